"""`ftn_peft.auto_config` on a zoo of timm and transformers vision models (random weights, 32 px inputs).

For each: the one-line configuration adapts the expected layers (counted independently from the weight shapes or
the head layout), a forward runs, a training step changes only the trained adapter, merged equals unmerged, save
and load give the same outputs, and two adapters keep task heads of different sizes.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import timm
import torch
import transformers
from peft import PeftModel, get_peft_model
from torch import nn

import ftn_peft
from ftn_peft.layer import FTNLayer


def timm_model(name, **kwargs):
    def build():
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
    return build


def hf_model(config_cls, model_cls, **kwargs):
    def build():
        torch.manual_seed(0)
        return getattr(transformers, model_cls)(getattr(transformers, config_cls)(num_labels=5, **kwargs)).eval()
    return build


def hf_dual(config_cls, model_cls):
    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8)
    text = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1)

    def build():
        torch.manual_seed(0)
        config = getattr(transformers, config_cls)(vision_config=vision, text_config=text, num_labels=5)
        return getattr(transformers, model_cls)(config).eval()
    return build


def conv_count(stem):
    """r=1 factors of every Conv2d but `stem`, from the weight shapes: k² + Cin/g + Cout each."""
    def count(model):
        return sum(
            m.weight.shape[2] * m.weight.shape[3] + m.weight.shape[1] + m.weight.shape[0]
            for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and name != stem
        )
    return count


def head_count(layers):
    """r=1 factors of head-tensorized projections: d_model + d + n each, for (d_model, d, n, how many) given."""
    return lambda model: sum(k * (d_model + d + n) for d_model, d, n, k in layers)


VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
# name: (builder, targets, {FTN layer kind: how many}, independent r=1 factor count, slow)
ZOO = {
    "timm/resnet50": (timm_model("resnet50"), "convs", {"conv": 52}, conv_count("conv1"), True),
    "timm/resnext50_32x4d": (timm_model("resnext50_32x4d"), "convs", {"conv": 52}, conv_count("conv1"), True),
    "timm/efficientnet_b0": (timm_model("efficientnet_b0"), "convs", {"conv": 80}, conv_count("conv_stem"), False),
    "timm/mobilenetv3_large_100": (
        timm_model("mobilenetv3_large_100"), "convs", {"conv": 62}, conv_count("conv_stem"), False
    ),
    # convnext_atto rather than convnext_tiny for speed: the same blocks (conv_mlp: 1x1 convs), fewer channels
    "timm/convnext_atto": (timm_model("convnext_atto"), "convs", {"conv": 39}, conv_count("stem.0"), False),
    "timm/regnety_002": (timm_model("regnety_002"), "convs", {"conv": 69}, conv_count("stem.conv"), False),
    # timm ViT / DeiT: fused qkv (width 3·192) split into 3·3 heads of 64
    "timm/vit_tiny": (
        timm_model("vit_tiny_patch16_224", img_size=32, depth=2), "attention", {"qkv": 2, "out": 2},
        head_count([(192, 64, 9, 2), (192, 64, 3, 2)]), False,
    ),
    "timm/deit_tiny": (
        timm_model("deit_tiny_patch16_224", img_size=32, depth=2), "qkv", {"qkv": 2},
        head_count([(192, 64, 9, 2)]), False,
    ),
    # Swin: 3, 6, 12, 24 heads of 32 in the four stages
    "timm/swin_tiny": (
        timm_model("swin_tiny_patch4_window7_224", img_size=32, window_size=2, depths=(1, 1, 1, 1)), "attention",
        {"qkv": 4, "out": 4},
        head_count([(96 * 2**i, 32, 3 * 3 * 2**i, 1) for i in range(4)] + [(96 * 2**i, 32, 3 * 2**i, 1) for i in range(4)]),
        False,
    ),
    "hf/vit": (
        hf_model("ViTConfig", "ViTForImageClassification", intermediate_size=64, **VIT), "qv", {"qkv": 4},
        head_count([(32, 8, 4, 4)]), False,
    ),
    "hf/dinov2": (
        hf_model("Dinov2Config", "Dinov2ForImageClassification", mlp_ratio=2, **VIT), "attention",
        {"qkv": 6, "out": 2}, head_count([(32, 8, 4, 8)]), False,
    ),
    "hf/swin": (
        hf_model("SwinConfig", "SwinForImageClassification", embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                 window_size=2, image_size=32, patch_size=4),
        "attention", {"qkv": 6, "out": 2}, head_count([(16, 8, 2, 4), (32, 8, 4, 4)]), False,
    ),
    "hf/convnext": (
        hf_model("ConvNextConfig", "ConvNextForImageClassification", hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
        "convs", {"conv": 3}, conv_count("convnext.embeddings.patch_embeddings"), False,
    ),
    "hf/resnet": (
        hf_model("ResNetConfig", "ResNetForImageClassification", embedding_size=8, hidden_sizes=[8, 16],
                 depths=[1, 1], layer_type="bottleneck"),
        "convs", {"conv": 7}, conv_count("resnet.embedder.embedder.convolution"), False,
    ),
    "hf/clip": (hf_dual("CLIPConfig", "CLIPForImageClassification"), "o", {"out": 2}, head_count([(32, 8, 4, 2)]), False),
    "hf/siglip": (
        hf_dual("SiglipConfig", "SiglipForImageClassification"), "qv", {"qkv": 4}, head_count([(32, 8, 4, 4)]), False
    ),
}
CASES = [pytest.param(name, marks=[pytest.mark.slow] if spec[-1] else [], id=name) for name, spec in ZOO.items()]


def logits(output):
    return getattr(output, "logits", output)


def images(n=2, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def two_adapters(name):
    """The model with adapters "a" (3 classes) and "b" (7 classes), xavier init so that ΔW ≠ 0."""
    build, targets = ZOO[name][:2]
    model = build()
    config = lambda k: ftn_peft.auto_config(model, targets=targets, num_classes=k, init_weights="xavier")
    peft_model = get_peft_model(model, config(3), adapter_name="a")
    peft_model.add_adapter("b", config(7))
    return build, peft_model


def owned_by(adapter, key):
    return re.search(rf"\.ftn_\w+\.{adapter}(\.|$)", key) is not None


@pytest.mark.parametrize("name", CASES)
def test_auto_config_adapts_the_expected_layers(name):
    build, targets, kinds, count, _ = ZOO[name]
    model = build()
    peft_model = get_peft_model(build(), ftn_peft.auto_config(model, targets=targets, num_classes=3))
    found = {}
    for layer in peft_model.modules():
        if isinstance(layer, FTNLayer):
            found[layer.kind["default"]] = found.get(layer.kind["default"], 0) + 1
    assert found == kinds  # attention projections are head-tensorized, never silently plain matrices
    report = ftn_peft.parameter_report(peft_model)["default"]
    assert report.factor_params == count(model)
    head = model.get_submodule(peft_model.peft_config["default"].head_module)
    assert report.head_params == head.in_features * 3 + 3
    assert report.norm_params == sum(
        m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    )
    assert logits(peft_model(images())).shape == (2, 3)


@pytest.mark.parametrize("name", CASES)
def test_train_merge_save_load_two_heads(name, tmp_path):
    build, model = two_adapters(name)
    x = images()
    model.set_adapter("b")
    model.eval()
    assert logits(model(x)).shape == (2, 7)
    model.set_adapter("a")
    assert logits(model(x)).shape == (2, 3)

    # one training step on "a" changes "a" (factors, head, BatchNorm statistics) and nothing else
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    logits(model(images(4, seed=1))).logsumexp(-1).sum().backward()
    optimizer.step()
    model.eval()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(owned_by("a", k) for k in changed), [k for k in changed if not owned_by("a", k)]
    assert any(".ftn_a.a" in k for k in changed) and any(".ftn_head.a." in k for k in changed)

    with torch.no_grad():
        out_a = logits(model(x))
        model.merge_adapter()
        merged = logits(model(x))
        model.unmerge_adapter()
        model.set_adapter("b")
        out_b = logits(model(x))
    torch.testing.assert_close(merged, out_a, rtol=1e-4, atol=1e-4)

    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build(), tmp_path / "a", adapter_name="a")
    loaded.load_adapter(tmp_path / "b", adapter_name="b")
    loaded.eval()
    with torch.no_grad():
        loaded.set_adapter("a")
        torch.testing.assert_close(logits(loaded(x)), out_a)
        loaded.set_adapter("b")
        torch.testing.assert_close(logits(loaded(x)), out_b)


@pytest.mark.slow
def test_saved_adapter_loads_in_a_fresh_process(tmp_path):
    build, model = two_adapters("hf/resnet")
    x = images()
    with torch.no_grad():
        expected = logits(model(x))
    model.save_pretrained(tmp_path)
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch, transformers, ftn_peft
        from peft import PeftModel
        torch.manual_seed(0)
        config = transformers.ResNetConfig(num_labels=5, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                           layer_type="bottleneck")
        model = PeftModel.from_pretrained(transformers.ResNetForImageClassification(config).eval(),
                                          {str(tmp_path / "a")!r}, adapter_name="a").eval()
        io = torch.load({str(tmp_path / "io.pt")!r})
        with torch.no_grad():
            torch.testing.assert_close(model(io["x"]).logits, io["expected"])
        print("same outputs")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "same outputs" in done.stdout, done.stderr[-2000:]


@pytest.mark.slow
def test_efficientnet_b4_counts():
    """The paper's EfficientNet-B4 (full size, random weights), counted only."""
    model = timm.create_model("efficientnet_b4", pretrained=False, num_classes=102)
    config = ftn_peft.auto_config(model, num_classes=102)
    assert config.head_module == "classifier" and "conv_stem" not in config.target_modules
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(config.target_modules) == sorted(set(convs) - {"conv_stem"})
    report = ftn_peft.parameter_report(get_peft_model(model, config))["default"]
    assert report.factor_params == conv_count("conv_stem")(timm.create_model("efficientnet_b4"))


def test_fused_qkv_refuses_query_value_only():
    model = ZOO["timm/vit_tiny"][0]()
    with pytest.raises(ValueError, match=r"fuses query, key and value.*targets='qkv'"):
        ftn_peft.auto_config(model, targets="qv")


def test_nothing_found_names_what_was_found_and_how_to_target_by_hand():
    model = ZOO["hf/convnext"][0]()
    with pytest.raises(ValueError, match=r"conv: 3 \(convnext\.encoder.*FTNConfig\(target_modules="):
        ftn_peft.auto_config(model, targets="o")


@pytest.mark.parametrize("targets", ["q", "", ["convs", "weights"], []])
def test_unknown_targets(targets):
    with pytest.raises(ValueError, match="must be one of"):
        ftn_peft.auto_config(ZOO["hf/resnet"][0](), targets=targets)


def test_num_classes_without_a_classifier():
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1, image_size=32, patch_size=8
    ))
    assert ftn_peft.auto_config(model, targets="o").head_module is None
    with pytest.raises(ValueError, match="no nn.Linear classifier.*head="):
        ftn_peft.auto_config(model, targets="o", num_classes=3)


def test_layers_with_their_own_forward_are_left_alone_with_a_warning():
    from timm.layers import Conv2dSame

    model = nn.Sequential(nn.Conv2d(3, 4, 3), Conv2dSame(4, 4, 3, stride=2), nn.Conv2d(4, 4, 1))
    with pytest.warns(UserWarning, match=r"1\.? \(Conv2dSame\)|'1 \(Conv2dSame\)'"):
        config = ftn_peft.auto_config(model)
    assert config.target_modules == {"2"}  # "0" is the stem; "1" pads "same" in its own forward


def test_presets_use_auto_config_with_a_model():
    model = timm.create_model("resnet50d", pretrained=False)
    config = ftn_peft.presets.resnet(r=1, num_classes=10, model=model)
    assert not any(n.startswith("conv1") for n in config.target_modules)  # the whole deep stem stays frozen
    assert len(config.target_modules) == 52 and config.head_module == "fc" and config.init_weights == "xavier"
    clip = ZOO["hf/clip"][0]()
    config = ftn_peft.presets.clip_vision(r=4, targets="qv", model=clip, head_module="classifier", num_classes=3)
    assert config.alpha == 10.0 and config.init_weights == "gaussian"
    assert config.target_modules == {
        f"vision_model.encoder.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"
    }


def test_timm_features_only_backbone():
    """A headless feature pyramid (detection / segmentation backbones): all convs but the stem, no task head."""
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_100", pretrained=False, features_only=True).eval()
    x = images()
    with torch.no_grad():
        base = model(x)
    config = ftn_peft.auto_config(model, init_weights="xavier")
    assert config.head_module is None
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert config.target_modules == convs - {"conv_stem"}
    peft_model = get_peft_model(model, config).eval()
    with torch.no_grad():
        adapted = peft_model(x)
        with peft_model.disable_adapter():
            again = peft_model(x)
    assert [a.shape for a in adapted] == [b.shape for b in base]
    assert all(torch.equal(a, b) for a, b in zip(again, base))
    assert not torch.allclose(adapted[-1], base[-1])
    with pytest.raises(ValueError, match="no nn.Linear classifier"):
        ftn_peft.auto_config(timm.create_model("mobilenetv3_small_100", features_only=True), num_classes=3)
