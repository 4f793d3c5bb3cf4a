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
    model.merge_adapter()
    with pytest.raises(ValueError, match=re.escape("Cannot pass `adapter_names` when there are merged adapters, please "
                                                   "call `unmerge_adapter` first. ")):
        model(images, adapter_names=["a"] * 4)


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
    "no-match-regex": ("net", dict(target_modules="nope.*"), ValueError,
                       f"target_modules='nope.*' matches no module of the model: {_MATCH_HELP}; layers FTN can adapt "
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


class ContainerHead(nn.Module):
    """A classifier in a container, as transformers' ResNet (`classifier = Sequential(Flatten, Linear)`)."""

    def __init__(self, *classifier):
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.classifier = nn.Sequential(*classifier)

    def forward(self, x):
        return self.classifier(self.body(x))


class Conventional(nn.Module):
    """A classifier that a library convention names (an attribute or an accessor); an auxiliary head after it."""

    def __init__(self, attr, accessor=None, head=None):
        super().__init__()
        self.body = nn.Linear(8, 8)
        setattr(self, attr, nn.Linear(8, 3) if head is None else head)
        self.aux_head = nn.Linear(8, 2)
        if accessor == "raises":
            def missing():
                raise NotImplementedError  # transformers' models without output embeddings
            self.get_output_embeddings = missing
        elif accessor is not None:
            setattr(self, accessor, lambda: getattr(self, attr))

    def forward(self, x):
        return self.body(x)


class Plain(nn.Module):
    """No classifier convention at all: the last Linear is the output layer (a Dropout is registered after it)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 3)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        return self.drop(self.fc(self.body(x)))


def _head_config(head, outputs=None):
    return FTNConfig(target_modules=["body"], r=1, head_module=head, head_num_outputs=outputs)


def _resized_output_error(model):
    with pytest.raises(ValueError, match="a middle layer with 8 outputs") as info:
        model.add_adapter("other", _head_config("body", 5)) if hasattr(model, "add_adapter") else get_peft_model(
            model, _head_config("body", 5))
    return re.search(r"must be the model's output layer: (\[.*\])$", str(info.value)).group(1)


def test_the_output_layers_a_resized_head_may_replace():
    x = torch.randn(2, 8)
    # a container head: the container and its last layer are output layers, also once an adapter wraps that layer
    model = get_peft_model(ContainerHead(nn.Flatten(), nn.Linear(8, 3)), _head_config("classifier.1", 5), "a")
    model.add_adapter("b", _head_config("classifier.1", 7))
    model.set_adapter("b")
    assert model(x).shape == (2, 7)
    assert _resized_output_error(model) == "['classifier', 'classifier.1']"
    # an adapter's head on the container's first layer does not hide the output layer after it
    model = get_peft_model(ContainerHead(nn.Linear(8, 8), nn.Linear(8, 3)), _head_config("classifier.0"), "a")
    model.add_adapter("b", _head_config("classifier.1", 5))
    model.set_adapter("b")
    assert model(x).shape == (2, 5)
    conventions = [
        (Conventional("head", "get_classifier"), "['head']"),  # timm
        (Conventional("classifier"), "['classifier']"),  # transformers' classification heads
        (Conventional("score"), "['score']"),
        (Conventional("lm_head", "get_output_embeddings"), "['lm_head']"),  # transformers' LM heads
        (Conventional("head", "get_classifier", head=nn.Identity()), "['aux_head']"),  # timm, num_classes=0
        (Conventional("head", "raises"), "['aux_head']"),
    ]
    for model, listed in conventions:  # else the last Linear
        assert _resized_output_error(model) == listed
    assert _resized_output_error(Plain()) == "['fc']"  # the last Linear, not the last module
    model = get_peft_model(Plain(), _head_config("fc"), "a")
    assert _resized_output_error(model) == "['fc']"  # also once an adapter wrapped it in a task head
    model = get_peft_model(Conventional("classifier"), _head_config("classifier", 5), "a")
    assert _resized_output_error(model) == "['classifier']"  # the task head, not an adapter's copy in it


def test_an_inference_mode_adapter_has_nothing_trainable_head_and_norms_included():
    def config():
        return FTNConfig(target_modules=["conv1"], r=1, head_module="fc", head_num_outputs=5, inference_mode=True)

    model = get_peft_model(tiny_timm_resnet(), config(), adapter_name="a")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == []
    model.add_adapter("b", config())  # into the existing task head and BatchNorm layers
    assert [n for n, p in model.named_parameters() if p.requires_grad] == []


def test_a_float64_model_keeps_float64_task_batchnorm_statistics(images):
    model = get_peft_model(tiny_timm_resnet().double(), ftn_peft.presets.resnet(r=1))
    bn = model.base_model.model.bn1.ftn_norm["default"]
    assert bn.running_mean.dtype == bn.running_var.dtype == torch.float64  # only half precision is upcast
    assert model(images.double()).dtype == torch.float64


class WideAttention(nn.Module):
    """Attention whose inner width (2 heads of 4) differs from the model width 12."""

    def __init__(self):
        super().__init__()
        self.head_dim = 4
        self.q = nn.Linear(12, 8)
        self.out_proj = nn.Linear(8, 12)

    def forward(self, x):
        return self.out_proj(self.q(x))


def test_an_output_projection_splits_its_input_width_into_heads():
    net = nn.Sequential(WideAttention(), nn.Linear(12, 3))
    model = get_peft_model(net, FTNConfig(target_modules=["q", "out_proj"], attention_heads="auto", r=1))
    attn = model.base_model.model[0]
    assert attn.q.num_heads["default"] == attn.out_proj.num_heads["default"] == 2
    with pytest.raises(ValueError, match=r"^attention_heads=3 does not divide the input width 8 of '0.out_proj'"):
        get_peft_model(nn.Sequential(WideAttention()), FTNConfig(target_modules=["out_proj"], attention_heads=3))


def test_one_config_object_may_serve_two_adapters():
    config = ftn_peft.presets.resnet(r=1, num_classes=5)
    model = get_peft_model(tiny_timm_resnet(), config, adapter_name="a")
    model.add_adapter("b", config)
    net = model.base_model.model
    assert set(net.fc.ftn_head) == set(net.bn1.ftn_norm) == {"a", "b"}


def test_the_no_match_error_lists_six_adaptable_layers_then_dots():
    for n, tail in ((6, ""), (7, " ...")):
        with pytest.raises(ValueError) as info:
            get_peft_model(nn.Sequential(*[nn.Linear(4, 4) for _ in range(n)]), FTNConfig(target_modules=["nope"]))
        assert str(info.value).endswith("['0', '1', '2', '3', '4', '5']" + tail)


def test_a_failed_injection_restores_requires_grad():
    net = Net()  # a model the user trains in full
    with pytest.raises(ValueError, match="does not divide"):  # fails after the base model was frozen
        get_peft_model(net, FTNConfig(target_modules=["q"], attention_heads=3))
    assert all(p.requires_grad for p in net.parameters())


def test_modules_to_save_implicit_names_of_task_types_and_nesting_across_adapters():
    from ftn_peft.model import FTNModel

    resnet = tiny_timm_resnet()
    names = [n for n, _ in resnet.named_modules() if n]
    for entry in ("classifier", "score"):  # PEFT's task-type wrappers add these names whether or not they exist
        FTNModel._check_modules_to_save(FTNConfig(target_modules=["conv1"], modules_to_save=[entry],
                                                  task_type="SEQ_CLS"), resnet, names)
        with pytest.raises(ValueError, match=f"^modules_to_save entry '{entry}' matches no module of the model$"):
            FTNModel._check_modules_to_save(FTNConfig(target_modules=["conv1"], modules_to_save=[entry]), resnet,
                                            names)
    model = get_peft_model(resnet, FTNConfig(target_modules=["fc"], task_batchnorm=False,
                                             modules_to_save=["layer1.0.conv2"]), adapter_name="a")
    with pytest.raises(ValueError) as info:
        model.add_adapter("b", FTNConfig(target_modules=["fc"], task_batchnorm=False, modules_to_save=["layer1"]))
    assert str(info.value) == (
        "modules_to_save entry 'layer1' covers 'layer1', which contains 'layer1.0.conv2' (from \"an earlier "
        "adapter's modules_to_save\"): a module saved inside another one breaks saving; keep only the outer one"
    )


def test_a_subclass_of_a_supported_layer_is_adapted_and_a_task_head_is_not_a_target():
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear  # nn.MultiheadAttention's out_proj

    net = nn.Sequential(NonDynamicallyQuantizableLinear(8, 8), nn.Linear(8, 3))
    model = get_peft_model(net, FTNConfig(target_modules=["0"], r=1))
    assert isinstance(model.base_model.model[0], ftn_peft.layer.Linear)
    model = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=1, num_classes=5), adapter_name="a")
    with pytest.raises(ValueError) as info:  # another adapter targets the layer that is adapter a's task head
        model.add_adapter("b", FTNConfig(target_modules=["fc"], r=1, task_batchnorm=False))
    assert str(info.value) == ("target 'fc' is a task head of FTN; remove it from target_modules (or add it to "
                               "exclude_modules)")


class SelfOutput(nn.Module):  # transformers' ViTSelfOutput: the output projection one level below the attention
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(8, 8)

    def forward(self, x):
        return self.dense(x)


def test_the_head_size_is_found_on_an_attention_module_above_the_parent():
    net = Net(head_dim=4)
    net.attn.output = SelfOutput()
    model = get_peft_model(net, FTNConfig(target_modules=["dense"], attention_heads="auto", output_projections=["dense"],
                                          r=1))
    assert model.base_model.model.attn.output.dense.num_heads["default"] == 2


@pytest.mark.parametrize("compute", ["materialized", "factorized"])
def test_the_configs_compute_path_reaches_every_layer(compute):
    model = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=1, compute=compute))
    layers = [m for m in model.modules() if isinstance(m, ftn_peft.layer.FTNLayer)]
    assert layers and all(m.compute["default"] == compute for m in layers)
    assert all(m._use_factorized("default") == (compute == "factorized") for m in layers)


def test_a_second_adapters_no_match_error_lists_layers_outside_the_first_ones_wrappers():
    model = get_peft_model(tiny_timm_resnet(), FTNConfig(target_modules=["conv1"], r=1), adapter_name="a")
    with pytest.raises(ValueError) as info:
        model.add_adapter("b", FTNConfig(target_modules=["nope"], r=1))
    assert str(info.value).endswith("layers FTN can adapt here: ['layer1.0.conv2', 'layer1.0.downsample.0', "
                                    "'layer2.0.conv2', 'layer2.0.downsample.0', 'layer3.0.conv2', "
                                    "'layer3.0.downsample.0'] ...")


def test_adapter_weights_of_a_bf16_model_are_upcast_to_fp32_by_default():
    model = get_peft_model(tiny_timm_resnet().to(torch.bfloat16), ftn_peft.presets.resnet(r=1))
    net = model.base_model.model
    assert net.layer1[0].conv1.ftn_a["default"].dtype == torch.float32  # PEFT's autocast_adapter_dtype=True
    assert net.bn1.ftn_norm["default"].running_mean.dtype == torch.float32
    assert net.layer1[0].conv1.base_layer.weight.dtype == torch.bfloat16


class Blocks(nn.Module):
    """Two Linear layers, a ModuleList (which PEFT's modules_to_save refuses to wrap) and a non-persistent buffer,
    as transformers models keep their `position_ids`."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)
        self.blocks = nn.ModuleList([nn.Linear(4, 4)])
        self.register_buffer("position_ids", torch.arange(4), persistent=False)

    def forward(self, x):
        return self.blocks[0](self.fc2(self.fc1(x)))


def test_a_failed_add_adapter_leaves_the_tuners_own_bookkeeping_as_it_was():
    # PEFT fails here after it recorded the new adapter's targets on the tuner (wrapping the ModuleList).
    model = get_peft_model(Blocks(), FTNConfig(target_modules=["fc1"]), adapter_name="a")
    tuner = model.base_model
    before = {k: (list(v) if isinstance(v, list) else v) for k, v in vars(tuner).items() if not k.startswith("_")}
    with pytest.raises(TypeError, match="modules_to_save cannot be applied to modules of type .*ModuleList"):
        model.add_adapter("b", FTNConfig(target_modules=["fc2"], modules_to_save=["blocks"]))
    after = {k: (list(v) if isinstance(v, list) else v) for k, v in vars(tuner).items() if not k.startswith("_")}
    assert after == before and tuner.targeted_module_names == ["fc1"]
    assert list(model.peft_config) == ["a"] and type(tuner.model.fc2) is nn.Linear


def test_a_model_with_non_persistent_buffers_keeps_them_out_of_its_state_dict_after_a_failed_injection():
    model = get_peft_model(Blocks(), FTNConfig(target_modules=["fc1"]), adapter_name="a")
    keys = set(model.state_dict())
    assert not any(k.endswith("position_ids") for k in keys)
    with pytest.raises(TypeError, match="ModuleList"):
        model.add_adapter("b", FTNConfig(target_modules=["fc2"], modules_to_save=["blocks"]))
    assert set(model.state_dict()) == keys
    torch.testing.assert_close(model.base_model.model.position_ids, torch.arange(4))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))


@pytest.mark.parametrize("target_modules", [["0"], ["absent"]], ids=["another-layer", "no-layer"])
def test_a_state_dict_given_to_inject_adapter_in_model_picks_the_targets_as_for_lora(target_modules):
    # PEFT's inject_adapter_in_model(..., state_dict=) adapts the layers that the checkpoint's keys name, whatever
    # target_modules says (a checkpoint saved without its config), and warns about the difference.
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    targeted = {}
    for config_cls, random_init in ((LoraConfig, {"init_lora_weights": False}), (FTNConfig, {"init_weights": False})):
        source = inject_adapter_in_model(config_cls(target_modules=["2"], **random_init), _mlp())
        state_dict = get_peft_model_state_dict(source)
        with pytest.warns(RuntimeWarning, match="The state_dict contained these additional target modules: \\['2'\\]"):
            model = inject_adapter_in_model(config_cls(target_modules=target_modules), _mlp(), state_dict=state_dict)
        targeted[config_cls] = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
        assert not set_peft_model_state_dict(model, state_dict).unexpected_keys
        x = torch.randn(2, 4)
        torch.testing.assert_close(model(x), source(x))
    assert targeted[FTNConfig] == targeted[LoraConfig] == ["2"]


def test_preparing_a_model_outside_inject_adapter_is_refused_by_name():
    # PEFT calls _prepare_model only from inject_adapter, which names the adapter the hook's config belongs to.
    model = get_peft_model(Blocks(), FTNConfig(target_modules=["fc1"]))
    message = ("FTNModel._prepare_model was called outside inject_adapter, so the adapter it prepares is unknown; add "
               "adapters with get_peft_model / PeftModel.add_adapter / PeftModel.load_adapter")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        model.base_model._prepare_model(model.peft_config["default"], model.base_model.model)
