"""The benchmark scripts run end to end on a small backbone and report what their tables claim.

Timings are never asserted (they belong to the printed tables); structure, exact file sizes and counts are.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_train_infer_benchmark_reports_every_ratio_and_exact_files(tmp_path):
    import bench_train_infer as B

    args = B.parse_args(["--backbone", "resnet18", "--image_size", "32", "--ranks", "1", "--repeats", "2",
                         "--infer_repeats", "2", "--adapters", "2", "--out", str(tmp_path / "bench")])
    result = B.run(args)
    B.write(result, args.out)
    rows = {r["method"]: r for r in result["methods"]}
    assert set(rows) >= {"base", "full", "lora r=1", "ftn r=1"}
    for name, row in rows.items():
        if name != "base":
            assert row["exact"], f"{name}: adapter file is not params × bytes + header"
    # the FTN adapter trains fewer parameters than LoRA at the same rank on the same convs
    assert rows["ftn r=1"]["trainable_params"] < rows["lora r=1"]["trainable_params"]
    measured = {(q["ratio"], q["measure"]) for q in result["ratios"]}
    for kind in ("infer_unmerged", "infer_merged", "infer_unloaded"):
        assert ("ftn r=1 / base", kind) in measured
    assert ("ftn r=1 / lora r=1", "train") in measured and ("ftn r=1 / full", "train") in measured
    table = (tmp_path / "bench.md").read_text()
    assert "merged & unloaded" in table and "ftn r=1 / lora r=1" in table


@pytest.mark.slow
def test_compute_paths_benchmark_times_every_setting(tmp_path):
    import bench_compute_paths as B

    out = tmp_path / "paths.md"
    B.main(["--backbone", "resnet18", "--r", "1", "--repeats", "1", "--infer_repeats", "1", "--out", str(out)])
    table = out.read_text()
    for label in ("base", "lora r=1", "ftn r=1 auto", "ftn r=1 factorized", "ftn r=1 materialized"):
        assert f"| {label} |" in table
