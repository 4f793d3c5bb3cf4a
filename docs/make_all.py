"""Regenerate every figure, table and result file in docs/ from the current code, with one command.

    python docs/make_all.py --out docs                  # everything (hours on a 2-core CPU; run on a quiet machine)
    python docs/make_all.py --out docs --only serving demo
    python docs/make_all.py --quick                     # every command at toy sizes, into outputs/make_all/
                                                        # (16 min on a busy 2-core CPU)

Each job below runs one script and lists the files it makes; after the job, every listed file must have been
written again, so this list cannot silently fall behind the scripts. `--quick` runs the same scripts with tiny
settings (a smoke test of this command; its numbers mean nothing) and never writes into docs/ unless told to.
Timings are only meaningful on an otherwise idle machine: the benchmarks say so in their tables.

| job | script | files in --out |
|---|---|---|
| demo | examples/train_multidomain.py (3 seeds) | demo_results.md, demo_accuracy_vs_params.png |
| demo5 | examples/train_multidomain.py --seeds 0,1,2,3,4 | demo_results_5seeds.md |
| demo_zero_init | examples/train_multidomain.py --ftn_init zero | demo_results_zero_init.md |
| vit_demo | examples/train_vit_demo.py (after demo: plots both) | vit_demo_results.{md,csv}, vit_demo_accuracy_vs_params.png |
| generation | examples/train_generator.py (3 seeds) | generation_results.md, generation_reconstructions.png |
| analysis_heatmap_prune | examples/analysis_demo.py --only heatmap prune | analysis_heatmap_domains.png, analysis_heatmap_ranks.png, analysis_prune_curve.png, analysis_results_heatmap_prune.json |
| analysis_ranks | examples/analysis_demo.py --only ranks | analysis_results_ranks.json |
| analysis_convert | examples/analysis_demo.py --only convert --seeds 0 1 | analysis_results_convert.json |
| bench_resnet50, bench_clip-qv, bench_clip-o | benchmarks/bench_train_infer.py | bench_<backbone>_cpu.{md,csv,json} |
| compute_paths_resnet50, compute_paths_clip-qv | benchmarks/bench_compute_paths.py | compute_paths_<backbone>_cpu.md |
| calibrate_conv_paths | benchmarks/calibrate_conv_paths.py | calibrate_conv_paths_cpu.{md,json} |
| widths, widths_compiled | benchmarks/bench_widths.py | widths_cpu.{md,json}, widths_compiled_cpu.{md,json} |
| scaling | benchmarks/bench_scaling.py | scaling_resnet18_cpu.{md,json,png} |
| serving | benchmarks/bench_serving.py | serving_bench.json, serving.png |
| bench_data | benchmarks/bench_data.py (streamed data: peak RSS, loader speed) | bench_data_cpu.{md,json} |
| inference_single_resnet50(_channels_last), inference_instances_resnet50, inference_single_clip-qv, inference_mixed_resnet18, inference_mixed_clip-qv | benchmarks/bench_inference.py | inference_<part>_<backbone>[_channels_last].{md,json} |
| zoo | benchmarks/zoo_table.py | zoo.md |
| dense | examples/train_dense.py (3 seeds) | dense_results.md, dense_predictions.png |
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Job:
    name: str
    script: str
    args: list  # "{out}" is the output directory, "{work}" a scratch directory for this job
    quick: list  # replaces values of `args` / adds flags for --quick
    files: list  # what the job leaves in {out}
    copies: dict = field(default_factory=dict)  # {work}-relative file -> name in {out}


DEMO_QUICK = ["--domains", "inverted", "--methods", "ftn,bn_head", "--ranks", "1", "--seeds", "0", "--lr_grid", "1",
              "--epochs", "1", "--source_epochs", "1", "--cache_dir", "{work}/../cache"]
ANALYSIS_QUICK = ["--epochs", "1", "--seeds", "0"]
BENCH_QUICK = ["--ranks", "1", "--repeats", "1", "--infer_repeats", "1", "--adapters", "2", "--no_memory"]

JOBS = [
    Job("demo", "examples/train_multidomain.py", ["--output_dir", "{work}"], DEMO_QUICK,
        ["demo_results.md", "demo_accuracy_vs_params.png"],
        {"results.md": "demo_results.md", "accuracy_vs_params.png": "demo_accuracy_vs_params.png"}),
    Job("demo5", "examples/train_multidomain.py", ["--output_dir", "{work}", "--seeds", "0,1,2,3,4"], DEMO_QUICK,
        ["demo_results_5seeds.md"], {"results.md": "demo_results_5seeds.md"}),
    Job("demo_zero_init", "examples/train_multidomain.py",
        ["--output_dir", "{work}", "--methods", "ftn,bn_head,lora", "--ranks", "1", "--ftn_init", "zero"],
        DEMO_QUICK, ["demo_results_zero_init.md"], {"results.md": "demo_results_zero_init.md"}),
    Job("vit_demo", "examples/train_vit_demo.py", ["--out", "{out}", "--resnet_csv", "{work}/../demo/results.csv"],
        ["--seeds", "0", "--epochs", "1", "--domains", "inverted", "--lr_grid", "1", "--max_widen", "0",
         "--source_epochs", "1", "--workers", "1", "--cache_dir", "{work}/../cache"],
        [f"vit_demo_{f}" for f in ("results.md", "results.csv", "accuracy_vs_params.png")]),
    Job("generation", "examples/train_generator.py", ["--output_dir", "{work}"],
        ["--domains", "colour", "--ranks", "1", "--lora_ranks", "1", "--seeds", "0", "--images", "4", "--steps", "3",
         "--source_steps", "3", "--cache_dir", "{work}/../cache"],
        ["generation_results.md", "generation_reconstructions.png"],
        {"results.md": "generation_results.md", "reconstructions.png": "generation_reconstructions.png"}),
    Job("analysis_heatmap_prune", "examples/analysis_demo.py", ["--out", "{out}", "--only", "heatmap", "prune"],
        ANALYSIS_QUICK, ["analysis_heatmap_domains.png", "analysis_heatmap_ranks.png", "analysis_prune_curve.png",
                         "analysis_results_heatmap_prune.json"]),
    Job("analysis_ranks", "examples/analysis_demo.py", ["--out", "{out}", "--only", "ranks"], ANALYSIS_QUICK,
        ["analysis_results_ranks.json"]),
    Job("analysis_convert", "examples/analysis_demo.py", ["--out", "{out}", "--only", "convert", "--seeds", "0", "1"],
        ANALYSIS_QUICK, ["analysis_results_convert.json"]),
    *[Job(f"bench_{b}", "benchmarks/bench_train_infer.py", ["--backbone", b, "--out", "{out}"],
          BENCH_QUICK + ["--image_size", "64", "--batch_size", "2"],
          [f"bench_{b}_cpu.{ext}" for ext in ("md", "csv", "json")]) for b in ("resnet50", "clip-qv", "clip-o")],
    *[Job(f"compute_paths_{b}", "benchmarks/bench_compute_paths.py", ["--backbone", b, "--r", "4", "--out", "{out}"],
          ["--repeats", "1", "--infer_repeats", "1"], [f"compute_paths_{b}_cpu.md"]) for b in ("resnet50", "clip-qv")],
    Job("calibrate_conv_paths", "benchmarks/calibrate_conv_paths.py", ["--out", "{out}"],
        ["--repeats", "1", "--inner", "1"], ["calibrate_conv_paths_cpu.md", "calibrate_conv_paths_cpu.json"]),
    Job("widths", "benchmarks/bench_widths.py", ["--modes", "eager", "channels_last", "--out", "{out}"],
        ["--backbones", "resnet18-q", "--ranks", "1", "--repeats", "1", "--infer_repeats", "1"],
        ["widths_cpu.md", "widths_cpu.json"]),
    Job("widths_compiled", "benchmarks/bench_widths.py",
        ["--backbones", "resnet18-q", "--modes", "compiled", "--name", "widths_compiled", "--out", "{out}"],
        ["--repeats", "1", "--infer_repeats", "1"], ["widths_compiled_cpu.md", "widths_compiled_cpu.json"]),
    Job("scaling", "benchmarks/bench_scaling.py", ["--out", "{out}"],
        ["--ranks", "1", "2", "--adapter_counts", "1", "2", "--repeats", "1", "--image_size", "32"],
        [f"scaling_resnet18_cpu.{ext}" for ext in ("md", "json", "png")]),
    Job("zoo", "benchmarks/zoo_table.py", ["--out", "{out}"], ["--models", "timm/regnety_002", "hf/resnet-50"],
        ["zoo.md"]),
    Job("serving", "benchmarks/bench_serving.py", ["--out", "{out}"],
        ["--res", "16", "--batch", "2", "--tasks", "1", "2", "--repeats", "1"], ["serving_bench.json", "serving.png"]),
    Job("bench_data", "benchmarks/bench_data.py", ["--repeats", "7", "--out", "{out}"],
        ["--small", "40", "--large", "80", "--classes", "4", "--speed_images", "40", "--repeats", "1"],
        ["bench_data_cpu.md", "bench_data_cpu.json"]),
    Job("dense", "examples/train_dense.py", ["--output_dir", "{work}"],
        ["--seeds", "0", "--ranks", "1", "--epochs", "1", "--train_size", "8", "--test_size", "4", "--batch_size", "4",
         "--image_size", "32", "--source_scenes", "8", "--source_epochs", "1", "--cache_dir", "{work}/../cache"],
        ["dense_results.md", "dense_predictions.png"],
        {"results.md": "dense_results.md", "predictions.png": "dense_predictions.png"}),
    *[Job(f"inference_{part}_{b}{suffix}", "benchmarks/bench_inference.py",
          ["--backbone", b, "--part", part, "--out", "{out}", *args],
          ["--ranks", "1", "--tasks", "1", "2", "--repeats", "1", "--image_size", "32", "--batch_size", "2",
           "--instances", "1"],
          [f"inference_{part}_{b}{suffix}.{ext}" for ext in ("md", "json")])
      for b, part, suffix, args in (("resnet50", "single", "", ["--ranks", "1", "4", "16", "50"]),
                                    ("resnet50", "single", "_channels_last", ["--ranks", "1", "4", "16", "50",
                                                                               "--channels_last"]),
                                    ("resnet50", "instances", "", ["--repeats", "20"]),
                                    ("clip-qv", "single", "", ["--ranks", "1", "4", "16", "50"]),
                                    ("resnet18", "mixed", "", ["--batch_size", "40", "--repeats", "7"]),
                                    ("clip-qv", "mixed", "", ["--batch_size", "20", "--repeats", "5"]))],
]


def merge(args: list, quick: list) -> list:
    """`args` with every `--flag values...` of `quick` replacing the same flag's values (or added)."""
    def parse(tokens):
        out, flag = {}, None
        for t in tokens:
            if t.startswith("--"):
                flag = t
                out[flag] = []
            else:
                out[flag].append(t)
        return out

    merged = {**parse(args), **parse(quick)}
    return [t for flag, values in merged.items() for t in (flag, *values)]


def run(job: Job, out: Path, work_root: Path, quick: bool) -> float:
    work = work_root / job.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    args = merge(job.args, job.quick) if quick else job.args
    args = [a.format(out=out, work=work) for a in args]
    command = [sys.executable, str(ROOT / job.script), *args]
    print(f"[{job.name}] {' '.join(command)}", flush=True)
    start = time.time()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    subprocess.run(command, check=True, cwd=ROOT, env=env)
    for source, target in job.copies.items():
        shutil.copyfile(work / source, out / target)
    stale = [f for f in job.files if not (out / f).exists() or (out / f).stat().st_mtime < start - 1]
    if stale:
        raise RuntimeError(f"job {job.name} did not write {stale}: update JOBS in {Path(__file__).name}")
    return time.time() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", type=Path, default=None,
                   help="where the files go: docs for the real thing; default outputs/make_all/")
    p.add_argument("--only", nargs="+", choices=[j.name for j in JOBS], default=None)
    p.add_argument("--quick", action="store_true", help="toy sizes, to check that every command works")
    args = p.parse_args(argv)
    out = (args.out or ROOT / "outputs" / "make_all").resolve()
    out.mkdir(parents=True, exist_ok=True)
    work_root = ROOT / "outputs" / "make_all_work"
    jobs = [j for j in JOBS if args.only is None or j.name in args.only]
    for job in jobs:
        print(f"[{job.name}] done in {run(job, out, work_root, args.quick):.0f} s; wrote {', '.join(job.files)}")


if __name__ == "__main__":
    main()
