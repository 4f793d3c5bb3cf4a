"""Both ways of applying ΔW (factorized small ops, materialized W + ΔW) against a dense reference.

The reference rebuilds ΔW component by component from the factors with plain outer products (not with
`functional.delta_weight`), then runs the layer's own torch op with ``W + ΔW``.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ftn_peft.layer import Conv, Linear, TransformersConv1D

ADAPTER = "default"

# name: (base layer factory, input shape, FTNLayer kwargs)
CASES = {
    "conv3x3": (lambda: nn.Conv2d(6, 8, 3, padding=1), (2, 6, 9, 9), {}),
    "conv3x3_stride2": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1), (2, 6, 9, 9), {}),
    "conv3x3_dilation2": (lambda: nn.Conv2d(6, 8, 3, padding=2, dilation=2), (2, 6, 9, 9), {}),
    "conv_rect_kernel_no_bias": (lambda: nn.Conv2d(6, 8, (1, 3), padding=(0, 1), bias=False), (2, 6, 7, 7), {}),
    "conv_groups2": (lambda: nn.Conv2d(6, 8, 3, padding=1, groups=2), (2, 6, 7, 7), {}),
    "conv_depthwise": (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), (2, 6, 7, 7), {}),
    "conv1x1_stride2": (lambda: nn.Conv2d(6, 8, 1, stride=2), (2, 6, 8, 8), {}),
    # the 1-element-kernel branch folds the spatial factor into the projection: padding, dilation and groups too
    "conv1x1_groups_padding": (lambda: nn.Conv2d(6, 8, 1, stride=2, padding=1, dilation=2, groups=2), (2, 6, 8, 8), {}),
    "conv1d_pointwise": (lambda: nn.Conv1d(6, 8, 1), (2, 6, 11), {}),
    "conv1d": (lambda: nn.Conv1d(6, 8, 3, stride=2, padding=1), (2, 6, 11), {}),
    "conv_two_taps": (lambda: nn.Conv2d(6, 8, (2, 1), padding=(1, 0)), (2, 6, 7, 7), {}),  # k = 2: not the 1×1 fold
    "linear_qkv": (lambda: nn.Linear(12, 16), (2, 5, 12), {"num_heads": 4}),
    "linear_out": (lambda: nn.Linear(16, 12), (2, 5, 16), {"num_heads": 4, "style": "out"}),
    "linear_matrix": (lambda: nn.Linear(12, 10), (2, 5, 12), {}),
    "hf_conv1d_matrix": (lambda: Conv1D(10, 12), (2, 5, 12), {}),
    "hf_conv1d_qkv": (lambda: Conv1D(16, 12), (2, 5, 12), {"num_heads": 4}),
}
WRAPPERS = {nn.Conv2d: Conv, nn.Conv1d: Conv, nn.Linear: Linear, Conv1D: TransformersConv1D}

R, ALPHA = 3, 6.0


def _make(case: str, r: int = R, alpha=ALPHA):
    factory, shape, kwargs = CASES[case]
    torch.manual_seed(0)
    base = factory()
    base.requires_grad_(False)
    layer = WRAPPERS[type(base)](base, ADAPTER, r=r, alpha=alpha, init_weights="gaussian", init_std=0.3, **kwargs)
    return layer, torch.randn(shape)

def _reference_delta(layer, r: int = R, alpha: float = ALPHA) -> torch.Tensor:
    """ΔW in the base weight's layout, summed one rank-1 component at a time; scaled by the `alpha / r` it was built with."""
    kind, scale = layer.kind[ADAPTER], alpha / r
    factors = [f.detach() for f in layer.factors(ADAPTER)]
    assert all(f.shape[0] == r for f in factors)
    terms = []
    for q in range(r):
        if kind == "conv":  # (k, Cin/g, Cout) -> (Cout, Cin/g, k)
            a, b, c = (f[q] for f in factors)
            terms.append(c[:, None, None] * b[None, :, None] * a[None, None, :])
        elif kind == "qkv":  # feature h·d + j of the output, i of the input
            a, b, c = (f[q] for f in factors)
            terms.append((c[:, None, None] * b[None, :, None] * a[None, None, :]).reshape(-1, a.numel()))
        elif kind == "out":
            a, b, c = (f[q] for f in factors)
            terms.append((a[:, None, None] * c[None, :, None] * b[None, None, :]).reshape(a.numel(), -1))
        else:
            a, b = (f[q] for f in factors)
            terms.append(torch.outer(b, a))
    delta = scale * sum(terms)
    weight = layer.get_base_layer().weight
    if isinstance(layer, TransformersConv1D):
        return delta.t()
    return delta.reshape(weight.shape)

def _dense(layer, x: torch.Tensor) -> torch.Tensor:
    base = layer.get_base_layer()
    weight = base.weight + _reference_delta(layer)
    if isinstance(base, Conv1D):
        return x @ weight + base.bias
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, base.bias)
    return base._conv_forward(x, weight, base.bias)

def _run(layer, x, mode: str) -> torch.Tensor:
    layer.compute[ADAPTER] = mode
    return layer(x)

@pytest.mark.parametrize("case", sorted(CASES))
def test_both_paths_equal_dense_reference_fp32(case):
    layer, x = _make(case)
    expected = _dense(layer, x)
    assert (expected - layer.get_base_layer()(x)).abs().max() > 1e-2  # ΔW is far from zero: the test can fail
    for mode in ("factorized", "materialized"):
        torch.testing.assert_close(_run(layer, x, mode), expected, rtol=1e-4, atol=1e-4)

@pytest.mark.parametrize("case", sorted(CASES))
def test_both_paths_give_the_same_factor_gradients(case):
    layer, x = _make(case)
    grads = {}
    for mode in ("factorized", "materialized"):
        for f in layer.factors(ADAPTER):
            f.grad = None
        _run(layer, x, mode).square().sum().backward()
        grads[mode] = [f.grad.clone() for f in layer.factors(ADAPTER)]
    for g_fact, g_mat in zip(grads["factorized"], grads["materialized"]):
        torch.testing.assert_close(g_fact, g_mat, rtol=1e-3, atol=1e-3)

@pytest.mark.parametrize("case", sorted(CASES))
def test_both_paths_match_under_cpu_bf16_autocast(case):
    layer, x = _make(case)
    expected = _dense(layer, x)
    scale = expected.abs().max().item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = {mode: _run(layer, x, mode).float() for mode in ("factorized", "materialized")}
    for out in outs.values():
        # bf16 keeps 8 bits of mantissa: a few 1e-2 of the output's scale is what the dense op itself loses.
        torch.testing.assert_close(out, expected, rtol=0.0, atol=5e-2 * scale)

def test_auto_rule_follows_the_shapes():
    layer, _ = _make("conv3x3", r=1)
    layer.compute[ADAPTER] = "auto"
    big = torch.randn(16, 6, 64, 64)
    single = torch.randn(1, 6, 2, 2)
    with torch.no_grad():  # without gradients: building W + ΔW once beats r channels at 65k positions
        assert not layer._use_factorized(ADAPTER, big)
    with torch.no_grad():  # ...but not for a handful of positions
        assert layer._use_factorized(ADAPTER, single)
    # With gradients, the materialized path pays the dense weight gradient: small ops win at r=1.
    assert layer._use_factorized(ADAPTER, big)
    wide, _ = _make("conv1x1_stride2", r=8)  # a 1×1 conv at r=8 > its ΔW size / 3: materialize
    wide.compute[ADAPTER] = "auto"
    assert not wide._use_factorized(ADAPTER, torch.randn(16, 6, 64, 64))

def test_auto_matches_dense_reference_with_and_without_grad():
    layer, x = _make("conv3x3_stride2")
    layer.compute[ADAPTER] = "auto"
    expected = _dense(layer, x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)

def _check_compiled(mode: str, backend: str) -> None:
    layer, x = _make("conv3x3_stride2")
    layer.compute[ADAPTER] = mode
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    expected = _dense(layer, x)
    out = compiled(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    out.square().sum().backward()  # the backward of the compiled graph runs too
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in layer.factors(ADAPTER))
    with torch.no_grad():  # a no-grad call re-traces; under "auto" it may take the other path
        torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["auto", "factorized", "materialized"])
def test_torch_compile_aot_eager_matches_eager(mode):
    _check_compiled(mode, "aot_eager")


@pytest.mark.slow  # inductor compiles C++ kernels: minutes on a busy 2-core machine
def test_torch_compile_inductor_matches_eager():
    _check_compiled("auto", "inductor")
