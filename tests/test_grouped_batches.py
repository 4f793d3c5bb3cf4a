"""Mixed-adapter batches in one pass per layer (ftn_peft/grouped.py), against independent references.

Every row of a mixed batch must equal the dense reference of its own adapter (the base op with W + ΔW_t rebuilt
by test_layers' tensorly reference) or the base layer for "__base__", on both one-pass ways: the stacked factors
and the stacked cached weights. Models: each row equals the same input run after set_adapter(name).
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import ftn_peft
from ftn_peft import FTNConfig, grouped, task_layers
from ftn_peft.weight_cache import set_inference_cache

import test_conv_transpose as CT
import test_layers as TL
from conftest import tiny_clip_classifier, tiny_timm_resnet

NAMES = ["b", "default", "__base__", "b", "b", "default"]  # unequal groups, unsorted, with the base model

LAYER_CASES = ["conv2d_3x3", "conv2d_stride_dilation", "conv2d_groups", "conv2d_1x1_nobias", "conv2d_reflect",
               "conv1d", "linear_matrix", "linear_qkv", "linear_out", "hf_conv1d_qkv", "hf_conv1d_out"]
KINDS = [f"layers:{c}" for c in LAYER_CASES] + ["transpose:2d_groups_dilation", "transpose:1d_s3_outpad"]


def make(kind: str):
    source, case = kind.split(":")
    if source == "transpose":
        model, layer, x = CT.make(case)
        name, heads = "up", None
        delta = lambda a: CT.reference_delta(layer, a)  # noqa: E731
        dense = CT.dense
    else:
        model, layer, x = TL.make(case)
        name, _, _, heads = TL.CASES[case]
        delta = lambda a: TL.reference_delta(layer, model.peft_config[a], a)  # noqa: E731
        dense = TL.dense_forward
    model.add_adapter("b", FTNConfig(r=3, alpha=6.0, target_modules=[name], attention_heads=heads, init_weights="gaussian",
                                     init_std=0.5, task_batchnorm=False))
    x = torch.randn(len(NAMES), *x.shape[1:])
    base = layer.get_base_layer()
    expected = torch.cat([
        dense(base, x[i : i + 1], base.weight if a == "__base__" else base.weight + delta(a)) for i, a in enumerate(NAMES)
    ])
    return model.eval(), layer, x, expected


@pytest.mark.parametrize("way", ["stacked_factors", "stacked_weights"])
@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_in_one_pass_equals_dense_reference(kind, way, monkeypatch):
    monkeypatch.setattr(grouped, "_factorized_is_cheaper", lambda *a: way == "stacked_factors")
    monkeypatch.setattr(grouped, "GROUPED_CONV", True)
    model, layer, x, expected = make(kind)
    calls = []
    monkeypatch.setattr(layer, "_route", lambda *a, **k: calls.append(a))  # the per-group path must not run
    with torch.no_grad():
        out = model(x, adapter_names=NAMES)
        again = model(x, adapter_names=NAMES)  # from the cached stacks
    assert not calls
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, expected, rtol=1e-4, atol=1e-5)


def test_conv_transpose_with_output_size_in_one_pass(monkeypatch):
    model, layer, x, _ = make("transpose:2d_groups_dilation")
    monkeypatch.setattr(layer, "_route", lambda *a, **k: pytest.fail("routed per group"))
    with torch.no_grad():
        default = layer.get_base_layer()(x[:1]).shape[-1]  # with the layer's output_padding=1
        size = [default - 1, default - 1]  # another output padding, set per call
        out = layer(x, output_size=size, adapter_names=NAMES)
        for i, a in enumerate(NAMES):
            if a == "__base__":
                expected = layer.get_base_layer()(x[i : i + 1], output_size=size)
            else:
                model.set_adapter(a)
                set_inference_cache(model, enabled=False)
                expected = layer(x[i : i + 1], output_size=size)
            torch.testing.assert_close(out[i : i + 1], expected, rtol=1e-4, atol=1e-5)


def test_training_and_gradients_keep_the_per_group_path(monkeypatch):
    model, layer, x, expected = make("layers:conv2d_3x3")
    monkeypatch.setattr(grouped, "_stacked_factor_delta", lambda *a: pytest.fail("one-pass path with gradients"))
    monkeypatch.setattr(grouped, "_stacked_weight_forward", lambda *a: pytest.fail("one-pass path with gradients"))
    out = model(x, adapter_names=NAMES)  # eval mode, gradients on
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert layer.ftn_c["default"].grad is not None  # the active (trainable) adapter
    set_inference_cache(model, enabled=False)
    with torch.no_grad():
        torch.testing.assert_close(model(x, adapter_names=NAMES), expected, rtol=1e-4, atol=1e-5)


def _per_row_reference(model, call, x, names):
    rows = []
    for i, a in enumerate(names):
        if a == "__base__":
            with model.disable_adapter():
                rows.append(call(x[i : i + 1], None))
        else:
            model.set_adapter(a)
            rows.append(call(x[i : i + 1], None))
    return torch.cat(rows)


def test_resnet_task_batchnorm_and_heads_per_sample(monkeypatch):
    calls = []
    real = task_layers.grouped_batchnorm
    monkeypatch.setattr(task_layers, "grouped_batchnorm", lambda *a: calls.append(1) or real(*a))
    model = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=2, num_classes=10, init_weights="gaussian"),
                           adapter_name="a")
    model.add_adapter("b", ftn_peft.presets.resnet(r=3, num_classes=10, init_weights="gaussian"))
    model.eval()
    gen = torch.Generator().manual_seed(3)
    for layer in model.modules():  # every adapter's BatchNorm and head its own statistics and weights
        if isinstance(layer, (ftn_peft.TaskNorm, ftn_peft.TaskHead)):
            for module in layer.modules_by_adapter.values():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.eps = 0.25  # eps must count too
                for t in (*module.parameters(), *module.buffers()):
                    if t.is_floating_point():
                        t.data.copy_(torch.rand(t.shape, generator=gen) + 0.5)
    names = ["a", "b", "__base__", "a", "b", "b"]
    x = torch.randn(len(names), 3, 32, 32, generator=gen)
    with torch.no_grad():
        out = model(x, adapter_names=names)
        expected = _per_row_reference(model, lambda xs, n: model(xs), x, names)
    assert calls  # the one-op BatchNorm ran
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_clip_tower_mixed_batch():
    model = get_peft_model(tiny_clip_classifier(), ftn_peft.presets.clip_vision(r=2, targets="qv", init_weights="gaussian"),
                           adapter_name="a")
    model.add_adapter("b", ftn_peft.presets.clip_vision(r=2, targets="o", init_weights="gaussian"))
    model.eval()
    names = ["b", "a", "a", "__base__", "b"]
    x = torch.randn(len(names), 3, 32, 32)
    call = lambda xs, n: model(pixel_values=xs, adapter_names=n).logits  # noqa: E731
    with torch.no_grad():
        out = call(x, names)
        expected = _per_row_reference(model, lambda xs, n: model(pixel_values=xs).logits, x, names)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_convs_without_the_small_ops_route_each_group_with_its_cached_weight(monkeypatch):
    monkeypatch.setattr(grouped, "_factorized_is_cheaper", lambda *a: False)
    monkeypatch.setattr(grouped, "GROUPED_CONV", False)
    model, layer, x, expected = make("layers:conv2d_groups")
    with torch.no_grad():
        torch.testing.assert_close(model(x, adapter_names=NAMES), expected, rtol=1e-4, atol=1e-5)
    assert set(layer._weight_cache._entries) == {("default",), ("b",)}
