"""FTN against LoRA and full fine-tuning across network widths, eager, channels_last and torch.compile.

    python benchmarks/bench_widths.py                        # CPU grid, see --help for the reduced compile grid
    python benchmarks/bench_widths.py --device cuda        # GPU sizes: ¼-width at batch 256, 32 px; others 64, 224 px

Backbones (random weights): "resnet18-q", a quarter-width ResNet-18 (16-channel stem, stages 16-32-64-128) at
batch 32 and 32 px; "resnet18" and "resnet50" at batch 4 and 64 px (CPU sizes; on CUDA 256 × 32 px and 64 × 224 px;
--batch_size/--image_size override all three). Per backbone and execution mode ("eager", "channels_last", "compiled": torch.compile with
inductor of the whole model, forward and backward, "compiled_cl": both) one interleaved run times the training
step (forward, backward, Adam) of full fine-tuning, and of LoRA, FTN (`compute="auto"`) and FTN forced onto the
three-op conv path at each r, and inference (no_grad, eval) of the base model, LoRA and FTN. Ratios are taken per
repeat and given as median [IQR]. On CPU the clock is the process's thread CPU time (the benchmark runs on one
thread; the machine may be shared, and CPU time does not count the time another process holds the core); on CUDA
wall time with synchronisation.

Writes widths_<device>.md and .json (--name changes the stem) in --out (default outputs/bench_widths/).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
from bench_compute_paths import ftn_with_compute  # noqa: E402
from ftn_peft import presets  # noqa: E402

SIZES = {"resnet18-q": (32, 32), "resnet18": (4, 64), "resnet50": (4, 64)}
GPU_SIZES = {"resnet18-q": (256, 32), "resnet18": (64, 224), "resnet50": (64, 224)}  # --device cuda
MODES = ("eager", "channels_last", "compiled", "compiled_cl")


def build(name: str, image_size: int) -> C.Backbone:
    if name != "resnet18-q":
        return C.build_backbone(name, image_size)
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=C.NUM_CLASSES, channels=(16, 32, 64, 128))
    # timm's plain stem is 64 channels whatever the widths: narrow it too, so that layer1 needs no projection.
    model.conv1 = nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(16)
    model.layer1[0].conv1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    model.layer1[0].downsample = None
    resnet = C.build_backbone("resnet18", image_size)  # the same targets, losses and LoRA extras
    resnet.name, resnet.model = name, model
    return resnet


def prepare(m: C.Method, mode: str) -> tuple[torch.nn.Module, dict]:
    """The callable model for `mode` and what compiling it cost (seconds of the first call come later)."""
    model = m.model
    if mode.endswith("cl") or mode == "channels_last":
        model.to(memory_format=torch.channels_last)
    if mode.startswith("compiled"):
        return torch.compile(model), {}
    return model, {}


def run_backbone(args, name: str, mode: str) -> list[dict]:
    batch, size = (SIZES if args.device == "cpu" else GPU_SIZES)[name]
    batch, size = args.batch_size or batch, args.image_size or size
    backbone = build(name, size)
    x = backbone.make_input(batch, size).to(args.device)
    if mode in ("channels_last", "compiled_cl"):
        x = x.contiguous(memory_format=torch.channels_last)
    ranks = args.compile_ranks if mode.startswith("compiled") else args.ranks
    methods = [C.build_method(backbone, "base", device=args.device), C.build_method(backbone, "full", device=args.device)]
    for r in ranks:
        methods += [C.build_method(backbone, "lora", r, args.device), C.build_method(backbone, "ftn", r, args.device)]
        if not mode.startswith("compiled"):
            methods.append(ftn_with_compute(backbone, r, "three_op", args.device))
    runners = {}
    compile_s = {}
    for m in methods:
        runners[m.name] = prepare(m, mode)[0]
    clock = time.thread_time if args.device == "cpu" else time.perf_counter

    def train(m):
        def step():
            m.model.train()
            m.optimizer.zero_grad(set_to_none=True)
            backbone.loss(runners[m.name], x).backward()
            m.optimizer.step()
        return step

    def infer(m):
        def step():
            m.model.eval()
            with torch.no_grad():
                backbone.forward(runners[m.name], x)
        return step

    # Warm-up outside the timing: compiles (the first call) and the per-shape path choices.
    check = {}
    for m in methods:
        t0 = time.perf_counter()
        if m.optimizer is not None:
            train(m)()
        infer(m)()
        compile_s[m.name] = time.perf_counter() - t0
        if mode.startswith("compiled"):
            m.model.eval()
            with torch.no_grad():  # compiled inference against the same model run eagerly
                check[m.name] = (runners[m.name](x) - m.model(x)).abs().max().item()
    trainable = {m.name: train(m) for m in methods if m.optimizer is not None}
    t_train = C.interleaved(trainable, args.repeats, 1, args.device, clock=clock)
    t_infer = C.interleaved({m.name: infer(m) for m in methods if m.kind != "full"}, args.infer_repeats, 1,
                            args.device, clock=clock)

    def ratio(times, a, b):
        return C.summary([p / q for p, q in zip(times[a], times[b])])

    rows = []
    for r in ranks:
        lora, ftn, three = f"lora r={r}", f"ftn r={r}", f"ftn r={r} three_op"
        row = {"backbone": name, "mode": mode, "r": r, "batch": batch, "image_size": size,
               "train_ms": {k: 1e3 * C.summary(t_train[k])["median"] for k in (lora, ftn, "full")},
               "infer_ms": {k: 1e3 * C.summary(t_infer[k])["median"] for k in (lora, ftn, "base")},
               "train_ftn_lora": ratio(t_train, ftn, lora), "train_ftn_full": ratio(t_train, ftn, "full"),
               "infer_ftn_lora": ratio(t_infer, ftn, lora), "infer_ftn_base": ratio(t_infer, ftn, "base"),
               "first_call_s": {k: compile_s[k] for k in (lora, ftn, "full", "base")},
               "compiled_vs_eager_max_abs": {k: check.get(k) for k in (lora, ftn, "base")}}
        if three in t_train:
            row["train_three_op_lora"] = ratio(t_train, three, lora)
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _fmt(s: dict) -> str:
    return f"{s['median']:.2f} [{s['q1']:.2f}, {s['q3']:.2f}]"


def _line(row: dict) -> str:
    three = _fmt(row["train_three_op_lora"]) if "train_three_op_lora" in row else "n/a"
    ms, r = row["train_ms"], row["r"]
    return (f"| {row['backbone']} | {row['mode']} | {row['r']} | {_fmt(row['train_ftn_lora'])} | {three} | "
            f"{_fmt(row['train_ftn_full'])} | {_fmt(row['infer_ftn_lora'])} | {_fmt(row['infer_ftn_base'])} | "
            f"{ms['ftn r=%d' % r]:.1f} / {ms['lora r=%d' % r]:.1f} / {ms['full']:.1f} |")


HEADER = ("| backbone | mode | r | train FTN / LoRA | train FTN three-op / LoRA | train FTN / full FT | "
          "infer FTN / LoRA | infer FTN / base | train ms FTN / LoRA / full |\n|---|---|---|---|---|---|---|---|---|")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--modes", nargs="+", default=["eager", "channels_last", "compiled"], choices=MODES)
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--compile_ranks", nargs="+", type=int, default=[4],
                   help="ranks of the compiled modes (compiling every model takes minutes on a small CPU)")
    p.add_argument("--compile_backbones", nargs="+", default=["resnet18-q", "resnet18"], choices=list(SIZES),
                   help="backbones the compiled modes run on")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--image_size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--infer_repeats", type=int, default=7)
    p.add_argument("--name", default="widths", help="file name stem: <name>_<device>.md / .json")
    p.add_argument("--out", default=None, help=C.OUT_HELP)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cmd = "python benchmarks/bench_widths.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(HEADER, flush=True)
    rows = []
    for mode in args.modes:  # the slow compiled modes last: what finishes first is the eager grid
        for name in args.backbones:
            if mode.startswith("compiled") and name not in args.compile_backbones:
                continue
            rows += run_backbone(args, name, mode)
    took = time.perf_counter() - t0
    title = (f"### FTN / LoRA across widths ({args.device}, {args.threads} thread(s), torch {torch.__version__}, "
             f"{'thread CPU time' if args.device == 'cpu' else 'wall time'})")
    table = "\n".join([title, "", f"Command: `{cmd}` ({took:.0f} s).", "", HEADER] + [_line(r) for r in rows]) + "\n"
    out = C.output_dir(args.out, "bench_widths")
    stem = os.path.join(out, f"{args.name}_{args.device.split(':')[0]}")
    with open(stem + ".md", "w") as f:
        f.write(table)
    with open(stem + ".json", "w") as f:
        json.dump({"command": cmd, "seconds": took, "rows": rows}, f, indent=1)
    print(table)
    print(f"wrote {stem}.md/.json")


if __name__ == "__main__":
    main()
