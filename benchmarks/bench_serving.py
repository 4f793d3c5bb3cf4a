"""Serving T tasks: FTN mixed batches and forward_all_tasks against a set_adapter loop and T fine-tuned models.

Two workloads, each for T = 1, 2, 5, 10 adapters on one backbone:
- all-tasks: one batch of B inputs, every task's output wanted (T·B outputs);
- mixed: one batch of B inputs, sample i wanted by task i mod T (B outputs).
Methods: FTN `forward_all_tasks(strategy="batched")` and `(strategy="loop")` / a mixed `adapter_names=` pass,
a `set_adapter` loop (for the mixed workload: one pass per adapter on its rows), and T separately fine-tuned
models (deep copies of the backbone, each on its rows). Memory: the weights held (parameters and buffers) and
the activation peak of a step above the resident memory before it (CPU: the process's VmHWM, reset through
/proc/self/clear_refs; CUDA: max_memory_allocated).

    python benchmarks/bench_serving.py --model resnet18 --res 64 --batch 8 --repeats 7 --threads 1 --out docs

Writes serving_bench.json and serving.png into --out (default outputs/bench_serving/).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

METHODS = {
    "all-tasks": ["ftn-batched", "ftn-all-tasks-loop", "ftn-loop", "separate-models"],
    "mixed": ["ftn-mixed", "ftn-loop", "separate-models"],
}


def build(args, method: str, t: int):
    import timm
    from peft import get_peft_model

    import ftn_peft

    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False, num_classes=10).eval()
    names = [f"task{i}" for i in range(t)]
    if method == "separate-models":
        return {n: copy.deepcopy(base).to(args.device) for n in names}, names
    model = get_peft_model(base, ftn_peft.presets.resnet(r=args.rank, num_classes=10), adapter_name=names[0])
    for n in names[1:]:
        model.add_adapter(n, ftn_peft.presets.resnet(r=args.rank, num_classes=10))
    return model.to(args.device).eval(), names


def step_fn(workload: str, method: str, model, names: list[str], x: torch.Tensor):
    """A zero-argument callable doing one serving step of the given workload and method."""
    from ftn_peft.serving import forward_all_tasks

    rows = {n: [i for i in range(len(x)) if i % len(names) == k] for k, n in enumerate(names)}
    if method == "separate-models":
        if workload == "all-tasks":
            return lambda: [model[n](x) for n in names]
        return lambda: [model[n](x[rows[n]]) for n in names if rows[n]]
    if method == "ftn-batched":
        return lambda: forward_all_tasks(model, x, names, strategy="batched")
    if method == "ftn-all-tasks-loop":
        return lambda: forward_all_tasks(model, x, names, strategy="loop")
    if method == "ftn-mixed":
        mixed = [names[i % len(names)] for i in range(len(x))]
        return lambda: model(x, adapter_names=mixed)

    def loop():  # the set_adapter loop a user writes without adapter_names=
        outs = []
        for n in names:
            if workload == "all-tasks" or rows[n]:
                model.set_adapter(n)
                outs.append(model(x if workload == "all-tasks" else x[rows[n]]))
        return outs

    return loop


def _peak_mib(device: str, reset: bool) -> float:
    """Peak memory since the last reset: CUDA allocator peak, or the process's peak RSS (VmHWM) on CPU."""
    if device == "cuda":
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return torch.cuda.max_memory_allocated() / 2**20
    if reset:
        with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets VmHWM to the current RSS
            f.write("5")
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**10


def _resident_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 2**10


def _release_freed_memory(device: str) -> None:
    """Give memory freed by earlier steps back, so it is not silently reused below the measured baseline."""
    if device == "cuda":
        torch.cuda.empty_cache()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _weights_mib(model) -> float:
    modules = model.values() if isinstance(model, dict) else [model]
    return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers())) / 2**20


def measure(args, workload: str, method: str, model, names: list[str]) -> dict:
    x = torch.randn(args.batch, 3, args.res, args.res, device=args.device)
    step = step_fn(workload, method, model, names, x)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        _release_freed_memory(args.device)
        before = _resident_mib(args.device)
        _peak_mib(args.device, reset=True)
        step()  # warm-up: allocator and caches
        for _ in range(args.repeats):
            sync()
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        extra = _peak_mib(args.device, reset=False) - before
    seconds = statistics.median(times)
    outputs = args.batch * (len(names) if workload == "all-tasks" else 1)
    return dict(workload=workload, method=method, tasks=len(names), seconds=seconds, outputs_per_s=outputs / seconds,
                weights_mib=_weights_mib(model), activation_peak_mib=max(extra, 0.0))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18", help="timm ResNet name (random weights)")
    p.add_argument("--res", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--tasks", type=int, nargs="+", default=[1, 2, 5, 10])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help=C.OUT_HELP)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for t in args.tasks:
        models = {}
        for workload, methods in METHODS.items():
            for method in methods:
                kind = "separate" if method == "separate-models" else "ftn"
                if kind not in models:
                    models[kind] = build(args, method, t)
                res = measure(args, workload, method, *models[kind])
                results.append(res)
                print(f"{workload:9s} T={t:2d} {method:18s} {res['outputs_per_s']:8.1f} outputs/s  weights "
                      f"{res['weights_mib']:6.1f} MiB  activation peak {res['activation_peak_mib']:6.1f} MiB")
    out = C.output_dir(args.out, "bench_serving")
    with open(os.path.join(out, "serving_bench.json"), "w") as f:
        json.dump(dict(config=vars(args), results=results), f, indent=1)
    plot(results, os.path.join(out, "serving.png"),
         f"{args.model} at {args.res}x{args.res}, batch {args.batch}, {args.device}")
    print(f"wrote {out}/serving_bench.json and serving.png")


def plot(results: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(m for ms in METHODS.values() for m in ms))}
    fig, axes = plt.subplots(1, len(METHODS), figsize=(11, 4), sharey=True)
    for ax, (workload, methods) in zip(axes, METHODS.items()):
        for method in methods:
            rows = [r for r in results if r["workload"] == workload and r["method"] == method]
            ax.plot([r["tasks"] for r in rows], [r["outputs_per_s"] for r in rows], marker="o", label=method, color=colors[method])
        ax.set(title=f"{workload}: {title}", xlabel="tasks T", ylabel="outputs / s")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
