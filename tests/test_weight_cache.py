"""The inference cache of adapted weights (ftn_peft/weight_cache.py) and the merged fast path.

Cached outputs are compared with an independent dense reference (the base op run with W + ΔW rebuilt from the
factors by test_layers' tensorly reference), and every way the factors or the base weight can change must make
the next call follow the change.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn

import ftn_peft
from ftn_peft import FTNConfig
from ftn_peft.weight_cache import clear_inference_cache, inference_cache_bytes, set_inference_cache

import test_conv_transpose as CT
import test_layers as TL

KINDS = [f"layers:{c}" for c in TL.CASES] + [f"transpose:{c}" for c in ("2d_groups_dilation", "1d_s3_outpad")]


def make(kind: str, **cfg):
    """(model, adapted layer, input, dense reference function of the current factors)."""
    source, case = kind.split(":")
    if source == "transpose":
        model, layer, x = CT.make(case, **cfg)
        reference = lambda: CT.dense(layer.get_base_layer(), x, layer.get_base_layer().weight + CT.reference_delta(layer))  # noqa: E731
    else:
        model, layer, x = TL.make(case, **cfg)
        config = model.peft_config["default"]
        reference = lambda: TL.dense_forward(  # noqa: E731
            layer.get_base_layer(), x, layer.get_base_layer().weight + TL.reference_delta(layer, config)
        )
    return model.eval(), layer, x, reference


def entries(model) -> int:
    return sum(len(m._weight_cache._entries) for m in model.modules() if isinstance(m, ftn_peft.FTNLayer))


@pytest.mark.parametrize("kind", KINDS)
def test_cached_forward_equals_dense_reference(kind):
    model, layer, x, reference = make(kind)
    with torch.no_grad():
        first, second = model(x), model(x)
        expected = reference()
    assert entries(model) == 1 and inference_cache_bytes(model) == layer.get_base_layer().weight.numel() * 4
    torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(second, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_cache_only_without_gradients_in_eval_and_compute_auto(mode):
    model, layer, x, reference = make("layers:conv2d_groups")
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with context():
        torch.testing.assert_close(model(x), reference(), rtol=1e-4, atol=1e-5)
    assert entries(model) == 1
    clear_inference_cache(model)
    model(x)  # eval mode but gradients on
    model.train()
    with torch.no_grad():
        model(x)  # train mode
    assert entries(model) == 0
    explicit, _, x2, _ = make("layers:conv2d_groups", compute="factorized")
    with torch.no_grad():
        explicit.eval()(x2)
    assert entries(explicit) == 0


def _step(optimizer_cls, **kwargs):
    def event(model, layer, x):
        optimizer = optimizer_cls([p for p in model.parameters() if p.requires_grad], lr=0.1, **kwargs)
        model.train()
        model(x).square().mean().backward()
        optimizer.step()
        model.eval()

    return event


def _inplace_factor(model, layer, x):
    with torch.no_grad():
        layer.ftn_b["default"].mul_(-2.0)


def _inplace_base(model, layer, x):
    with torch.no_grad():
        layer.get_base_layer().weight.add_(0.5)


def _inplace_bias(model, layer, x):
    with torch.no_grad():
        layer.get_base_layer().bias.add_(1.0)


def _replace_factor(model, layer, x):
    layer.ftn_a["default"] = nn.Parameter(torch.randn_like(layer.ftn_a["default"]))


def _load_state_dict(model, layer, x):
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items() if "ftn_" in k}
    model.load_state_dict(state, strict=False)


def _scaling(model, layer, x):
    layer.scaling["default"] *= 3


def _merge_unmerge(model, layer, x):
    # unmerge subtracts through .data (no version bump); a stale entry would carry the merge's rounding over
    model.merge_adapter()
    with torch.no_grad():
        layer.get_base_layer().weight.data.add_(1.0)  # a .data edit: seen only because unmerge drops the entries
    model.unmerge_adapter()


def _train(model, layer, x):
    model.train()
    with torch.no_grad():
        layer.ftn_c["default"].data.mul_(2.0)  # a .data edit while training: train() has dropped the entries
    model.eval()


def _to_double(model, layer, x):
    model.double()


EVENTS = {
    "sgd_step": _step(torch.optim.SGD),
    "adam_step": _step(torch.optim.Adam),
    "adam_foreach_step": _step(torch.optim.AdamW, foreach=True),
    "inplace_factor": _inplace_factor,
    "inplace_base_weight": _inplace_base,
    "inplace_base_bias": _inplace_bias,
    "replaced_factor": _replace_factor,
    "load_state_dict": _load_state_dict,
    "scaling": _scaling,
    "merge_unmerge": _merge_unmerge,
    "train": _train,
    "to_double": _to_double,
}


@pytest.mark.parametrize("event", list(EVENTS))
def test_cache_follows_every_change(event):
    model, layer, x, reference = make("layers:conv2d_3x3")
    with torch.no_grad():
        before = model(x)
    assert entries(model) == 1
    EVENTS[event](model, layer, x)
    x = x.to(layer.get_base_layer().weight.dtype)
    with torch.no_grad():
        after = model(x)
        delta = TL.reference_delta(layer, model.peft_config["default"]) * (3 if event == "scaling" else 1)
        expected = TL.dense_forward(layer.get_base_layer(), x, layer.get_base_layer().weight + delta)
    if event == "to_double":  # same values: a stale float32 entry would have given float32 (or failed)
        assert after.dtype == torch.float64
    else:
        assert not torch.allclose(after, before, atol=1e-3)
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)


def test_set_load_delete_adapter(tmp_path):
    model, layer, x, _ = make("layers:linear_qkv")
    model.add_adapter("other", FTNConfig(r=2, target_modules=["q_proj"], attention_heads=4, init_weights="gaussian",
                                         init_std=0.5, task_batchnorm=False))
    with torch.no_grad():
        default = model(x)
        model.set_adapter("other")
        other = model(x)
        model.set_adapter("other")
        assert torch.equal(model(x), other)
    assert not torch.allclose(default, other, atol=1e-3)
    assert entries(model) == 2  # one per adapter, both reused
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        layer.ftn_a["other"].mul_(5.0)
        changed = model(x)
    model.load_adapter(tmp_path / "other", adapter_name="other")  # the saved factors come back
    with torch.no_grad():
        torch.testing.assert_close(model(x), other)
    assert not torch.allclose(changed, other, atol=1e-3)
    model.delete_adapter("other")
    assert entries(model) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), default)


def test_budget_evicts_least_recently_used_and_zero_disables():
    model, layer, x, reference = make("layers:conv2d_3x3")
    one = layer.get_base_layer().weight.numel() * 4
    for name in ("b", "c"):
        model.add_adapter(name, FTNConfig(r=2, target_modules=["conv"], init_weights="gaussian", task_batchnorm=False))
    set_inference_cache(model, max_bytes=2 * one)
    with torch.no_grad():
        for name in ("default", "b", "default", "c"):
            model.set_adapter(name)
            model(x)
    assert inference_cache_bytes(model) == 2 * one
    assert set(layer._weight_cache._entries) == {("default",), ("c",)}  # "b" was the least recently used
    set_inference_cache(model, max_bytes=one - 1)  # smaller than one weight: nothing is kept
    with torch.no_grad():
        model.set_adapter("default")
        torch.testing.assert_close(model(x), reference(), rtol=1e-4, atol=1e-5)
    assert inference_cache_bytes(model) == 0
    set_inference_cache(model, enabled=False)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(), rtol=1e-4, atol=1e-5)
    assert entries(model) == 0
    with pytest.raises(TypeError, match="max_bytes must be an int"):
        set_inference_cache(model, max_bytes=1.5)
    with pytest.raises(ValueError, match="max_bytes=-1 is negative"):
        set_inference_cache(model, max_bytes=-1)
    with pytest.raises(ValueError, match="holds no FTN layer"):
        set_inference_cache(nn.Linear(2, 2))


def test_budget_is_shared_by_the_model_and_copies_start_empty():
    model, layer, x, _ = make("layers:conv2d_3x3")
    budgets = {id(m._weight_cache.budget) for m in model.modules() if isinstance(m, ftn_peft.FTNLayer)}
    assert len(budgets) == 1
    with torch.no_grad():
        model(x)
    copied = copy.deepcopy(model)
    assert inference_cache_bytes(model) > 0 and inference_cache_bytes(copied) == 0
    with torch.no_grad():
        torch.testing.assert_close(copied(x), model(x))


def test_training_gradients_unchanged_by_the_cache():
    grads = []
    for enabled in (True, False):
        model, layer, x, _ = make("layers:conv2d_stride_dilation")
        set_inference_cache(model, enabled=enabled)
        with torch.no_grad():
            model(x)  # fills the cache when enabled
        model.train()
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_merged_fast_path_and_disable_adapter():
    model, layer, x, reference = make("layers:conv2d_3x3")
    with torch.no_grad():
        base, expected = layer.get_base_layer()(x), reference()
        model(x)
        assert entries(model) == 1
        model.merge_adapter()
        assert entries(model) == 0  # a merged layer runs its base layer: the entries are dropped
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
        with model.disable_adapter():  # unmerges, then runs the base layer
            torch.testing.assert_close(model(x), base, rtol=1e-4, atol=1e-5)



def test_a_budgets_entry_toucher_marks_an_entry_as_just_used():
    from ftn_peft.weight_cache import CacheBudget, LayerWeightCache

    budget = CacheBudget(max_bytes=8)  # room for two 4-byte entries
    cache = LayerWeightCache(budget)
    source = torch.ones(1)
    for key in ("old", "new"):
        cache.get_or_build(key, (source,), (), lambda: torch.zeros(1))
    budget.entry_toucher()((id(cache), "old"))  # what the fast path calls on a hit
    cache.get_or_build("third", (source,), (), lambda: torch.zeros(1))
    assert set(cache._entries) == {"old", "third"}  # "new" was the least recently used
