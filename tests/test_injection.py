"""Adding adapters: identified by name (a config object may be reused), and a failed call changes nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from peft import get_peft_model

import ftn_peft
from ftn_peft import FTNConfig, TaskHead, TaskNorm

from conftest import tiny_clip_classifier, tiny_timm_resnet


def _output(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def test_one_config_object_serves_two_adapters(images):
    config = ftn_peft.presets.resnet(r=1, num_classes=5)
    model = get_peft_model(tiny_timm_resnet(), config)
    net = model.base_model.model
    with torch.no_grad():  # make adapter "default" differ from a fresh copy of the base layers
        net.bn1.ftn_norm["default"].running_mean.fill_(0.3)
        net.fc.ftn_head["default"].weight.fill_(0.01)
    model.eval()
    before = _output(model, images)

    model.add_adapter("b", config)

    for module in net.modules():
        if isinstance(module, (TaskNorm, TaskHead)):
            assert set(module.modules_by_adapter) == {"default", "b"}
    assert (net.bn1.ftn_norm["default"].running_mean == 0.3).all()
    assert torch.equal(_output(model, images), before)
    model.set_adapter("b")
    after_b = _output(model, images)
    assert after_b.shape == (4, 5) and not torch.equal(after_b, before)
    # adapter "b" starts from the base BatchNorm statistics, not from adapter "default"'s
    assert torch.equal(net.bn1.ftn_norm["b"].running_mean, net.bn1.base_layer.running_mean)


def _fingerprint(model):
    return dict(
        modules=[(name, id(m), type(m)) for name, m in model.named_modules()],
        state={k: v.clone() for k, v in model.state_dict().items()},
        params={k: (id(p), p.requires_grad) for k, p in model.named_parameters()},
        training=[m.training for m in model.modules()],
        peft_config=dict(getattr(model, "peft_config", {})),
    )


def _assert_same(before, after):
    assert after["modules"] == before["modules"]
    assert after["params"] == before["params"]
    assert after["training"] == before["training"]
    assert after["peft_config"] == before["peft_config"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


# Each fails half-way without the validation / rollback: convs or BatchNorms are wrapped before the error.
RESNET_FAILURES = [
    (dict(target_modules=["conv1", "conv2"], head_module="fc", rank_pattern={"layer9.0.conv1": 2}), ValueError),
    (dict(target_modules=["conv1", "conv2"], head_module="layer4.0.act1"), TypeError),
    (dict(target_modules=r".*(conv\d|act1)"), TypeError),  # ReLU comes after the stem conv was wrapped
    (dict(target_modules=r".*(conv\d|bn1)"), ValueError),  # a BatchNorm, already a task BatchNorm
    (dict(target_modules=["conv1", "fc"], head_module="fc"), ValueError),
    (dict(target_modules=["conv2"], head_module="fc", modules_to_save=["layer4"]), ValueError),
    (dict(target_modules=["conv2"], head_module="layer4.0.act1"), TypeError),
]


@pytest.mark.parametrize("kwargs, error", RESNET_FAILURES)
def test_failed_first_adapter_leaves_model_untouched(kwargs, error):
    base = tiny_timm_resnet()
    for p in base.layer1.parameters():
        p.requires_grad_(False)  # a user's own trainability must survive too
    before = _fingerprint(base)
    with pytest.raises(error):
        get_peft_model(base, FTNConfig(**kwargs))
    _assert_same(before, _fingerprint(base))
    assert not hasattr(base, "peft_config")


@pytest.mark.parametrize("kwargs, error", RESNET_FAILURES)
def test_failed_second_adapter_leaves_model_untouched(kwargs, error, images):
    model = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=2, num_classes=7))
    model.add_adapter("other", ftn_peft.presets.resnet(r=1))
    model.eval()
    outputs = _output(model, images)
    before = _fingerprint(model)
    with pytest.raises(error):
        model.add_adapter("new", FTNConfig(**kwargs))
    _assert_same(before, _fingerprint(model))
    assert model.active_adapters == ["default"]
    assert set(model.peft_config) == {"default", "other"}
    assert torch.equal(_output(model, images), outputs)
    model.add_adapter("new", ftn_peft.presets.resnet(r=1))  # the name is still free and the model still works
    model.set_adapter("new")
    assert torch.isfinite(_output(model, images)).all()


def test_failed_clip_adapter_leaves_model_untouched():
    base = tiny_clip_classifier()
    before = _fingerprint(base)
    config = FTNConfig(target_modules=r".*(q_proj|out_proj)", rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 2.0})
    with pytest.raises(ValueError, match=r"alpha_pattern keys \['v_proj'\] match no adapted module"):
        get_peft_model(base, config)
    _assert_same(before, _fingerprint(base))
    # every q_proj is wrapped before the classifier (10 outputs) fails to split into 4 heads
    with pytest.raises(ValueError, match="attention_heads=4 does not divide the output width 10 of 'classifier'"):
        get_peft_model(base, FTNConfig(target_modules=r".*(q_proj|classifier)", attention_heads=4))
    _assert_same(before, _fingerprint(base))


def test_head_of_another_size_must_be_the_output_layer():
    base = tiny_clip_classifier()
    before = _fingerprint(base)
    config = FTNConfig(target_modules=["q_proj"], head_module="layers.1.mlp.fc2", head_num_outputs=5)
    with pytest.raises(ValueError, match=r"middle layer with 32 outputs.*output layer: \['classifier'\]"):
        get_peft_model(base, config)
    _assert_same(before, _fingerprint(base))
    # keeping its size, the same layer becomes a per-adapter copy of itself: allowed
    model = get_peft_model(base, FTNConfig(target_modules=["q_proj"], head_module="layers.1.mlp.fc2"))
    assert isinstance(model.base_model.model.vision_model.encoder.layers[1].mlp.fc2, TaskHead)

    # a plain model without a classifier accessor: its last Linear
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"'0', a middle layer with 8 outputs.*output layer: \['2'\]"):
        get_peft_model(mlp, FTNConfig(target_modules=["2"], head_module="0", head_num_outputs=5))
    model = get_peft_model(mlp, FTNConfig(target_modules=["0"], head_module="2", head_num_outputs=5))
    assert model(torch.randn(2, 4)).shape == (2, 5)
