"""`task_norms="all"`: per-adapter LayerNorm / GroupNorm copies for ViTs and ConvNeXt (BatchNorm stays the default)."""

from __future__ import annotations

import pytest
import timm
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import ftn_peft
from ftn_peft import FTNConfig
from ftn_peft.task_layers import TaskNorm


def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, depth=2).eval()


def tiny_convnext():
    torch.manual_seed(0)
    # convnext_atto uses timm's LayerNorm2d (a subclass of nn.LayerNorm) in its stem and downsampling layers
    return timm.create_model("convnext_atto", pretrained=False, num_classes=5).eval()


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.gn = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.gn(self.conv(x)).mean((2, 3)))


BUILDERS = {"vit": (tiny_vit, "attention"), "convnext": (tiny_convnext, "convs")}


def norm_shapes(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))}


def two_adapters(kind):
    build, targets = BUILDERS[kind]
    base = build()
    norms = norm_shapes(base)
    config = ftn_peft.auto_config(base, r=2, targets=targets, norms="all", init_weights="xavier")
    model = get_peft_model(base, config, adapter_name="a")
    model.add_adapter("b", ftn_peft.auto_config(build(), r=2, targets=targets, norms="all", init_weights="xavier"))
    return model, norms


def test_default_leaves_layernorm_shared():
    base = tiny_vit()
    model = get_peft_model(base, ftn_peft.auto_config(base, r=1, targets="attention"))
    assert not any(isinstance(m, TaskNorm) for m in model.modules())
    config = ftn_peft.auto_config(tiny_vit(), r=1, targets="attention")
    assert config.task_norms == "batchnorm"


@pytest.mark.parametrize("value", ["layernorm", "ALL", None, True, ["all"]])
def test_bad_task_norms_names_the_field(value):
    with pytest.raises(ValueError, match=r"task_norms=.*'batchnorm'.*'all'"):
        FTNConfig(r=1, target_modules=["fc"], task_norms=value)


@pytest.mark.parametrize("kind", ["vit", "convnext"])
def test_every_norm_wrapped_and_counted(kind):
    model, norms = two_adapters(kind)
    wrapped = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, TaskNorm)}
    assert set(wrapped) == set(norms)
    if kind == "convnext":
        assert any(type(m).__name__ == "LayerNorm2d" for m in norms.values())
    # independent count: the affine parameters of each LayerNorm, from its shape
    expected = sum(
        2 * int(torch.Size(m.normalized_shape).numel()) if m.elementwise_affine else 0 for m in norms.values()
    )
    reports = ftn_peft.parameter_report(model)
    assert reports["a"].norm_params == reports["b"].norm_params == expected > 0
    # the backbone keeps the base norms, not the copies
    base = BUILDERS[kind][0]()
    classifier = sum(p.numel() for p in base.get_classifier().parameters())
    assert reports["a"].backbone_params == sum(p.numel() for p in base.parameters()) - classifier


def test_groupnorm_counted():
    base = GroupNormNet()
    model = get_peft_model(base, FTNConfig(r=1, target_modules=["conv"], task_norms="all"))
    assert isinstance(model.base_model.model.gn, TaskNorm)
    assert ftn_peft.parameter_report(model)["default"].norm_params == 2 * 8


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["vit", "convnext"])
def test_training_one_adapter_leaves_the_other_and_base(kind):
    model, _ = two_adapters(kind)
    model.set_adapter("a")
    before = _snapshot(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".ftn_norm.a." in k for k in changed), "adapter a's norm copies did not train"
    assert all(".a." in k or k.endswith(".a") for k in changed), sorted(changed)[:5]


@pytest.mark.parametrize("kind", ["vit", "convnext"])
def test_merged_equals_unmerged_and_adapters_differ(kind):
    model, _ = two_adapters(kind)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ftn_norm.a." in name:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    model.set_adapter("a")
    out_a = model(x)
    model.set_adapter("b")
    out_b = model(x)
    assert not torch.allclose(out_a, out_b)
    model.set_adapter("a")
    model.merge_adapter(["a"])
    torch.testing.assert_close(model(x), out_a, rtol=1e-4, atol=1e-4)
    model.unmerge_adapter()
    merged = model.merge_and_unload(adapter_names=["a"])
    assert not any(isinstance(m, TaskNorm) for m in merged.modules())
    torch.testing.assert_close(merged(x), out_a, rtol=1e-4, atol=1e-4)


def test_save_load_round_trip(tmp_path):
    model, _ = two_adapters("vit")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ftn_norm." in name:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    model.set_adapter("b")
    expected = model(x)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_vit(), tmp_path / "b", adapter_name="b").eval()
    assert loaded.peft_config["b"].task_norms == "all"
    torch.testing.assert_close(loaded(x), expected)


def test_batchnorm_only_adapter_beside_an_all_adapter_uses_the_base_layernorm():
    base = tiny_vit()
    model = get_peft_model(base, ftn_peft.auto_config(base, r=1, targets="attention", norms="all"), adapter_name="a")
    model.add_adapter("b", ftn_peft.auto_config(tiny_vit(), r=1, targets="attention"))
    norms = [m for m in model.modules() if isinstance(m, TaskNorm)]
    assert norms and all(set(m.ftn_norm) == {"a"} for m in norms)
    with torch.no_grad():
        for m in norms:
            m.ftn_norm["a"].weight.mul_(3.0)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    model.set_adapter("b")
    with model.disable_adapter():
        plain = model(x)
    # b's factors start at zero (init_weights=True) and b has no LayerNorm copies: the base model's output
    torch.testing.assert_close(model(x), plain)
    assert ftn_peft.parameter_report(model)["b"].norm_params == 0
