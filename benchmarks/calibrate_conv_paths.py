"""Calibrate the choice between FTN's two small-op paths for k×k convs, by measurement.

    python benchmarks/calibrate_conv_paths.py            # ~1 min on one CPU thread

Times `functional.conv_delta` three-op (1×1 down, depthwise k×k, 1×1 up) and two-op (built k×k kernel down, 1×1
up) on the 3×3 conv shapes of a quarter-width ResNet-18 (batch 32, 32 px) and of ResNet-18/50 (batch 4, 64 px)
at r = 1, 4, 16, forward + backward ("train") and forward only under no_grad ("infer"), and fits the two-op minus
three-op time by least squares on the features of `compute_path.conv_two_op_features`. Prints the coefficients
to paste into `compute_path.TWO_OP_FIT`, and writes a table of measured and predicted differences to
calibrate_conv_paths_<device>.md / .json in --out.

On CPU the clock is the thread's CPU time (`time.thread_time`), not wall time: on a shared machine another
process taking the core pauses the wall clock's victim but not its CPU-time count. Each time is the minimum
over interleaved repeats (the least disturbed sample).
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
from ftn_peft.compute_path import conv_two_op_features  # noqa: E402

# (label, batch, Cin, Cout, input size, stride): every 3×3 conv shape of the benchmarked networks
SHAPES = [
    ("¼-R18 layer1", 32, 16, 16, 8, 1),
    ("¼-R18 layer2.0", 32, 16, 32, 8, 2),
    ("¼-R18 layer2", 32, 32, 32, 4, 1),
    ("¼-R18 layer3", 32, 64, 64, 2, 1),
    ("¼-R18 layer4", 32, 128, 128, 1, 1),
    ("R18/50 layer1", 4, 64, 64, 16, 1),
    ("R18 layer2.0", 4, 64, 128, 16, 2),
    ("R50 layer2.0", 4, 128, 128, 16, 2),
    ("R18/50 layer2", 4, 128, 128, 8, 1),
    ("R18/50 layer3", 4, 256, 256, 4, 1),
    ("R18/50 layer4", 4, 512, 512, 2, 1),
    ("R50 layer4.0", 4, 512, 512, 4, 2),
]
RANKS = (1, 4, 16)


def clock(device: str):
    return time.thread_time if device == "cpu" else time.perf_counter


def measure(device: str, repeats: int, inner: int) -> list[dict]:
    rows = []
    C.time.perf_counter, saved = clock(device), C.time.perf_counter  # common.timed reads time.perf_counter
    try:
        for label, batch, cin, cout, size, stride in SHAPES:
            base = torch.nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
            for r in RANKS:
                torch.manual_seed(0)
                x = torch.randn(batch, cin, size, size, device=device, requires_grad=True)
                factors = [torch.randn(r, n, device=device, requires_grad=True) for n in (9, cin, cout)]
                out_size = (size + stride - 1) // stride
                grad = torch.randn(batch, cout, out_size, out_size, device=device)

                def delta(two_op):
                    return FF.conv_delta(x, factors, (3, 3), stride, 1, 1, 1, 0.5, two_op=two_op)

                def infer(two_op):
                    with torch.no_grad():
                        delta(two_op)

                jobs = {
                    ("train", False): lambda: delta(False).backward(grad),
                    ("train", True): lambda: delta(True).backward(grad),
                    ("infer", False): lambda: infer(False),
                    ("infer", True): lambda: infer(True),
                }
                times = C.interleaved(jobs, repeats, 1, device, inner)
                features = conv_two_op_features(r, (9, cin, cout), base, x)
                for mode in ("train", "infer"):
                    three, two = (1e6 * min(times[(mode, t)]) for t in (False, True))
                    rows.append({"shape": label, "batch": batch, "cin": cin, "cout": cout, "size": size,
                                 "stride": stride, "r": r, "mode": mode, "three_op_us": three, "two_op_us": two,
                                 "features": features})
                print(f"{label:16s} r={r:2d} " + " ".join(
                    f"{row['mode']} 3op {row['three_op_us']:7.1f} 2op {row['two_op_us']:7.1f} µs" for row in rows[-2:]),
                    flush=True)
    finally:
        C.time.perf_counter = saved
    return rows


def fit(rows: list[dict]) -> dict[str, list[float]]:
    coef = {}
    for mode in ("train", "infer"):
        sel = [row for row in rows if row["mode"] == mode]
        a = torch.tensor([row["features"] for row in sel], dtype=torch.float64)
        b = torch.tensor([[row["two_op_us"] - row["three_op_us"]] for row in sel], dtype=torch.float64)
        coef[mode] = [round(v, 3) for v in torch.linalg.lstsq(a, b).solution.flatten().tolist()]
    return coef


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--inner", type=int, default=5)
    p.add_argument("--out", default=None, help=C.OUT_HELP)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = measure(args.device, args.repeats, args.inner)
    coef = fit(rows)
    cmd = f"python benchmarks/calibrate_conv_paths.py --device {args.device} --threads {args.threads}"
    lines = [f"### Two-op vs three-op k×k conv delta ({args.device}, {args.threads} thread(s), torch {torch.__version__})",
             "", f"Command: `{cmd}` ({time.perf_counter() - t0:.0f} s). Fit (µs, features of "
             f"`compute_path.conv_two_op_features`): `TWO_OP_FIT = {coef}`", "",
             "| shape | batch | Cin→Cout | size | stride | r | mode | three-op µs | two-op µs | measured winner | "
             "fit's choice |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    agree = 0
    for row in rows:
        predicted = sum(c * f for c, f in zip(coef[row["mode"]], row["features"]))
        winner = "two" if row["two_op_us"] < row["three_op_us"] else "three"
        choice = "two" if predicted < 0 else "three"
        agree += winner == choice
        lines.append(f"| {row['shape']} | {row['batch']} | {row['cin']}→{row['cout']} | {row['size']} | "
                     f"{row['stride']} | {row['r']} | {row['mode']} | {row['three_op_us']:.0f} | "
                     f"{row['two_op_us']:.0f} | {winner} | {choice} |")
    lines += ["", f"The fit picks the measured winner in {agree} of {len(rows)} cases."]
    table = "\n".join(lines) + "\n"
    out = C.output_dir(args.out, "calibrate_conv_paths")
    stem = os.path.join(out, f"calibrate_conv_paths_{args.device.split(':')[0]}")
    with open(stem + ".md", "w") as f:
        f.write(table)
    with open(stem + ".json", "w") as f:
        json.dump({"command": cmd, "fit": coef, "rows": rows}, f, indent=1)
    print(table)
    print(f"wrote {stem}.md/.json")


if __name__ == "__main__":
    main()
