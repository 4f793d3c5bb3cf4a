"""The three conv paths (three-op, two-op, materialized) against a dense reference, the measured rule choosing
among them, and FTN models under torch.compile.

The reference builds ΔW one rank-1 component at a time with plain outer products (not `functional.delta_weight`
or `conv_delta`) and runs the base layer's own forward with ``W + ΔW``; gradients come from autograd through it.
"""

import json
import os
import sys

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from peft import get_peft_model
from torch import nn

from ftn_peft import FTNConfig
from ftn_peft.compute_path import CONV_PATH_FIT, conv_path
from ftn_peft.layer import Conv

ADAPTER = "default"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_OPS = ("two_op", "three_op")

# name: (base conv factory, input shape); every conv option the small-op paths must reproduce
VARIANTS = {
    "k3": (lambda: nn.Conv2d(6, 8, 3, padding=1), (2, 6, 7, 7)),
    "k3_stride2_no_bias": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False), (2, 6, 9, 9)),
    "k3_same_dilation2": (lambda: nn.Conv2d(6, 8, 3, padding="same", dilation=2), (2, 6, 9, 9)),
    "k2_same_even_kernel": (lambda: nn.Conv2d(6, 8, 2, padding="same"), (2, 6, 7, 7)),
    "k3_valid_rect": (lambda: nn.Conv2d(6, 8, (3, 2), padding="valid"), (2, 6, 7, 6)),
    "k3_groups2": (lambda: nn.Conv2d(6, 8, 3, padding=1, groups=2), (2, 6, 7, 7)),
    "k3_depthwise_stride2": (lambda: nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6), (2, 6, 8, 8)),
    "k3_reflect": (lambda: nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect"), (2, 6, 7, 7)),
    "k3_circular_groups3": (lambda: nn.Conv2d(6, 9, 3, padding=2, dilation=2, groups=3, padding_mode="circular"),
                            (2, 6, 8, 8)),
    "k3_replicate_stride2": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1, padding_mode="replicate"), (2, 6, 7, 7)),
    "k1_stride2_groups2": (lambda: nn.Conv2d(6, 8, 1, stride=2, groups=2), (2, 6, 8, 8)),
    "conv1d_k3_stride2": (lambda: nn.Conv1d(6, 8, 3, stride=2, padding=1), (2, 6, 11)),
    "conv1d_same_groups2": (lambda: nn.Conv1d(6, 8, 5, padding="same", groups=2), (2, 6, 11)),
    "unbatched_k3": (lambda: nn.Conv2d(6, 8, 3, padding=1), (6, 7, 7)),
}


def _layer(base: nn.Module, r: int = 3, alpha: float = 6.0) -> Conv:
    base.requires_grad_(False)
    return Conv(base, ADAPTER, r=r, alpha=alpha, init_weights="gaussian", init_std=0.3)


def _reference_delta(layer: Conv) -> torch.Tensor:
    """ΔW (Cout, Cin/g, *kernel) as Σ_q scale · c_q ⊗ b_q ⊗ a_q, one component at a time."""
    a, b, c = layer.factors(ADAPTER)
    weight = layer.get_base_layer().weight
    delta = sum(c[q][:, None, None] * b[q][None, :, None] * a[q][None, None, :] for q in range(a.shape[0]))
    return layer.scaling[ADAPTER] * delta.reshape(weight.shape)


def _dense(layer: Conv, x: torch.Tensor) -> torch.Tensor:
    base = layer.get_base_layer()
    return base._conv_forward(x, base.weight + _reference_delta(layer), base.bias)


def _grads(layer: Conv, x: torch.Tensor, run) -> list[torch.Tensor]:
    x = x.clone().requires_grad_(True)
    for f in layer.factors(ADAPTER):
        f.grad = None
    out = run(x)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))  # not a sum: weights every output
    return [x.grad] + [f.grad.clone() for f in layer.factors(ADAPTER)]


def _check_against_dense(layer: Conv, x: torch.Tensor, modes=SMALL_OPS + ("materialized", "auto")) -> None:
    expected = _dense(layer, x).detach()
    assert (expected - layer.get_base_layer()(x)).abs().max() > 1e-2  # ΔW is far from zero: the check can fail
    reference_grads = _grads(layer, x, lambda xs: _dense(layer, xs))
    for mode in modes:
        layer.compute[ADAPTER] = mode
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4, msg=lambda m: f"{mode}: {m}")
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4, msg=lambda m: f"{mode}: {m}")
        for got, want in zip(_grads(layer, x, layer), reference_grads):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3, msg=lambda m: f"{mode} grad: {m}")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_path_equals_dense_reference_forward_and_gradients(variant):
    factory, shape = VARIANTS[variant]
    torch.manual_seed(0)
    _check_against_dense(_layer(factory()), torch.randn(shape))


@settings(max_examples=12, deadline=None)
@given(
    cin_g=st.integers(1, 4), cout_g=st.integers(1, 4), groups=st.integers(1, 3), k=st.integers(1, 4),
    stride=st.integers(1, 3), dilation=st.integers(1, 2), padding=st.integers(0, 2), r=st.integers(1, 4),
    size=st.integers(5, 9), batch=st.integers(1, 3),
)
def test_two_op_path_equals_dense_reference_over_shapes(cin_g, cout_g, groups, k, stride, dilation, padding, r,
                                                        size, batch):
    assume(size + 2 * padding >= dilation * (k - 1) + 1)  # an output of at least one pixel
    torch.manual_seed(0)
    base = nn.Conv2d(cin_g * groups, cout_g * groups, k, stride=stride, padding=padding, dilation=dilation,
                     groups=groups)
    layer = _layer(base, r=r)
    x = torch.randn(batch, cin_g * groups, size, size)
    layer.compute[ADAPTER] = "two_op"
    torch.testing.assert_close(layer(x), _dense(layer, x), rtol=1e-4, atol=1e-4)
    for got, want in zip(_grads(layer, x, layer), _grads(layer, x, lambda xs: _dense(layer, xs))):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_forced_small_op_path_is_the_one_that_runs(monkeypatch):
    torch.manual_seed(0)
    layer = _layer(nn.Conv2d(6, 8, 3, padding=1))
    x = torch.randn(2, 6, 7, 7)
    seen = []
    depthwise = torch.nn.functional.conv2d

    def spy(inp, weight, *args, **kwargs):
        seen.append(tuple(weight.shape))
        return depthwise(inp, weight, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", spy)
    for mode, expected in (("two_op", [(3, 6, 3, 3), (8, 3, 1, 1)]),
                           ("three_op", [(3, 6, 1, 1), (3, 1, 3, 3), (8, 3, 1, 1)])):
        layer.compute[ADAPTER] = mode
        seen.clear()
        layer(x)
        assert seen[1:] == expected  # seen[0] is the frozen base conv


# --- the measured rule ------------------------------------------------------------------------------------------
def _x(batch, cin, size, device="cpu"):
    return torch.empty(batch, cin, size, size, device=device)


@pytest.mark.parametrize(
    "cin, cout, k, stride, batch, size, r, needs_grad, expected",
    [
        # measured in docs/calibrate_conv_paths_cpu.md (ms, train): three / two / materialized
        (16, 16, 3, 1, 32, 8, 4, True, "materialized"),  # ¼-width layer1: 1.61 / 1.49 / 0.98
        (128, 128, 3, 1, 32, 1, 4, True, "two_op"),  # ¼-width layer4, 1×1 pixels: 1.51 / 1.20 / 1.57
        (64, 64, 3, 1, 4, 16, 4, True, "three_op"),  # ResNet-18/50 layer1 at 64 px: 3.01 / 3.49 / 3.89
        (128, 128, 3, 2, 4, 16, 1, True, "three_op"),  # ResNet-50 layer2.0: 3.18 / 3.71 / 4.23
        (1024, 256, 1, 1, 4, 4, 4, True, "two_op"),  # ResNet-50 1×1: two-op fold 2.79 / materialized 5.15
        (32, 64, 1, 2, 32, 4, 4, True, "materialized"),  # ¼-width downsample: 1.06 / 0.74
        # inference (three / two; materializing is the FLOP rule's call, "no" at these few positions)
        (256, 256, 3, 1, 4, 4, 1, False, "three_op"),  # ResNet-18/50 layer3: 1.07 / 1.18
        (128, 128, 3, 1, 32, 1, 4, False, "two_op"),  # ¼-width layer4: 0.43 / 0.30
    ],
)
def test_measured_rule_picks_the_calibrated_path(cin, cout, k, stride, batch, size, r, needs_grad, expected):
    base = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)
    assert conv_path(r, (k * k, cin, cout), base, _x(batch, cin, size), needs_grad) == expected


def test_measured_rule_is_cpu_only_and_keeps_other_padding_modes_materialized():
    base = nn.Conv2d(16, 16, 3, padding=1)
    assert conv_path(4, (9, 16, 16), base, _x(32, 16, 8, device="meta"), True) is None  # not calibrated off CPU
    reflect = nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect")
    assert conv_path(4, (9, 16, 16), reflect, _x(4, 16, 16), True) == "materialized"


def test_layer_follows_the_rule_per_shape_and_forced_modes_override_it():
    layer = _layer(nn.Conv2d(64, 64, 3, padding=1), r=4)
    layer.compute[ADAPTER] = "auto"
    many_small, few_large = torch.randn(32, 64, 2, 2), torch.randn(4, 64, 16, 16)
    assert layer._use_factorized(ADAPTER, many_small) and layer._use_two_op(ADAPTER, many_small)
    assert layer._use_factorized(ADAPTER, few_large) and not layer._use_two_op(ADAPTER, few_large)
    assert len(layer._path_cache) == 2  # one remembered choice per input shape
    for mode, two in (("two_op", True), ("three_op", False)):
        layer.compute[ADAPTER] = mode
        assert layer._use_factorized(ADAPTER, many_small) and layer._use_two_op(ADAPTER, many_small) is two
        assert layer._use_two_op(ADAPTER, few_large) is two
    layer.compute[ADAPTER] = "materialized"
    assert not layer._use_factorized(ADAPTER, many_small)


def test_committed_calibration_refits_to_the_coefficients_in_the_code():
    # docs/ holds the measurements the constants came from: refitting them must give the constants back.
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import calibrate_conv_paths
    finally:
        sys.path.pop(0)
    with open(os.path.join(ROOT, "docs", "calibrate_conv_paths_cpu.json")) as f:
        rows = json.load(f)["rows"]
    coef = calibrate_conv_paths.fit(rows)
    for target, modes in CONV_PATH_FIT.items():
        for mode, values in modes.items():
            assert coef[target][mode] == pytest.approx(list(values), abs=2e-3), (target, mode)


def test_fit_recovers_known_coefficients():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import calibrate_conv_paths
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    true = {"two_op": (50.0, -10.0, 3.0, 7.0), "materialized": (-20.0, 1.0, 5.0, 2.0, -4.0)}
    rows = []
    for i in range(12):
        f2 = (1.0, *(float(v) for v in torch.rand(3) * 10))
        fm = (1.0, *(float(v) for v in torch.rand(4) * 10))
        three = 1000.0
        two = three + sum(c * f for c, f in zip(true["two_op"], f2))
        materialized = min(two, three) + sum(c * f for c, f in zip(true["materialized"], fm))
        for mode in ("train", "infer"):
            rows.append({"mode": mode, "k": 3, "features": {"two_op": f2, "materialized": fm},
                         "us": {"three": three, "two": two, "materialized": materialized}})
    coef = calibrate_conv_paths.fit(rows)
    assert coef["two_op"]["train"] == pytest.approx(list(true["two_op"]), abs=1e-2)
    assert coef["materialized"]["train"] == pytest.approx(list(true["materialized"]), abs=1e-2)


# --- torch.compile ----------------------------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.conv3 = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.conv3(torch.relu(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _tiny_ftn(compute: str):
    torch.manual_seed(0)
    cfg = FTNConfig(r=2, target_modules=["conv1", "conv2", "conv3"], init_weights="gaussian", compute=compute)
    return get_peft_model(Tiny(), cfg)


@pytest.mark.parametrize("compute", ["two_op", "three_op"])  # materialized and auto: tests/test_compute_paths.py
def test_compiled_ftn_model_has_no_graph_break_and_matches_eager_training_and_inference(compute):
    # aot_eager: dynamo's graph capture and AOTAutograd's joint forward/backward graph, without inductor's C++
    # builds (minutes per graph on a busy 2-core machine; tests/test_compute_paths.py compiles a layer with
    # inductor, benchmarks/bench_widths.py whole ResNets and reports compiled − eager outputs).
    eager = _tiny_ftn(compute)
    compiled_model = _tiny_ftn(compute)
    compiled_model.load_state_dict(eager.state_dict())
    # fullgraph: any graph break (training forward, or the no_grad re-trace below) is an error
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    torch.manual_seed(1)
    x = torch.randn(4, 3, 8, 8)
    for model, run in ((eager, eager), (compiled_model, compiled)):
        model.train()
        run(x).square().mean().backward()
    trainable = [n for n, p in eager.named_parameters() if p.requires_grad]
    assert any("ftn_a" in n for n in trainable)
    got = dict(compiled_model.named_parameters())
    for name, p in eager.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[name].grad, p.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    eager.eval()
    compiled_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)
