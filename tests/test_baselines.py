"""Baselines train exactly their parameters; the feature extractor keeps the source BatchNorm statistics."""

import pytest
import torch
from timm.models.resnet import BasicBlock, ResNet

from ftn_peft import baselines


def source():
    torch.manual_seed(0)
    return ResNet(block=BasicBlock, layers=[1, 1, 1, 1], channels=(4, 8, 8, 8), in_chans=1, num_classes=5).eval()


def train_one_step(model):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    torch.nn.functional.cross_entropy(model(torch.randn(8, 1, 16, 16) * 3 + 1), torch.arange(8) % 3).backward()
    opt.step()


def test_feature_extractor_keeps_source_bn_statistics():
    src = source()
    model = baselines.build("feature_extractor", src, num_classes=3)
    before = {k: v.clone() for k, v in model.model.state_dict().items() if "fc" not in k}
    train_one_step(model)
    after = model.model.state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v)  # running stats and weights untouched
    assert baselines.trainable_parameters(model) == 8 * 3 + 3


def test_bn_head_trains_bn_and_updates_statistics():
    src = source()
    model = baselines.build("bn_head", src, num_classes=3)
    bn_params = sum(m.weight.numel() * 2 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert baselines.trainable_parameters(model) == bn_params + 8 * 3 + 3
    train_one_step(model)
    assert not torch.equal(model.bn1.running_mean, src.bn1.running_mean)
    assert not torch.equal(model.bn1.weight, src.bn1.weight)
    torch.testing.assert_close(model.conv1.weight, src.conv1.weight)


def test_finetune_trains_everything_and_leaves_source_alone():
    src = source()
    ref = {k: v.clone() for k, v in src.state_dict().items()}
    model = baselines.build("finetune", src, num_classes=3)
    assert baselines.trainable_parameters(model) == sum(p.numel() for p in model.parameters())
    train_one_step(model)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(v, ref[k])


def test_lora_on_ftn_targets_with_task_bn_and_head():
    src = source()
    model = baselines.build("lora", src, num_classes=3, r=1)
    lora_names = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    # every conv of the residual stages (not the stem) gets lora_A and lora_B
    convs = [n for n, m in src.named_modules() if isinstance(m, torch.nn.Conv2d) and n.startswith("layer")]
    assert len(lora_names) == 2 * len(convs)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 3)
    assert any("bn1.modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad)


def test_ftn_counts_match_parameter_report():
    import ftn_peft

    model = baselines.build("ftn", source(), num_classes=3, r=2)
    rep = ftn_peft.parameter_report(model)["default"]
    assert baselines.trainable_parameters(model) == rep.total


def test_unknown_method_and_bad_head():
    with pytest.raises(ValueError, match="method="):
        baselines.build("prompt", source(), 3)
    with pytest.raises(TypeError, match="head_module="):
        baselines.build("finetune", source(), 3, head_module="layer1")
    with pytest.raises(ValueError, match="no BatchNorm"):
        baselines.bn_head(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)), 3, head_module="1")
