"""Model-level behaviour: several adapters, isolation, task BN and heads, merging, unloading, disabling."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from peft import get_peft_model

import ftn_peft
from ftn_peft import FTNConfig, TaskHead, TaskNorm

from conftest import tiny_clip_classifier, tiny_timm_resnet, tiny_torchvision_resnet


def train_steps(model, images, num_classes, steps=3, seed=0):
    """A few SGD steps in train mode, so factors, BN parameters, BN statistics and the head all move."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (images.shape[0],), generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    model.train()
    for _ in range(steps):
        x = images + 0.5 * torch.randn(images.shape, generator=gen)
        loss = nn.functional.cross_entropy(model(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def adapter_state(model, name):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if f".{name}." in k or k.endswith(f".{name}")}


def base_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "ftn_" not in k}


def test_training_b_never_changes_a(images):
    model = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=2, num_classes=10))
    train_steps(model, images, 10)
    out_a = model(images).detach()
    state_a, frozen = adapter_state(model, "default"), base_state(model)
    assert any("running_mean" in k for k in state_a) and any("ftn_head" in k for k in state_a)

    model.add_adapter("b", ftn_peft.presets.resnet(r=3, num_classes=7))
    model.set_adapter("b")
    assert not any(p.requires_grad for k, p in model.named_parameters() if ".default" in k)
    train_steps(model, images, 7, seed=1)
    assert model(images).shape == (4, 7)

    for k, v in adapter_state(model, "default").items():
        assert torch.equal(v, state_a[k]), k
    for k, v in base_state(model).items():
        assert torch.equal(v, frozen[k]), k
    model.set_adapter("default")
    assert torch.equal(model(images), out_a)


def test_only_adapter_parameters_train(images):
    model = get_peft_model(tiny_torchvision_resnet(), ftn_peft.presets.resnet(r=1, num_classes=5))
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("ftn_a" in k or "ftn_b" in k or "ftn_c" in k or "ftn_norm" in k or "ftn_head" in k) for k in trainable)
    norms = [m for m in model.modules() if isinstance(m, TaskNorm)]
    assert len(norms) == sum(isinstance(m, nn.BatchNorm2d) for m in tiny_torchvision_resnet().modules())
    reports = ftn_peft.parameter_report(model)["default"]
    assert reports.total == sum(p.numel() for k, p in model.named_parameters() if k in trainable)


def test_heads_of_different_sizes_side_by_side(images):
    model = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=1, num_classes=10), adapter_name="ten")
    model.add_adapter("seven", ftn_peft.presets.resnet(r=1, num_classes=7))
    head = model.base_model.model.fc
    assert isinstance(head, TaskHead) and head.num_outputs == {"ten": 10, "seven": 7}
    assert model(images).shape == (4, 10)
    model.set_adapter("seven")
    assert model(images).shape == (4, 7)
    with model.disable_adapter():
        assert model(images).shape == (4, 10)  # the base classifier


def test_head_keeps_base_weights_when_size_matches(images):
    base = tiny_timm_resnet()
    expected = base(images)
    model = get_peft_model(copy.deepcopy(base), ftn_peft.presets.resnet(r=1, init_weights=True))
    torch.testing.assert_close(model(images), expected)


def test_merge_and_unload_equals_adapter_output(images):
    model = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=2, num_classes=6))
    train_steps(model, images, 6)
    expected = model(images).detach()
    merged = model.merge_and_unload()
    assert not any(isinstance(m, (ftn_peft.FTNLayer, TaskNorm, TaskHead)) for m in merged.modules())
    assert isinstance(merged.fc, nn.Linear) and merged.fc.out_features == 6
    torch.testing.assert_close(merged(images), expected, rtol=1e-4, atol=1e-5)


def test_merge_unmerge_restores_base_and_unload_gives_base(images):
    base = tiny_timm_resnet()
    expected_base = base(images)
    model = get_peft_model(copy.deepcopy(base), ftn_peft.presets.resnet(r=2, num_classes=10))
    train_steps(model, images, 10)
    adapted = model(images).detach()
    model.merge_adapter()
    torch.testing.assert_close(model(images), adapted, rtol=1e-4, atol=1e-5)
    model.unmerge_adapter()
    unloaded = model.unload()
    assert list(base.state_dict()) == list(unloaded.state_dict())
    for (k, v), (_, w) in zip(base.state_dict().items(), unloaded.state_dict().items()):
        torch.testing.assert_close(v, w, rtol=0, atol=1e-6, msg=k)
    torch.testing.assert_close(unloaded.eval()(images), expected_base.detach(), rtol=1e-5, atol=1e-6)


def test_disable_adapter_gives_base_output(images):
    base = tiny_clip_classifier()
    expected = base(pixel_values=images).logits
    model = get_peft_model(copy.deepcopy(base), ftn_peft.presets.clip_vision(r=2, targets="qv", head_module="classifier", num_classes=3))
    assert model(pixel_values=images).logits.shape == (4, 3)
    with model.disable_adapter():
        torch.testing.assert_close(model(pixel_values=images).logits, expected)


def test_safe_merge_refuses_non_finite_weights(images):
    model = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=1))
    layer = model.base_model.model.layer1[0].conv1
    before = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.ftn_a["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        model.merge_and_unload(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, before)


def test_delete_adapter_removes_everything(images):
    model = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=1, num_classes=4), adapter_name="a")
    model.add_adapter("b", ftn_peft.presets.resnet(r=1, num_classes=5))
    model.delete_adapter("b")
    assert not any(".b." in k or k.endswith(".b") for k in model.state_dict())
    assert model.base_model.model.fc.num_outputs == {"a": 4}
    assert model(images).shape == (4, 4)


def test_multiple_active_adapters_are_refused_for_heads(images):
    model = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=1), adapter_name="a")
    model.add_adapter("b", ftn_peft.presets.resnet(r=1))
    model.base_model.set_adapter(["a", "b"])
    with pytest.raises(ValueError, match="one adapter at a time"):
        model(images)


def test_adapters_without_heads_or_bn_sum_factors(images):
    model = get_peft_model(tiny_timm_resnet(), FTNConfig(r=1, target_modules=["conv1"], task_batchnorm=False, init_weights="xavier"), adapter_name="a")
    model.add_adapter("b", FTNConfig(r=1, target_modules=["conv1"], task_batchnorm=False, init_weights="xavier"))
    layer = model.base_model.model.layer1[0].conv1
    model.base_model.set_adapter(["a", "b"])
    x = torch.randn(2, layer.get_base_layer().in_channels, 8, 8)
    expected = layer.get_base_layer()._conv_forward(
        x, layer.get_base_layer().weight + layer.get_delta_weight("a") + layer.get_delta_weight("b"), None
    )
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)
