"""Every bad input gets an error that names the problem and the fix."""

from __future__ import annotations

import pytest
from torch import nn
from peft import get_peft_model

import ftn_peft
from ftn_peft import FTNConfig

from conftest import tiny_bert, tiny_timm_resnet


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "r must be an int >= 1, got 0"),
        (dict(r=-2), "r must be an int >= 1"),
        (dict(r=1.5), "r must be an int >= 1"),
        (dict(alpha=0), "alpha must be a positive number"),
        (dict(rank_pattern={"conv1": 0}), r"rank_pattern\['conv1'\] must be an int >= 1"),
        (dict(alpha_pattern={"conv1": -1.0}), r"alpha_pattern\['conv1'\] must be a positive"),
        (dict(init_weights="kaiming"), "init_weights='kaiming' is not one of"),
        (dict(init_std=0), "init_std must be a positive number"),
        (dict(attention_heads=0), "attention_heads must be 'auto', None or a positive int"),
        (dict(attention_heads="many"), "attention_heads must be"),
        (dict(compute="fast"), "compute='fast' is not one of"),
        (dict(head_num_outputs=0, head_module="fc"), "head_num_outputs must be a positive int"),
        (dict(head_num_outputs=5), "head_num_outputs=5 needs head_module"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FTNConfig(target_modules=["conv1"], **kwargs)


def test_missing_target_modules_points_to_presets():
    with pytest.raises(ValueError, match="target_modules is None.*presets"):
        get_peft_model(tiny_timm_resnet(), FTNConfig())


def test_target_that_matches_nothing():
    with pytest.raises(ValueError, match=r"target_modules=\['conv9'\] matches no module .*can adapt here: \['conv1'"):
        get_peft_model(tiny_timm_resnet(), FTNConfig(target_modules=["conv9"]))
    with pytest.raises(ValueError, match=r"target_modules='layer9\.\*' matches no module"):
        get_peft_model(tiny_timm_resnet(), FTNConfig(target_modules="layer9.*"))
    with pytest.raises(ValueError, match=r"target_modules=\['conv1'\] matches no module of the model outside exclude"):
        get_peft_model(tiny_timm_resnet(), FTNConfig(target_modules=["conv1"], exclude_modules=".*conv1"))


def test_rank_pattern_key_that_matches_nothing():
    with pytest.raises(ValueError, match=r"rank_pattern keys \['layer9.*'\] match no adapted module"):
        get_peft_model(tiny_timm_resnet(), FTNConfig(target_modules=["conv1"], rank_pattern={"layer9.0.conv1": 2}))


def test_rank_and_alpha_pattern_apply_per_layer():
    model = get_peft_model(
        tiny_timm_resnet(),
        FTNConfig(target_modules=["conv1", "conv2"], r=2, rank_pattern={"layer4.0.conv2": 5}, alpha_pattern={"conv1": 8.0}),
    )
    m = model.base_model.model
    assert (m.layer4[0].conv2.r["default"], m.layer4[0].conv1.r["default"]) == (5, 2)
    assert (m.layer1[0].conv1.scaling["default"], m.layer1[0].conv2.scaling["default"]) == (4.0, 1.0)


def test_unsupported_layer_type_is_named():
    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)

    with pytest.raises(TypeError, match="cannot adapt 'emb' of type Embedding; supported layer types: Conv2d"):
        get_peft_model(WithEmbedding(), FTNConfig(target_modules=["emb"]))


def test_head_count_that_does_not_divide():
    with pytest.raises(ValueError, match="attention_heads=5 does not divide the output width 24 of .*query"):
        get_peft_model(tiny_bert(), FTNConfig(target_modules=["query"], attention_heads=5))


def test_head_module_must_exist_once():
    with pytest.raises(ValueError, match="head_module='classifier' matches no module"):
        get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(head_module="classifier"))
    with pytest.raises(ValueError, match="head_module='conv1' matches .* modules"):
        get_peft_model(tiny_timm_resnet(), FTNConfig(target_modules=["conv2"], head_module="conv1"))


def test_targeting_the_task_head_is_refused():
    with pytest.raises(ValueError, match="'fc' is a task head of FTN; remove it from target_modules"):
        get_peft_model(tiny_timm_resnet(), FTNConfig(target_modules=["conv1", "fc"], head_module="fc"))


def test_mixed_batch_errors(images):
    model = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=1))
    with pytest.raises(ValueError, match=r"unknown adapters \['nope'\]"):
        model(images, adapter_names=["default", "nope", "default", "default"])
    with pytest.raises(ValueError, match="has 2 entries but the batch has 4"):
        model(images, adapter_names=["default", "__base__"])
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged model"):
        model(images, adapter_names=["default"] * 4)


def test_parameter_report_errors():
    with pytest.raises(ValueError, match="holds no FTN layers"):
        ftn_peft.parameter_report(tiny_timm_resnet())
    model = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=1))
    with pytest.raises(ValueError, match=r"unknown adapters \['x'\]"):
        ftn_peft.parameter_report(model, ["x"])
