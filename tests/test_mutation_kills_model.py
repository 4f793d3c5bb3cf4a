"""Behavioural tests that kill mutants of model.py (see docs/mutation.md).

Each test checks what a user sees (how a layer is laid out, outputs, errors), not how it is computed.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from peft import get_peft_model

import ftn_peft
from ftn_peft import FTNConfig

from conftest import tiny_timm_resnet


class _Config(SimpleNamespace):
    """A model config as PEFT reads it (to_dict) and as FTN reads it (attributes)."""

    def to_dict(self):
        return {"model_type": "custom"}


class Attention(nn.Module):
    def __init__(self, d=8, **attrs):
        super().__init__()
        self.q = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        for k, v in attrs.items():
            setattr(self, k, v)

    def forward(self, x):
        return self.out_proj(self.q(x))


class Net(nn.Module):
    """Attention straight under the root (keys `attn.q`), as in a bare block; `config` as transformers models have."""

    def __init__(self, config=None, **attention_attrs):
        super().__init__()
        if config is not None:
            self.config = config
        self.attn = Attention(**attention_attrs)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.attn(x))


def _heads(net):
    model = get_peft_model(net, FTNConfig(target_modules=["q", "out_proj", "fc"], attention_heads="auto", r=1))
    inner = model.base_model.model
    return inner.attn.q.num_heads["default"], inner.attn.out_proj.num_heads["default"], inner.fc.num_heads["default"]


@pytest.mark.parametrize(
    "config, attrs, heads",
    [
        (_Config(hidden_size=8, num_attention_heads=4), {}, 4),
        (_Config(head_dim=4, hidden_size=8, num_attention_heads=4), {}, 2),  # head_dim wins
        (_Config(vision_config=_Config(n_embd=8, n_head=2)), {}, 2),
        (_Config(hidden_size=8, vision_config=_Config(hidden_size=8, num_attention_heads=2)), {}, 2),  # needs both
        (_Config(text_config=_Config(d_model=8, n_heads=8)), {}, 8),
        (_Config(hidden_size=8, num_attention_heads=4), {"num_heads": 2}, 4),  # num_heads without dim: not enough
        (None, {"num_heads": 2, "dim": 8}, 2),  # timm's WindowAttention: dim // num_heads
        (None, {"head_dim": 4}, 2),
        (None, {}, None),  # nothing says the head size: a plain matrix
    ],
    ids=["hidden-heads", "head_dim", "vision_config", "hidden-without-heads", "text_config", "num_heads-only", "dim-num_heads", "attr",
         "none"],
)
def test_head_size_found_on_the_attention_module_or_the_model_config(config, attrs, heads):
    q, out, fc = _heads(Net(config, **attrs))
    assert (q, out) == (heads, heads)
    assert fc is None  # not inside an attention module: never split into heads


def test_the_tuner_itself_routes_mixed_batches(images):
    """`model.base_model(x, adapter_names=...)` (the tuner, as with LoRA) routes each sample like the PeftModel."""
    model = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=1, num_classes=10), adapter_name="a")
    model.add_adapter("b", ftn_peft.presets.resnet(r=1, num_classes=10))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    singles = {}
    with torch.no_grad():
        for name in ("a", "b"):
            model.set_adapter(name)
            singles[name] = model(images)
        mixed = model.base_model(images, adapter_names=["a", "b", "b", "a"])
        plain = model.base_model(x=images)  # no adapter_names: the active adapter ("b"); keywords passed on
    torch.testing.assert_close(mixed[[0, 3]], singles["a"][[0, 3]])
    torch.testing.assert_close(mixed[[1, 2]], singles["b"][[1, 2]])
    torch.testing.assert_close(plain, singles["b"])


def test_mixed_batch_errors_use_peft_words(images):
    model = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=1), adapter_name="a")
    with pytest.raises(TypeError, match=r"^adapter_names must be a list of adapter names, one per sample$"):
        model(images, adapter_names="a")
    with pytest.raises(TypeError, match="list of adapter names"):
        model(images, adapter_names=["a", 1, "a", "a"])
    model.train()
    train_words = ("Cannot pass `adapter_names` when the model is in training mode. adapter_names= (mixed-adapter "
                   "batches) is for inference: call model.eval() first; train one adapter at a time with set_adapter()")
    with pytest.raises(ValueError, match=f"^{re.escape(train_words)}$"):
        model(images, adapter_names=["a"] * 4)
    model.eval()
    with pytest.raises(ValueError, match=re.escape("Trying to infer with non-existing adapter(s): nope, zzz. ")):
        model(images, adapter_names=["zzz", "a", "nope", "a"])


_MATCH_HELP = "name layers by exact name or suffix (a list) or by a regex matching the full name (a string)"
_RESNET_LAYERS = "['conv1', 'layer1.0.conv1', 'layer1.0.conv2', 'layer1.0.downsample.0', 'layer2.0.conv1', 'layer2.0.conv2']"
_KEPT = "which FTN already keeps per adapter (task BatchNorm, task head or FTN layer); remove it from modules_to_save"
_EXCLUDE_HELP = ("match no module of the model; name modules by exact name or suffix (a list) or by a regex matching "
                 "the full name (a string), or leave exclude_modules=None")
_RANK_HELP = "no CP decomposition of it needs more components than that: use a smaller rank"
# (model, config kwargs, error type, the whole message): users read these, and PEFT's own words must stay intact
_ERRORS = {
    "no-targets": ("resnet", dict(target_modules=None), ValueError,
                   "Please specify `target_modules` in `peft_config`: FTNConfig.target_modules is None. Name the layers "
                   "to adapt (suffixes or a regex), or start from a preset such as ftn_peft.presets.resnet() or "
                   "ftn_peft.presets.clip_vision()"),
    "task-bn-target": ("resnet", dict(target_modules=["bn1"]), ValueError,
                       "target 'bn1' is a task BatchNorm of FTN; remove it from target_modules (or add it to "
                       "exclude_modules)"),
    "unsupported": ("resnet", dict(target_modules=["bn1"], task_batchnorm=False), TypeError,
                    "FTN cannot adapt 'bn1' of type BatchNorm2d; supported layer types: "
                    f"{', '.join(t.__name__ for t in ftn_peft.layer.LAYER_CLASSES)}. Remove it from target_modules or "
                    "add it to exclude_modules."),
    "heads-qkv": ("net", dict(target_modules=["q"], attention_heads=3), ValueError,
                  "attention_heads=3 does not divide the output width 8 of 'attn.q'; pick a divisor of 8 or "
                  "attention_heads='auto'"),
    "heads-out": ("net", dict(target_modules=["out_proj"], attention_heads=3), ValueError,
                  "attention_heads=3 does not divide the input width 8 of 'attn.out_proj'; pick a divisor of 8 or "
                  "attention_heads='auto'"),
    "head-dim": ("net-head-dim-3", dict(target_modules=["q"], attention_heads="auto"), ValueError,
                 "'attn.q' has width 8, not a multiple of the attention head size 3; set FTNConfig.attention_heads to "
                 "an explicit head count, or None to adapt it as a plain matrix"),
    "no-match": ("resnet", dict(target_modules=["nope"]), ValueError,
                 f"target_modules=['nope'] matches no module of the model: {_MATCH_HELP}; layers FTN can adapt here: "
                 f"{_RESNET_LAYERS} ..."),
    "no-match-excluded": ("resnet", dict(target_modules=["conv1"], exclude_modules=["conv1"]), ValueError,
                          "target_modules=['conv1'] matches no module of the model outside exclude_modules / "
                          f"modules_to_save: {_MATCH_HELP}; layers FTN can adapt here: {_RESNET_LAYERS} ..."),
    "no-match-set": ("net", dict(target_modules={"zz", "aa"}), ValueError,
                     f"target_modules=['aa', 'zz'] matches no module of the model: {_MATCH_HELP}; layers FTN can adapt "
                     "here: ['attn.q', 'attn.out_proj', 'fc']"),
    "rank-pattern": ("resnet", dict(target_modules=["conv1"], rank_pattern={"nope": 2}), ValueError,
                     "rank_pattern keys ['nope'] match no adapted module (none of the target_modules); adapted modules "
                     "are e.g. ['conv1', 'layer1.0.conv1', 'layer2.0.conv1']"),
    "alpha-pattern": ("resnet", dict(target_modules=["conv1"], alpha_pattern={"nope": 2}), ValueError,
                      "alpha_pattern keys ['nope'] match no adapted module (none of the target_modules); adapted "
                      "modules are e.g. ['conv1', 'layer1.0.conv1', 'layer2.0.conv1']"),
    "rank": ("net", dict(target_modules=["q"], r=65), ValueError,
             f"r=65 exceeds the 64 entries of 'attn.q''s weight; {_RANK_HELP}"),
    "rank-pattern-big": ("net", dict(target_modules=["q", "fc"], rank_pattern={"q": 65}), ValueError,
                         f"rank_pattern['q']=65 exceeds the 64 entries of 'attn.q''s weight; {_RANK_HELP}"),
    "exclude-regex": ("resnet", dict(target_modules=["conv1"], exclude_modules="nope.*"), ValueError,
                      f"exclude_modules ['nope.*'] {_EXCLUDE_HELP}"),
    "exclude-list": ("resnet", dict(target_modules=["conv1"], exclude_modules=["zz", "conv2", "yy"]), ValueError,
                     f"exclude_modules ['yy', 'zz'] {_EXCLUDE_HELP}"),
    "save-nothing": ("resnet", dict(target_modules=["conv1"], modules_to_save=["nope"]), ValueError,
                     "modules_to_save entry 'nope' matches no module of the model"),
    "save-head": ("resnet", dict(target_modules=["conv1"], head_module="fc", modules_to_save=["fc"]), ValueError,
                  f"modules_to_save entry 'fc' covers 'fc' (Linear), {_KEPT}"),
    "save-norm": ("resnet", dict(target_modules=["conv1"], modules_to_save=["layer1"]), ValueError,
                  f"modules_to_save entry 'layer1' covers 'layer1.0.bn1' (BatchNorm2d), {_KEPT}"),
    "save-nested": ("resnet", dict(target_modules=["conv1"], task_batchnorm=False,
                                   modules_to_save=["layer1.0.conv2", "layer1"]), ValueError,
                    "modules_to_save entry 'layer1' covers 'layer1', which contains 'layer1.0.conv2' (from "
                    "'layer1.0.conv2'): a module saved inside another one breaks saving; keep only the outer one"),
    "head-missing": ("resnet", dict(target_modules=["conv1"], head_module="nope"), ValueError,
                     "head_module='nope' matches no module; it must name exactly one module, e.g. ['fc']"),
    "head-several": ("resnet", dict(target_modules=["conv1"], head_module="conv1"), ValueError,
                     "head_module='conv1' matches 5 modules (['conv1', 'layer1.0.conv1', 'layer2.0.conv1', "
                     "'layer3.0.conv1', 'layer4.0.conv1']); it must name exactly one module, e.g. ['fc']"),
    # A module with no Linear / Conv in it (an Attention block is a valid head now: its last Linear is the output).
    "head-not-linear": ("resnet", dict(target_modules=["conv1"], head_module="layer1.0.act1"), TypeError,
                        "head_module='layer1.0.act1' names 'layer1.0.act1', a ReLU; it must name an nn.Linear "
                        "classifier or a decoder whose last Linear / Conv layer is its output layer, e.g. ['fc'] "
                        "(wrap other heads with modules_to_save)"),
    "head-middle": ("net", dict(target_modules=["fc"], head_module="q", head_num_outputs=4), ValueError,
                    "head_module='q' names 'attn.q', a middle layer with 8 outputs; head_num_outputs=4 would break the "
                    "layers after it. A head of another size must be the model's output layer: ['fc']"),
    "head-targeted": ("resnet", dict(target_modules=["fc", "conv1"], head_module="fc"), ValueError,
                      "target 'fc' is a task head of FTN; remove it from target_modules (or add it to "
                      "exclude_modules): head_module='fc' already gives each adapter a whole copy of it"),
}


@pytest.mark.parametrize("case", _ERRORS, ids=_ERRORS)
def test_errors_name_the_problem_and_the_fix_in_full(case):
    model_kind, kwargs, error, message = _ERRORS[case]
    model = tiny_timm_resnet() if model_kind == "resnet" else Net(head_dim=3) if model_kind.endswith("3") else Net()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(error) as info:
        get_peft_model(model, FTNConfig(**kwargs))
    assert str(info.value) == message
    assert {n: type(m) for n, m in model.named_modules()} == before  # and the model is left as it was


def test_rank_limits_and_regex_excludes():
    # a rank equal to the weight's entries is allowed; a target without a weight does not stop the rank check
    model = get_peft_model(Net(), FTNConfig(target_modules=["q"], r=64))
    assert model.base_model.model.attn.q.r["default"] == 64
    with pytest.raises(ValueError, match=r"^r=10000 exceeds the 320 entries of 'fc''s weight"):
        get_peft_model(tiny_timm_resnet(), FTNConfig(target_modules=["layer1", "fc"], r=10000))
    model = get_peft_model(tiny_timm_resnet(), FTNConfig(target_modules=["conv1"], exclude_modules=r"layer1\..*"))
    net = model.base_model.model
    assert not hasattr(net.layer1[0].conv1, "ftn_a") and hasattr(net.layer2[0].conv1, "ftn_a")


def test_a_head_name_matching_many_modules_lists_five():
    with pytest.raises(ValueError) as info:
        get_peft_model(tiny_timm_resnet(), FTNConfig(target_modules=["conv1"], head_module="0"))
    listed = re.search(r"matches (\d+) modules \((\[.*?\])\)", str(info.value))
    assert int(listed.group(1)) > 5 and len(eval(listed.group(2))) == 5
