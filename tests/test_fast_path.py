"""The inference fast paths: a cache hit re-checked per call (weight_cache.FastPath) and task BatchNorm in eval mode
run as the op alone (task_layers.eval_batchnorm).

Each test checks the output against an independent reference (the dense W + ΔW of test_layers, or the BatchNorm
module itself) AND that the fast path is the one that ran or was refused, so that a check missing from the fast
path fails here rather than passing through the slow path.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

from ftn_peft import FTNConfig
from ftn_peft.task_layers import eval_batchnorm
from ftn_peft.weight_cache import InferenceCacheMixin, set_inference_cache

import test_layers as TL
from test_weight_cache import KINDS, make


@pytest.fixture
def lookups(monkeypatch):
    """Counts the full cache lookups (the slow path); a fast-path call adds none."""
    calls = []
    original = InferenceCacheMixin._cached_weight

    def counted(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InferenceCacheMixin, "_cached_weight", counted)
    return calls


@pytest.mark.parametrize("kind", KINDS)
def test_second_call_takes_the_fast_path_and_equals_the_dense_reference(kind, lookups):
    model, layer, x, reference = make(kind)
    with torch.no_grad():
        first = model(x)
        assert len(lookups) == 1 and layer._weight_cache.fast is not None
        second = model(x)
        expected = reference()
    assert len(lookups) == 1  # no second lookup: the recorded hit ran
    torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(second, expected, rtol=1e-4, atol=1e-5)


def _other(model, layer):
    model.add_adapter("other", FTNConfig(r=2, alpha=4.0, target_modules=["conv"], init_weights="gaussian",
                                         init_std=0.5, task_batchnorm=False))


def _set_adapter(model, layer):
    model.set_adapter("other")


def _active_list_in_place(model, layer):  # the recorded active adapters are a copy
    layer._active_adapter[:] = ["other"]


def _disable(model, layer):
    model.base_model.disable_adapter_layers()


def _replace_base_weight(model, layer):  # a new Parameter object: its version counter says nothing
    base = layer.get_base_layer()
    base.weight = nn.Parameter(base.weight.detach() * 2, requires_grad=False)


def _assign_factor_data(model, layer):  # `.data =` bumps no version counter: the storage changes
    factor = layer.ftn_b["default"]
    factor.data = factor.data * -2


def _readd_adapter(model, layer):
    torch.manual_seed(1)
    layer.update_layer("default", r=3, alpha=6.0, init_weights="gaussian", init_std=0.5)


def _scaling(model, layer):
    layer.scaling["default"] *= 3


EVENTS = {
    "set_adapter": _set_adapter,
    "active_list_in_place": _active_list_in_place,
    "disable_adapter_layers": _disable,
    "replaced_base_weight": _replace_base_weight,
    "assigned_factor_data": _assign_factor_data,
    "re-added_adapter": _readd_adapter,
    "scaling": _scaling,
}


def _expected(model, layer, x, event):
    base = layer.get_base_layer()
    if event == "disable_adapter_layers":
        return base(x)
    adapter = "other" if event in ("set_adapter", "active_list_in_place") else "default"
    delta = TL.reference_delta(layer, model.peft_config[adapter], adapter)
    return TL.dense_forward(base, x, base.weight + delta * (3 if event == "scaling" else 1))


@pytest.mark.parametrize("event", list(EVENTS))
def test_fast_path_follows_every_state_change(event, lookups):
    model, layer, x, _ = make("layers:conv2d_3x3")
    _other(model, layer)  # before the hit is recorded: adding an adapter drops it
    with torch.no_grad():
        model(x)
        before = model(x)  # through the recorded hit
    assert len(lookups) == 1
    EVENTS[event](model, layer)
    with torch.no_grad():
        after = model(x)
        expected = _expected(model, layer, x, event)
    assert not torch.allclose(after, before, atol=1e-3)
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)


def test_compute_mode_change_leaves_the_fast_path(lookups):
    model, layer, x, reference = make("layers:conv2d_3x3")
    with torch.no_grad():
        model(x)
        layer.compute["default"] = "factorized"  # explicit modes run as named, never from the cache
        out = model(x)
    assert len(lookups) > 1  # the recorded hit was refused
    torch.testing.assert_close(out, reference(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scope", ["base layer", "global"])
def test_forward_hooks_see_the_base_layer_call_as_with_lora(scope):
    model, layer, x, reference = make("layers:conv2d_3x3")
    base = layer.get_base_layer()
    seen = []

    def hook(module, args, output):
        if module is base:
            seen.append(output)

    with torch.no_grad():
        model(x)
        model(x)  # the fast path is recorded before the hook comes
        if scope == "global":
            handle = torch.nn.modules.module.register_module_forward_hook(hook)
        else:
            handle = base.register_forward_hook(hook)
        try:
            out = model(x)
        finally:
            handle.remove()
        torch.testing.assert_close(out, reference(), rtol=1e-4, atol=1e-5)
        assert len(seen) == 1
        torch.testing.assert_close(seen[0], base._conv_forward(x, base.weight, base.bias))  # W alone, not W + ΔW


def test_fast_calls_keep_the_budget_least_recently_used():
    torch.manual_seed(0)
    model = get_peft_model(
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)),
        FTNConfig(r=2, target_modules=["0", "1"], init_weights="gaussian", task_batchnorm=False),
    ).eval()
    model.add_adapter("other", FTNConfig(r=2, target_modules=["0"], init_weights="gaussian", task_batchnorm=False))
    first, second = model.base_model.model[0], model.base_model.model[1]
    one = first.get_base_layer().weight.numel() * 4
    set_inference_cache(model, max_bytes=2 * one)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        model(x)  # entries: first/default, then second/default
        first(x)  # a fast call: first/default becomes the most recently used
        model.set_adapter("other")
        first(x)  # a new entry evicts the least recently used: second's
    assert set(first._weight_cache._entries) == {("default",), ("other",)}
    assert not second._weight_cache._entries and second._weight_cache.fast is None


def test_eviction_drops_the_recorded_hit(lookups):
    model, layer, x, reference = make("layers:conv2d_3x3")
    with torch.no_grad():
        model(x)
        layer._weight_cache.budget.admit(layer._weight_cache, "someone else", layer._weight_cache.budget.max_bytes)
        assert layer._weight_cache.fast is None  # evicted with its entry
        torch.testing.assert_close(model(x), reference(), rtol=1e-4, atol=1e-5)
    assert len(lookups) == 2


def test_cached_weight_keeps_channels_last():
    model, layer, x, reference = make("layers:conv2d_3x3")
    model.to(memory_format=torch.channels_last)
    x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        model(x)
        out = model(x)
        expected = reference()
    weight = layer._weight_cache.fast.args[0]
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


# --- task BatchNorm in eval mode --------------------------------------------------------------------------------


def _bn(cls, n=3, **kwargs):
    torch.manual_seed(0)
    bn = cls(n, **kwargs)
    with torch.no_grad():
        if bn.running_mean is not None:
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
        if bn.weight is not None:
            bn.weight.normal_()
            bn.bias.normal_()
    return bn.eval()


@pytest.mark.parametrize(
    "cls, shape, kwargs",
    [
        (nn.BatchNorm1d, (4, 3), {}),
        (nn.BatchNorm1d, (4, 3, 5), {}),
        (nn.BatchNorm2d, (4, 3, 5, 5), {}),
        (nn.BatchNorm3d, (2, 3, 2, 3, 3), {}),
        (nn.BatchNorm2d, (4, 3, 5, 5), {"affine": False}),
    ],
)
def test_eval_batchnorm_equals_the_module(cls, shape, kwargs):
    bn, x = _bn(cls, **kwargs), torch.randn(shape)
    out = eval_batchnorm(bn, x)
    assert out is not None
    torch.testing.assert_close(out, bn(x))


def test_eval_batchnorm_leaves_other_cases_to_the_module():
    x = torch.randn(4, 3, 5, 5)
    assert eval_batchnorm(_bn(nn.BatchNorm2d).train(), x) is None  # batch statistics
    assert eval_batchnorm(_bn(nn.BatchNorm2d, track_running_stats=False), x) is None
    assert eval_batchnorm(_bn(nn.BatchNorm2d), x.double()) is None  # the wrapper casts
    assert eval_batchnorm(_bn(nn.BatchNorm2d, affine=False), x.double()) is None
    assert eval_batchnorm(_bn(nn.BatchNorm2d), x[0]) is None  # BatchNorm2d rejects 3-d input itself
    assert eval_batchnorm(nn.GroupNorm(1, 3).eval(), x) is None
    hooked = _bn(nn.BatchNorm2d)
    hooked.register_forward_pre_hook(lambda m, args: None)
    assert eval_batchnorm(hooked, x) is None


def test_task_batchnorm_wrapper_in_eval(monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model = get_peft_model(net, FTNConfig(r=2, target_modules=["0"], init_weights="gaussian")).eval()
    wrapper = model.base_model.model[1]
    task_bn = wrapper.ftn_norm["default"]
    with torch.no_grad():
        task_bn.running_mean.normal_()
        task_bn.weight.normal_()
    y = torch.randn(2, 4, 5, 5)
    seen = []
    with torch.no_grad():
        expected = task_bn(y)
        with monkeypatch.context() as m:
            m.setattr(task_bn, "forward", None)  # not called: the op alone runs
            torch.testing.assert_close(wrapper(y), expected)
        assert not torch.allclose(expected, wrapper.base_layer(y), atol=1e-3)  # the adapter's copy ran
        handle = task_bn.register_forward_hook(lambda m, args, out: seen.append(out))
        torch.testing.assert_close(wrapper(y), task_bn(y))
        handle.remove()
    assert len(seen) == 2  # the module ran, with its hook, once for the wrapper and once for the reference
    with pytest.raises(ValueError, match="expected 4D input"):
        wrapper(y[0])
