"""Training and serving costs of FTN against the base model, full fine-tuning and PEFT LoRA, in one run.

    python benchmarks/bench_train_infer.py --backbone resnet50            # CPU-sized defaults
    python benchmarks/bench_train_infer.py --backbone clip-qv --device cuda --batch_size 64 --image_size 224

Prints a table and writes bench_<backbone>_<device>.{md,csv,json} into --out (default outputs/bench_train_infer/;
the tables in docs/ come from `--out docs`). Methods: base (inference only), full
fine-tuning, LoRA at FTN's ranks on the same targets, LoRA at the rank closest to FTN's factor-parameter count, FTN.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet50", choices=sorted(C.CPU_SIZES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch_size", type=int, default=None, help="default: 4 for ResNets, 2 for CLIP (CPU sizes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads; 1 is steadiest on a shared CPU")
    p.add_argument("--image_size", type=int, default=None, help="default: 64 for ResNets, 128 for CLIP")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 16, 50])
    p.add_argument("--repeats", type=int, default=5, help="interleaved training-step repeats")
    p.add_argument("--infer_repeats", type=int, default=9)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--adapters", type=int, default=10, help="adapters to switch among")
    p.add_argument("--no_memory", action="store_true", help="skip the (slow on CPU) peak-memory step")
    p.add_argument("--out", default=None, help=C.OUT_HELP)
    return p.parse_args(argv)


def build_methods(backbone, ranks, device):
    methods = [C.build_method(backbone, "base", device=device), C.build_method(backbone, "full", device=device)]
    ftn = [C.build_method(backbone, "ftn", r, device) for r in ranks]
    lora_ranks = {r: f"lora r={r}" for r in ranks}
    matched = {}
    for m in ftn:
        factor_params = sum(p.numel() for n, p in m.model.named_parameters() if "ftn_" in n and "ftn_norm" not in n
                            and "ftn_head" not in n)
        r_l = C.closest_lora_rank(backbone, factor_params)
        matched[m.r] = (r_l, factor_params, C.lora_param_count(backbone, r_l))
        lora_ranks.setdefault(r_l, f"lora r={r_l}")
    lora = {r: C.build_method(backbone, "lora", r, device, name) for r, name in sorted(lora_ranks.items())}
    return methods + list(lora.values()) + ftn, lora, ftn, matched


def ratio_rows(times, ftn, lora, matched):
    """Per-repeat ratios (same repeat = same contention), summarised."""
    rows = []

    def add(label, kind, num, den):
        if num in times[kind] and den in times[kind]:
            per_repeat = [a / b for a, b in zip(times[kind][num], times[kind][den])]
            rows.append({"ratio": label, "measure": kind, **C.summary(per_repeat)})

    for m in ftn:
        same, close = lora[m.r].name, lora[matched[m.r][0]].name
        for kind in ("train", "infer_unmerged"):
            add(f"{m.name} / {same}", kind, m.name, same)
            if close != same:
                add(f"{m.name} / {close} (≈ params)", kind, m.name, close)
        add(f"{m.name} / full", "train", m.name, "full")
        add(f"{m.name} / base", "infer_unmerged", m.name, "base")
        add(f"{m.name} / base", "infer_merged", m.name, "base")
        add(f"{m.name} / base", "infer_unloaded", m.name, "base")
    return rows


def run(args):
    torch.set_num_threads(args.threads)
    batch, size = C.CPU_SIZES[args.backbone]
    batch, size = args.batch_size or batch, args.image_size or size
    backbone = C.build_backbone(args.backbone, size)
    x = backbone.make_input(batch, size).to(args.device)
    t0 = time.perf_counter()
    methods, lora, ftn, matched = build_methods(backbone, args.ranks, args.device)
    trainable = [m for m in methods if m.optimizer is not None]
    adapters = [m for m in methods if m.kind in ("lora", "ftn")]
    times = {}
    times["train"] = C.interleaved({m.name: (lambda m=m: C.train_step(m, backbone, x)) for m in trainable},
                                   args.repeats, args.warmup, args.device)
    infer_jobs = {m.name: (lambda m=m: C.infer(m, backbone, x)) for m in methods}
    times["infer_unmerged"] = C.interleaved(infer_jobs, args.infer_repeats, args.warmup, args.device)
    for m in adapters:
        m.model.base_model.merge_adapter()
    times["infer_merged"] = C.interleaved(infer_jobs, args.infer_repeats, args.warmup, args.device)
    for m in adapters:
        m.model.base_model.unmerge_adapter()
    # merge_and_unload() gives the plain backbone back: what "costs nothing once merged" means without wrappers.
    unloaded = {m.name: C.Method(m.name, m.kind, m.r, copy.deepcopy(m.model).merge_and_unload()) for m in adapters}
    unloaded["base"] = methods[0]
    times["infer_unloaded"] = C.interleaved({k: (lambda u=u: C.infer(u, backbone, x)) for k, u in unloaded.items()},
                                            args.infer_repeats, args.warmup, args.device)
    del unloaded
    rows = []
    for m in methods:
        row = {"method": m.name, "kind": m.kind, "r": m.r, "trainable_params": m.trainable}
        for kind, per in times.items():
            if m.name in per:
                s = C.summary(per[m.name])
                row.update({f"{kind}_ms": 1e3 * s["median"], f"{kind}_q1_ms": 1e3 * s["q1"],
                            f"{kind}_q3_ms": 1e3 * s["q3"]})
        if m.optimizer is not None and not args.no_memory:
            persistent, transient = C.train_peak_bytes(m, backbone, x, args.device)
            row.update({"persistent_MiB": persistent / 2**20, "step_peak_MiB": transient / 2**20,
                        "train_peak_MiB": (persistent + transient) / 2**20})
        if m.kind != "base":
            row.update(C.adapter_file(m) or {})
            sw = C.switch_cost(m, args.adapters, args.device)
            row.update({"switch_ms": 1e3 * sw["unmerged"], "switch_merged_ms": 1e3 * sw["merged"]})
        rows.append(row)
        print(f"  measured {m.name}", file=sys.stderr, flush=True)
    setup = {"backbone": args.backbone, "device": args.device, "batch_size": batch, "image_size": size,
             "repeats": args.repeats, "infer_repeats": args.infer_repeats, "threads": torch.get_num_threads(),
             "torch": torch.__version__, "wall_s": None,
             "matched_lora": {str(k): {"lora_r": v[0], "ftn_factor_params": v[1], "lora_factor_params": v[2]}
                              for k, v in matched.items()}}
    result = {"setup": setup, "methods": rows, "ratios": ratio_rows(times, ftn, lora, matched), "raw_s": times}
    setup["wall_s"] = time.perf_counter() - t0
    return result


def _fmt(v, digits=1):
    if v is None or v == "":
        return ""
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def to_markdown(result) -> str:
    s = result["setup"]
    cmd = f"python benchmarks/bench_train_infer.py --backbone {s['backbone']} --device {s['device']} " \
          f"--batch_size {s['batch_size']} --image_size {s['image_size']} --threads {s['threads']}"
    lines = [f"### {s['backbone']} on {s['device']} (batch {s['batch_size']}, {s['image_size']}px, "
             f"{s['threads']} threads, torch {s['torch']})", "", f"Command: `{cmd}` ({s['wall_s']:.0f} s).", "",
             "| method | trainable | file bytes (header) | file exact | train ms [IQR] | infer ms unmerged [IQR] | "
             "infer ms merged | infer ms merged & unloaded | train peak MiB (step) | switch ms | switch merged ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["methods"]:
        def t(k):
            return f"{r[k + '_ms']:.1f} [{r[k + '_q1_ms']:.1f}, {r[k + '_q3_ms']:.1f}]" if k + "_ms" in r else ""
        file = f"{r['file_bytes']:,} ({r['header_bytes']:,})" if "file_bytes" in r else ""
        peak = f"{r['train_peak_MiB']:.0f} ({r['step_peak_MiB']:.0f})" if "train_peak_MiB" in r else ""
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {file} | {_fmt(r.get('exact'))} | {t('train')} | "
                     f"{t('infer_unmerged')} | {t('infer_merged')} | {t('infer_unloaded')} | {peak} | {_fmt(r.get('switch_ms'), 2)} | "
                     f"{_fmt(r.get('switch_merged_ms'), 1)} |")
    lines += ["", "| ratio (per repeat) | measure | median | IQR | min | max |", "|---|---|---|---|---|---|"]
    for q in result["ratios"]:
        lines.append(f"| {q['ratio']} | {q['measure']} | {q['median']:.3f} | [{q['q1']:.3f}, {q['q3']:.3f}] | "
                     f"{q['min']:.3f} | {q['max']:.3f} |")
    m = s["matched_lora"]
    lines += ["", "Closest LoRA rank by factor parameters: " + "; ".join(
        f"FTN r={k}: {v['ftn_factor_params']:,} vs LoRA r={v['lora_r']}: {v['lora_factor_params']:,}"
        for k, v in m.items()) + "."]
    return "\n".join(lines) + "\n"


def write(result, prefix):
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump(result, f, indent=1)
    keys = sorted({k for r in result["methods"] for k in r})
    with open(prefix + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(result["methods"])
    with open(prefix + ".md", "w") as f:
        f.write(to_markdown(result))


def main(argv=None):
    args = parse_args(argv)
    result = run(args)
    prefix = os.path.join(C.output_dir(args.out, "bench_train_infer"),
                          f"bench_{args.backbone}_{args.device.split(':')[0]}")
    write(result, prefix)
    print(to_markdown(result))
    print(f"wrote {prefix}.md/.csv/.json")


if __name__ == "__main__":
    main()
