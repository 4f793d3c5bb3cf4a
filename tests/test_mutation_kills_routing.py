"""Tests written for mutants of `routing.py` (mixed-adapter batches) and `compute_path.py` (the rule choosing the
materialized, two-op or three-op path) that the rest of the suite let through (docs/mutation.md).

References: a mixed batch is checked sample by sample against the same layer run on that sample alone with its
adapter active (or the frozen base layer); the cost model against the formulas of docs/design.md and against the
committed calibration (`docs/calibrate_conv_paths_cpu.json` holds the features each measured shape had, and
`docs/calibrate_conv_paths_cpu.md` the path the fit chose for it).
"""

import json
import math
import os

import pytest
import torch
from torch import nn

from ftn_peft.compute_path import conv_path, conv_path_features
from ftn_peft.layer import Conv, ConvTranspose, Linear
from ftn_peft.routing import BASE_ADAPTER, MERGED_MESSAGE, check_batch, route, route_per_sample
from ftn_peft.task_layers import TaskNorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADAPTER = "default"


# --- routing ----------------------------------------------------------------------------------------------------
GAIN = {"a": 2.0, "b": -3.0, None: 1.0}


def _run_recording(calls):
    def run(xs, adapter):
        calls.append((adapter, xs.shape[0]))
        return xs[:, :2] * GAIN[adapter]  # narrower than the input: the output takes the shape run gives
    return run


@pytest.mark.parametrize(
    "names",
    [
        ["b"],  # one sample
        ["a", "a", "a"],  # one adapter
        ["a", "a", "b", "b", BASE_ADAPTER],  # contiguous blocks (forward_all_tasks): sliced
        ["a", "b", "a", "b"],  # every group interleaved: gathered and scattered back
        ["b", "a", "a", "zzz", "b"],  # some contiguous, some not; a name this layer does not hold runs the base
    ],
)
def test_route_gives_every_sample_its_adapter_in_batch_order(names):
    torch.manual_seed(0)
    x = torch.randn(len(names), 3)
    calls = []
    out = route(x, names, _run_recording(calls), available={"a", "b"})
    expected = torch.stack([x[i, :2] * GAIN[n if n in ("a", "b") else None] for i, n in enumerate(names)])
    torch.testing.assert_close(out, expected)
    # one call per adapter group, with that group's samples
    groups = dict.fromkeys(names)
    assert sorted(calls, key=str) == sorted(
        [(n if n in ("a", "b") else None, names.count(n)) for n in groups], key=str)


@pytest.mark.parametrize("names", [[BASE_ADAPTER, BASE_ADAPTER, "a", "a"], [BASE_ADAPTER, "a", BASE_ADAPTER, "a"]])
def test_route_gives_the_batch_the_first_groups_dtype_on_both_paths(names):
    # e.g. base samples in the model's bf16 and an adapter computing in fp32: one batch, in the first group's dtype
    x = torch.randn(4, 3)

    def run(xs, adapter):
        return (xs * 2.0).float() if adapter else xs.to(torch.bfloat16)

    out = route(x, names, run, available={"a"})
    assert out.dtype == torch.bfloat16
    expected = torch.stack([x[i] * 2.0 if n == "a" else x[i] for i, n in enumerate(names)]).to(torch.bfloat16)
    torch.testing.assert_close(out, expected)


def test_route_gathers_and_scatters_on_the_inputs_device():
    # the row numbers of an interleaved batch live on the input's device (meta stands in for a GPU here: an index on
    # the CPU fails there the same way)
    x = torch.empty(4, 3, device="meta")
    out = route(x, ["a", "b", "a", "b"], lambda xs, adapter: xs * GAIN[adapter], available={"a", "b"})
    assert out.device.type == "meta" and out.shape == (4, 3)


def test_route_per_sample_gives_each_sample_its_adapters_rows():
    names = ["a", "zzz", "b", "a"]
    x = torch.arange(8.0).reshape(4, 2)
    widths = {"a": 3, "b": 1, None: 2}  # task heads of different sizes

    def run(xs, adapter):
        return xs.sum(1, keepdim=True).expand(-1, widths[adapter]) * GAIN[adapter]

    out = route_per_sample(x, names, run, available={"a", "b"})
    assert len(out) == 4
    for i, n in enumerate(names):
        key = n if n in ("a", "b") else None
        torch.testing.assert_close(out[i], x[i].sum().expand(widths[key]) * GAIN[key])


def test_check_batch_errors_in_full():
    with pytest.raises(ValueError) as err:
        check_batch(["a", "b"], 3, merged=False)
    assert str(err.value) == (
        "Length of `adapter_names` should be the same as the number of inputs, but got 2 and 3 respectively. "
        "adapter_names has 2 entries but the batch has 3 samples; pass one adapter name per sample"
    )
    with pytest.raises(ValueError) as err:
        check_batch(["a", "b"], 2, merged=True)
    assert str(err.value) == MERGED_MESSAGE
    check_batch(["a", "b"], 2, merged=False)


def _two_adapter_linear():
    torch.manual_seed(0)
    base = nn.Linear(6, 5).requires_grad_(False)
    layer = Linear(base, "a", r=2, alpha=None, init_weights="gaussian", init_std=0.3)
    layer.update_layer("b", r=3, alpha=None, init_weights="gaussian", init_std=0.3)
    for name, p in layer.named_parameters():
        p.requires_grad_(name.startswith("ftn_"))  # both adapters trained
    return layer.eval()


@pytest.mark.parametrize("names", [["b"], ["a", "a", "b", "b", BASE_ADAPTER], ["a", "b", BASE_ADAPTER, "b", "a"]])
def test_layer_routes_a_mixed_batch_with_gradients_like_each_sample_alone(names):
    layer = _two_adapter_linear()
    torch.manual_seed(1)
    x = torch.randn(len(names), 6)
    out = layer(x, adapter_names=names)  # gradients on: one run per adapter group (routing.route)
    expected = []
    for i, n in enumerate(names):
        if n == BASE_ADAPTER:
            expected.append(layer.get_base_layer()(x[i : i + 1]))
        else:
            layer.set_adapter(n)
            expected.append(layer(x[i : i + 1]))
    torch.testing.assert_close(out, torch.cat(expected))
    assert out.grad_fn is not None
    with pytest.raises(ValueError, match="3 samples; pass one adapter name per sample"):
        layer(torch.randn(3, 6), adapter_names=names[:1] * 2)


def test_layers_refuse_a_mixed_batch_once_merged():
    layer = _two_adapter_linear()
    layer.merge(adapter_names=["a"])
    with pytest.raises(ValueError) as err:
        layer(torch.randn(2, 6), adapter_names=["a", "b"])
    assert str(err.value) == MERGED_MESSAGE
    # a task LayerNorm has no one-op mixed batch: only the routing refuses it
    norm = TaskNorm(nn.LayerNorm(6), "a")
    norm.update_layer("b")
    norm.merge(adapter_names=["a"])
    with pytest.raises(ValueError) as err:
        norm(torch.randn(2, 6), adapter_names=["a", "b"])
    assert str(err.value) == MERGED_MESSAGE


def test_active_adapters_here_are_the_active_ones_this_layer_holds():
    layer = _two_adapter_linear()
    layer.update_layer("other", r=2, alpha=None)
    layer._active_adapter = "other"  # PEFT's attribute holds a name or a list of names
    assert layer._active_here() == ["other"]
    layer._active_adapter = ["b", "missing", "a"]
    assert layer._active_here() == ["b", "a"]
    assert layer._available() == {"a", "b", "other"}


# --- the cost model: documented formulas ---------------------------------------------------------------------------
def _conv(base, r=4):
    base.requires_grad_(False)
    return Conv(base, ADAPTER, r=r, alpha=None, init_weights="gaussian", init_std=0.3)


@pytest.mark.parametrize(
    "base, r",
    [
        (nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2), 4),
        (nn.Conv2d(6, 8, (3, 1), stride=(1, 2)), 3),
        (nn.Conv1d(4, 6, 5, stride=3), 2),
        (nn.Conv2d(6, 8, (2, 1)), 2),  # two taps: not the 1×1 fold
    ],
)
def test_conv_extra_macs_are_the_documented_formula(base, r):
    # per output position r·(Cin·stride² + g·k² + Cout) + Cout (k² taps); materializing builds |W|
    layer = _conv(base, r)
    taps, stride = math.prod(base.kernel_size), math.prod(base.stride)
    f = r * (base.in_channels * stride + base.groups * taps + base.out_channels) + base.out_channels
    assert layer._extra_macs(ADAPTER) == (f, base.weight.numel())


def test_one_by_one_conv_extra_macs_fold_the_stride_into_the_down_projection():
    base = nn.Conv2d(6, 8, 1, stride=2, groups=2)
    layer = _conv(base, r=4)
    assert layer._extra_macs(ADAPTER) == (4 * (6 + 8) + 8, base.weight.numel())


def test_conv_transpose_extra_macs_are_the_documented_formula():
    # down and the depthwise scatter at input resolution (1/stride² of the output positions), up and the add at output
    base = nn.ConvTranspose2d(6, 8, 3, stride=2, groups=2).requires_grad_(False)
    r = 3
    layer = ConvTranspose(base, ADAPTER, r=r, alpha=None, init_weights="gaussian", init_std=0.3)
    f = r * (6 + 2 * 9) / 4 + r * 8 + 8
    assert layer._extra_macs(ADAPTER) == pytest.approx((f, base.weight.numel()))
    x = torch.empty(2, 6, 5, 5)
    assert layer._positions(x) == 2 * 25 * 4  # the input's pixels times the stride
    assert layer._positions(None) == math.inf


def test_linear_extra_macs_and_positions():
    base = nn.Linear(12, 16).requires_grad_(False)
    matrix = Linear(base, ADAPTER, r=3, alpha=None, init_weights="gaussian")
    heads = Linear(nn.Linear(12, 16).requires_grad_(False), ADAPTER, r=3, alpha=None, num_heads=4)
    assert matrix._extra_macs(ADAPTER) == (3 * (12 + 16), 12 * 16)
    assert heads._extra_macs(ADAPTER) == (3 * (12 + 4 + 4), 12 * 16)  # d_model + head size + heads
    assert matrix._positions(torch.empty(2, 5, 12)) == 10  # batch × tokens
    assert matrix._positions(None) == math.inf


def test_conv_positions_are_batch_times_output_pixels():
    layer = _conv(nn.Conv2d(6, 8, 3, stride=2, padding=1))
    assert layer._positions(torch.empty(2, 6, 8, 8)) == 2 * 4 * 4
    assert layer._positions(None) == math.inf


# --- the cost model: the choice -----------------------------------------------------------------------------------
def _calibration():
    with open(os.path.join(ROOT, "docs", "calibrate_conv_paths_cpu.json")) as f:
        rows = json.load(f)["rows"]
    with open(os.path.join(ROOT, "docs", "calibrate_conv_paths_cpu.md")) as f:
        table = [line.split("|")[1:-1] for line in f if line.startswith("| ") and "→" in line]
    table = [cells for cells in table if cells[1].strip() != "batch"]  # the header
    assert len(table) == len(rows) == 96
    return rows, table


def _row_call(row):
    base = nn.Conv2d(row["cin"], row["cout"], row["k"], stride=row["stride"], padding=row["k"] // 2, bias=False)
    x = torch.empty(row["batch"], row["cin"], row["size"], row["size"])
    return (row["r"], (row["k"] ** 2, row["cin"], row["cout"]), base, x)


def test_conv_rule_sees_the_features_it_was_calibrated_on_and_picks_the_documented_path():
    rows, table = _calibration()
    names = {"two": "two_op", "three": "three_op", "materialized": "materialized"}
    for row, cells in zip(rows, table):
        assert [c.strip() for c in cells[1:8]] == [str(row["batch"]), f"{row['cin']}→{row['cout']}", str(row["k"]),
                                                   str(row["size"]), str(row["stride"]), str(row["r"]), row["mode"]]
        call = _row_call(row)
        features = conv_path_features(*call)
        for target in ("two_op", "materialized"):
            assert features[target] == pytest.approx(row["features"][target], rel=1e-9), (row, target)
        assert conv_path(*call, needs_grad=row["mode"] == "train") == names[cells[-1].strip()], row


def test_conv_inference_materializes_past_the_flop_break_even():
    # without gradients W + ΔW is built when fP ≥ (r+1)|W|: 64→64 3×3, r = 4, f = 4·(64 + 9 + 64) + 64 = 612,
    # |W| = 36864; batch 4 of 10×10: fP = 244800 ≥ 5|W| = 184320; of 8×8: 156672 < 184320
    base = nn.Conv2d(64, 64, 3, padding=1)
    assert conv_path(4, (9, 64, 64), base, torch.empty(4, 64, 10, 10), False) == "materialized"
    assert conv_path(4, (9, 64, 64), base, torch.empty(4, 64, 8, 8), False) == "three_op"


def test_one_by_one_convs_always_take_the_two_op_form():
    # a 1×1 kernel's two small-op forms are the same ops: the two-op fit (here > 0: "three") is not asked
    base = nn.Conv2d(256, 256, 1)
    assert conv_path(4, (1, 256, 256), base, torch.empty(1, 256, 32, 32), True) == "two_op"
    layer = _conv(nn.Conv2d(256, 256, 1), r=4)
    layer.compute[ADAPTER] = "auto"
    x = torch.empty(1, 256, 32, 32)
    assert layer._use_factorized(ADAPTER, x) and layer._use_two_op(ADAPTER, x)


def test_small_op_macs_are_the_cheaper_small_op_path():
    # Ms (materialized features) = the cheaper down path's MACs (two-op M2 or three-op M3) + the 1×1 up, r·Cout·P_out;
    # a 2-tap kernel on a wide layer: the three-op path (1×1 down + depthwise) is the cheaper one
    r, cin, cout = 4, 64, 32
    base = nn.Conv2d(cin, cout, (2, 1))
    x = torch.empty(3, cin, 8, 5)
    two_op, materialized = conv_path_features(r, (2, cin, cout), base, x).values()
    p_in = p_out = 3 * 8 * 5  # padding ignored
    assert two_op == pytest.approx((1.0, 3.0, r * cin * 2 * p_out / 1e6, (r * cin * p_in + r * 2 * p_out) / 1e6))
    assert two_op[3] < two_op[2]
    assert materialized == pytest.approx(
        (1.0, 3.0, 2 * cin * cout * p_out / 1e6, r * 2 * cin * cout / 1e6, (two_op[3] * 1e6 + r * cout * p_out) / 1e6))


def test_grouped_conv_features_count_every_group():
    # M2 = r·Cin·k·P_out, M3 = r·Cin·P_in + g·r·k·P_out (Cin the layer's whole input width, k taps, P = images × pixels)
    r, cin, cout, g = 3, 12, 9, 3
    base = nn.Conv2d(cin, cout, 3, padding=1, groups=g)
    x = torch.empty(2, cin, 5, 5)
    two_op, materialized = conv_path_features(r, (9, cin // g, cout), base, x).values()
    p = 2 * 25
    assert two_op == pytest.approx((1.0, 2.0, r * cin * 9 * p / 1e6, (r * cin * p + g * r * 9 * p) / 1e6))
    assert materialized[2:4] == pytest.approx((base.weight.numel() * p / 1e6, r * base.weight.numel() / 1e6))


def test_while_compiling_the_choice_follows_the_shape_and_is_not_remembered(monkeypatch):
    # dynamo guards on the shapes, so the cost model runs while tracing: the same choice as in eager mode
    layer = _conv(nn.Conv2d(64, 64, 3, padding=1), r=4)
    layer.compute[ADAPTER] = "auto"
    many_small, few_large = torch.randn(32, 64, 2, 2), torch.randn(4, 64, 16, 16)
    eager = [layer._auto_path(ADAPTER, x) for x in (many_small, few_large)]
    assert eager == ["two_op", "three_op"]
    layer._path_cache.clear()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert [layer._auto_path(ADAPTER, x) for x in (many_small, few_large)] == eager
    assert layer._path_cache == {}


def test_the_cost_model_runs_once_per_shape(monkeypatch):
    # it costs about as much as a small op (pure Python), so it is remembered per input shape
    layer = _conv(nn.Conv2d(64, 64, 3, padding=1), r=4)
    layer.compute[ADAPTER] = "auto"
    calls = []
    choose = layer._choose_path
    monkeypatch.setattr(layer, "_choose_path", lambda *args: calls.append(args[1].shape) or choose(*args))
    x = torch.randn(32, 64, 2, 2)
    for _ in range(3):
        assert layer._use_factorized(ADAPTER, x) and layer._use_two_op(ADAPTER, x)
    assert calls == [x.shape]


def test_an_unbatched_input_is_one_image():
    base = nn.Conv2d(128, 128, 3, padding=1)
    for size in (1, 16):
        x = torch.empty(128, size, size)
        assert conv_path_features(4, (9, 128, 128), base, x) == conv_path_features(4, (9, 128, 128), base, x[None])
        for grad in (True, False):
            assert conv_path(4, (9, 128, 128), base, x, grad) == conv_path(4, (9, 128, 128), base, x[None], grad)


def test_flop_rule_decides_linear_layers_with_and_without_gradients():
    # with gradients: factorized iff 3fP < |W|P + (4r+1)|W|; without: materialized iff fP ≥ (r+1)|W|
    wide = Linear(nn.Linear(256, 256).requires_grad_(False), ADAPTER, r=2, alpha=None)
    narrow = Linear(nn.Linear(4, 4).requires_grad_(False), ADAPTER, r=4, alpha=None)
    for layer in (wide, narrow):
        layer.compute[ADAPTER] = "auto"
    many, few = torch.randn(512, 256), torch.randn(2, 256)
    assert wide._use_factorized(ADAPTER, many)  # 3·1024·512 ≪ 65536·512
    assert not narrow._use_factorized(ADAPTER, torch.randn(512, 4))  # 3·32·512 > 16·512 + 17·16
    with torch.no_grad():
        assert not wide._use_factorized(ADAPTER, many)  # 1024·512 ≥ 3·65536: build W + ΔW once
        assert not wide._use_factorized(ADAPTER, torch.randn(256, 256))  # 1024·256 = 4/3 · 3·65536
        assert wide._use_factorized(ADAPTER, torch.randn(128, 256))  # 1024·128 = 2/3 · 3·65536
        assert wide._use_factorized(ADAPTER, few)  # 1024·2 < 3·65536
        assert not wide._use_factorized(ADAPTER)  # no input: the large-batch limit
    assert wide._use_factorized(ADAPTER)  # with gradients: 3f/|W| < 1
    assert not narrow._use_factorized(ADAPTER)
    # frozen factors need no weight gradient: the rule without gradients, although autograd is on
    wide.ftn_a[ADAPTER].requires_grad_(False)
    assert not wide._use_factorized(ADAPTER, many)


def test_convs_off_the_cpu_take_the_flop_rule_and_the_three_op_form():
    # quarter-width ResNet-18, layer1, r = 4, batch 32 of 8×8, training: measured on CPU "materialized"; the FLOP rule
    # (3fP = 3·180·2048 < |W|P + 17|W| = 2304·2048 + 17·2304) keeps the small ops, and then three ops
    layer = _conv(nn.Conv2d(16, 16, 3, padding=1), r=4)
    layer.compute[ADAPTER] = "auto"
    cpu, meta = torch.empty(32, 16, 8, 8), torch.empty(32, 16, 8, 8, device="meta")
    assert layer._auto_path(ADAPTER, cpu) == "materialized"
    assert layer._auto_path(ADAPTER, meta) == "factorized"
    assert layer._use_factorized(ADAPTER, meta) and not layer._use_two_op(ADAPTER, meta)
    with torch.no_grad():  # fP = 180·2048 ≥ 5·2304: build W + ΔW once
        assert layer._auto_path(ADAPTER, meta) == "materialized"
    assert layer._auto_path(ADAPTER, cpu) == "materialized"  # remembered per device type


def test_factorized_mode_runs_the_small_ops_the_rule_picks_and_forced_modes_win():
    layer = _conv(nn.Conv2d(64, 64, 3, padding=1), r=4)
    many_small, few_large = torch.randn(32, 64, 2, 2), torch.randn(4, 64, 16, 16)
    expected = {"factorized": (True, True, False), "auto": (True, True, False), "two_op": (True, True, True),
                "three_op": (True, False, False), "materialized": (False, None, None)}
    for mode, (factorized, two_small, two_large) in expected.items():
        layer.compute[ADAPTER] = mode
        assert layer._use_factorized(ADAPTER, many_small) is factorized, mode
        assert layer._use_factorized(ADAPTER, few_large) is factorized, mode
        if factorized:
            assert layer._use_two_op(ADAPTER, many_small) is two_small, mode
            assert layer._use_two_op(ADAPTER, few_large) is two_large, mode


def test_remembered_choices_are_per_adapter_and_rank_and_bounded():
    # with gradients a Linear layer is factorized iff 3fP < |W|P + (4r+1)|W|: at 256→256 and P = 512, r = 2 is,
    # r = 100 (3·51200·512 > 65536·512 + 401·65536) is not
    layer = Linear(nn.Linear(256, 256).requires_grad_(False), ADAPTER, r=2, alpha=None)
    layer.update_layer("wide", r=100, alpha=None)
    for name in (ADAPTER, "wide"):
        layer.compute[name] = "auto"
        layer.ftn_a[name].requires_grad_(True)
    x = torch.randn(512, 256)
    assert [layer._use_factorized(a, x) for a in (ADAPTER, "wide", ADAPTER)] == [True, False, True]
    layer.update_layer("wide", r=1, alpha=None)  # the same name with another rank
    layer.compute["wide"] = "auto"
    layer.ftn_a["wide"].requires_grad_(True)
    assert layer._use_factorized("wide", x)
    layer._path_cache.clear()
    with torch.no_grad():
        for n in range(1, 2000):  # many sequence lengths: the memory stays bounded (about a thousand choices)
            layer._use_factorized(ADAPTER, torch.empty(n, 256))
        assert len(layer._path_cache) < 1100
