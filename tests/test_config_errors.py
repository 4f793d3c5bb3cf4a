"""Every bad input gets an error that names the problem and the fix."""

from __future__ import annotations

import pytest
from torch import nn
from peft import get_peft_model

import ftn_peft
from ftn_peft import FTNConfig

from conftest import tiny_bert, tiny_clip_classifier, tiny_timm_resnet


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


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(rank_pattern=[]), TypeError, r"rank_pattern must be a dict"),
        (dict(alpha_pattern=None), TypeError, r"alpha_pattern must be a dict"),
        (dict(rank_pattern={3: 2}), TypeError, r"rank_pattern keys must be non-empty strings"),
        (dict(rank_pattern={"conv(": 2}), ValueError, r"rank_pattern: 'conv\(' is not a valid regular expression"),
        (dict(target_modules="layer[1"), ValueError, r"target_modules: 'layer\[1' is not a valid regular expression"),
        (dict(exclude_modules="*conv"), ValueError, r"exclude_modules: '\*conv' is not a valid regular expression"),
        (dict(target_modules=0), TypeError, r"target_modules must be a list of module names / suffixes or one regex"),
        (dict(target_modules=["conv1", None]), TypeError, r"target_modules must hold non-empty strings"),
        (dict(target_modules=[]), ValueError, r"target_modules is empty"),
        (dict(exclude_modules=3.5), TypeError, r"exclude_modules must be a list"),
        (dict(output_projections=None), TypeError, r"output_projections must be a list of module names"),
        (dict(output_projections="out_proj"), TypeError, r"output_projections must be a list .*\['out_proj'\]"),
        (dict(alpha=float("inf")), ValueError, r"alpha must be a positive number <= 1000, got inf"),
        (dict(alpha=1e300), ValueError, r"alpha must be a positive number <= 1000"),
        (dict(alpha=float("nan")), ValueError, r"alpha must be a positive number"),
        (dict(alpha=True), ValueError, r"alpha must be a positive number"),
        (dict(alpha_pattern={"conv1": 1e4}), ValueError, r"alpha_pattern\['conv1'\] must be a positive number <= 1000"),
        (dict(init_std=1e30), ValueError, r"init_std must be a positive number <= 1.0"),
        (dict(init_std=True), ValueError, r"init_std must be a positive number"),
        (dict(init_std=float("nan")), ValueError, r"init_std must be a positive number"),
        (dict(init_weights=1), ValueError, r"init_weights=1 is not one of"),
        (dict(task_batchnorm="no"), TypeError, r"task_batchnorm must be True or False, got 'no'"),
        (dict(head_num_outputs=True, head_module="fc"), ValueError, r"head_num_outputs must be a positive int, got True"),
        (dict(head_module=""), TypeError, r"head_module must be the name"),
        (dict(head_module=["fc"]), TypeError, r"head_module must be the name"),
        (dict(compute=["auto"]), ValueError, r"compute=\['auto'\] is not one of"),
        (dict(attention_heads=True), ValueError, r"attention_heads must be"),
        (dict(modules_to_save="fc"), TypeError, r"modules_to_save must be a list of module names"),
        (dict(modules_to_save=["fc("]), ValueError, r"modules_to_save: 'fc\(' is not a valid regular expression"),
        (dict(inference_mode="yes"), TypeError, r"inference_mode must be True or False"),
        (dict(revision=3), TypeError, r"revision must be a string or None"),
        (dict(task_type="bogus"), ValueError, r"Invalid task type: .bogus.; task_type must be one of"),
    ],
)
def test_wrong_types_and_values_name_the_field(kwargs, error, message):
    kwargs = {"target_modules": ["conv1"], **kwargs}
    with pytest.raises(error, match=message):
        FTNConfig(**kwargs)


def test_output_projections_list_lays_out_clip_out_proj_as_output():
    # A bare string used to become its characters, silently laying out_proj out as a query/key/value projection.
    model = get_peft_model(tiny_clip_classifier(), FTNConfig(target_modules=["out_proj"], output_projections=["out_proj"]))
    assert model.base_model.model.vision_model.encoder.layers[0].self_attn.out_proj.kind["default"] == "out"


def test_modules_to_save_errors():
    with pytest.raises(ValueError, match="modules_to_save entry 'nothing' matches no module"):
        get_peft_model(tiny_timm_resnet(), FTNConfig(target_modules=["conv2"], modules_to_save=["nothing"]))
    with pytest.raises(ValueError, match=r"modules_to_save entry 'layer1' covers 'layer1.0.bn1' \(BatchNorm2d\)"):
        get_peft_model(tiny_timm_resnet(), FTNConfig(target_modules=["conv2"], modules_to_save=["layer1"]))
    with pytest.raises(ValueError, match=r"entry 'encoder' covers '.*encoder', which contains '.*layers.0.self_attn.q_proj'"):
        get_peft_model(tiny_clip_classifier(), FTNConfig(target_modules=["patch_embedding"], modules_to_save=["q_proj", "encoder"]))
    with pytest.raises(ValueError, match=r"modules_to_save entry 'fc' covers 'fc' \(TaskHead\)"):
        model = get_peft_model(tiny_timm_resnet(), FTNConfig(target_modules=["conv2"], head_module="fc"))
        model.add_adapter("b", FTNConfig(target_modules=["conv2"], modules_to_save=["fc"]))


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


def test_exclude_modules_that_exclude_nothing():
    with pytest.raises(ValueError, match=r"exclude_modules \['conv9'\] match no module"):
        get_peft_model(tiny_timm_resnet(), FTNConfig(target_modules=["conv1"], exclude_modules=["conv9", "layer1.0.conv1"]))
    with pytest.raises(ValueError, match=r"exclude_modules \['layer9.*'\] match no module"):
        get_peft_model(tiny_timm_resnet(), FTNConfig(target_modules=["conv1"], exclude_modules="layer9.*"))
    model = get_peft_model(tiny_timm_resnet(), FTNConfig(target_modules=["conv1"], exclude_modules=["layer1.0.conv1"]))
    assert not hasattr(model.base_model.model.layer1[0].conv1, "ftn_a")


def test_modules_to_save_around_an_earlier_adapters_copy():
    model = get_peft_model(tiny_clip_classifier(), FTNConfig(target_modules=["patch_embedding"], modules_to_save=["q_proj"]))
    with pytest.raises(ValueError, match=r"covers '.*encoder', which contains '.*q_proj' \(from \"an earlier adapter"):
        model.add_adapter("b", FTNConfig(target_modules=["patch_embedding"], modules_to_save=["encoder"]))
    assert set(model.peft_config) == {"default"}
