"""Behaviours that mutation testing (docs/mutation.md) found no other test pinned down."""

import copy

import pytest
import torch
from torch import nn
from peft import get_peft_model

import ftn_peft
from ftn_peft import FTNConfig, TaskHead, TaskNorm
from ftn_peft import functional as FF

from conftest import tiny_timm_resnet


@pytest.mark.parametrize("kind", ["qkv", "out"])
@pytest.mark.parametrize("heads", [None, 0, -2])
def test_head_layouts_refuse_a_missing_or_non_positive_head_count(kind, heads):
    with pytest.raises(ValueError, match=rf"kind='{kind}' needs a positive num_heads, got {heads}"):
        FF.factor_dims(kind, (12, 12), heads)


def test_head_count_must_divide_the_projection_width():
    with pytest.raises(ValueError, match="num_heads=5 does not divide the projection width 12"):
        FF.factor_dims("qkv", (12, 10), 5)
    with pytest.raises(ValueError, match="num_heads=5 does not divide the projection width 12"):
        FF.factor_dims("out", (10, 12), 5)


def test_unknown_factor_kinds_are_refused_by_name():
    factors = [torch.randn(2, 3) for _ in range(3)]
    with pytest.raises(ValueError, match=r"unknown factor kind 'tucker'; expected one of \('conv', 'qkv'"):
        FF.delta_weight("tucker", factors, (3, 3, 3))
    with pytest.raises(ValueError, match="linear_delta does not take kind='conv'"):
        FF.linear_delta("conv", torch.randn(4, 3), factors, 1.0)


def test_a_single_head_is_a_valid_head_layout():
    assert FF.factor_dims("qkv", (12, 10), 1) == (10, 12, 1)
    assert FF.factor_dims("out", (10, 12), 1) == (10, 12, 1)


# --- task BatchNorm and task heads (task_layers.py) ------------------------------------------------------------
def _two_task_resnet():
    """Adapters "a" (4 classes) and "b" (5 classes), each with its own BN statistics, head and factors."""
    model = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=1, num_classes=4, init_weights="gaussian"), adapter_name="a")
    model.add_adapter("b", ftn_peft.presets.resnet(r=1, num_classes=5, init_weights="gaussian"))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TaskNorm):
                for name in ("a", "b"):
                    m.ftn_norm[name].running_mean.uniform_(-0.3, 0.3)
            if isinstance(m, TaskHead):
                for name in ("a", "b"):
                    m.ftn_head[name].weight.normal_()
    return model.eval()


def _outputs(model, images):
    out = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        with torch.no_grad():
            out[name] = model(images)
    return out


def test_task_layers_refuse_two_active_adapters_and_name_the_fix(images):
    model = _two_task_resnet()
    model.base_model.set_adapter(["a", "b"])
    with pytest.raises(ValueError, match=r"TaskNorm serves one adapter at a time but adapters \['a', 'b'\] are active; "
                       r"activate one with set_adapter\(\), or pass adapter_names="):
        model(images)


def test_merge_and_unload_of_a_named_adapter_uses_its_bn_and_head(images):
    model = _two_task_resnet()
    expected = _outputs(model, images)["b"]
    model.set_adapter("a")  # the named adapter, not the active one, is merged
    merged = model.merge_and_unload(adapter_names=["b"])
    assert merged.fc.out_features == 5
    with torch.no_grad():
        torch.testing.assert_close(merged(images), expected, rtol=1e-4, atol=1e-5)


def test_task_layers_merge_one_adapter_only(images):
    model = _two_task_resnet()
    with pytest.raises(ValueError, match=r"TaskNorm can merge one adapter, not \['a', 'b'\]"):
        model.merge_adapter(["a", "b"])
    model.unmerge_adapter()
    model.merge_adapter(["a"])
    with pytest.raises(ValueError, match=r"can merge one adapter, not \['a', 'b'\]"):
        model.merge_adapter(["b"])


def test_safe_merge_checks_task_bn_and_head(images):
    model = _two_task_resnet()
    expected = _outputs(model, images)["a"]
    model.set_adapter("a")
    with torch.no_grad():
        model.base_model.model.fc.ftn_head["b"].weight[0, 0] = float("nan")
    torch.testing.assert_close(model.merge_and_unload(safe_merge=True, adapter_names=["a"])(images), expected)
    model = _two_task_resnet()
    with torch.no_grad():
        model.base_model.model.fc.ftn_head["b"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"adapter b seems to be broken: its TaskHead has non-finite values; it was not merged"):
        model.merge_and_unload(safe_merge=True, adapter_names=["b"])


def test_unload_gives_back_the_base_modules_themselves():
    base = tiny_timm_resnet()
    fc, bn = base.fc, base.bn1
    model = get_peft_model(base, ftn_peft.presets.resnet(r=1, num_classes=4))
    unloaded = model.unload()
    assert unloaded.fc is fc and unloaded.bn1 is bn  # no copies: unloading costs no memory


def test_unload_after_merge_keeps_the_merged_adapter_like_lora(images):
    # LoRA's unload() keeps a merged delta in the base weight; FTN keeps the merged task BatchNorm and head with it,
    # never a hybrid of merged factors and base BatchNorm / head.
    model = _two_task_resnet()
    expected = _outputs(model, images)["b"]
    model.merge_adapter()
    with torch.no_grad():
        out = model.unload()(images)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_task_head_calls_with_mixed_sizes_give_clear_errors():
    head = TaskHead(nn.Linear(6, 3), "a", num_outputs=4)
    head.update_layer("b", num_outputs=5)
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match="adapter_names has 3 entries but the batch has 2 samples"):
        head(x, adapter_names=["a", "b", "a"])
    head.merge(adapter_names=["a"])
    with pytest.raises(ValueError, match=r"please call `unmerge_adapter` first. adapter_names= \(mixed-adapter batches\) cannot run on a merged model"):
        head(x, adapter_names=["a", "b"])


def test_task_layers_print_as_ftn_modules():
    head = TaskHead(nn.Linear(6, 3), "a")
    norm = TaskNorm(nn.BatchNorm2d(3), "a")
    assert repr(head).startswith("ftn.TaskHead(") and repr(norm).startswith("ftn.TaskNorm(")


def test_an_adapter_without_task_bn_or_head_runs_on_the_base_ones(images):
    base = tiny_timm_resnet()
    model = get_peft_model(copy.deepcopy(base), ftn_peft.presets.resnet(r=1, num_classes=4), adapter_name="a")
    model.add_adapter("plain", FTNConfig(r=1, target_modules=["conv1"], task_batchnorm=False))  # c = 0: a no-op
    model.set_adapter("plain")
    with torch.no_grad():
        torch.testing.assert_close(model(images), base(images))


def test_a_non_linear_head_is_refused_with_the_alternative():
    with pytest.raises(TypeError, match=r"head_module must name an nn.Linear classifier or a module whose last "
                       r"Linear / Conv layer is its output layer \(a decoder\), got ReLU, which holds neither; "
                       r"wrap other heads with modules_to_save instead"):
        TaskHead(nn.ReLU(), "a")


@pytest.mark.parametrize("two_op", [True, False])
def test_conv_delta_keeps_the_dilation_on_both_small_op_paths(two_op):
    # tests/test_conv_paths.py checks this over many shapes, but it is outside mutmut's selection; a dilated 3×3
    # conv is where the two-op path's k×k conv must receive the layer's dilation.
    torch.manual_seed(0)
    r, cin, cout, k = 3, 4, 5, (3, 3)
    factors = [torch.randn(r, 9), torch.randn(r, cin), torch.randn(r, cout)]
    x = torch.randn(2, cin, 9, 9)
    dense = FF.delta_weight(FF.CONV, factors, (cout, cin, *k), scale=0.5)
    want = torch.nn.functional.conv2d(x, dense, stride=1, padding=2, dilation=2)
    got = FF.conv_delta(x, factors, k, 1, 2, 2, 1, 0.5, two_op=two_op)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
