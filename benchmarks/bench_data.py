"""The streamed data pipeline (examples/image_data.py, examples/domains.py): memory and speed.

1. Peak RSS does not grow with the data set. Two imagefolders of generated JPEGs are written (--small and --large
   images, default 2,000 and 20,000; benchmarks/make_image_domains.py, nothing is kept); for each, a fresh
   process opens it as a domain and reads one full training epoch through the DataLoader (workers decode and
   transform). Reported: the peak RSS of the main process, of the largest worker, and main + workers x that.
2. Loader speed: images per second of the pipeline alone (no model) against a plain torchvision `ImageFolder` +
   `DataLoader` with the same transform, batch size and workers, timed interleaved (A, B, B, A, ...) so that
   load from other processes hits both alike; the ratio is taken per repeat.

    python benchmarks/bench_data.py                        # CPU: 64 px JPEGs -> 64 px crops, 2 workers
    python benchmarks/bench_data.py --size 256 --image_size 224 --workers 8 --speed_images 20000   # GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "examples")]

from common import OUT_HELP, output_dir  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", type=int, default=2000)
    p.add_argument("--large", type=int, default=20000)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--size", type=int, default=64, help="side of the generated JPEGs")
    p.add_argument("--image_size", type=int, default=64, help="side of the transformed images")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--speed_images", type=int, default=4000, help="images per timed pass")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--data_dir", default=None, help="where to write the JPEGs (default: a temporary dir, removed)")
    p.add_argument("--out", default=None, help=OUT_HELP)
    p.add_argument("--child", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def transforms(args):
    import image_data

    return image_data.transforms(image_data.data_config(image_size=args.image_size), augment=True)


def streamed_train(args, folder: str):
    """The training split of `folder` as train_multidomain.py builds it (domains file entry -> Images view)."""
    import domains

    (source,) = domains.parse({"domains": {"bench": {"imagefolder": folder, "seed": 0}}})
    train_tf, eval_tf = transforms(args)
    train, _, _ = domains.build_domain(domains.open_source(source), 0, train_tf, eval_tf, augment=True)
    return train


def rss_child(args, folder: str) -> dict:
    """One epoch over the whole training split; peak RSS in bytes (ru_maxrss is KiB on Linux)."""
    import image_data

    start = time.perf_counter()
    train = streamed_train(args, folder)
    seen = 0
    for x, y in image_data.make_loader(train, args.batch_size, None, args.workers, seed=0, epoch=0):
        seen += len(y)
        x.sum()  # touch the batch
    main = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest joined worker
    return {"images": seen, "main_peak_rss": main, "worker_peak_rss": worker,
            "total_peak_rss": main + args.workers * worker, "seconds": time.perf_counter() - start}


def speed_child(args, folder: str) -> dict:
    """Interleaved passes of the two loaders over the same `speed_images` images."""
    import torch
    from torch.utils.data import DataLoader, Subset
    from torchvision.datasets import ImageFolder

    import image_data

    train_tf, _ = transforms(args)
    ours_all = streamed_train(args, folder)
    reference = ImageFolder(folder, transform=train_tf)
    n = min(args.speed_images, len(ours_all), len(reference))
    order = torch.randperm(len(ours_all), generator=torch.Generator().manual_seed(0))[:n].tolist()
    ref_order = torch.randperm(len(reference), generator=torch.Generator().manual_seed(0))[:n].tolist()

    def ours():
        return image_data.make_loader(ours_all, args.batch_size, order, args.workers, seed=0, epoch=0)

    def plain():
        return DataLoader(Subset(reference, ref_order), batch_size=args.batch_size, num_workers=args.workers)

    def rate(make) -> float:
        start = time.perf_counter()
        count = sum(len(y) for _, y in make())
        return count / (time.perf_counter() - start)

    rate(ours), rate(plain)  # warm the page cache and the imports
    runs = {"ours": [], "torchvision": []}
    for r in range(args.repeats):
        pair = [("ours", ours), ("torchvision", plain)]
        for name, make in (pair if r % 2 == 0 else pair[::-1]):
            runs[name].append(rate(make))
    ratios = [a / b for a, b in zip(runs["ours"], runs["torchvision"])]
    return {"images_per_pass": n, "runs": runs, "ratios": ratios,
            "ours_median": statistics.median(runs["ours"]),
            "torchvision_median": statistics.median(runs["torchvision"]),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def run_child(args, mode: str, folder: str) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", mode, folder,
            "--batch_size", str(args.batch_size), "--workers", str(args.workers), "--image_size", str(args.image_size),
            "--speed_images", str(args.speed_images), "--repeats", str(args.repeats)]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def generate(root: str, images: int, classes: int, size: int) -> str:
    from make_image_domains import write_domains

    if images % classes:
        raise ValueError(f"{images} images must be a multiple of --classes {classes}")
    (folder,) = write_domains(os.path.join(root, f"n{images}"), domains=1, classes=classes,
                              per_class=images // classes, size=size, seed=images)
    return folder


def run(args) -> dict:
    root = args.data_dir or tempfile.mkdtemp(prefix="bench_data_")
    try:
        folders = {n: generate(root, n, args.classes, args.size) for n in (args.small, args.large)}
        rss = {}
        for n in (args.small, args.large, args.small, args.large):  # interleaved, two of each
            rss.setdefault(n, []).append(run_child(args, "rss", folders[n]))
        speed = run_child(args, "speed", folders[args.large])
    finally:
        if args.data_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    peaks = {n: max(r["total_peak_rss"] for r in runs) for n, runs in rss.items()}
    return {"settings": {k: v for k, v in vars(args).items() if k not in ("child", "out", "data_dir")},
            "rss": {str(n): runs for n, runs in rss.items()}, "peak_ratio": peaks[args.large] / peaks[args.small],
            "speed": speed, "cpus": os.cpu_count()}


def table(result: dict) -> str:
    s = result["settings"]
    mib = 1 / 2**20
    lines = [f"JPEGs {s['size']} px -> {s['image_size']} px (random resized crop + flip + normalise), batch "
             f"{s['batch_size']}, {s['workers']} workers, {result['cpus']} CPUs", "",
             "| images | main peak RSS (MiB) | largest worker (MiB) | main + workers (MiB) | epoch (s) |",
             "|---:|---:|---:|---:|---:|"]
    for n, runs in result["rss"].items():
        for r in runs:
            lines.append(f"| {int(n):,} | {r['main_peak_rss'] * mib:.0f} | {r['worker_peak_rss'] * mib:.0f} | "
                         f"{r['total_peak_rss'] * mib:.0f} | {r['seconds']:.1f} |")
    lines += ["", f"peak RSS (main + workers), {s['large']:,} / {s['small']:,} images: "
                  f"{result['peak_ratio']:.3f}", ""]
    sp = result["speed"]
    lines += [f"| loader ({sp['images_per_pass']:,} images a pass, {s['repeats']} interleaved repeats) | images/s "
              "(median) | per-repeat values |", "|---|---:|---|"]
    for name, label in (("ours", "image_data.Images + make_loader"),
                        ("torchvision", "torchvision ImageFolder + DataLoader")):
        lines.append(f"| {label} | {statistics.median(sp['runs'][name]):.0f} | "
                     f"{', '.join(f'{v:.0f}' for v in sp['runs'][name])} |")
    lines += ["", f"ratio ours / torchvision per repeat: median {sp['ratio_median']:.3f} (min {sp['ratio_min']:.3f}, "
                  f"max {sp['ratio_max']:.3f})"]
    return "\n".join(lines)


def write(result: dict, out: str) -> None:
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(table(result) + "\n")


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        mode, folder = args.child
        print(json.dumps((rss_child if mode == "rss" else speed_child)(args, folder)))
        return
    result = run(args)
    out = os.path.join(output_dir(args.out, "bench_data"), "bench_data_cpu")
    write(result, out)
    print(table(result))
    print(f"\nwritten to {out}.md / .json")


if __name__ == "__main__":
    main()
