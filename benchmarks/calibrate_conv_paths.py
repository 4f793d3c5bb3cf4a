"""Calibrate FTN's choice among three conv paths, by measurement.

    python benchmarks/calibrate_conv_paths.py            # ~2 min on one CPU thread

Times a whole adapted conv (frozen base conv included) on each path: three-op (base conv + 1×1 down, depthwise k×k,
1×1 up), two-op (base conv + a k×k conv down with the kernel built from the factors, 1×1 up) and materialized
(one conv with W + ΔW), on the conv shapes of a quarter-width ResNet-18 (batch 32, 32 px) and of ResNet-18/50
(batch 4, 64 px) at r = 1, 4, 16, forward + backward ("train") and forward only under no_grad ("infer"). Fits by
least squares the two time differences of `compute_path.CONV_PATH_FIT` on the features of
`compute_path.conv_path_features`, prints the coefficients to paste there, and writes the table of measured times
and the fit's choices to calibrate_conv_paths_<device>.md / .json in --out.

On CPU the clock is the thread's CPU time (`time.thread_time`), not wall time: on a shared machine another
process taking the core stops the wall clock's victim but not its CPU-time count. Each time is the minimum over
interleaved repeats (the least disturbed sample).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
from ftn_peft import functional as FF  # noqa: E402
from ftn_peft.compute_path import conv_extra_macs, conv_path_features, conv_positions, factorized_cost_ratio  # noqa: E402,E501

# (label, batch, Cin, Cout, input size, stride, kernel): the conv shapes of the benchmarked networks
SHAPES = [
    ("¼-R18 layer1", 32, 16, 16, 8, 1, 3),
    ("¼-R18 layer2.0", 32, 16, 32, 8, 2, 3),
    ("¼-R18 layer2", 32, 32, 32, 4, 1, 3),
    ("¼-R18 layer3", 32, 64, 64, 2, 1, 3),
    ("¼-R18 layer4", 32, 128, 128, 1, 1, 3),
    ("¼-R18 downsample", 32, 32, 64, 4, 2, 1),
    ("R18/50 layer1", 4, 64, 64, 16, 1, 3),
    ("R18 layer2.0", 4, 64, 128, 16, 2, 3),
    ("R50 layer2.0", 4, 128, 128, 16, 2, 3),
    ("R18/50 layer2", 4, 128, 128, 8, 1, 3),
    ("R18/50 layer3", 4, 256, 256, 4, 1, 3),
    ("R18/50 layer4", 4, 512, 512, 2, 1, 3),
    ("R50 layer4.0", 4, 512, 512, 4, 2, 3),
    ("R50 1x1 up", 4, 64, 256, 16, 1, 1),
    ("R50 1x1 down", 4, 1024, 256, 4, 1, 1),
    ("R50 1x1 layer4", 4, 512, 2048, 2, 1, 1),
]
RANKS = (1, 4, 16)
PATHS = ("three", "two", "materialized")


def clock(device: str):
    return time.thread_time if device == "cpu" else time.perf_counter


def measure(device: str, repeats: int, inner: int) -> list[dict]:
    """Per shape, rank and mode, the time of the whole adapted layer (base conv included) on each path."""
    rows = []
    for label, batch, cin, cout, size, stride, k in SHAPES:
        base = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False).to(device)
        base.requires_grad_(False)
        for r in RANKS:
            torch.manual_seed(0)
            x = torch.randn(batch, cin, size, size, device=device, requires_grad=True)
            factors = [torch.randn(r, n, device=device, requires_grad=True) for n in (k * k, cin, cout)]
            grad = torch.randn_like(base(x))

            def layer(path):
                if path == "materialized":
                    delta = FF.delta_weight(FF.CONV, factors, tuple(base.weight.shape), 0.5)
                    return base._conv_forward(x, base.weight + delta, None)
                delta = FF.conv_delta(x, factors, (k, k), stride, k // 2, 1, 1, 0.5, two_op=path == "two")
                return base(x) + delta

            def infer(path):
                with torch.no_grad():
                    layer(path)

            paths = PATHS if k > 1 else PATHS[1:]  # a 1×1 kernel's small ops are the two-op fold
            jobs = {("train", p): (lambda p=p: layer(p).backward(grad)) for p in paths}
            jobs.update({("infer", p): (lambda p=p: infer(p)) for p in paths})
            times = C.interleaved(jobs, repeats, 1, device, inner, clock(device))
            features = conv_path_features(r, (k * k, cin, cout), base, x)
            for mode in ("train", "infer"):
                us = {p: 1e6 * min(times[(mode, p)]) for p in paths}
                us.setdefault("three", us["two"])
                rows.append({"shape": label, "batch": batch, "cin": cin, "cout": cout, "size": size, "k": k,
                             "stride": stride, "r": r, "mode": mode, "us": us, "features": features})
            print(f"{label:18s} r={r:2d} " + " ".join(
                f"{row['mode']} " + " ".join(f"{p} {t:6.0f}" for p, t in row["us"].items()) for row in rows[-2:]),
                flush=True)
    return rows


def fit(rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Least-squares coefficients of (two-op − three-op), per mode, and (materialized − best small-op path) with
    gradients; without gradients the FLOP rule decides materializing (building W + ΔW once per call)."""
    coef = {"two_op": {}, "materialized": {}}
    for mode in ("train", "infer"):
        sel = [row for row in rows if row["mode"] == mode]
        for target in coef:
            if target == "materialized" and mode == "infer":
                continue
            use = [row for row in sel if row["k"] > 1] if target == "two_op" else sel
            a = torch.tensor([row["features"][target] for row in use], dtype=torch.float64)
            b = torch.tensor([[_difference(row, target)] for row in use], dtype=torch.float64)
            coef[target][mode] = [round(v, 3) for v in torch.linalg.lstsq(a, b).solution.flatten().tolist()]
    return coef


def _difference(row: dict, target: str) -> float:
    us = row["us"]
    if target == "two_op":
        return us["two"] - us["three"]
    return us["materialized"] - min(us["two"], us["three"])


def predicted_path(coef: dict, row: dict) -> str:
    two = sum(c * f for c, f in zip(coef["two_op"][row["mode"]], row["features"]["two_op"])) if row["k"] > 1 else 0
    small = "two" if two < 0 or row["k"] == 1 else "three"
    if row["mode"] == "train":
        mat = sum(c * f for c, f in zip(coef["materialized"]["train"], row["features"]["materialized"]))
    else:
        base = torch.nn.Conv2d(row["cin"], row["cout"], row["k"], stride=row["stride"])
        x = torch.empty(row["batch"], row["cin"], row["size"], row["size"], device="meta")
        mat = factorized_cost_ratio(*conv_extra_macs(row["r"], (row["k"] ** 2, row["cin"], row["cout"]), base),
                                    conv_positions(x, base), row["r"], needs_grad=False) - 1.0
        mat = -mat  # < 0: materialize
    return "materialized" if mat < 0 else small


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--inner", type=int, default=5)
    p.add_argument("--out", default=None, help=C.OUT_HELP)
    p.add_argument("--refit", default=None, help="a .json this script wrote: fit and tabulate its rows again")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.refit:
        with open(args.refit) as f:
            saved = json.load(f)
        rows, seconds = saved["rows"], saved["seconds"]
    else:
        rows = measure(args.device, args.repeats, args.inner)
        seconds = time.perf_counter() - t0
    coef = fit(rows)
    cmd = f"python benchmarks/calibrate_conv_paths.py --device {args.device} --threads {args.threads}"
    lines = [f"### FTN conv paths: three-op, two-op, materialized ({args.device}, {args.threads} thread(s), "
             f"torch {torch.__version__})", "",
             f"Command: `{cmd}` ({seconds:.0f} s). Whole adapted layer (base conv included), "
             f"minimum over interleaved repeats, µs. Fit (features of `compute_path.conv_path_features`): "
             f"`CONV_PATH_FIT = {coef}`", "",
             "| shape | batch | Cin→Cout | k | size | stride | r | mode | three-op | two-op | materialized | "
             "measured best | fit's choice |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    agree = 0
    for row in rows:
        us = row["us"]
        best = min(us, key=us.get)
        choice = predicted_path(coef, row)
        agree += us[choice] <= 1.05 * us[best]
        three = f"{us['three']:.0f}" if row["k"] > 1 else "(= two)"
        lines.append(f"| {row['shape']} | {row['batch']} | {row['cin']}→{row['cout']} | {row['k']} | {row['size']} | "
                     f"{row['stride']} | {row['r']} | {row['mode']} | {three} | {us['two']:.0f} | "
                     f"{us['materialized']:.0f} | {best} | {choice} |")
    lines += ["", f"The fit's choice is within 5 % of the fastest path in {agree} of {len(rows)} cases."]
    table = "\n".join(lines) + "\n"
    out = C.output_dir(args.out, "calibrate_conv_paths")
    stem = os.path.join(out, f"calibrate_conv_paths_{args.device.split(':')[0]}")
    with open(stem + ".md", "w") as f:
        f.write(table)
    with open(stem + ".json", "w") as f:
        json.dump({"command": cmd, "seconds": seconds, "fit": coef, "rows": rows}, f, indent=1)
    print(table)
    print(f"wrote {stem}.md/.json")


if __name__ == "__main__":
    main()
