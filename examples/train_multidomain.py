"""Learn several domains on one frozen backbone with FTN, and compare with the paper's baselines.

With no arguments this runs the built-in demo: a tiny ResNet pretrained on half of scikit-learn's 8x8 digits
(trained once, cached) and target domains made from the other half (ftn_peft/demo/digits.py). For each method and
domain, the learning rate is picked on a validation split of the first seed (never on test), then every seed is
trained with it; the table reports test top-1 as mean ± std over seeds. In the demo each seed also has its own
source model (pretrained with that seed), so the spread covers the pretrained backbone too.

    python examples/train_multidomain.py                                   # the demo, prints the table
    accelerate launch examples/train_multidomain.py                        # one or many GPUs
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/train_multidomain.py  # 2 CPU procs
    python examples/train_multidomain.py --backbone resnet50 --dataset /data/domains --domains sketch,clipart

The FTN adapters of every domain are saved in one directory per rank and seed (`<output_dir>/ftn_r1/seed0`);
load them with `PeftModel.from_pretrained(backbone, "<dir>/<domain>", adapter_name=<domain>)` and `load_adapter`.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import multidomain_data as data_lib  # noqa: E402
import multidomain_report as report_lib  # noqa: E402
import safe_checkpoint  # noqa: E402

import ftn_peft  # noqa: E402,F401  (registers FTN in PEFT)
from ftn_peft import baselines, optim  # noqa: E402
from ftn_peft.metrics import load_accuracy  # noqa: E402

# Base learning rates (factor-like params with Adam, BatchNorm + head with SGD); the grid multiplies both.
BASE_LR = {
    "ftn": (5e-3, 5e-2),  # the paper's Adam lr for factors; SGD lr raised for runs of tens of steps
    "lora": (5e-3, 5e-2),
    "finetune": (1e-3, 5e-2),
    "feature_extractor": (5e-3, 5e-2),
    "bn_head": (5e-3, 5e-2),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="demo", help='"demo", a timm name (or timm "local-dir:<path>"), a HF model id or a '
                   'local save_pretrained dir')
    p.add_argument("--dataset", default="demo", help='"demo", a datasets name, or a dir with one imagefolder per domain')
    p.add_argument("--domains", default=None, help="comma-separated; default: the demo's domains / every subdir")
    p.add_argument("--methods", default="ftn,finetune,feature_extractor,bn_head,lora")
    p.add_argument("--ranks", default="1,8", help="FTN ranks, comma-separated")
    p.add_argument("--lora_rank", type=int, default=1)
    p.add_argument("--ftn_init", default="xavier", choices=["xavier", "gaussian", "zero"],
                   help="FTN factor init: the paper's xavier (default), gaussian, or zero (ΔW = 0 at step 0, like LoRA)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--lr_grid", default="0.5,2", help="multipliers of each method's base lrs, picked on val")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=64, help="per process")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--target_modules", default=None, help="FTN/LoRA targets: a comma list of layer names or a regex (default: presets for ResNets and CLIP, else "
                   "ftn_peft.auto_config)")
    p.add_argument("--head_module", default=None, help="name of the classifier Linear (default: found automatically)")
    p.add_argument("--image_size", type=int, default=224, help="for non-demo data without a processor")
    p.add_argument("--output_dir", default="outputs/train_multidomain", help="ignored by git")
    p.add_argument("--cache_dir", default=None, help="where the demo's source model is cached")
    p.add_argument("--source_epochs", type=int, default=15, help="epochs of the demo's source model (cached)")
    p.add_argument("--checkpointing_steps", type=int, default=None, help="save a resumable state every N steps")
    p.add_argument("--resume_from_checkpoint", default=None, help='a checkpoint.json (or its directory), or "latest" in output_dir')
    p.add_argument("--stop_after_steps", type=int, default=None, help="exit after N optimizer steps (kill tests)")
    p.add_argument("--num_threads", type=int, default=None, help="torch threads per process (demo default: 1)")
    p.add_argument("--adapter_hash_file", default=None, help="each process writes the hash of its adapters here")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(baselines.METHODS))
    if unknown:
        p.error(f"--methods has unknown {unknown}; choose from {list(baselines.METHODS)}")
    args.ranks = [int(r) for r in args.ranks.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.lr_grid = [float(s) for s in args.lr_grid.split(",")]
    return args


def method_labels(args) -> list[tuple[str, str, int]]:
    """(label, method, rank) for every model the run trains per domain."""
    out = []
    for method in args.methods:
        if method == "ftn":
            out += [(f"ftn_r{r}", "ftn", r) for r in args.ranks]
        elif method == "lora":
            out.append((f"lora_r{args.lora_rank}", "lora", args.lora_rank))
        else:
            out.append((method, method, 0))
    return out


# ------------------------------------------------------------------------------------------------ training
def epoch_loader(dataset, batch_size: int, seed: int, epoch: int) -> DataLoader:
    # The order depends only on (seed, epoch), so a resumed run sees exactly the batches the killed run would have.
    g = torch.Generator().manual_seed(seed * 10_007 + epoch)
    order = torch.randperm(len(dataset), generator=g).tolist()
    return DataLoader(Subset(dataset, order), batch_size=batch_size, shuffle=False)


def trainable_state(model) -> dict:
    """Every trained tensor, plus BatchNorm statistics (buffers of modules that have trainable params)."""
    state = {}
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            for k, v in module.state_dict(keep_vars=False).items():
                if "." not in k:
                    state[f"{name}.{k}" if name else k] = v.detach().cpu().clone()
    return state


def state_hash(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].float().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def accuracy(accelerator, model, dataset, batch_size: int) -> float:
    model.eval()
    loader = accelerator.prepare_data_loader(DataLoader(dataset, batch_size=batch_size))
    metric = load_accuracy()
    for x, y in loader:
        logits = data_lib.logits_of(model(x))
        preds, refs = accelerator.gather_for_metrics((logits.argmax(-1), y))
        metric.add_batch(predictions=preds.tolist(), references=refs.tolist())
    return metric.compute()["accuracy"]


def train_job(accelerator, args, job, model, domain, state) -> dict:
    """Train `model` on one domain; `state` carries the global step and an optional checkpoint to resume from."""
    factor_lr, head_lr = (lr * job["lr_scale"] for lr in BASE_LR[job["method"]])
    per_epoch = math.ceil(math.ceil(len(domain.train) / (args.batch_size * accelerator.num_processes))
                          / args.gradient_accumulation_steps)
    optimizer, scheduler = optim.create_optimizer_and_scheduler(
        model, num_training_steps=args.epochs * per_epoch, factor_lr=factor_lr, head_lr=head_lr
    )
    # The scheduler is not prepared: it is stepped once per optimizer step, however many processes there are.
    model, optimizer = accelerator.prepare(model, optimizer)
    step, resume = 0, state.pop("resume", None)
    if resume is not None:
        accelerator.unwrap_model(model).load_state_dict(resume["model"], strict=False)
        optimizer.optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        step = resume["step"]
    for epoch in range(step // per_epoch, args.epochs):
        model.train()
        loader = accelerator.prepare_data_loader(epoch_loader(domain.train, args.batch_size, job["seed"], epoch))
        skip = (step - epoch * per_epoch) * args.gradient_accumulation_steps
        loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        total, count, correct, seen = 0.0, 0, 0, 0
        for x, y in tqdm(loader, desc=f"{job['key']} ep{epoch}", leave=False,
                         disable=not accelerator.is_local_main_process or not sys.stderr.isatty()):
            with accelerator.accumulate(model):
                logits = data_lib.logits_of(model(x))
                loss = F.cross_entropy(logits, y)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            total, count = total + loss.item(), count + 1
            correct, seen = correct + int((logits.argmax(-1) == y).sum()), seen + len(y)
            if accelerator.sync_gradients:
                scheduler.step()
                step += 1
                state["global_step"] += 1
                maybe_checkpoint(accelerator, args, job, model, optimizer, scheduler, step, state)
        # Training loss and accuracy of this process's batches (as seen during the epoch, no extra pass).
        accelerator.print(f"  {job['key']} epoch {epoch}: loss {total / max(count, 1):.4f} "
                          f"train_acc {correct / max(seen, 1):.4f}")
    result = dict(job, val=accuracy(accelerator, model, domain.val, 256),
                  test=accuracy(accelerator, model, domain.test, 256), optimizer_steps=step)
    return result, accelerator.unwrap_model(model)


def maybe_checkpoint(accelerator, args, job, model, optimizer, scheduler, step, state) -> None:
    if args.checkpointing_steps and state["global_step"] % args.checkpointing_steps == 0:
        ckpt = {"job": job["key"], "step": step, "global_step": state["global_step"],
                "model": trainable_state(accelerator.unwrap_model(model)),
                "optimizer": optimizer.optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # safetensors + JSON, never a pickle: loading a checkpoint cannot run code. A kill during the save
            # leaves the previous checkpoint whole (checkpoint.json is replaced last).
            safe_checkpoint.save_checkpoint(ckpt, args.output_dir, tag=state["global_step"])
    if args.stop_after_steps and state["global_step"] >= args.stop_after_steps:
        accelerator.print(f"stopping after {state['global_step']} steps (--stop_after_steps)")
        accelerator.wait_for_everyone()
        sys.exit(3)


# ------------------------------------------------------------------------------------------------ the run
def build_model(args, job, source, domain, spec):
    set_seed(job["seed"])  # the seed also fixes the new head's and the factors' initialization
    if job["method"] == "ftn":
        from peft import get_peft_model

        init = True if args.ftn_init == "zero" else args.ftn_init
        return get_peft_model(copy.deepcopy(source), spec.ftn_config(job["rank"], domain.num_classes, init),
                              adapter_name=domain.name)
    return baselines.build(job["method"], source, domain.num_classes, r=job["rank"],
                           head_module=spec.head_module, target_modules=spec.target_modules)


def run_job(accelerator, args, job, source, domain, spec, state) -> dict:
    model = build_model(args, job, source, domain, spec)
    trainable = baselines.trainable_parameters(model)
    result, model = train_job(accelerator, args, job, model, domain, state)
    result["trainable"] = trainable
    if job["method"] == "ftn":
        adapter_dir = Path(args.output_dir) / "runs" / job["key"]
        model.save_pretrained(str(adapter_dir), is_main_process=accelerator.is_main_process)
        if args.adapter_hash_file:
            with open(f"{args.adapter_hash_file}.rank{accelerator.process_index}", "a") as f:
                f.write(f"{job['key']} {state_hash(trainable_state(model))}\n")
    accelerator.free_memory()
    return result


def load_done(args) -> tuple[dict, dict | None]:
    done, resume = {}, None
    results = Path(args.output_dir) / "results.jsonl"
    if args.resume_from_checkpoint and results.exists():
        done = {r["key"]: r for r in map(json.loads, results.read_text().splitlines())}
    if args.resume_from_checkpoint == "latest":
        path = safe_checkpoint.find_checkpoint(args.output_dir)  # refuses a planted pickle (checkpoint.pt)
        resume = None if path is None else safe_checkpoint.load_checkpoint(path)
    elif args.resume_from_checkpoint:
        resume = safe_checkpoint.load_checkpoint(args.resume_from_checkpoint)
    return done, resume


def run_grid(accelerator, args, domains, spec) -> list[dict]:
    """LR picked per (method, domain) on the first seed's val split; then the other seeds at that LR."""
    done, resume = load_done(args)
    state = {"global_step": 0}
    results = []
    for label, method, rank in method_labels(args):
        for domain_name in domains:
            chosen = None
            for seed in args.seeds:
                domain = spec.domain(domain_name, seed)
                scales = args.lr_grid if chosen is None else [chosen]
                trials = []
                for scale in scales:
                    key = f"{label}/seed{seed}/{domain_name}/lr{scale:g}"
                    job = dict(key=key, label=label, method=method, rank=rank, domain=domain_name,
                               seed=seed, lr_scale=scale)
                    if key in done:
                        trials.append(done[key])
                        continue
                    if resume is not None and resume["job"] == key:
                        state["resume"], state["global_step"] = resume, resume["global_step"]
                    result = run_job(accelerator, args, job, spec.source_for(seed), domain, spec, state)
                    if accelerator.is_main_process:
                        with open(Path(args.output_dir) / "results.jsonl", "a") as f:
                            f.write(json.dumps(result) + "\n")
                    trials.append(result)
                best = max(trials, key=lambda r: (r["val"], -abs(math.log(r["lr_scale"]))))
                chosen = best["lr_scale"]
                results.append(dict(best, selected=True))
    return results


def assemble_adapters(accelerator, args, spec, results) -> None:
    """Load every domain's selected FTN adapter onto one backbone and save them in one directory."""
    from peft import PeftModel

    for (label, seed), group in report_lib.group_by(results, ("label", "seed")).items():
        if not group or group[0]["method"] != "ftn":
            continue
        model = None
        for r in group:
            src = Path(args.output_dir) / "runs" / r["key"] / r["domain"]  # PEFT saves non-default adapters in a subdir
            if model is None:
                model = PeftModel.from_pretrained(copy.deepcopy(spec.source_for(seed)), str(src), adapter_name=r["domain"])
            else:
                model.load_adapter(str(src), adapter_name=r["domain"])
        out = Path(args.output_dir) / label / f"seed{seed}"
        model.save_pretrained(str(out), is_main_process=accelerator.is_main_process)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.num_threads or args.backbone == "demo":
        # The demo's tensors are tiny: extra threads only add synchronization (and fight other processes).
        torch.set_num_threads(args.num_threads or 1)
    accelerator = Accelerator(mixed_precision=args.mixed_precision,
                              gradient_accumulation_steps=args.gradient_accumulation_steps)
    start = time.time()
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    with accelerator.main_process_first():  # the main process trains and caches the demo source models
        spec = data_lib.load_spec(args)
        for seed in args.seeds:
            spec.source_for(seed)
    accelerator.wait_for_everyone()
    domains = spec.domain_names
    accelerator.print(f"backbone {args.backbone}: {spec.backbone_params:,} params; domains {domains}")
    results = run_grid(accelerator, args, domains, spec)
    accelerator.wait_for_everyone()  # every process reads the adapters the main process wrote
    assemble_adapters(accelerator, args, spec, results)
    if accelerator.is_main_process:
        table = report_lib.write_outputs(results, spec.backbone_params, args.output_dir)
        print(table)
        print(f"\nwall time {time.time() - start:.0f} s; outputs in {args.output_dir}/")
    accelerator.end_training()


if __name__ == "__main__":
    main()
