"""Property: every FTNConfig ends in a clear error that names a field, or in a working adapter; nothing in between.

Each example draws every field of FTNConfig (valid values, wrong values, wrong types) for a tiny timm ResNet or a tiny
CLIP classifier and checks that either
- the config (or `get_peft_model`) raises ValueError / TypeError whose message names a config field, and a failed
  `get_peft_model` leaves the model exactly as it was, or
- the adapter's forward pass is finite, and `save_pretrained` + `PeftModel.from_pretrained` into a fresh copy of the
  base model gives the same outputs.

The suite runs `FTN_FUZZ_EXAMPLES` examples (default 1000, about 2 minutes on one core). The full run:

    FTN_FUZZ_EXAMPLES=10000 PYTHONPATH=$PWD python -m pytest -q -s -p no:cacheprovider -m slow tests/test_config_fuzz.py

prints the tally (examples, clean errors, working adapters).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import tempfile
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model

from ftn_peft import FTNConfig
from ftn_peft.presets import CLIP_VISION_TARGETS, RESNET_TARGETS

from conftest import tiny_clip_classifier, tiny_timm_resnet

FIELDS = [f.name for f in dataclasses.fields(FTNConfig)]
EXAMPLES = int(os.environ.get("FTN_FUZZ_EXAMPLES", "1000"))

# Names that exist in one model, in both, in neither; regexes valid and not.
NAMES = {
    "resnet": ["conv1", "conv2", "layer1.0.conv1", "layer4.0.conv2", "downsample.0", "fc", "bn1", "act1", "layer2"],
    "clip": ["q_proj", "v_proj", "k_proj", "out_proj", "fc1", "fc2", "layers.1.mlp.fc2", "classifier",
             "patch_embedding", "layer_norm1", "self_attn"],
}
REGEXES = {
    "resnet": [RESNET_TARGETS, r".*conv\d", r".*(conv\d|fc)", r"layer[12]\..*"],
    "clip": [CLIP_VISION_TARGETS["qv"], CLIP_VISION_TARGETS["o"], r".*(q|k|v|out)_proj", r".*mlp\.fc\d"],
}
NOWHERE = ["conv9", "layer9.0.conv1", "nothing", "encoder"]
BAD_REGEXES = ["conv(", "*conv", "layer[1", "(?P<x>", "a{2,1}"]
JUNK = [None, 0, -1, 2.5, True, False, "", "x", [], {}, (), float("nan"), float("inf"), b"fc", object()]


def _names(kind):
    return st.sampled_from(NAMES[kind] + NAMES["clip" if kind == "resnet" else "resnet"][:3] + NOWHERE)


def _targets(kind):
    return st.one_of(
        st.lists(_names(kind), min_size=1, max_size=4),
        st.sampled_from(REGEXES[kind] + BAD_REGEXES),
        st.lists(st.one_of(_names(kind), st.sampled_from(JUNK)), max_size=3),
        st.sampled_from(JUNK),
    )


def _rank():
    return st.one_of(st.integers(1, 4), st.integers(-3, 0), st.sampled_from(JUNK + [2.0, "2", 10**40]))


def _alpha():
    return st.one_of(
        st.none(), st.floats(), st.floats(1e-3, 1000.0), st.integers(-5, 2000), st.sampled_from(JUNK + ["8", 1000.0])
    )


def _pattern(kind, values):
    keys = st.one_of(_names(kind), st.sampled_from(REGEXES[kind][2:] + BAD_REGEXES), st.sampled_from([3, None, ""]))
    return st.one_of(st.dictionaries(keys, values, max_size=2), st.sampled_from(JUNK))


ADAPTABLE = {
    "resnet": ["conv1", "conv2", "layer1.0.conv1", "layer4.0.conv2", "downsample.0", "fc"],
    "clip": ["q_proj", "v_proj", "k_proj", "out_proj", "fc1", "fc2", "patch_embedding", "classifier"],
}
HEADS = {"resnet": "fc", "clip": "classifier"}


def _valid(kind):
    """Each field's sensible values: a config drawn from these alone should give a working adapter."""
    head = st.sampled_from([None, HEADS[kind]])
    return dict(
        r=st.integers(1, 4),
        alpha=st.one_of(st.none(), st.floats(1e-3, 1000.0)),
        target_modules=st.one_of(st.lists(st.sampled_from(ADAPTABLE[kind]), min_size=1, max_size=3),
                                 st.sampled_from(REGEXES[kind])),
        exclude_modules=st.none(),
        rank_pattern=st.just({}),
        alpha_pattern=st.just({}),
        init_weights=st.sampled_from([True, False, "xavier", "gaussian"]),
        init_std=st.floats(1e-4, 1.0),
        attention_heads=st.sampled_from(["auto", None, 1, 2, 4]),
        output_projections=st.sampled_from([["out_proj"], [], ["out_proj", "fc2"]]),
        compute=st.sampled_from(["auto", "factorized", "materialized"]),
        task_batchnorm=st.booleans(),
        task_norms=st.sampled_from(["batchnorm", "all"]),
        head_module=head,
        head_num_outputs=st.sampled_from([None, 1, 5, 10]),
        modules_to_save=st.none(),
        inference_mode=st.booleans(),
        task_type=st.none(),
        revision=st.none(),
    )


def _wild(kind):
    """Each field's valid, wrong and wrongly typed values."""
    heads = {"resnet": ["fc", "conv1", "layer4.0.conv2", "classifier"], "clip": ["classifier", "fc2", "layers.1.mlp.fc2", "fc"]}
    return dict(
        r=_rank(),
        alpha=_alpha(),
        target_modules=_targets(kind),
        exclude_modules=st.one_of(st.none(), _targets(kind)),
        rank_pattern=_pattern(kind, _rank()),
        alpha_pattern=_pattern(kind, _alpha()),
        init_weights=st.sampled_from([True, False, "xavier", "gaussian", "kaiming", 1, 0, 1.0, None, "True"]),
        init_std=st.one_of(st.floats(), st.floats(1e-4, 1.0), st.sampled_from(JUNK + [1, 0.05])),
        attention_heads=st.sampled_from(["auto", None, 1, 2, 4, 3, 5, 0, -1, True, "many", 64]),
        output_projections=st.one_of(
            st.sampled_from([["out_proj"], [], ["fc2", "q_proj"], "out_proj", None, [3], [""]]),
            st.lists(_names(kind), max_size=2),
        ),
        compute=st.sampled_from(["auto", "factorized", "materialized", "fast", None, 1, ["auto"]]),
        task_batchnorm=st.sampled_from([True, False, "no", 1, None]),
        task_norms=st.sampled_from(["batchnorm", "all", "layernorm", "ALL", None, True]),
        head_module=st.one_of(st.none(), st.sampled_from(heads[kind] + ["nothing", "", 3, ["fc"]])),
        head_num_outputs=st.sampled_from([None, 1, 3, 10, 32, 0, -1, True, 2.0]),
        modules_to_save=st.one_of(st.lists(_names(kind), max_size=2), st.sampled_from(["fc", ["fc("], [3], None])),
        inference_mode=st.sampled_from([False, True, "yes", None]),
        task_type=st.sampled_from([None, "bogus", 3]),
        revision=st.sampled_from([None, 3, "main"]),
    )


@st.composite
def configs(draw):
    """A sensible config with 0 to 4 fields (sometimes all) replaced by wild values."""
    kind = draw(st.sampled_from(["resnet", "clip"]))
    valid, wild = _valid(kind), _wild(kind)
    kwargs = {name: draw(strategy) for name, strategy in valid.items()}
    if draw(st.integers(0, 9)) == 0:
        wild_fields = list(wild)
    else:
        wild_fields = draw(st.lists(st.sampled_from(sorted(wild)), max_size=4, unique=True))
    for name in wild_fields:
        kwargs[name] = draw(wild[name])
    for name in draw(st.lists(st.sampled_from(sorted(kwargs)), max_size=3, unique=True)):  # some left at defaults
        kwargs.pop(name)
    return kind, kwargs


_BASES = {}


def _base(kind):
    if kind not in _BASES:
        _BASES[kind] = tiny_timm_resnet() if kind == "resnet" else tiny_clip_classifier()
    return copy.deepcopy(_BASES[kind])


_INPUTS = {"resnet": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
_INPUTS["clip"] = _INPUTS["resnet"]


def _output(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _fingerprint(model):
    return (
        [(n, id(m), type(m)) for n, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        {k: p.requires_grad for k, p in model.named_parameters()},
        hasattr(model, "peft_config"),
    )


def _same(a, b) -> bool:
    return a[0] == b[0] and a[2] == b[2] and a[3] == b[3] and a[1].keys() == b[1].keys() and all(
        torch.equal(a[1][k], b[1][k]) for k in a[1]
    )


def _names_a_field(err: Exception) -> bool:
    message = str(err)
    return any(re.search(rf"(?<!\w){name}(?!\w)", message) for name in FIELDS)


TALLY: Counter = Counter()


def _check(kind, kwargs):
    TALLY["examples"] += 1
    try:
        config = FTNConfig(**kwargs)
    except (ValueError, TypeError) as err:
        assert _names_a_field(err), f"FTNConfig({kwargs}) raised an error naming no field: {err!r}"
        TALLY["clean error (config)"] += 1
        return
    base = _base(kind)
    before = _fingerprint(base)
    torch.manual_seed(0)
    try:
        model = get_peft_model(base, config)
    except (ValueError, TypeError) as err:
        assert _names_a_field(err), f"get_peft_model with {kwargs} raised an error naming no field: {err!r}"
        assert _same(before, _fingerprint(base)), f"the failed get_peft_model with {kwargs} changed the model"
        TALLY["clean error (model)"] += 1
        return
    x = _INPUTS[kind]
    model.eval()
    out = _output(model, x)
    assert torch.isfinite(out).all(), f"{kwargs} gives non-finite outputs"
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        loaded = PeftModel.from_pretrained(_base(kind), tmp).eval()
    torch.testing.assert_close(_output(loaded, x), out, rtol=1e-5, atol=1e-6)
    TALLY["working adapter"] += 1


@pytest.mark.slow
def test_every_config_is_a_clear_error_or_a_working_adapter(capsys, monkeypatch):
    # Rendering the README model card is a third of a save and not what is tested here.
    monkeypatch.setattr(PeftModel, "create_or_update_model_card", lambda self, output_dir: None)
    TALLY.clear()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(configs())
    def run(case):
        _check(*case)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run()
    with capsys.disabled():
        print(f"\nconfig fuzz tally: {dict(TALLY)}")
    assert TALLY["working adapter"] > EXAMPLES // 20
    assert TALLY["clean error (model)"] > EXAMPLES // 50
