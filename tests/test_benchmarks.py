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
                         "--infer_repeats", "2", "--adapters", "2"])
    result = B.run(args)
    B.write(result, str(tmp_path / "bench"))
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
def test_compute_paths_benchmark_times_every_setting(tmp_path, monkeypatch):
    import bench_compute_paths as B

    monkeypatch.chdir(tmp_path)  # without --out, the table goes to outputs/bench_compute_paths/, not to docs/
    B.main(["--backbone", "resnet18", "--r", "1", "--repeats", "1", "--infer_repeats", "1"])
    assert [p.name for p in tmp_path.rglob("*.md")] == ["compute_paths_resnet18_cpu.md"]
    table = (tmp_path / "outputs" / "bench_compute_paths" / "compute_paths_resnet18_cpu.md").read_text()
    for label in ("base", "lora r=1", "ftn r=1 auto", "ftn r=1 factorized", "ftn r=1 materialized"):
        assert f"| {label} |" in table


@pytest.mark.slow
def test_serving_benchmark_writes_its_json_and_plot_into_out(tmp_path):
    import json

    import bench_serving as B

    B.main(["--res", "16", "--batch", "2", "--tasks", "1", "2", "--repeats", "1", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["serving.png", "serving_bench.json"]
    results = json.loads((tmp_path / "serving_bench.json").read_text())["results"]
    assert {(r["workload"], r["method"], r["tasks"]) for r in results} == {
        (w, m, t) for w, ms in B.METHODS.items() for m in ms for t in (1, 2)}
    assert all(r["outputs_per_s"] > 0 for r in results)


def test_every_script_defaults_to_an_ignored_output_directory(tmp_path, monkeypatch):
    import common as C

    monkeypatch.chdir(tmp_path)
    assert C.output_dir(None, "bench_x") == "outputs/bench_x" and (tmp_path / "outputs" / "bench_x").is_dir()
    assert C.output_dir(str(tmp_path / "docs"), "bench_x") == str(tmp_path / "docs")
    ignored = (Path(__file__).resolve().parents[1] / ".gitignore").read_text().split()
    assert "/outputs/" in ignored
