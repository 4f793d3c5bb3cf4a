"""FTN behaves like a PEFT tuner where code written for LoRA looks: error words, layer sizes, modules_to_save routing.

PEFT's own generic battery runs in test_peft_generic.py; these are the FTN-side checks behind docs/peft_compat.md.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from peft import get_peft_model
from transformers.pytorch_utils import Conv1D

from ftn_peft import FTNConfig, TaskHead, TaskNorm
from ftn_peft.layer import FTNLayer

from conftest import tiny_timm_resnet


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(6, 8)
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.proj = Conv1D(5, 16)
        self.lin1 = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.relu(self.lin0(x))  # (B, 8)
        h = self.conv(h.view(-1, 2, 4)).flatten(1)  # (B, 16)
        return self.lin1(torch.relu(self.proj(h)))


def _net():
    torch.manual_seed(0)
    return _Net().eval()


def test_tuner_layers_expose_in_and_out_features():
    """PEFT's tuner layers carry the base layer's sizes (channels for convs); so do all FTN layers."""
    model = get_peft_model(_net(), FTNConfig(target_modules=["lin0", "conv", "proj"], r=2))
    sizes = {n.rsplit(".", 1)[-1]: (m.in_features, m.out_features) for n, m in model.named_modules()
             if isinstance(m, FTNLayer)}
    assert sizes == {"lin0": (6, 8), "conv": (2, 4), "proj": (16, 5)}
    resnet = get_peft_model(tiny_timm_resnet(), FTNConfig(target_modules=["conv1"], head_module="fc", head_num_outputs=3))
    bn1 = resnet.base_model.model.bn1
    assert (bn1.in_features, bn1.out_features) == (bn1.base_layer.num_features,) * 2
    head = resnet.base_model.model.fc
    assert isinstance(head, TaskHead) and (head.in_features, head.out_features) == (32, 10)
    assert all(hasattr(m, "in_features") for m in resnet.modules() if isinstance(m, TaskNorm))


def test_mixed_batch_routes_modules_to_save_copies():
    """In a mixed batch every sample also gets its own adapter's modules_to_save copy, as under LoRA."""
    model = get_peft_model(_net(), FTNConfig(target_modules=["lin0"], modules_to_save=["lin1"], init_weights=False), "a")
    model.add_adapter("b", FTNConfig(target_modules=["lin0"], modules_to_save=["lin1"], init_weights=False))
    with torch.no_grad():
        model.base_model.model.lin1.modules_to_save["b"].weight.mul_(-3.0)  # b's copy now differs from a's
    model.eval()
    x = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    expected = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        expected[name] = model(x)
    assert not torch.allclose(expected["a"], expected["b"])
    names = ["a", "b", "a", "b", "b", "a"]
    mixed = model(x, adapter_names=names)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], expected[name][i])


PEFT_WORDS = {
    "target_modules": "Please specify `target_modules` in `peft_config`",
    "safe_merge": "NaNs detected in the merged weights. The adapter default seems to be broken",
    "length": "Length of `adapter_names` should be the same as the number of inputs, but got 2 and 4 respectively",
    "merged": "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first.",
    "training": "Cannot pass `adapter_names` when the model is in training mode.",
    "unknown": "Trying to infer with non-existing adapter(s): nope, zzz",
}


@pytest.mark.parametrize("case", list(PEFT_WORDS))
def test_errors_include_peft_words(case):
    """Each error carries PEFT's own sentence (code written against LoRA matches on it) and FTN's explanation."""
    x = torch.randn(4, 6)
    if case == "target_modules":
        with pytest.raises(ValueError, match=re.escape(PEFT_WORDS[case]) + ".*presets"):
            get_peft_model(_net(), FTNConfig())
        return
    model = get_peft_model(_net(), FTNConfig(target_modules=["lin0", "conv"], init_weights=False)).eval()
    if case == "safe_merge":
        with torch.no_grad():
            model.base_model.model.conv.ftn_a["default"][0, 0] = float("nan")
        with pytest.raises(ValueError, match=re.escape(PEFT_WORDS[case]) + ".*non-finite"):
            model.merge_adapter(safe_merge=True)
        assert not model.base_model.model.conv.merged
        return
    call = dict(length=["default"] * 2, unknown=["default", "nope", "zzz", "nope"])
    if case == "merged":
        model.merge_adapter()
    if case == "training":
        model.train()
    explanation = {"length": "one adapter name per sample", "merged": "merged model", "training": "model.eval",
                   "unknown": "known: "}[case]
    with pytest.raises(ValueError, match=re.escape(PEFT_WORDS[case]) + ".*" + re.escape(explanation)):
        model(x, adapter_names=call.get(case, ["default"] * 4))
