"""How FTN's costs grow with the rank r and with the number of adapters, next to LoRA at the same rank.

    python benchmarks/bench_scaling.py                       # resnet18, CPU-sized defaults
    python benchmarks/bench_scaling.py --backbone resnet50 --device cuda --batch_size 64 --image_size 224

Writes scaling_<backbone>_<device>.{md,json,png} into --out (default outputs/bench_scaling/; the files in docs/
come from `--out docs`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet18", choices=["resnet18", "resnet50", "clip-qv", "clip-o"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--adapter_counts", type=int, nargs="+", default=[1, 5, 10, 20, 50])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help=C.OUT_HELP)
    return p.parse_args(argv)


def rank_sweep(backbone, x, args):
    methods = [C.build_method(backbone, kind, r, args.device) for r in args.ranks for kind in ("ftn", "lora")]
    times = C.interleaved({m.name: (lambda m=m: C.train_step(m, backbone, x)) for m in methods},
                          args.repeats, 1, args.device)
    rows = []
    for m in methods:
        persistent, transient = C.train_peak_bytes(m, backbone, x, args.device)
        file = C.adapter_file(m)
        rows.append({"method": m.kind, "r": m.r, "trainable_params": m.trainable,
                     "train_ms": 1e3 * statistics.median(times[m.name]),
                     "train_peak_MiB": (persistent + transient) / 2**20, "step_peak_MiB": transient / 2**20,
                     "file_bytes": file["file_bytes"], "file_exact": file["exact"]})
    return rows


def adapter_sweep(backbone, x, args):
    m = C.build_method(backbone, "ftn", 4, args.device)
    rows = []
    for n in range(1, max(args.adapter_counts) + 1):
        if n > 1:
            m.model.add_adapter(f"a{n - 1}", m.config_factory())
            m.model.to(args.device)
        if n not in args.adapter_counts:
            continue
        m.model.set_adapter("default")
        m.optimizer = torch.optim.Adam([p for p in m.model.parameters() if p.requires_grad], lr=1e-4)
        step = C.interleaved({"s": lambda: C.train_step(m, backbone, x)}, args.repeats, 1, args.device)["s"]
        names = list(m.model.peft_config)
        switch = [C.timed(lambda a=a: m.model.set_adapter(a), args.device) for a in names * 2]
        m.model.set_adapter("default")
        with tempfile.TemporaryDirectory() as tmp:
            m.model.save_pretrained(tmp)
            files = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp) for f in fs
                        if f.endswith(".safetensors"))
        rows.append({"adapters": n, "train_ms": 1e3 * statistics.median(step),
                     "model_MiB": C.persistent_bytes(m) / 2**20, "files_bytes": files,
                     "switch_ms": 1e3 * statistics.median(switch)})
        print(f"  {n} adapters", file=sys.stderr, flush=True)
    return rows


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(13, 7))
    for kind, style in (("ftn", "o-"), ("lora", "s--")):
        rows = [r for r in result["ranks"] if r["method"] == kind]
        rs = [r["r"] for r in rows]
        for j, (key, label) in enumerate((("train_ms", "train step (ms)"), ("train_peak_MiB", "train peak (MiB)"),
                                          ("file_bytes", "adapter file (bytes)"))):
            ax[0, j].plot(rs, [r[key] for r in rows], style, label=kind)
            ax[0, j].set(xscale="log", xlabel="rank r", ylabel=label)
            ax[0, j].legend()
    rows = result["adapters"]
    ns = [r["adapters"] for r in rows]
    for j, (key, label) in enumerate((("train_ms", "train step, active adapter (ms)"),
                                      ("model_MiB", "params + buffers + Adam (MiB)"),
                                      ("files_bytes", "all adapter files (bytes)"))):
        ax[1, j].plot(ns, [r[key] for r in rows], "o-")
        ax[1, j].set(xlabel="adapters (FTN r=4)", ylabel=label)
    s = result["setup"]
    fig.suptitle(f"{s['backbone']} on {s['device']}, batch {s['batch_size']}, {s['image_size']}px")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def to_markdown(result, png):
    s = result["setup"]
    lines = [f"### Scaling on {s['backbone']} ({s['device']}, batch {s['batch_size']}, {s['image_size']}px, "
             f"{s['threads']} thread(s))", "",
             f"Command: `python benchmarks/bench_scaling.py --backbone {s['backbone']} --device {s['device']} "
             f"--batch_size {s['batch_size']} --image_size {s['image_size']}` ({s['wall_s']:.0f} s).", "",
             "| method | r | trainable | train ms (median) | train peak MiB (step) | file bytes | file exact |",
             "|---|---|---|---|---|---|---|"]
    for r in result["ranks"]:
        lines.append(f"| {r['method']} | {r['r']} | {r['trainable_params']:,} | {r['train_ms']:.1f} | "
                     f"{r['train_peak_MiB']:.0f} ({r['step_peak_MiB']:.0f}) | {r['file_bytes']:,} | "
                     f"{'yes' if r['file_exact'] else 'NO'} |")
    lines += ["", "| adapters (FTN r=4) | train ms, active adapter | params+buffers+Adam MiB | all files bytes | "
              "set_adapter ms |", "|---|---|---|---|---|"]
    for r in result["adapters"]:
        lines.append(f"| {r['adapters']} | {r['train_ms']:.1f} | {r['model_MiB']:.1f} | {r['files_bytes']:,} | "
                     f"{r['switch_ms']:.2f} |")
    lines += ["", f"![scaling]({os.path.basename(png)})"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    backbone = C.build_backbone(args.backbone, args.image_size)
    x = backbone.make_input(args.batch_size, args.image_size).to(args.device)
    result = {"setup": {"backbone": args.backbone, "device": args.device, "batch_size": args.batch_size,
                        "image_size": args.image_size, "threads": args.threads, "repeats": args.repeats}}
    result["ranks"] = rank_sweep(backbone, x, args)
    result["adapters"] = adapter_sweep(backbone, x, args)
    result["setup"]["wall_s"] = time.perf_counter() - t0
    prefix = os.path.join(C.output_dir(args.out, "bench_scaling"),
                          f"scaling_{args.backbone}_{args.device.split(':')[0]}")
    with open(prefix + ".json", "w") as f:
        json.dump(result, f, indent=1)
    plot(result, prefix + ".png")
    md = to_markdown(result, prefix + ".png")
    with open(prefix + ".md", "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
