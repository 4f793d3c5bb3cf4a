"""The transformer demo (ftn_peft/demo/vit.py, examples/train_vit_demo.py): counts, the lr rule, a run end to end."""

import csv
import math
import sys
from pathlib import Path

import pytest
import torch

import ftn_peft  # noqa: F401
from ftn_peft import baselines
from ftn_peft.demo import vit
from ftn_peft.report import parameter_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import train_vit_demo as demo  # noqa: E402


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    return vit.build_source_vit().requires_grad_(False).eval()


# ------------------------------------------------------------------------------------------------ parameter counts
def _shape(model):
    cfg = model.config.vision_config
    return cfg.num_hidden_layers, cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads, cfg.num_attention_heads


@pytest.mark.parametrize("num_classes", [10, 3])
def test_each_method_trains_exactly_its_parameters(source, num_classes):
    L, d_model, d, n = _shape(source)
    assert (L, d_model, d, n) == (4, 64, 16, 4)
    head = d_model * num_classes + num_classes
    # the backbone: every parameter but the source classifier's, counted from the modules themselves
    backbone = sum(p.numel() for name, p in source.named_parameters() if not name.startswith("classifier."))
    assert vit.backbone_parameters(source) == backbone
    expected = {
        ("linear_probe", 0): head,
        ("finetune", 0): backbone + head,
        ("lora_qv", 4): L * 2 * (4 * d_model + d_model * 4) + head,  # A (r x d_model) and B (d_model x r), q and v
        ("lora_qv", 2): L * 2 * (2 * d_model + d_model * 2) + head,
        ("ftn_qv", 4): 2 * L * 4 * (d_model + d + n) + head,  # the paper's 2LR(d_model + d + n)
        ("ftn_o", 4): L * 4 * (d_model + d + n) + head,  # LR(d_model + d + n)
    }
    for (method, r), count in expected.items():
        model = vit.build_method(method, source, num_classes, r=r or 4)
        assert baselines.trainable_parameters(model) == count, method
        assert demo.head_parameters(model) == head, method
    for targets in ("qv", "o"):
        rep = parameter_report(vit.build_method(f"ftn_{targets}", source, num_classes))["default"]
        assert rep.factor_params == (2 if targets == "qv" else 1) * L * 4 * (d_model + d + n)
        assert rep.head_params == head and rep.norm_params == 0  # LayerNorm is shared: nothing per task


def test_source_is_never_modified(source):
    before = {k: v.clone() for k, v in source.state_dict().items()}
    for method in vit.METHODS:
        model = vit.build_method(method, source, 3)
        for p in model.parameters():
            if p.requires_grad:
                p.data.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in source.state_dict().items())


def test_matching_lora_rank_is_the_closest(source):
    L, d_model, d, n = _shape(source)
    ftn = 2 * 4 * (d_model + d + n)
    best = min(range(1, 20), key=lambda r: abs(4 * r * d_model - ftn))
    assert vit.lora_rank_matching(source, 4) == best == 3
    jobs = demo.method_jobs(["lora_qv", "ftn_qv"], 4, source)
    assert jobs == [("lora_qv_r4", "lora_qv", 4), ("lora_qv_r3", "lora_qv", 3), ("ftn_qv_r4", "ftn_qv", 4)]


def test_unknown_method_is_refused(source):
    with pytest.raises(ValueError, match="method"):
        vit.build_method("adapter", source, 3)
    with pytest.raises(SystemExit):
        demo.parse_args(["--methods", "ftn"])


def test_missing_resnet_csv_names_the_fix(tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--resnet_csv", str(tmp_path / "nope.csv")])
    assert "train_multidomain.py" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the lr rule
def _fake(val_of):
    calls = []

    def run(scale):
        calls.append(scale)
        return {"val": val_of(scale), "lr_scale": scale}

    return run, calls


def _peak_at(center):
    return lambda s: round(1.0 - abs(math.log(s) - math.log(center)), 6)


def test_interior_best_needs_no_widening():
    run, calls = _fake(_peak_at(1.0))
    best, trials, edge = demo.select_lr(run, [0.3, 1.0, 3.0], 3.0, 3)
    assert best["lr_scale"] == 1.0 and edge == "" and sorted(calls) == [0.3, 1.0, 3.0]


@pytest.mark.parametrize("center,expected", [(9.0, 9.0), (0.1, 0.1)])
def test_edge_best_widens_until_inside(center, expected):
    run, calls = _fake(_peak_at(center))
    best, trials, edge = demo.select_lr(run, [0.3, 1.0, 3.0], 3.0, 5)
    assert best["lr_scale"] == pytest.approx(expected) and edge == ""
    scales = sorted(trials)
    assert scales[0] < best["lr_scale"] < scales[-1]  # the pick has a worse neighbour on both sides
    assert len(calls) == 5  # two steps past the old edge: to the peak, then one beyond it


def test_edge_is_reported_when_widening_runs_out():
    run, calls = _fake(lambda s: s)  # better and better: never inside
    best, trials, edge = demo.select_lr(run, [0.3, 1.0, 3.0], 3.0, 2)
    assert edge == "high" and best["lr_scale"] == pytest.approx(27.0) and len(calls) == 5
    run, calls = _fake(lambda s: -s)
    best, _, edge = demo.select_lr(run, [1.0, 2.0], 2.0, 0)
    assert edge == "low" and best["lr_scale"] == 1.0 and calls == [1.0, 2.0]


def test_plateau_reaching_inside_is_not_an_edge():
    run, calls = _fake(lambda s: 0.8 if s >= 1.0 else 0.5)
    best, _, edge = demo.select_lr(run, [0.3, 1.0, 3.0], 3.0, 3)
    assert best["lr_scale"] == 1.0 and edge == "" and len(calls) == 3


def test_a_single_value_grid_is_widened_to_both_sides():
    run, calls = _fake(_peak_at(1.0))
    best, trials, edge = demo.select_lr(run, [1.0], 2.0, 3)
    assert best["lr_scale"] == 1.0 and edge == "" and sorted(trials) == [0.5, 1.0, 2.0]


# ------------------------------------------------------------------------------------------------ the source model
def test_source_model_is_cached(tmp_path):
    a = vit.load_source_vit(cache_dir=tmp_path, epochs=1, batch_size=256)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    b = vit.load_source_vit(cache_dir=tmp_path, epochs=1, batch_size=256)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    fresh = vit.build_source_vit()
    assert not torch.equal(fresh.classifier.weight, a.classifier.weight)  # it was trained, not just built
    with pytest.raises(ValueError, match="epochs"):
        vit.load_source_vit(cache_dir=tmp_path, epochs=0)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    resnet_csv = tmp_path / "resnet.csv"
    resnet_csv.write_text("method,domain,top1,top1_std,seeds,lr_scale,trainable_params,total_params_multiple\n"
                          "ftn_r1,mean,80.0,1.0,3,,4246,1.04\nfinetune,mean,89.0,2.0,3,,319594,4.0\n")
    table = demo.main(["--seeds", "0", "--epochs", "1", "--domains", "inverted", "--lr_grid", "0.5,1,2",
                       "--max_widen", "0", "--source_epochs", "1", "--workers", "1", "--cache_dir", str(tmp_path),
                       "--out", str(out), "--resnet_csv", str(resnet_csv)])
    assert "| ftn_o_r4 |" in table and table in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "vit_demo_results.csv")))
    labels = ["linear_probe", "finetune", "lora_qv_r4", "lora_qv_r3", "ftn_qv_r4", "ftn_o_r4"]
    assert [r["method"] for r in rows if r["domain"] == "mean"] == labels
    source = vit.load_source_vit(cache_dir=tmp_path, epochs=1)
    for r in rows:
        acc = float(r["top1"])
        assert 0.0 <= acc <= 100.0
        model = vit.build_method(r["method"].split("_r")[0], source, 10, r=int(r["method"].split("_r")[1])
                                 if "_r" in r["method"] else 4)
        assert int(r["trainable_params"]) == baselines.trainable_parameters(model)
        assert float(r["total_params_multiple"]) == pytest.approx(
            1 + baselines.trainable_parameters(model) / vit.backbone_parameters(source))
    assert (out / "vit_demo_results.md").read_text().strip() == table.strip()
    assert (out / "vit_demo_accuracy_vs_params.png").stat().st_size > 10_000
    demo.main(["--replot", str(out / "vit_demo_results.csv"), "--resnet_csv", str(resnet_csv), "--out", str(tmp_path / "re")])
    assert (tmp_path / "re" / "vit_demo_accuracy_vs_params.png").stat().st_size > 10_000


@pytest.mark.slow
def test_results_do_not_depend_on_the_number_of_workers(tmp_path):
    common = ["--seeds", "0,1", "--epochs", "1", "--domains", "inverted,rotated", "--methods", "ftn_o",
              "--lr_grid", "1", "--max_widen", "0", "--source_epochs", "1", "--cache_dir", str(tmp_path)]
    runs = []
    for workers in ("1", "2"):
        args = demo.parse_args([*common, "--workers", workers, "--out", str(tmp_path / workers)])
        for seed in args.seeds:
            demo._source(args, seed)
        runs.append(demo.run_grid(args, log=lambda line: None))
    key = ("label", "domain", "seed", "lr_scale", "val", "test", "trainable")
    assert [tuple(r[k] for k in key) for r in runs[0]] == [tuple(r[k] for k in key) for r in runs[1]]
    assert len(runs[0]) == 4


def test_table_marks_a_rate_left_on_an_edge():
    def result(label, domain, seed, test, edge=""):
        return dict(label=label, domain=domain, seed=seed, test=test, trainable=1000, head=100, lr_scale=1.0,
                    factor_lr=1e-2, head_lr=5e-2, lr_edge=edge)

    results = [result("ftn_o_r4", d, s, 0.5 + 0.1 * s, "high" if d == "a" else "") for d in "ab" for s in (0, 1)]
    results += [result("finetune", d, s, 0.9) for d in "ab" for s in (0, 1)]
    rows = demo.summarize(results, backbone_params=10_000)
    table = demo.markdown(rows, 10_000)
    ftn_line = next(line for line in table.splitlines() if line.startswith("| ftn_o_r4"))
    assert ftn_line.split(" | ")[1:3] == ["55.0 ± 7.1 †", "55.0 ± 7.1"]  # only domain a is marked
    assert "†" not in next(line for line in table.splitlines() if line.startswith("| finetune"))
    assert "still on an edge" in table
    mean = next(r for r in rows if r["method"] == "ftn_o_r4" and r["domain"] == "mean")
    assert mean["params_without_head"] == 900 and mean["total_params_multiple"] == pytest.approx(1.2)
    assert "still on an edge" not in demo.markdown(demo.summarize(results[4:], 10_000), 10_000)
