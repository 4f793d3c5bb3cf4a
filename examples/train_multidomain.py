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
    accelerate launch examples/train_multidomain.py --recipe paper-resnet --dataset /data/domains --ranks 1,10,50
    python examples/train_multidomain.py --recipe paper-clip --print_config   # each value and its source

Recipes (examples/recipes.py) set the paper's hyperparameters; a flag typed explicitly overrides the recipe. One
progress bar on a terminal, one line per finished job always; per-epoch metrics go to <output_dir>/epochs.jsonl
and, with --with_tracking, to TensorBoard. Flags, checkpoints and resuming: docs/training.md.

The FTN adapters of every domain are saved in one directory per rank and seed (`<output_dir>/ftn_r1/seed0`);
load them with `PeftModel.from_pretrained(backbone, "<dir>/<domain>", adapter_name=<domain>)` and `load_adapter`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import multidomain_data as data_lib  # noqa: E402
import multidomain_report as report_lib  # noqa: E402
import recipes  # noqa: E402
import safe_checkpoint  # noqa: E402
from progress import Progress  # noqa: E402

import ftn_peft  # noqa: E402  (registers FTN in PEFT)
import ftn_peft.auto  # noqa: E402
from ftn_peft import baselines, optim  # noqa: E402
from ftn_peft.metrics import load_accuracy  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Flags marked [recipe] default to the --recipe's value (examples/recipes.py); "
                                       "typing one overrides the recipe.")
    p.add_argument("--recipe", default="demo", help=f"named settings: one of {sorted(recipes.RECIPES)} (default: demo)")
    p.add_argument("--print_config", action="store_true", help="print the resolved settings and where each comes "
                   "from (typed, or the recipe and the paper's section), then exit")
    p.add_argument("--backbone", default=None, help='[recipe] "demo", a timm name (or timm "local-dir:<path>"), a HF '
                   'model id or a local save_pretrained dir')
    p.add_argument("--dataset", default="demo", help='"demo", a datasets name, or a dir with one imagefolder per domain')
    p.add_argument("--domains", default=None, help="a domains file (.yaml / .json: each domain's source, columns and "
                   "splits; docs/data.md), or a comma list of --dataset's domains; default: the demo's / every subdir")
    p.add_argument("--methods", default=None, help=f"[recipe] comma-separated, from {list(baselines.METHODS)}")
    p.add_argument("--ranks", default=None, help="[recipe] FTN ranks, comma-separated")
    p.add_argument("--lora_rank", type=int, default=1)
    p.add_argument("--ftn_targets", default=None, help='[recipe] FTN variants, comma-separated ftn_peft.auto_config '
                   'targets ("qv", "o", "convs", ...), one label each (ftn_qv_r4); empty: the backbone\'s preset')
    p.add_argument("--ftn_init", default=None, choices=["xavier", "gaussian", "zero"],
                   help="[recipe] FTN factor init: xavier (the paper's for convs), gaussian (for transformers), or "
                        "zero (ΔW = 0 at step 0, like LoRA)")
    p.add_argument("--ftn_init_std", type=float, default=None, help="[recipe] σ of the gaussian init")
    p.add_argument("--ftn_alpha", default=None, help='[recipe] ΔW scale alpha/r: "none", a number, or per '
                   'target "qv=10,o=100"')
    p.add_argument("--seeds", default=None, help="[recipe] comma-separated; each seed fixes split, init and order")
    p.add_argument("--seed", type=int, default=None, help="one seed (the same as --seeds N)")
    p.add_argument("--lr_grid", default=None, help="[recipe] multipliers of each method's lrs, picked on val")
    p.add_argument("--epochs", type=int, default=None, help="[recipe] epochs per job")
    p.add_argument("--max_train_steps", type=int, default=None, help="optimizer steps per job; overrides --epochs")
    p.add_argument("--batch_size", type=int, default=None, help="[recipe] per process")
    p.add_argument("--lr_scheduler", default=None, choices=["cosine", "constant"], help="[recipe] per job")
    p.add_argument("--factor_optimizer", default=None, choices=["adam", "sgd"],
                   help="overrides the recipe's optimizer of factor-like weights, for every method")
    p.add_argument("--factor_lr", type=float, default=None, help="overrides the recipe's factor lr, for every method")
    p.add_argument("--head_optimizer", default=None, choices=["adam", "sgd"],
                   help="overrides the recipe's optimizer of BatchNorm + head, for every method")
    p.add_argument("--head_lr", type=float, default=None,
                   help="overrides the recipe's BatchNorm + head lr, for every method")
    p.add_argument("--weight_decay", type=float, default=None, help="overrides the recipe's, for every method")
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum; overrides the recipe's")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--target_modules", default=None, help="FTN/LoRA targets: a comma list of layer names or a regex (default: presets for ResNets and CLIP, else "
                   "ftn_peft.auto_config)")
    p.add_argument("--head_module", default=None, help="name of the classifier Linear (default: found automatically)")
    p.add_argument("--image_size", type=int, default=None, help="input size for non-demo data (default: the model's "
                   "own, from timm's pretrained_cfg or the image processor; 224 without either)")
    p.add_argument("--backbone_weights", default=None, help="a local weights file for a timm --backbone (offline)")
    p.add_argument("--no_augment", action="store_true", help="no random resized crop / flip when training")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--output_dir", default="outputs/train_multidomain", help="ignored by git")
    p.add_argument("--cache_dir", default=None, help="where the demo's source model is cached")
    p.add_argument("--source_epochs", type=int, default=15, help="epochs of the demo's source model (cached)")
    p.add_argument("--checkpointing_steps", default=None,
                   help='save a resumable state every N optimizer steps (counted over the whole run), or "epoch"')
    p.add_argument("--resume_from_checkpoint", default=None, help='a checkpoint.json (or its directory), or "latest" in output_dir')
    p.add_argument("--with_tracking", action="store_true", help="log per-epoch metrics with the --report_to trackers")
    p.add_argument("--report_to", default="tensorboard", help='accelerate trackers: "tensorboard" (offline, in '
                   '<output_dir>/train_multidomain), "wandb", ..., or "all"')
    p.add_argument("--push_to_hub", action="store_true",
                   help="upload each FTN label's adapters (one repo per label and seed) with a model card")
    p.add_argument("--hub_model_id", default=None, help="repo id; default: the output dir's name; with several labels "
                   "or seeds, -<label>-seed<s> is appended")
    p.add_argument("--hub_token", default=None)
    p.add_argument("--hub_dry_run", action="store_true", help="stage the uploads in <output_dir>/hub_dry_run/<repo id> "
                   "instead of calling the Hub")
    p.add_argument("--stop_after_steps", type=int, default=None, help="exit after N optimizer steps (kill tests)")
    p.add_argument("--num_threads", type=int, default=None, help="torch threads per process (demo default: 1)")
    p.add_argument("--adapter_hash_file", default=None, help="each process writes the hash of its adapters here")
    return p


def _ints(flag: str, text: str, p) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        p.error(f"--{flag} {text!r}: expected comma-separated integers, e.g. 1,8")


def _alphas(text: str, targets: list, p) -> dict:
    """--ftn_alpha as {target: alpha or None}; "" is the preset's target."""
    text = str(text).strip()
    if text.lower() == "none":
        return {t: None for t in targets}
    try:
        if "=" not in text:
            return {t: float(text) for t in targets}
        given = {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        p.error(f'--ftn_alpha {text!r}: expected "none", a number, or target=number pairs like "qv=10,o=100"')
    missing = [t or "(preset)" for t in targets if t not in given]
    if missing:
        p.error(f"--ftn_alpha {text!r} gives no alpha for the FTN targets {missing}; add them or pass one number")
    return {t: given[t] for t in targets}


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    try:
        recipe = recipes.get(args.recipe)
    except ValueError as e:
        p.error(str(e))
    given = dict(vars(args))  # None: not typed
    values, args.config_sources = recipes.resolve(recipe, given)
    vars(args).update(values)
    args.config_values = dict(values)  # in command-line form, for --print_config
    if args.seed is not None:
        if given["seeds"] is not None:
            p.error("--seed and --seeds both given; pass one (--seed N is --seeds N)")
        args.seeds = args.config_values["seeds"] = str(args.seed)
        args.config_sources["seeds"] = "given (--seed)"
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(baselines.METHODS))
    if not args.methods:
        p.error(f"--methods is empty; choose from {list(baselines.METHODS)}")
    if unknown:
        p.error(f"--methods has unknown {unknown}; choose from {list(baselines.METHODS)}")
    args.ranks = _ints("ranks", args.ranks, p)
    args.seeds = _ints("seeds", args.seeds, p)
    args.lr_grid = [float(s) for s in args.lr_grid.split(",")]
    args.ftn_targets = [t.strip() for t in args.ftn_targets.split(",")] if args.ftn_targets.strip() else [""]
    bad = [t for t in args.ftn_targets if t and t not in ftn_peft.auto.TARGET_CHOICES]
    if bad:
        p.error(f"--ftn_targets has unknown {bad}; choose from {list(ftn_peft.auto.TARGET_CHOICES)} (empty: preset)")
    args.ftn_alpha = _alphas(args.ftn_alpha, args.ftn_targets, p)
    args.optimizers = {m: recipes.optimizers_for(recipe, m, given) for m in args.methods}
    for flag in ("epochs", "batch_size", "max_train_steps", "gradient_accumulation_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("factor_lr", "head_lr", "weight_decay", "momentum"):
        value = given[flag]
        if value is not None and (value < 0 or flag.endswith("lr") and value == 0):
            p.error(f"--{flag} must be {'> 0' if flag.endswith('lr') else '>= 0'}, got {value:g}")
    if args.checkpointing_steps is not None and args.checkpointing_steps != "epoch":
        if not args.checkpointing_steps.isdigit() or int(args.checkpointing_steps) < 1:
            p.error(f'--checkpointing_steps {args.checkpointing_steps!r}: expected a number of steps >= 1 or "epoch"')
        args.checkpointing_steps = int(args.checkpointing_steps)
    domains_file = str(args.domains or "").endswith((".yaml", ".yml", ".json"))
    if recipe.real_data and args.dataset == "demo" and not domains_file and not args.print_config:
        p.error(f"--recipe {recipe.name} is the paper's setting for real images; pass your data (--dataset, or a "
                "domains file as --domains), or use --recipe demo for the built-in digits")
    if args.push_to_hub and "ftn" not in args.methods:
        p.error("--push_to_hub uploads FTN adapters, but --methods has no ftn")
    args.hub_model_id = args.hub_model_id or Path(args.output_dir).resolve().name
    return args


def print_config(args) -> None:
    for dest, source in args.config_sources.items():
        print(f"--{dest} {args.config_values[dest]}    # {source}")
    for method, o in args.optimizers.items():
        print(f"{method}: factors {o.factor_optimizer} lr {o.factor_lr:g}, head {o.head_optimizer} lr {o.head_lr:g}, "
              f"weight decay {o.weight_decay:g}, momentum {o.momentum:g}")


def method_labels(args) -> list[tuple[str, str, int, str]]:
    """(label, method, rank, FTN targets) for every model the run trains per domain."""
    out = []
    for method in args.methods:
        if method == "ftn":
            out += [(f"ftn_{t}_r{r}" if t else f"ftn_r{r}", "ftn", r, t) for t in args.ftn_targets for r in args.ranks]
        elif method == "lora":
            out.append((f"lora_r{args.lora_rank}", "lora", args.lora_rank, ""))
        else:
            out.append((method, method, 0, ""))
    return out


# ------------------------------------------------------------------------------------------------ training
class EpochSamples(Dataset):
    """`dataset` with its random augmentation seeded per sample: sample i of epoch e draws from (seed, e, i) only.

    So a resumed run (which skips the batches it already trained on) and a run with another number of workers or
    processes transform every image exactly as an uninterrupted run does. The caller's random states are restored.
    """

    def __init__(self, dataset, seed: int, epoch: int):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        state = np.random.SeedSequence([self.seed, self.epoch, int(i)]).generate_state(2)
        saved = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(state[0]))
            random.seed(int(state[1]))
            np.random.seed(int(state[1]))
            try:
                return self.dataset[i]
            finally:
                random.setstate(saved[0])
                np.random.set_state(saved[1])


def epoch_loader(dataset, batch_size: int, seed: int, epoch: int, num_workers: int = 0) -> DataLoader:
    """The epoch's batches: the order depends only on (seed, epoch), so a resumed run sees exactly the batches the
    killed run would have (it skips the first ones with accelerate's `skip_first_batches`)."""
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise TypeError(f"the training split is a {type(dataset).__name__} without a length; train_multidomain.py "
                        "needs a map-style Dataset (__len__ and __getitem__), so that it can order and resume epochs")
    g = torch.Generator().manual_seed(seed * 10_007 + epoch)
    order = torch.randperm(len(dataset), generator=g).tolist()
    if not isinstance(dataset, TensorDataset):  # indexing stored tensors draws no random numbers
        dataset = EpochSamples(dataset, seed, epoch)
    # generator: the loader draws its workers' base seed from it, not from the global generator, which a resumed
    # run restores for the model's own random layers (dropout) and which must not depend on where the loader began
    return DataLoader(dataset, batch_size=batch_size, sampler=order, shuffle=False, num_workers=num_workers,
                      generator=g)


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
def accuracy(accelerator, model, dataset, batch_size: int, num_workers: int = 0) -> float:
    model.eval()
    loader = accelerator.prepare_data_loader(DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                                        generator=torch.Generator()))  # leaves the global one alone
    metric = load_accuracy()
    for x, y in loader:
        logits = data_lib.logits_of(model(x))
        preds, refs = accelerator.gather_for_metrics((logits.argmax(-1), y))
        metric.add_batch(predictions=preds.tolist(), references=refs.tolist())
    return metric.compute()["accuracy"]


OPTIMIZERS = {
    "adam": lambda params, lr, o: torch.optim.Adam(params, lr=lr, weight_decay=o.weight_decay),
    "sgd": lambda params, lr, o: torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay),
}


def make_optimizer(model, o: recipes.Optimizers, lr_scale: float, steps: int, schedule: str):
    """The recipe's optimizer per parameter group (factor-like / BatchNorm + head), as one optimizer, and the
    schedule over `steps` optimizer steps."""
    factors, heads = optim.split_parameters(model)
    parts = [OPTIMIZERS[name](params, lr * lr_scale, o)
             for params, name, lr in ((factors, o.factor_optimizer, o.factor_lr), (heads, o.head_optimizer, o.head_lr))
             if params]
    optimizer = optim.CombinedOptimizer(parts)
    if schedule == "cosine":
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def steps_per_epoch(args, accelerator, dataset) -> int:
    batches = math.ceil(len(dataset) / (args.batch_size * accelerator.num_processes))  # per process, even_batches
    return math.ceil(batches / args.gradient_accumulation_steps)


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train_job(accelerator, args, job, model, domain, state, progress) -> tuple[dict, object]:
    """Train `model` on one domain; `state` carries the global step and an optional checkpoint to resume from."""
    per_epoch = steps_per_epoch(args, accelerator, domain.train)
    total_steps = args.max_train_steps or args.epochs * per_epoch
    epochs = math.ceil(total_steps / per_epoch)
    optimizer, scheduler = make_optimizer(model, args.optimizers[job["method"]], job["lr_scale"], total_steps,
                                          args.lr_scheduler)
    # The scheduler is not prepared: it is stepped once per optimizer step, however many processes there are.
    model, optimizer = accelerator.prepare(model, optimizer)
    step, resume = 0, state.pop("resume", None)
    if resume is not None:
        accelerator.unwrap_model(model).load_state_dict(resume["model"], strict=False)
        optimizer.optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        set_rng_state(resume["rng"])  # dropout and other random layers continue as if never stopped
        step = resume["step"]
    val, val_step = None, None
    for epoch in range(step // per_epoch, epochs):
        if step >= total_steps:  # resumed from a checkpoint at the last step
            break
        model.train()
        loader = accelerator.prepare_data_loader(
            epoch_loader(domain.train, args.batch_size, job["seed"], epoch, args.num_workers))
        skip = (step - epoch * per_epoch) * args.gradient_accumulation_steps
        loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        total, count, correct, seen = 0.0, 0, 0, 0
        for x, y in loader:
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
                progress.step(step, total_steps)
                maybe_checkpoint(accelerator, args, job, model, optimizer, scheduler, step, state)
                if step >= total_steps:
                    break
        val, val_step = accuracy(accelerator, model, domain.val, 256, args.num_workers), step
        # Training loss and accuracy of this process's batches (as seen during the epoch, no extra pass).
        metrics = {"epoch": epoch, "step": step, "train_loss": total / max(count, 1),
                   "train_acc": correct / max(seen, 1), "val_acc": val, "lr": scheduler.get_last_lr()[0]}
        log_epoch(accelerator, args, job, metrics)
        maybe_checkpoint(accelerator, args, job, model, optimizer, scheduler, step, state, epoch_end=True)
    if val_step != step:  # resumed after the last step, before the last evaluation
        val = accuracy(accelerator, model, domain.val, 256, args.num_workers)
    test = accuracy(accelerator, model, domain.test, 256, args.num_workers)
    if args.with_tracking:
        accelerator.log({f"{job['key']}/test_acc": test}, step=step)
    result = dict(job, val=val, test=test, optimizer_steps=step)
    return result, accelerator.unwrap_model(model)


def log_epoch(accelerator, args, job, metrics: dict) -> None:
    """Per-epoch metrics: to the trackers (--with_tracking) and always to <output_dir>/epochs.jsonl."""
    if args.with_tracking:
        accelerator.log({f"{job['key']}/{k}": v for k, v in metrics.items() if k not in ("epoch", "step")},
                        step=metrics["step"])
    if accelerator.is_main_process:
        with open(Path(args.output_dir) / "epochs.jsonl", "a") as f:
            f.write(json.dumps({"key": job["key"], **metrics}) + "\n")


def maybe_checkpoint(accelerator, args, job, model, optimizer, scheduler, step, state, epoch_end=False) -> None:
    """Called after every optimizer step and at the end of every epoch (after its evaluation)."""
    every = args.checkpointing_steps
    if every == "epoch" and epoch_end or isinstance(every, int) and not epoch_end and state["global_step"] % every == 0:
        ckpt = {"job": job["key"], "step": step, "global_step": state["global_step"], "rng": rng_state(),
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
        targets = job.get("targets", "")
        if targets:
            config = ftn_peft.auto_config(source, r=job["rank"], targets=targets, num_classes=domain.num_classes,
                                          init_weights=init, head=spec.head_module, task_batchnorm=spec.has_batchnorm)
        else:
            config = spec.ftn_config(job["rank"], domain.num_classes, init)
        # replace() runs FTNConfig's checks on the new values
        config = dataclasses.replace(config, alpha=args.ftn_alpha[targets], init_std=args.ftn_init_std)
        return get_peft_model(copy.deepcopy(source), config, adapter_name=domain.name)
    return baselines.build(job["method"], source, domain.num_classes, r=job["rank"],
                           head_module=spec.head_module, target_modules=spec.target_modules)


def run_job(accelerator, args, job, source, domain, spec, state, progress) -> dict:
    model = build_model(args, job, source, domain, spec)
    trainable = baselines.trainable_parameters(model)
    result, model = train_job(accelerator, args, job, model, domain, state, progress)
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


def count_jobs(args, domains) -> int:
    """Jobs of run_grid: per label and domain, every lr of the grid on the first seed, then one per other seed."""
    return len(method_labels(args)) * len(domains) * (len(args.lr_grid) + len(args.seeds) - 1)


def run_grid(accelerator, args, domains, spec, progress) -> list[dict]:
    """LR picked per (method, domain) on the first seed's val split; then the other seeds at that LR."""
    done, resume = load_done(args)
    state = {"global_step": 0}
    results = []
    for label, method, rank, targets in method_labels(args):
        for domain_name in domains:
            chosen = None
            for seed in args.seeds:
                domain = spec.domain(domain_name, seed)
                scales = args.lr_grid if chosen is None else [chosen]
                trials = []
                for scale in scales:
                    key = f"{label}/seed{seed}/{domain_name}/lr{scale:g}"
                    job = dict(key=key, label=label, method=method, rank=rank, domain=domain_name,
                               seed=seed, lr_scale=scale, targets=targets)
                    if key in done:
                        trials.append(done[key])
                        progress.skip(job)
                        continue
                    if resume is not None and resume["job"] == key:
                        state["resume"], state["global_step"] = resume, resume["global_step"]
                    progress.start(job)
                    result = run_job(accelerator, args, job, spec.source_for(seed), domain, spec, state, progress)
                    progress.finish(job, f"val {100 * result['val']:.1f} %, test {100 * result['test']:.1f} %, "
                                         f"{result['optimizer_steps']} steps")
                    if accelerator.is_main_process:
                        with open(Path(args.output_dir) / "results.jsonl", "a") as f:
                            f.write(json.dumps(result) + "\n")
                    trials.append(result)
                best = max(trials, key=lambda r: (r["val"], -abs(math.log(r["lr_scale"]))))
                chosen = best["lr_scale"]
                results.append(dict(best, selected=True))
    return results


def assemble_adapters(accelerator, args, spec, results) -> list[tuple[str, int, Path]]:
    """Load every domain's selected FTN adapter onto one backbone and save them in one directory per label and
    seed; returns (label, seed, directory) of each."""
    from peft import PeftModel

    saved = []
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
        saved.append((label, seed, out))
    return saved


class DryRunHub:
    """Stands in for huggingface_hub.HfApi under --hub_dry_run: the upload is copied to a local folder."""

    def __init__(self, root: Path):
        self.root = root

    def create_repo(self, repo_id, private=None, exist_ok=False):
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)

    def upload_folder(self, repo_id, folder_path, commit_message=""):
        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)
        return (self.root / repo_id).resolve().as_uri()


def push_adapters(args, saved) -> None:
    from ftn_peft import hub

    api = DryRunHub(Path(args.output_dir) / "hub_dry_run") if args.hub_dry_run else None
    for label, seed, folder in saved:
        repo = args.hub_model_id if len(saved) == 1 else f"{args.hub_model_id}-{label}-seed{seed}"
        url = hub.push_to_hub(folder, repo, token=args.hub_token, api=api,
                              commit_message=f"FTN adapters {label}, seed {seed}")
        print(f"pushed {folder} to {repo}: {url}")


def tracker_config(args) -> dict:
    # TensorBoard's hparams take numbers, strings and booleans only
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()
            if k not in ("config_sources", "config_values", "hub_token")}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.print_config:
        print_config(args)
        return
    if args.num_threads or args.backbone == "demo":
        # The demo's tensors are tiny: extra threads only add synchronization (and fight other processes).
        torch.set_num_threads(args.num_threads or 1)
    accelerator = Accelerator(mixed_precision=args.mixed_precision,
                              gradient_accumulation_steps=args.gradient_accumulation_steps,
                              log_with=args.report_to if args.with_tracking else None, project_dir=args.output_dir)
    start = time.time()
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    if args.with_tracking:
        accelerator.init_trackers("train_multidomain", config=tracker_config(args))
    with accelerator.main_process_first():  # the main process trains and caches the demo source models
        spec = data_lib.load_spec(args)
        for seed in args.seeds:
            spec.source_for(seed)
    accelerator.wait_for_everyone()
    domains = spec.domain_names
    accelerator.print(f"backbone {args.backbone}: {spec.backbone_params:,} params; domains {domains}")
    progress = Progress(count_jobs(args, domains), enabled=accelerator.is_main_process)
    try:
        results = run_grid(accelerator, args, domains, spec, progress)
    finally:
        progress.close()
    accelerator.wait_for_everyone()  # every process reads the adapters the main process wrote
    saved = assemble_adapters(accelerator, args, spec, results)
    if accelerator.is_main_process:
        table = report_lib.write_outputs(results, spec.backbone_params, args.output_dir)
        print(table)
        if args.push_to_hub:
            push_adapters(args, saved)
        print(f"\nwall time {time.time() - start:.0f} s; outputs in {args.output_dir}/")
    accelerator.end_training()


if __name__ == "__main__":
    main()
