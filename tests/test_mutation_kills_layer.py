"""Behavioural tests that kill mutants of layer.py, routing.py and compute_path.py (see docs/mutation.md).

Each test checks what a user sees (outputs against a dense reference, merged weights, errors), not how it is computed,
except where the path itself is the promise: the ops a conv runs for its compute mode, one op per layer for a
mixed batch or with the inference cache (docs/design.md).
"""

import math

import pytest
import torch
from torch import nn

from ftn_peft import inference_cache_bytes
from ftn_peft.compute_path import conv_extra_macs, conv_path, factorized_cost_ratio
from ftn_peft.layer import Conv, ConvTranspose, Linear

ADAPTER = "default"


def _linear(r=2, alpha=None, **kwargs):
    torch.manual_seed(0)
    base = nn.Linear(6, 5).requires_grad_(False)
    kwargs.setdefault("init_weights", "gaussian")
    return Linear(base, ADAPTER, r=r, alpha=alpha, init_std=0.3, **kwargs)


def _dense_matrix_delta(layer, scale):
    a, b = (f.detach().float() for f in layer.factors(ADAPTER))
    return scale * sum(torch.outer(b[q], a[q]) for q in range(a.shape[0]))


def test_alpha_none_means_no_scaling_and_alpha_scales_by_alpha_over_r():
    unscaled = _linear(r=2, alpha=None)
    torch.testing.assert_close(unscaled.get_delta_weight(ADAPTER), _dense_matrix_delta(unscaled, 1.0))
    scaled = _linear(r=2, alpha=6.0)
    torch.testing.assert_close(scaled.get_delta_weight(ADAPTER), _dense_matrix_delta(scaled, 3.0))


def test_default_init_is_a_noop_with_trainable_gradient_and_false_init_is_not():
    layer = _linear(init_weights=True)
    x = torch.randn(4, 6)
    torch.testing.assert_close(layer(x), layer.get_base_layer()(x))
    a, b = layer.factors(ADAPTER)
    assert a.abs().sum() > 0 and b.abs().sum() == 0  # only the output-side factor is zero
    layer(x).square().sum().backward()
    assert b.grad.abs().sum() > 0  # ...and it still learns
    random = _linear(init_weights=False)
    assert all(f.abs().sum() > 0 for f in random.factors(ADAPTER))
    assert random.get_delta_weight(ADAPTER).abs().max() > 1e-3


def test_safe_merge_refuses_non_finite_factors_and_leaves_the_weight_alone():
    layer = _linear()
    before = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.factors(ADAPTER)[0][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN.*default.*merging it into Linear.*not merged"):
        layer.merge(safe_merge=True)
    torch.testing.assert_close(layer.get_base_layer().weight, before, equal_nan=False)
    assert not layer.merged


def test_merge_unmerge_round_trip_and_disable_unmerges():
    layer = _linear()
    x = torch.randn(3, 6)
    base_w = layer.get_base_layer().weight.detach().clone()
    adapted = layer(x)
    layer.merge()
    assert layer.merged_adapters == [ADAPTER]
    torch.testing.assert_close(layer.get_base_layer().weight, base_w + _dense_matrix_delta(layer, 1.0))
    torch.testing.assert_close(layer(x), adapted)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.get_base_layer().weight, base_w)
    layer.merge()
    layer.enable_adapters(False)  # a disabled, merged layer gives the base output (it unmerges first)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, base_w, layer.get_base_layer().bias))
    torch.testing.assert_close(layer.get_base_layer().weight, base_w)


def test_unsafe_merge_is_the_default_as_in_lora():
    layer = _linear()
    with torch.no_grad():
        layer.factors(ADAPTER)[0][0, 0] = float("nan")
    layer.merge()  # no finiteness check unless safe_merge=True (PEFT's default)
    assert layer.merged_adapters == [ADAPTER]
    assert not torch.isfinite(layer.get_base_layer().weight).all()


def test_merging_an_adapter_this_layer_lacks_skips_it_only():
    layer = _linear()
    base_w = layer.get_base_layer().weight.detach().clone()
    layer.merge(adapter_names=["absent"])
    assert layer.merged_adapters == []
    torch.testing.assert_close(layer.get_base_layer().weight, base_w)
    layer.merge(adapter_names=["absent", ADAPTER])  # an adapter of other layers first: the next one still merges
    assert layer.merged_adapters == [ADAPTER]
    torch.testing.assert_close(layer.get_base_layer().weight, base_w + _dense_matrix_delta(layer, 1.0))


def test_ftn_layers_print_as_ftn_modules():
    assert repr(_linear()).startswith("ftn.Linear(")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_delta_comes_in_the_base_dtype(dtype):
    layer = _linear()
    layer.get_base_layer().to(dtype)
    for f in layer.factors(ADAPTER):
        f.data = f.data.to(dtype)
    delta = layer.get_delta_weight(ADAPTER)
    assert delta.dtype == dtype
    torch.testing.assert_close(delta, _dense_matrix_delta(layer, 1.0).to(dtype))


def test_path_choice_is_remembered_per_shape_and_forgotten_on_update():
    layer = _linear(r=1)
    layer.compute[ADAPTER] = "auto"
    x = torch.randn(2, 6)
    with torch.no_grad():
        first = layer._use_factorized(ADAPTER, x)
    assert first == (layer._factorized_cost_ratio(ADAPTER, x, needs_grad=False) < 1.0)
    layer.update_layer("other", r=4, alpha=None)
    assert len(layer._path_cache) == 0  # a new adapter (new rank) invalidates the remembered choices


def test_cost_model_limits():
    # unknown positions: the factorized extra cost grows without bound without gradients, is 3f/|W| with them
    assert factorized_cost_ratio(10.0, 100.0, math.inf, 2, needs_grad=False) == math.inf
    assert factorized_cost_ratio(10.0, 100.0, math.inf, 2, needs_grad=True) == pytest.approx(0.3)
    # a padding mode the small ops cannot do never picks them
    assert factorized_cost_ratio(math.inf, 100.0, 4.0, 2, needs_grad=True) == math.inf
    # finite positions: per-position cost × positions against building W + ΔW (and, with grads, the weight grad)
    assert factorized_cost_ratio(10.0, 100.0, 30.0, 2, needs_grad=False) == pytest.approx(10 * 30 / (3 * 100))
    assert factorized_cost_ratio(10.0, 100.0, 30.0, 2, needs_grad=True) == pytest.approx(
        3 * 10 * 30 / (100 * 30 + 9 * 100)
    )


def test_conv_with_reflect_padding_matches_dense_on_both_paths():
    torch.manual_seed(0)
    base = nn.Conv2d(4, 5, 3, padding=1, padding_mode="reflect").requires_grad_(False)
    layer = Conv(base, ADAPTER, r=2, alpha=None, init_weights="gaussian", init_std=0.3)
    x = torch.randn(2, 4, 6, 6)
    expected = base._conv_forward(x, base.weight + layer.get_delta_weight(ADAPTER), base.bias)
    assert (expected - base(x)).abs().max() > 1e-2
    for mode in ("factorized", "materialized", "auto"):
        layer.compute[ADAPTER] = mode
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
    layer.compute[ADAPTER] = "auto"
    assert not layer._use_factorized(ADAPTER, x)  # the small ops pad with zeros only


def test_conv_transpose_output_size_matches_dense_on_both_paths():
    torch.manual_seed(0)
    base = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1).requires_grad_(False)
    layer = ConvTranspose(base, ADAPTER, r=2, alpha=None, init_weights="gaussian", init_std=0.3)
    x = torch.randn(2, 4, 5, 5)
    weight = base.weight + layer.get_delta_weight(ADAPTER)
    for size in ([9, 9], [10, 10]):
        expected = nn.functional.conv_transpose2d(
            x, weight, base.bias, 2, 1, base._output_padding(x, size, base.stride, base.padding, base.kernel_size, 2, base.dilation)
        )
        assert expected.shape[-2:] == tuple(size)
        for mode in ("factorized", "materialized"):
            layer.compute[ADAPTER] = mode
            torch.testing.assert_close(layer(x, output_size=size), expected, rtol=1e-4, atol=1e-4)
    assert layer(x).shape[-2:] == (9, 9)  # the per-call output padding does not stick


def test_conv_transpose_output_size_reaches_every_path():
    """output_size= with dilation, with adapters disabled, merged, or a mixed batch: all give that size and values."""
    torch.manual_seed(0)
    base = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, dilation=2).requires_grad_(False)
    layer = ConvTranspose(base, ADAPTER, r=2, alpha=None, init_weights="gaussian", init_std=0.3)
    x = torch.randn(2, 4, 5, 5)
    size = [12, 12]  # reachable only with an output padding of 1 (dilation 2: 11 without)
    pad = base._output_padding(x, size, base.stride, base.padding, base.kernel_size, 2, base.dilation)

    def dense(weight):
        return nn.functional.conv_transpose2d(x, weight, base.bias, 2, 1, pad, 1, 2)

    adapted, plain = dense(base.weight + layer.get_delta_weight(ADAPTER)), dense(base.weight)
    assert adapted.shape[-2:] == (12, 12) and (adapted - plain).abs().max() > 1e-2
    torch.testing.assert_close(layer(x, output_size=size), adapted, rtol=1e-4, atol=1e-4)
    mixed = layer(x, output_size=size, adapter_names=["__base__", ADAPTER])
    torch.testing.assert_close(mixed, torch.cat([plain[:1], adapted[1:]]), rtol=1e-4, atol=1e-4)
    layer.merge()
    torch.testing.assert_close(layer(x, output_size=size), adapted, rtol=1e-4, atol=1e-4)
    layer.enable_adapters(False)
    torch.testing.assert_close(layer(x, output_size=size), plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["factorized", "materialized"])
def test_fp32_factors_on_a_bf16_base_layer_match_the_dense_reference(mode):
    """PEFT keeps the factors in fp32 on a bf16 model: the adapter computes in fp32 and the output is bf16."""
    torch.manual_seed(0)
    base = nn.Conv2d(4, 6, 3, padding=1).requires_grad_(False)
    layer = Conv(base, ADAPTER, r=2, alpha=None, init_weights="gaussian", init_std=0.3, compute=mode)
    x = torch.randn(2, 4, 5, 5)
    expected = base._conv_forward(x, base.weight + layer.get_delta_weight(ADAPTER), base.bias)
    base.to(torch.bfloat16)
    assert layer.ftn_a[ADAPTER].dtype == torch.float32
    out = layer(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=5e-2 * expected.abs().max().item())


def test_layer_defaults_are_a_noop_adapter_and_a_small_gaussian_spread():
    torch.manual_seed(0)
    base = nn.Linear(64, 48).requires_grad_(False)
    layer = Linear(base, ADAPTER, r=8, alpha=None)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), base(x))  # init_weights=True by default: ΔW = 0
    gaussian = Linear(nn.Linear(64, 48), ADAPTER, r=8, alpha=None, init_weights="gaussian")
    for f in gaussian.factors(ADAPTER):
        assert 0.04 < f.std().item() < 0.06  # init_std = 0.05, as FTNConfig's default


def test_factors_take_the_base_layer_float_dtype_and_inference_mode_freezes_them():
    base = nn.Linear(6, 5).to(torch.bfloat16).requires_grad_(False)
    layer = Linear(base, ADAPTER, r=2, alpha=None)
    assert all(f.dtype == torch.bfloat16 for f in layer.factors(ADAPTER))  # as LoRA, before PEFT's autocast
    assert all(f.requires_grad for f in layer.factors(ADAPTER))
    frozen = Linear(nn.Linear(6, 5), ADAPTER, r=2, alpha=None, inference_mode=True)
    assert not any(f.requires_grad for f in frozen.factors(ADAPTER))


# --- the compute path a conv runs, the inference cache, mixed batches ------------------------------------------
def _conv(cin, cout, k, stride=1, r=2, **kwargs):
    torch.manual_seed(0)
    base = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2).requires_grad_(False)
    return Conv(base, ADAPTER, r=r, alpha=None, init_weights="gaussian", init_std=0.3, **kwargs)


def _conv_weights_seen(monkeypatch, run):
    """The weight shapes of the F.conv2d calls made by ``run()`` (the ops a forward actually runs)."""
    seen, conv2d = [], nn.functional.conv2d

    def spy(inp, weight, *args, **kwargs):
        seen.append(tuple(weight.shape))
        return conv2d(inp, weight, *args, **kwargs)

    monkeypatch.setattr(nn.functional, "conv2d", spy)
    out = run()
    monkeypatch.setattr(nn.functional, "conv2d", conv2d)
    return seen, out


@pytest.mark.parametrize(
    "cin, cout, k, batch, size, r, needs_grad, expected",
    [  # shapes of tests/test_conv_paths.py's calibrated cases, one per path
        (16, 16, 3, 32, 8, 4, True, "materialized"),
        (128, 128, 3, 32, 1, 4, True, "two_op"),
        (64, 64, 3, 4, 16, 4, True, "three_op"),
        (128, 128, 3, 32, 1, 4, False, "two_op"),
    ],
)
def test_conv_in_auto_mode_runs_the_path_the_measured_rule_picks(
    monkeypatch, cin, cout, k, batch, size, r, needs_grad, expected
):
    """compute="auto": the ops a forward runs are those of the path `compute_path.conv_path` picks for that input,
    and the output is the dense conv with W + ΔW."""
    layer = _conv(cin, cout, k, r=r)
    base = layer.get_base_layer()
    x = torch.randn(batch, cin, size, size)
    assert conv_path(r, (k * k, cin, cout), base, x, needs_grad) == expected  # the case is what it claims
    with torch.no_grad():
        reference = nn.functional.conv2d(x, base.weight + layer.get_delta_weight(ADAPTER), base.bias, padding=k // 2)
    with torch.set_grad_enabled(needs_grad):  # train mode: the inference cache stays out of it
        seen, out = _conv_weights_seen(monkeypatch, lambda: layer(x))
    full = (cout, cin, k, k)
    ops = {
        "materialized": [full],  # one conv with W + ΔW
        "two_op": [full, (r, cin, k, k), (cout, r, 1, 1)],  # the base conv, k×k down, 1×1 up
        "three_op": [full, (r, cin, 1, 1), (r, 1, k, k), (cout, r, 1, 1)],
    }
    assert seen == ops[expected]
    torch.testing.assert_close(out.detach(), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode, down", [("two_op", [(2, 4, 3, 3)]), ("three_op", [(2, 4, 1, 1), (2, 1, 3, 3)])])
def test_conv_forced_small_op_mode_runs_as_named(monkeypatch, mode, down):
    layer = _conv(4, 6, 3, compute=mode)
    x = torch.randn(2, 4, 5, 5)
    seen, _ = _conv_weights_seen(monkeypatch, lambda: layer(x))
    assert seen == [(6, 4, 3, 3), *down, (6, 2, 1, 1)]


def test_conv_positions_count_the_batch_times_output_pixels_and_drive_the_rule_off_the_cpu():
    """Off the CPU (where the measured rule is not calibrated) the FLOP rule decides, from the output positions."""
    layer = _conv(4, 6, 3, stride=2, r=1)
    base = layer.get_base_layer()
    for shape in ((1, 4, 2, 2), (3, 4, 8, 8), (16, 4, 64, 64)):
        x = torch.randn(shape)
        assert layer._positions(x) == base(x).numel() / base.out_channels  # padding 1, even sizes: exact
    per_position, size = conv_extra_macs(1, layer.factor_dims(ADAPTER), base)
    with torch.no_grad():
        for shape, factorized in (((1, 4, 2, 2), True), ((16, 4, 64, 64), False)):
            x = torch.empty(shape, device="meta")  # stands in for a GPU input
            positions = shape[0] * (shape[2] // 2) * (shape[3] // 2)
            assert (factorized_cost_ratio(per_position, size, positions, 1, needs_grad=False) < 1.0) is factorized
            assert layer._use_factorized(ADAPTER, x) is factorized


def test_conv_transpose_with_output_size_in_eval_runs_one_op_with_the_cached_weight(monkeypatch):
    """Eval without gradients: W + ΔW is cached and run as one op, also when output_size= is passed."""
    torch.manual_seed(0)
    base = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1).requires_grad_(False)
    layer = ConvTranspose(base, ADAPTER, r=2, alpha=None, init_weights="gaussian", init_std=0.3).eval()
    x = torch.randn(1, 4, 2, 2)  # few positions: the small ops would be chosen without the cache
    weight = base.weight + layer.get_delta_weight(ADAPTER)
    pad = base._output_padding(x, [4, 4], base.stride, base.padding, base.kernel_size, 2, base.dilation)
    expected = nn.functional.conv_transpose2d(x, weight, base.bias, 2, 1, pad)
    seen, conv_t = [], nn.functional.conv_transpose2d

    def spy(inp, w, *args, **kwargs):
        seen.append(w)
        return conv_t(inp, w, *args, **kwargs)

    monkeypatch.setattr(nn.functional, "conv_transpose2d", spy)
    with torch.no_grad():
        out = layer(x, output_size=[4, 4])
    monkeypatch.setattr(nn.functional, "conv_transpose2d", conv_t)
    assert out.shape[-2:] == (4, 4)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], weight)
    assert inference_cache_bytes(layer) == weight.numel() * weight.element_size()


def test_mixed_batch_in_eval_runs_one_conv(monkeypatch):
    """Eval without gradients, a mixed batch: the groups' cached weights stacked into one grouped conv."""
    layer = _conv(4, 6, 3, r=4)
    layer.update_layer("other", r=4, alpha=None, init_weights="gaussian", init_std=0.3)
    layer.eval()
    base = layer.get_base_layer()
    x = torch.randn(4, 4, 5, 5)
    names = [ADAPTER, "other", "__base__", ADAPTER]
    with torch.no_grad():
        per_adapter = {
            a: nn.functional.conv2d(x, base.weight + layer.get_delta_weight(a), base.bias, padding=1)
            for a in (ADAPTER, "other")
        }
        per_adapter["__base__"] = base(x)
        seen, out = _conv_weights_seen(monkeypatch, lambda: layer(x, adapter_names=names))
    assert seen == [(3 * 6, 4, 3, 3)]  # the three groups' weights side by side
    for i, name in enumerate(names):
        torch.testing.assert_close(out[i], per_adapter[name][i], rtol=1e-4, atol=1e-4)


def test_a_layer_built_directly_computes_in_auto_mode_and_caches_in_eval():
    layer = _linear()  # no compute= given
    layer.eval()
    x = torch.randn(3, 6)
    with torch.no_grad():
        out = layer(x)
    base = layer.get_base_layer()
    torch.testing.assert_close(out, nn.functional.linear(x, base.weight + _dense_matrix_delta(layer, 1.0), base.bias))
    assert inference_cache_bytes(layer) == base.weight.numel() * base.weight.element_size()  # W + ΔW, one copy
    factorized = _linear(compute="factorized").eval()
    with torch.no_grad():
        factorized(x)
    assert inference_cache_bytes(factorized) == 0  # an explicit mode runs as named, uncached


# --- the disabled / merged layer is the base layer's own call -------------------------------------------------
@pytest.mark.parametrize("state", ["disabled", "merged"])
def test_disabled_or_merged_layer_passes_extra_arguments_to_the_base_layer(state):
    """Then the call is the base layer's own: an argument nn.Linear refuses is refused the same way."""
    layer = _linear()
    x = torch.randn(3, 6)
    with pytest.raises(TypeError) as plain:
        layer.get_base_layer()(x, 1.0)
    if state == "disabled":
        layer.enable_adapters(False)
    else:
        layer.merge()
    with pytest.raises(TypeError) as adapted:
        layer(x, 1.0)
    assert str(adapted.value) == str(plain.value)


def test_disable_adapters_is_a_bool_as_in_lora():
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    lora = LoraLinear(nn.Linear(6, 5), ADAPTER, config=LoraConfig(r=2), r=2)
    layer = _linear()
    assert layer.disable_adapters is lora.disable_adapters is False
    layer.enable_adapters(False)
    assert layer.disable_adapters is True
    layer.enable_adapters(True)
    assert layer.disable_adapters is False


# --- factors: precision of ΔW, device -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype, ulp", [(torch.bfloat16, 2.0**-7), (torch.float16, 2.0**-10)])
def test_half_precision_delta_is_the_exact_product_rounded_once(dtype, ulp):
    """Half-precision factors are multiplied in fp32: ΔW is the exact sum of products within one rounding, not
    a product rounded at every step (up to 21 % off in bf16, 8 % in fp16 here, where the 16 components cancel)."""
    torch.manual_seed(0)
    base = nn.Conv2d(4, 5, 3).to(dtype).requires_grad_(False)
    layer = Conv(base, ADAPTER, r=16, alpha=None, init_weights="gaussian", init_std=1.0)
    a, b, c = (f.detach().double() for f in layer.factors(ADAPTER))
    assert all(f.dtype == dtype for f in layer.factors(ADAPTER))
    exact = sum(torch.einsum("o,i,k->oik", c[q], b[q], a[q]) for q in range(16)).reshape(base.weight.shape)
    delta = layer.get_delta_weight(ADAPTER)
    assert delta.dtype == dtype
    torch.testing.assert_close(delta.double(), exact, rtol=ulp, atol=0.0)


def test_factors_of_a_later_adapter_are_created_on_the_meta_device_of_the_base_layer():
    """A layer built on the meta device (a model without memory) keeps every adapter's factors there: PEFT moves an
    adapter's factors to the base layer's device only while none of that container's factors is on meta."""
    base = nn.Conv2d(4, 6, 3, padding=1, device="meta").requires_grad_(False)
    layer = Conv(base, ADAPTER, r=2, alpha=None)
    layer.update_layer("other", r=3, alpha=None)
    assert {f.device.type for name in (ADAPTER, "other") for f in layer.factors(name)} == {"meta"}
