"""Inference speed of FTN against the base model and PEFT LoRA: the weight cache, merged wrappers, mixed batches.

    python benchmarks/bench_inference.py --backbone resnet50 --part single           # targets 1 and 2
    python benchmarks/bench_inference.py --backbone clip-qv --part single
    python benchmarks/bench_inference.py --backbone resnet50 --part instances --repeats 20  # the spread of copies
    python benchmarks/bench_inference.py --backbone resnet18 --part mixed --batch_size 40  # target 3
    python benchmarks/bench_inference.py --backbone clip-qv --part mixed --batch_size 20

single: one batch in eval mode under torch.inference_mode: base, a copy of base (the noise floor), FTN unmerged with the weight cache (default),
FTN unmerged without it (`set_inference_cache(model, enabled=False)`: the factorized/materialized paths), LoRA
unmerged at the same r, FTN merged with the wrappers kept (`merge_adapter()`), LoRA merged.
instances: K independent copies each of base, FTN merged (wrappers kept), FTN unmerged with the cache and LoRA
merged at the first r, all timed against the same base: how much one copy of the same model differs from another
(where its weights happen to lie in memory), the noise floor that one "base copy" per row samples only once.
mixed: a batch of B samples spread over T adapters (sample i to adapter i mod T) for each T: base on the whole
batch, FTN `model(x, adapter_names=...)` (one pass per layer, grouped.py), a `set_adapter` loop over the groups,
T merged models (one plain backbone per adapter, each on its rows; T distinct copies for ResNets, one tower run T
times for CLIP, whose copies would not fit in memory), PEFT LoRA's
`adapter_names=` mixed batch (its ResNet BatchNorms shared: PEFT mixes batches through Linear/Conv copies only).

Timing: interleaved repeats in a rotated order, ratios to base per repeat, median [IQR]; both process CPU time
(robust to other processes on a shared machine with one torch thread) and wall time are recorded. Writes
inference_<part>_<backbone>.{md,json} into --out (default outputs/bench_inference/).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

from peft import LoraConfig, get_peft_model  # noqa: E402

from ftn_peft.weight_cache import clear_inference_cache, inference_cache_bytes, set_inference_cache  # noqa: E402


# The clock the tables report: process CPU time on a CPU (robust to other processes), wall time on a GPU (where the
# host's CPU time says nothing about the kernels). main() sets it from --device.
CLOCK = "cpu"
DEVICE = "cpu"


def timed_repeats(jobs: dict, repeats: int) -> dict[str, dict[str, list[float]]]:
    """{name: {"cpu": [...], "wall": [...]}}, every job once per repeat in a rotated order, after one warm-up."""
    names = list(jobs)
    out = {n: {"cpu": [], "wall": []} for n in names}
    with torch.inference_mode():
        for n in names:
            jobs[n]()
        for i in range(repeats):
            shift = i % len(names)
            for n in names[shift:] + names[:shift]:
                C.sync(DEVICE)
                cpu, wall = time.process_time(), time.perf_counter()
                jobs[n]()
                C.sync(DEVICE)
                out[n]["cpu"].append(time.process_time() - cpu)
                out[n]["wall"].append(time.perf_counter() - wall)
    return out


def ratios(times: dict, reference: str = "base") -> dict:
    rows = {}
    for n, t in times.items():
        rows[n] = {clock: C.summary([a / b for a, b in zip(t[clock], times[reference][clock])]) for clock in ("cpu", "wall")}
        rows[n]["seconds"] = C.summary(t[CLOCK])["median"]
    return rows


def _ftn(backbone, r: int, names: list[str]):
    model = get_peft_model(copy.deepcopy(backbone.model), _gaussian(backbone.ftn_config(r)), adapter_name=names[0])
    for n in names[1:]:
        model.add_adapter(n, _gaussian(backbone.ftn_config(r)))
    set_inference_cache(model, max_bytes=None)  # the benchmark reports what it holds
    return model.eval()


def _gaussian(config):
    config.init_weights = "gaussian"  # a non-zero ΔW, as after training
    return config


def _lora(backbone, r: int, names: list[str], mixed: bool = False):
    extra = dict(backbone.lora_extra)
    if mixed and "modules_to_save" in extra:  # PEFT mixes batches through Linear/Conv copies only, not BatchNorm
        extra["modules_to_save"] = [m for m in extra["modules_to_save"] if m == "fc"]

    def config():
        return LoraConfig(r=r, lora_alpha=r, target_modules=backbone.targets, init_lora_weights=False, **extra)

    model = get_peft_model(copy.deepcopy(backbone.model), config(), adapter_name=names[0])
    for n in names[1:]:
        model.add_adapter(n, config())
    return model.eval()


def single(args, backbone, x) -> dict:
    base, base_copy = copy.deepcopy(backbone.model).eval(), copy.deepcopy(backbone.model).eval()
    results = {}
    for r in args.ranks:
        ftn, ftn_off, ftn_merged = (_ftn(backbone, r, ["default"]) for _ in range(3))
        set_inference_cache(ftn_off, enabled=False)
        ftn_merged.base_model.merge_adapter()
        lora, lora_merged = _lora(backbone, r, ["default"]), _lora(backbone, r, ["default"])
        lora_merged.base_model.merge_adapter()
        jobs = {
            "base": lambda: backbone.forward(base, x),
            "base copy": lambda: backbone.forward(base_copy, x),  # the same ops: the noise floor of this run
            "ftn cached": lambda: backbone.forward(ftn, x),
            "ftn uncached": lambda: backbone.forward(ftn_off, x),
            "lora": lambda: backbone.forward(lora, x),
            "ftn merged": lambda: backbone.forward(ftn_merged, x),
            "lora merged": lambda: backbone.forward(lora_merged, x),
        }
        rows = ratios(timed_repeats(jobs, args.repeats))
        rows["ftn cached"]["cache_bytes"] = inference_cache_bytes(ftn)
        results[f"r={r}"] = rows
        print(f"r={r}: " + ", ".join(f"{n} {v[CLOCK]['median']:.3f}" for n, v in rows.items()), flush=True)
    return results


INSTANCE_KINDS = ("base copy", "ftn merged", "ftn cached", "lora merged")


def instances(args, backbone, x) -> dict:
    r = args.ranks[0]
    models = {"base": copy.deepcopy(backbone.model).eval()}
    for k in range(args.instances):
        models[f"base copy {k}"] = copy.deepcopy(backbone.model).eval()
        models[f"ftn merged {k}"] = _ftn(backbone, r, ["default"])
        models[f"ftn merged {k}"].base_model.merge_adapter()
        models[f"ftn cached {k}"] = _ftn(backbone, r, ["default"])
        models[f"lora merged {k}"] = _lora(backbone, r, ["default"])
        models[f"lora merged {k}"].base_model.merge_adapter()
    jobs = {n: (lambda m=m: backbone.forward(m, x)) for n, m in models.items()}
    rows = ratios(timed_repeats(jobs, args.repeats))
    results = {}
    for kind in INSTANCE_KINDS:
        medians = [rows[f"{kind} {k}"][CLOCK]["median"] for k in range(args.instances)]
        results[kind] = {"instances": medians, "seconds": rows["base"]["seconds"]}
        print(f"{kind}: " + " ".join(f"{m:.3f}" for m in medians), flush=True)
    return results


def instances_table(results: dict, title: str) -> str:
    lines = [f"### {title}", "", "| | median ratio to base, per copy | mean | base s |", "|---|---|---|---|"]
    for kind, row in results.items():
        cells = " ".join(f"{m:.3f}" for m in row["instances"])
        mean = sum(row["instances"]) / len(row["instances"])
        lines.append(f"| {kind} | {cells} | {mean:.3f} | {row['seconds']:.3f} |")
    return "\n".join(lines) + "\n"


def mixed(args, backbone, x) -> dict:
    base = copy.deepcopy(backbone.model).eval()
    results = {}
    r = args.ranks[0]
    for t in args.tasks:
        names = [f"task{i}" for i in range(t)]
        per_sample = [names[i % t] for i in range(x.shape[0])]
        rows = {n: [i for i in range(x.shape[0]) if i % t == k] for k, n in enumerate(names)}
        ftn, lora = _ftn(backbone, r, names), _lora(backbone, r, names, mixed=True)
        # CLIP: one tower stands for all T (the same ops; T copies of 88 M parameters would not fit in memory here)
        merged = [base] * t if backbone.name.startswith("clip") else [copy.deepcopy(base) for _ in names]

        def loop():
            for n in names:
                ftn.set_adapter(n)
                backbone.forward(ftn, x[rows[n]])

        jobs = {
            "base": lambda: backbone.forward(base, x),
            "ftn mixed": lambda: _mixed(backbone, ftn, x, per_sample),
            "ftn set_adapter loop": loop,
            "T merged models": lambda: [backbone.forward(m, x[rows[n]]) for m, n in zip(merged, names)],
            "lora mixed": lambda: _mixed(backbone, lora, x, per_sample),
        }
        out = ratios(timed_repeats(jobs, args.repeats))
        clear_inference_cache(ftn)  # what the mixed pass alone holds (the loop fills single-adapter entries)
        with torch.inference_mode():
            _mixed(backbone, ftn, x, per_sample)
        out["ftn mixed"]["cache_bytes"] = inference_cache_bytes(ftn)
        results[f"T={t}"] = out
        print(f"T={t}: " + ", ".join(f"{n} {v[CLOCK]['median']:.3f}" for n, v in out.items()), flush=True)
        del ftn, lora, merged
    return results


def _mixed(backbone, model, x, names):
    if backbone.name.startswith("clip"):
        return model(pixel_values=x, adapter_names=names)
    return model(x, adapter_names=names)


def table(results: dict, title: str) -> str:
    methods = list(next(iter(results.values())))
    lines = [f"### {title}", "", "| | " + " | ".join(f"{m} / base" for m in methods[1:]) + f" | base {CLOCK} s | cache MiB |",
             "|" + "---|" * (len(methods) + 2)]
    for key, rows in results.items():
        cells = [f"{rows[m][CLOCK]['median']:.2f} [{rows[m][CLOCK]['q1']:.2f}, {rows[m][CLOCK]['q3']:.2f}]"
                 for m in methods[1:]]
        cache = next((v["cache_bytes"] for v in rows.values() if "cache_bytes" in v), 0) / 2**20
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {rows['base']['seconds']:.3f} | {cache:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet50", choices=sorted(C.CPU_SIZES))
    p.add_argument("--part", default="single", choices=["single", "instances", "mixed"])
    p.add_argument("--batch_size", type=int, default=None, help="default: the backbone's CPU size")
    p.add_argument("--image_size", type=int, default=None)
    p.add_argument("--ranks", type=int, nargs="+", default=[4], help="single: every r; mixed: the first")
    p.add_argument("--tasks", type=int, nargs="+", default=[1, 2, 5, 10, 20])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--instances", type=int, default=4, help="instances: copies of each model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--channels_last", action="store_true", help="ResNets: weights and input in channels_last")
    p.add_argument("--device", default="cpu", help="cpu or cuda (GPU: wall time with synchronization)")
    p.add_argument("--out", default=None, help=C.OUT_HELP)
    args = p.parse_args(argv)
    global CLOCK, DEVICE
    DEVICE, CLOCK = args.device, ("wall" if args.device.startswith("cuda") else "cpu")
    torch.set_num_threads(args.threads)
    batch, size = C.CPU_SIZES[args.backbone]
    batch, size = args.batch_size or batch, args.image_size or size
    backbone = C.build_backbone(args.backbone, size)
    backbone.model.to(args.device)  # every method is a deep copy of it
    x = backbone.make_input(batch, size).to(args.device)
    if args.channels_last:
        if x.dim() != 4:
            raise ValueError(f"--channels_last needs a conv backbone with 4-d inputs; {args.backbone} takes {x.dim()}-d")
        backbone.model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    results = {"single": single, "instances": instances, "mixed": mixed}[args.part](args, backbone, x)
    command = "python benchmarks/bench_inference.py " + " ".join(argv if argv is not None else sys.argv[1:])
    clock = "CPU time" if CLOCK == "cpu" else f"{args.device} wall time"
    layout = ", channels_last" if args.channels_last else ""
    title = f"{args.backbone}, batch {batch}, {size} px{layout}, {args.threads} thread(s), {clock} ratios to base"
    if args.part == "instances":
        title = f"{args.backbone}, r={args.ranks[0]}, {args.instances} copies of each model, " + title.split(", ", 1)[1]
    text = f"`{command}` ({time.perf_counter() - start:.0f} s)\n\n" + (
        instances_table if args.part == "instances" else table
    )(results, title)
    print(text)
    out = C.output_dir(args.out, "bench_inference")
    suffix = "" if args.device == "cpu" else f"_{args.device.split(':')[0]}"
    suffix += "_channels_last" if args.channels_last else ""
    stem = os.path.join(out, f"inference_{args.part}_{args.backbone}{suffix}")
    with open(stem + ".md", "w") as f:
        f.write(text)
    with open(stem + ".json", "w") as f:
        json.dump(dict(config=vars(args), batch=batch, image_size=size, results=results), f, indent=1)


if __name__ == "__main__":
    main()
