"""Multi-task dense prediction (semantic segmentation, depth, surface normals, edges) on one frozen encoder.

Each task is an FTN adapter: rank-r factors on the encoder's convs, task BatchNorm and its own DeepLabv3+ decoder;
compared with fine-tuning (one network per task), a feature extractor (frozen encoder, trained decoders) and
BatchNorm + decoder, the methods of the paper's NYUD table. Prints mean ± std over seeds of mIoU, depth RMSE,
normals mean angular error and edge odsF, the parameters per task and the "Params" multiple of the encoder, and
draws a few test predictions.

    python examples/train_dense.py                                   # built-in procedural scenes (no download)
    python examples/train_dense.py --dataset /data/NYUD_MT --recipe paper          # NYUD-v2, layout in dense_data.py
    accelerate launch examples/train_dense.py --dataset /data/NYUD_MT --recipe paper   # one or many GPUs

With no arguments the encoder is a tiny ResNet pretrained on source scenes (cached in ~/.cache/ftn_peft), the
images are 32 px and every method is trained with Adam for 8 epochs of 160 scenes; a per-pixel mean / majority
predictor (no image) is the row to beat. 3 seeds: 230 s of CPU time, 5.5 min wall on a busy 2-core machine
(docs/dense.md). `--recipe paper` is the paper's NYUD
recipe: SGD, lr 0.005, momentum 0.9, weight decay 1e-4, polynomial decay, batch 8, 60 epochs, random scaling 0.5-2,
flips and 425×560 crops, an ImageNet ResNet-18 (`--encoder_weights imagenet` downloads it through timm); the FTN
factors use Adam at the paper's factor lr 0.005. The FTN adapters of each rank and seed are saved together
(`<output_dir>/ftn_r<r>/seed<s>/<task>`); load them with `PeftModel.from_pretrained` and `load_adapter`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import textwrap
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dense_data  # noqa: E402

import ftn_peft  # noqa: E402  (registers FTN in PEFT)
from ftn_peft import dense, optim  # noqa: E402
from ftn_peft.demo import scenes  # noqa: E402
from ftn_peft.metrics.dense import ODSF, DepthRMSE, MeanAngularError, MeanIoU  # noqa: E402

TASK_LABELS = {"semseg": "SemSeg mIoU ↑", "depth": "Depth RMSE ↓", "normals": "Normals mErr ↓",
               "edges": "Edge odsF ↑"}
METHOD_LABELS = {"mean": "Mean / majority per pixel (no image)", "finetune": "Fine-tuning (one network per task)",
                 "feature_extractor": "Feature extractor (decoder only)", "bn_decoder": "BatchNorm + decoder"}
# "mean" is the trivial predictor every method must beat: per pixel, the training set's majority class, mean depth,
# mean normal and edge frequency, whatever the image.
DEMO_METHODS, NYUD_METHODS = "mean,finetune,feature_extractor,bn_decoder,ftn", "finetune,feature_extractor,bn_decoder,ftn"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="demo", help='"demo", a NYUD-v2 directory, or a datasets name (streamed)')
    p.add_argument("--recipe", default="demo", choices=["demo", "paper"], help="training recipe (see above)")
    p.add_argument("--methods", default=None, help=f"default: demo {DEMO_METHODS}; NYUD {NYUD_METHODS}")
    p.add_argument("--ranks", default="1,10,30", help="FTN ranks (paper: 1,10,20,30)")
    p.add_argument("--tasks", default="semseg,depth,normals,edges")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=None, help="default: demo 8, paper 60")
    p.add_argument("--batch_size", type=int, default=None, help="per process; default: demo 16, paper 8")
    p.add_argument("--lr", type=float, default=None, help="decoder / BatchNorm / fine-tuning lr; demo 4e-3 (Adam), "
                   "paper 0.005 (SGD)")
    p.add_argument("--factor_lr", type=float, default=5e-3, help="Adam lr of the FTN factors (paper: 0.005)")
    p.add_argument("--train_size", type=int, default=160, help="demo: training scenes per seed")
    p.add_argument("--test_size", type=int, default=96, help="demo: test scenes per seed")
    p.add_argument("--image_size", type=int, default=scenes.IMAGE_SIZE, help="demo: scene size in pixels")
    p.add_argument("--source_scenes", type=int, default=384, help="demo: source scenes for the cached encoder")
    p.add_argument("--source_epochs", type=int, default=8, help="demo: epochs of the cached encoder")
    p.add_argument("--cache_dir", default=None, help="demo: where the source encoder is cached")
    p.add_argument("--encoder", default="resnet18", help="timm encoder for NYUD")
    p.add_argument("--encoder_weights", default="imagenet", help='NYUD: "imagenet" (timm download), "none", or a '
                   "safetensors file of the encoder's state dict")
    p.add_argument("--crop_size", type=int, nargs=2, default=(425, 560))
    p.add_argument("--num_classes", type=int, default=40)
    p.add_argument("--seg_void_zero", type=int, default=1, help="NYUD: label 0 is void and 1..C become 0..C-1")
    p.add_argument("--train_split", default="train")
    p.add_argument("--test_split", default="val")
    p.add_argument("--stream_samples", type=int, default=795, help="training samples of a streamed data set")
    p.add_argument("--edge_tolerance", type=float, default=None, help="odsF matching tolerance in pixels; default: "
                   "1 for the demo, 0.0075 × the image diagonal (as BSDS) otherwise")
    p.add_argument("--show", type=int, default=3, help="test images drawn in predictions.png")
    p.add_argument("--num_threads", type=int, default=None)
    p.add_argument("--output_dir", default="outputs/train_dense", help="ignored by git")
    args = p.parse_args(argv)
    paper = args.recipe == "paper"
    args.epochs = args.epochs or (60 if paper else 8)
    args.batch_size = args.batch_size or (8 if paper else 16)
    args.lr = args.lr or (5e-3 if paper else 4e-3)
    methods = args.methods or (DEMO_METHODS if args.dataset == "demo" else NYUD_METHODS)
    args.methods = [m.strip() for m in methods.split(",") if m.strip()]
    known = ["mean", *dense.BASELINES, "ftn"]
    unknown = sorted(set(args.methods) - set(known))
    if unknown:
        p.error(f"--methods has unknown {unknown}; choose from {known}")
    args.ranks = [int(r) for r in args.ranks.split(",")]
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if set(args.tasks) - set(TASK_LABELS):
        p.error(f"--tasks must be among {list(TASK_LABELS)}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    return args


# ------------------------------------------------------------------------------------------------ losses, metrics
# The depth head predicts normalized depth: a fresh output layer starts near 0, and in metres that is several metres
# off, which an L1 loss at the demo's learning rate does not close in a few hundred steps (RMSE ≈ 4 m, worse than
# predicting the mean). Both the demo's depths (up to 10 m) and NYUD's (0.5–10 m) are centred with these.
DEPTH_SHIFT, DEPTH_SCALE = 3.0, 2.0


def depth_in_metres(out: torch.Tensor) -> torch.Tensor:
    return DEPTH_SHIFT + DEPTH_SCALE * out


def loss_fn(task: str, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if task == "semseg":
        return F.cross_entropy(out, target, ignore_index=255)
    if task == "depth":
        valid = target > 0
        return F.l1_loss(depth_in_metres(out)[valid], target[valid])
    if task == "normals":
        valid = (target.norm(dim=1, keepdim=True) > 0).expand_as(target)
        return F.l1_loss(F.normalize(out, dim=1)[valid], target[valid])
    # edges: weighted binary cross-entropy (positives 0.95, as in the multi-task NYUD literature): edges are rare
    weight = torch.where(target > 0.5, 0.95, 0.05)
    return F.binary_cross_entropy_with_logits(out, target, weight=weight, reduction="sum") / weight.sum()


EVAL_SECONDS = [0.0]  # time spent in evaluate(), for the closing summary


def new_metric(task: str, num_classes: int, tolerance: float):
    # Every process updates with the gathered batches, so no torchmetrics synchronization on top.
    kwargs = dict(sync_on_compute=False)
    return {"semseg": lambda: MeanIoU(num_classes, **kwargs), "depth": lambda: DepthRMSE(**kwargs),
            "normals": lambda: MeanAngularError(**kwargs), "edges": lambda: ODSF(tolerance, **kwargs)}[task]()


def as_map(task: str, out: torch.Tensor) -> torch.Tensor:
    """A prediction as the metric takes it (and as drawn)."""
    return {"semseg": lambda o: o.argmax(1), "depth": depth_in_metres, "normals": lambda o: F.normalize(o, dim=1),
            "edges": torch.sigmoid}[task](out.float())


# ------------------------------------------------------------------------------------------------ models
def source_model(args, seed: int):
    if args.dataset == "demo":
        return scenes.load_source_model(args.cache_dir, seed=0, scenes=args.source_scenes, epochs=args.source_epochs,
                                        size=args.image_size)
    set_seed(seed)
    weights = args.encoder_weights
    model = dense.build_model(args.encoder, pretrained=weights == "imagenet")
    if weights not in ("imagenet", "none"):
        from safetensors.torch import load_file

        model.encoder.load_state_dict(load_file(weights))
    return model


def optimizer_for(args, model, steps: int):
    factors = [p for n, p in model.named_parameters() if p.requires_grad and ".ftn_" in n and "ftn_head" not in n
               and "ftn_norm" not in n]
    ids = {id(p) for p in factors}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    if args.recipe == "paper":
        parts = [torch.optim.SGD(rest, lr=args.lr, momentum=0.9, weight_decay=1e-4)]
    else:
        parts = [torch.optim.Adam(rest, lr=args.lr, foreach=True)]
    if factors:
        parts.append(torch.optim.Adam(factors, lr=args.factor_lr, foreach=True))
    optimizer = optim.CombinedOptimizer(parts)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=steps, power=0.9)
    return optimizer, scheduler


def train_task(accelerator, args, model, task: str, train_set, seed: int) -> None:
    steps = args.epochs * dense_data.steps_per_epoch(train_set, args.batch_size * accelerator.num_processes,
                                                     args.stream_samples)
    optimizer, scheduler = optimizer_for(args, model, steps)
    g = torch.Generator().manual_seed(seed)
    shuffle = hasattr(train_set, "__len__")
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=shuffle, generator=g if shuffle else None,
                        drop_last=True, num_workers=0 if args.dataset == "demo" else 4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    step = 0
    for _ in range(args.epochs):
        for images, maps in loader:
            loss = loss_fn(task, model(images), maps[task])
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            step += 1
    return accelerator.unwrap_model(model)


@torch.no_grad()
def evaluate(accelerator, args, predict, tasks, test_set, num_classes, tolerance, keep: int = 0):
    """Metrics per task over the test set; `predict(images)` returns {task: output}. Also the first `keep`
    predictions per task, for the picture."""
    start = time.time()
    loader = accelerator.prepare_data_loader(DataLoader(test_set, batch_size=max(args.batch_size, 32)))
    metrics = {t: new_metric(t, num_classes, tolerance) for t in tasks}
    shown = {t: [] for t in tasks}
    for images, maps in loader:
        outputs = predict(images)
        for t in tasks:
            pred, true = accelerator.gather_for_metrics((as_map(t, outputs[t]), maps[t]))
            metrics[t].update(pred.cpu(), true.cpu())
            if sum(len(s) for s in shown[t]) < keep:
                shown[t].append(pred[:keep].cpu())
    scores = {t: float(m.compute()) for t, m in metrics.items()}
    EVAL_SECONDS[0] += time.time() - start
    return scores, {t: torch.cat(s)[:keep] for t, s in shown.items() if s}


def encoder_params(model) -> int:
    return sum(p.numel() for p in model.encoder.parameters())


def run_ftn(accelerator, args, source, rank, seed, data, channels, tolerance):
    from peft import get_peft_model

    set_seed(seed)
    model = None
    for task in args.tasks:  # adding a task never changes another: each gets its own factors, BN and decoder
        config = dense.ftn_config(r=rank, num_outputs=channels[task])
        if model is None:
            model = get_peft_model(copy.deepcopy(source), config, adapter_name=task)
        else:
            model.add_adapter(task, config)
    for task in args.tasks:
        model.set_adapter(task)
        model = train_task(accelerator, args, model, task, data[0], seed)
    model.eval()
    out = Path(args.output_dir) / f"ftn_r{rank}" / f"seed{seed}"
    model.save_pretrained(str(out), is_main_process=accelerator.is_main_process)
    # every task's maps from one call: the batch goes through each task's adapter and decoder
    scores, shown = evaluate(accelerator, args, lambda x: ftn_peft.forward_all_tasks(model, x, args.tasks),
                             args.tasks, data[1], data[2], tolerance, args.show if seed == args.seeds[0] else 0)
    report = ftn_peft.parameter_report(model)
    per_task = {t: report[t].factor_params + report[t].norm_params for t in args.tasks}
    decoder = {t: report[t].head_params for t in args.tasks}
    return scores, shown, per_task, decoder


@torch.no_grad()
def fit_mean_predictor(args, train_set, tasks, num_classes):
    """Per-pixel statistics of the training labels, one batch at a time: the predictor that ignores the image.
    Returns `predict(images)` with outputs in the form the networks give (logits, normalized depth)."""
    sums, counts = {}, {}
    for _, maps in DataLoader(train_set, batch_size=max(args.batch_size, 32)):
        for t in tasks:
            y = maps[t]
            if t == "semseg":  # votes per class; 255 (ignore) falls into an extra class that never wins
                value = F.one_hot(torch.where(y == 255, num_classes, y), num_classes + 1).permute(0, 3, 1, 2).float()
                valid = torch.ones_like(value[:, :1])
            elif t == "depth":
                valid = (y > 0).float()
                value = y * valid
            elif t == "normals":
                valid, value = torch.ones_like(y[:, :1]), y
            else:
                valid, value = torch.ones_like(y), y.float()
            sums[t] = sums.get(t, 0) + value.sum(0)
            counts[t] = counts.get(t, 0) + valid.sum(0)
    mean = {t: sums[t] / counts[t].clamp_min(1) for t in tasks}
    fixed = {}
    for t in tasks:
        if t == "semseg":
            fixed[t] = F.one_hot(mean[t][:num_classes].argmax(0), num_classes).permute(2, 0, 1).float()
        elif t == "depth":  # the mean in metres, as the normalized output the depth heads give
            fixed[t] = (mean[t] - DEPTH_SHIFT) / DEPTH_SCALE
        elif t == "edges":
            fixed[t] = torch.logit(mean[t], eps=1e-6)
        else:
            fixed[t] = mean[t]
    return lambda images: {t: m.expand(images.shape[0], *m.shape).to(images.device) for t, m in fixed.items()}


def run_mean(accelerator, args, seed, data, tolerance):
    set_seed(seed)  # the training split's random flips
    predict = fit_mean_predictor(args, data[0], args.tasks, data[2])
    scores, shown = evaluate(accelerator, args, predict, args.tasks, data[1], data[2], tolerance,
                             args.show if seed == args.seeds[0] else 0)
    zero = {t: 0 for t in args.tasks}
    return scores, shown, zero, zero


def run_baseline(accelerator, args, source, method, seed, data, channels, tolerance):
    scores, shown, per_task, decoder = {}, {}, {}, {}
    for task in args.tasks:
        set_seed(seed)
        model = train_task(accelerator, args, dense.baseline(method, source, channels[task]), task, data[0], seed)
        model.eval()
        s, sh = evaluate(accelerator, args, lambda x: {task: model(x)}, [task], data[1], data[2], tolerance,
                         args.show if seed == args.seeds[0] else 0)
        scores.update(s)
        shown.update(sh)
        inner = model.model if hasattr(model, "model") else model
        per_task[task] = sum(p.numel() for p in inner.encoder.parameters() if p.requires_grad)
        decoder[task] = sum(p.numel() for p in inner.decoder.parameters())
    return scores, shown, per_task, decoder


# ------------------------------------------------------------------------------------------------ report
def table(results, args, backbone: int) -> str:
    by_label = {}
    for r in results:
        by_label.setdefault(r["label"], []).append(r)
    head = ["method", "encoder params / task", "decoder / task", "Params"] + [TASK_LABELS[t] for t in args.tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, runs in by_label.items():
        per_task = runs[0]["per_task"]
        # The paper's "Params": encoder parameters of all tasks together as a multiple of one encoder.
        if runs[0]["method"] == "finetune":
            multiple = sum(per_task.values()) / backbone
        else:
            multiple = 1 + sum(per_task.values()) / backbone
        cells = [label, f"{statistics.mean(per_task.values()):,.0f}",
                 f"{statistics.mean(runs[0]['decoder'].values()):,.0f}", f"{multiple:.3f}×"]
        if runs[0]["method"] == "mean":
            cells[1:] = ["—", "—", "—"]
        for t in args.tasks:
            values = [r["scores"][t] * (100 if t in ("semseg", "edges") else 1) for r in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.2f} ± {spread:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw(path, tasks, test_set, shown):
    """Rows: the truth, then each method; per test image, its input and one column per task; a legend below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    n = min(len(v) for per in shown.values() for v in per.values())
    rows = ["truth"] + list(shown)
    cols = 1 + len(tasks)
    fig, axes = plt.subplots(len(rows), cols * n, figsize=(1.0 * cols * n + 1.3, 1.0 * len(rows) + 0.6),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    cmap = matplotlib.colormaps["tab10"]
    for i in range(n):
        image, maps = test_set[i]
        rgb = (image * scenes.SceneDataset.STD + scenes.SceneDataset.MEAN).permute(1, 2, 0).clamp(0, 1).numpy()
        for r, label in enumerate(rows):
            ax = axes[r, i * cols]  # the input column: the image on the truth row, empty below
            if r == 0:
                ax.imshow(rgb)
                ax.set_title(f"test image {i}", fontsize=8)
            if i == 0:  # the row's name, as the first input column's label (an axis turned off hides its label)
                ax.set_ylabel(textwrap.fill(label, 20), fontsize=7, rotation=0, ha="right", va="center")
            if r > 0:
                for side in ax.spines.values():
                    side.set_visible(False)
            for j, t in enumerate(tasks):
                ax = axes[r, i * cols + 1 + j]
                m = maps[t] if r == 0 else shown[label][t][i]
                m = m.float()
                if t == "semseg":
                    ax.imshow(m.numpy(), cmap=cmap, vmin=0, vmax=9, interpolation="nearest")
                elif t == "normals":
                    ax.imshow(((m.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
                elif t == "depth":
                    ax.imshow(m[0].numpy(), cmap="viridis", vmin=0, vmax=scenes.MAX_DEPTH)
                else:
                    ax.imshow(m[0].numpy(), cmap="gray", vmin=0, vmax=1)
                if r == 0:
                    ax.set_title(t, fontsize=8)
    legend = [Patch(color=cmap(c), label=name) for c, name in enumerate(scenes.CLASSES)]
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=7, frameon=False,
               title=f"semseg classes; depth: dark 0 m to yellow {scenes.MAX_DEPTH:.0f} m; normals: (x, y, z) as RGB; "
                     "edges: probability, white = 1", title_fontsize=7)
    fig.tight_layout(rect=(0, 0.06, 1, 1), pad=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.num_threads or args.dataset == "demo":
        # The demo's convs are small; on a shared 2-core machine with other jobs running, steps with two threads
        # took 2-6 times as long as with one (docs/dense.md).
        torch.set_num_threads(args.num_threads or 1)
    accelerator = Accelerator()
    start = time.time()
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.jsonl").unlink(missing_ok=True)
    phases = {}  # seconds per phase, printed at the end (where the time goes)

    def timed(name, t0):
        phases[name] = phases.get(name, 0.0) + time.time() - t0

    t0 = time.time()
    with accelerator.main_process_first():  # the main process trains and caches the demo's source encoder
        source = source_model(args, args.seeds[0])
    timed("source encoder (trained or read from the cache)", t0)
    results, pictures = [], {}
    for seed in args.seeds:
        t0 = time.time()
        data = dense_data.load(args, seed)
        timed("data (demo: rendering the scenes)", t0)
        channels = {t: (data[2] if t == "semseg" else scenes.TASKS[t]) for t in args.tasks}
        tolerance = args.edge_tolerance
        if tolerance is None:
            tolerance = 1.0 if args.dataset == "demo" else 0.0075 * (args.crop_size[0] ** 2 + args.crop_size[1] ** 2) ** 0.5
        src = source if args.dataset == "demo" else source_model(args, seed)
        labels = [(m, METHOD_LABELS[m], None) for m in args.methods if m != "ftn"]
        labels += [("ftn", f"FTN, R={r}", r) for r in args.ranks if "ftn" in args.methods]
        for method, label, rank in labels:
            t0 = time.time()
            if method == "mean":
                scores, shown, per_task, decoder = run_mean(accelerator, args, seed, data, tolerance)
            elif method == "ftn":
                scores, shown, per_task, decoder = run_ftn(accelerator, args, src, rank, seed, data, channels, tolerance)
            else:
                scores, shown, per_task, decoder = run_baseline(accelerator, args, src, method, seed, data, channels,
                                                                tolerance)
            results.append(dict(label=label, method=method, rank=rank, seed=seed, scores=scores, per_task=per_task,
                                decoder=decoder, seconds=time.time() - t0))
            timed(label, t0)
            if shown:
                pictures[label] = shown
            accelerator.print(f"seed {seed} {label}: " + ", ".join(f"{t} {v:.4f}" for t, v in scores.items())
                              + f" ({time.time() - t0:.0f} s)", flush=True)
            if accelerator.is_main_process:  # kept as it comes, so that an interrupted run keeps what it measured
                with open(out / "results.jsonl", "a") as f:
                    f.write(json.dumps(results[-1]) + "\n")
        if seed == args.seeds[0] and accelerator.is_main_process and args.show and args.dataset == "demo":
            t0 = time.time()
            draw(out / "predictions.png", args.tasks, data[1], pictures)
            timed("picture", t0)
    if accelerator.is_main_process:
        text = table(results, args, encoder_params(source))
        (out / "results.md").write_text(text + "\n")
        print(text)
        print(f"\nwall time {time.time() - start:.0f} s ({'; '.join(f'{k} {v:.0f} s' for k, v in phases.items())}; "
              f"evaluation included in each method's time: {EVAL_SECONDS[0]:.0f} s); outputs in {out}/")
    accelerator.end_training()


if __name__ == "__main__":
    main()
