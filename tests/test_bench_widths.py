"""benchmarks/bench_widths.py at toy sizes: every ratio of the table is there, and the files go to --out."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_widths_benchmark_writes_every_ratio_for_every_rank_and_mode(tmp_path):
    import bench_widths as B

    B.main(["--backbones", "resnet18-q", "--modes", "channels_last", "--ranks", "1", "--repeats", "2",
            "--infer_repeats", "1", "--batch_size", "2", "--image_size", "32", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "widths_cpu.json").read_text())["rows"]
    assert [(r["mode"], r["r"]) for r in rows] == [("channels_last", 1)]
    for row in rows:
        for key in ("train_ftn_lora", "train_three_op_lora", "train_ftn_full", "infer_ftn_lora", "infer_ftn_base"):
            assert row[key]["n"] >= 1 and row[key]["median"] > 0, key
    table = (tmp_path / "widths_cpu.md").read_text()
    assert table.count("| resnet18-q | channels_last | 1 |") == 1 and "--modes channels_last" in table


def test_quarter_width_resnet18_is_narrow_everywhere():
    import bench_widths as B

    model = B.build("resnet18-q", 32).model
    widths = {m.out_channels for m in model.modules() if hasattr(m, "out_channels")}
    assert widths == {16, 32, 64, 128}  # stem included: no 64-channel timm stem left
