"""The per-task factor counts of docs/design.md ("Parameter counts") on the full-size backbones (random weights), and the parameter report."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from peft import LoraConfig, get_peft_model
from transformers import CLIPVisionConfig, CLIPVisionModel

import ftn_peft
from ftn_peft.report import format_report


def expected_conv_count(model, r):
    """r·(k² + Cin/g + Cout) summed over every Conv2d but the stem, straight from the weight shapes."""
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d) and name != "conv1":
            cout, cin_g, kh, kw = m.weight.shape
            total += r * (kh * kw + cin_g + cout)
    return total


@pytest.mark.parametrize(
    "build, expected",
    [
        (lambda: timm.create_model("resnet50", pretrained=False), 49_204),
        (lambda: torchvision.models.resnet50(), 49_204),
        (lambda: timm.create_model("resnet34", pretrained=False), 16_291),
        (lambda: torchvision.models.resnet34(), 16_291),
    ],
)
def test_resnet_rank1_counts(build, expected):
    model = build()
    assert expected_conv_count(model, 1) == expected
    features = model.fc.in_features
    peft_model = get_peft_model(model, ftn_peft.presets.resnet(r=1, num_classes=102))
    report = ftn_peft.parameter_report(peft_model)["default"]
    assert report.factor_params == expected
    assert report.head_params == features * 102 + 102


def vit_b32():
    cfg = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, image_size=224, patch_size=32)
    return CLIPVisionModel(cfg)


@pytest.mark.parametrize("targets, expected", [("o", 40_512), ("qv", 81_024)])
def test_clip_vit_b32_rank4_counts(targets, expected):
    model = get_peft_model(vit_b32(), ftn_peft.presets.clip_vision(r=4, targets=targets))
    assert ftn_peft.parameter_report(model)["default"].factor_params == expected
    assert expected == (2 if targets == "qv" else 1) * 12 * 4 * (768 + 64 + 12)  # paper: L·R·(d_model + d + n)


def test_counts_grow_linearly_with_rank_and_beat_lora():
    model = get_peft_model(vit_b32(), ftn_peft.presets.clip_vision(r=8, targets="qv"))
    assert ftn_peft.parameter_report(model)["default"].factor_params == 2 * 81_024
    lora = get_peft_model(vit_b32(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lora_params = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    assert lora_params == 147_456 > 81_024  # LoRA on Q and V at r = 4 (docs/design.md)


def test_report_matches_paper_params_column():
    model = get_peft_model(timm.create_model("resnet50", pretrained=False), ftn_peft.presets.resnet(r=1, num_classes=102), adapter_name="flowers")
    model.add_adapter("cars", ftn_peft.presets.resnet(r=1, num_classes=196))
    reports = ftn_peft.parameter_report(model)
    backbone = reports["flowers"].backbone_params
    assert backbone == sum(p.numel() for n, p in timm.create_model("resnet50").named_parameters() if not n.startswith("fc."))
    bn_affine = sum(2 * m.num_features for m in timm.create_model("resnet50").modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert reports["cars"].norm_params == bn_affine
    assert reports["cars"].total == 49_204 + bn_affine + 2048 * 196 + 196
    table = format_report(reports)
    together = 1 + (reports["flowers"].total + reports["cars"].total) / backbone
    assert f"{together:.4f}×" in table and "| flowers | 49,204 |" in table
