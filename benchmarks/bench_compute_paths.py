"""FTN's two compute paths and the per-call rule that picks between them, against LoRA, in one interleaved run.

    python benchmarks/bench_compute_paths.py --backbone resnet50 --r 4
    python benchmarks/bench_compute_paths.py --backbone clip-qv --r 4

Methods: base (inference only), LoRA at r, FTN at r with `compute="auto"` (the default rule), `"factorized"`
(the factors as small ops) and `"materialized"` (W + ΔW built every call). Prints a markdown table of median
training-step and inference times (ms) and their ratio to LoRA, and writes it to
compute_paths_<backbone>_<device>.md in --out (default outputs/bench_compute_paths/; docs/ from `--out docs`).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
from peft import get_peft_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet50", choices=sorted(C.CPU_SIZES))
    p.add_argument("--r", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--infer_repeats", type=int, default=9)
    p.add_argument("--out", default=None, help=C.OUT_HELP)
    return p.parse_args(argv)


def ftn_with_compute(backbone: C.Backbone, r: int, compute: str, device: str) -> C.Method:
    def config():
        cfg = backbone.ftn_config(r)
        cfg.compute = compute
        return cfg

    model = get_peft_model(copy.deepcopy(backbone.model), config()).to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return C.Method(f"ftn r={r} {compute}", "ftn", r, model, optimizer, config)


def run(args) -> str:
    torch.set_num_threads(args.threads)
    batch, size = C.CPU_SIZES[args.backbone]
    backbone = C.build_backbone(args.backbone, size)
    x = backbone.make_input(batch, size).to(args.device)
    t0 = time.perf_counter()
    methods = [C.build_method(backbone, "base", device=args.device),
               C.build_method(backbone, "lora", args.r, args.device)]
    methods += [ftn_with_compute(backbone, args.r, c, args.device) for c in ("auto", "factorized", "materialized")]
    trainable = {m.name: (lambda m=m: C.train_step(m, backbone, x)) for m in methods if m.optimizer is not None}
    train = C.interleaved(trainable, args.repeats, 1, args.device)
    infer = C.interleaved({m.name: (lambda m=m: C.infer(m, backbone, x)) for m in methods}, args.infer_repeats, 1,
                          args.device)
    lora = methods[1].name
    cmd = (f"python benchmarks/bench_compute_paths.py --backbone {args.backbone} --r {args.r} "
           f"--device {args.device} --threads {args.threads}")
    lines = [f"### Compute paths on {args.backbone} ({args.device}, batch {batch}, {size}px, r={args.r}, "
             f"{args.threads} thread(s), torch {torch.__version__})", "",
             f"Command: `{cmd}` ({time.perf_counter() - t0:.0f} s).", "",
             "| method | train ms | train / LoRA | infer ms | infer / LoRA |", "|---|---|---|---|---|"]

    def ratio(times, name):
        per = [a / b for a, b in zip(times[name], times[lora])]
        return f"{C.summary(per)['median']:.2f}"

    for m in methods:
        tr = f"{1e3 * C.summary(train[m.name])['median']:.1f}" if m.name in train else ""
        tr_ratio = ratio(train, m.name) if m.name in train else ""
        lines.append(f"| {m.name} | {tr} | {tr_ratio} | {1e3 * C.summary(infer[m.name])['median']:.1f} | "
                     f"{ratio(infer, m.name)} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    table = run(args)
    out = os.path.join(C.output_dir(args.out, "bench_compute_paths"),
                       f"compute_paths_{args.backbone}_{args.device.split(':')[0]}.md")
    with open(out, "w") as f:
        f.write(table)
    print(table)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
