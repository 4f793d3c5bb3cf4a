"""Loading an FTN adapter writes only that adapter's tensors, refuses impossible values, and names damaged files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import ftn_peft
from ftn_peft.loading import SKIP_VALUE_CHECKS_ENV, AdapterWeightsError, CorruptAdapterFileError, skip_value_checks

from conftest import tiny_timm_resnet

REPO = Path(__file__).parents[1]
WEIGHTS = "adapter_model.safetensors"


def shared_backbone_model():
    """Two FTN adapters on one backbone, with factors, task BN statistics and heads that differ from the base."""
    model = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=2, num_classes=5), adapter_name="default")
    model.add_adapter("seven", ftn_peft.presets.resnet(r=3, num_classes=7))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if ".ftn_" in name and tensor.is_floating_point():
                tensor.add_(0.1 * torch.randn(tensor.shape, generator=gen)).abs_()  # abs: valid running_var
    return model.eval()


def outputs(model, images) -> dict:
    result = {}
    for name in model.peft_config:
        model.set_adapter(name)
        result[name] = model(images).detach()
    return result


def rewrite(directory: Path, edit) -> None:
    """Edit the saved tensors and write them back the way another tool would (without FTN's checksum)."""
    tensors = load_file(directory / WEIGHTS)
    edit(tensors)
    save_file(tensors, directory / WEIGHTS, metadata={"format": "pt"})


def snapshot(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before: dict) -> None:
    after = model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(after[k], v)]
    assert not changed, changed


FOREIGN_KEYS = {
    "stem conv": "base_model.model.conv1.weight",
    "frozen weight of an adapted conv": "base_model.model.layer1.0.conv1.base_layer.weight",
    "base BatchNorm running_mean": "base_model.model.layer1.0.bn1.base_layer.running_mean",
    "another adapter's factor": "base_model.model.layer1.0.conv1.ftn_a.seven",
    "another adapter's BatchNorm": "base_model.model.bn1.ftn_norm.seven.running_var",
    "a key the model does not have": "base_model.model.layer9.weight",
}


@pytest.mark.parametrize("key", FOREIGN_KEYS.values(), ids=FOREIGN_KEYS.keys())
def test_a_file_with_foreign_tensors_is_refused_and_changes_nothing(tmp_path, images, key):
    model = shared_backbone_model()
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    state = model.state_dict()
    rewrite(tmp_path, lambda t: t.__setitem__(key, state[key] + 1.0 if key in state else torch.ones(3)))
    before, expected = snapshot(model), outputs(model, images)

    with pytest.raises(AdapterWeightsError, match=rf"not this adapter's: \[{key!r}\].*Nothing was loaded"):
        model.load_adapter(str(tmp_path), adapter_name="third")
    assert list(model.peft_config) == ["default", "seven"]  # the adapter PEFT added first is removed again
    assert model.state_dict().keys() == before.keys()
    assert_unchanged(model, before)  # backbone and both adapters bit-identical
    for name, out in outputs(model, images).items():
        if name in expected:
            torch.testing.assert_close(out, expected[name], rtol=0, atol=0)

    base = tiny_timm_resnet()
    tensors, base_before = base.state_dict(), snapshot(base)  # state_dict() shares storage with the model
    with pytest.raises(AdapterWeightsError, match=key):
        PeftModel.from_pretrained(base, tmp_path)
    assert all(torch.equal(tensors[k], v) for k, v in base_before.items())


def test_a_tensor_stored_twice_is_refused(tmp_path):
    model = shared_backbone_model()
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    key = "base_model.model.layer1.0.conv1.ftn_a"
    rewrite(tmp_path, lambda t: t.__setitem__(key + ".third", t[key] * 2))  # which one would win?
    with pytest.raises(AdapterWeightsError, match=rf"holds some tensors twice.*{key}.third"):
        model.load_adapter(str(tmp_path), adapter_name="third")


def test_every_tensor_the_adapter_owns_loads(tmp_path, images):
    config = ftn_peft.presets.resnet(r=2, num_classes=5)
    config.modules_to_save = ["conv1"]  # the stem conv: a legitimately saved copy of a base module
    model = get_peft_model(tiny_timm_resnet(), config)
    with torch.no_grad():
        model.base_model.model.conv1.modules_to_save["default"].weight.mul_(-2.0)
        model.base_model.model.layer1[0].bn1.ftn_norm["default"].running_var.mul_(3.0)
    model.eval()
    expected = model(images)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / WEIGHTS)
    assert "base_model.model.conv1.weight" in saved and "base_model.model.layer1.0.bn1.ftn_norm.running_var" in saved

    loaded = PeftModel.from_pretrained(tiny_timm_resnet(), tmp_path).eval()
    torch.testing.assert_close(loaded(images), expected, rtol=1e-5, atol=1e-5)  # compute paths may differ

    rewrite(tmp_path, lambda t: t.pop("base_model.model.conv1.weight"))
    with pytest.raises(AdapterWeightsError, match=r"lacks 1 modules_to_save tensors: \['base_model.model.conv1.weight"):
        PeftModel.from_pretrained(tiny_timm_resnet(), tmp_path)


FACTOR = "base_model.model.layer1.0.conv1.ftn_a"
NORM = "base_model.model.layer1.0.bn1.ftn_norm"


def _set(key, fn):
    return lambda t: t.__setitem__(key, fn(t[key]))


def _poke(value):
    def fn(t):
        t = t.clone()
        t.view(-1)[0] = value
        return t

    return fn


BAD_VALUES = {
    "NaN factor": (FACTOR, _poke(float("nan"))),
    "inf factor": (FACTOR, _poke(float("inf"))),
    "negative running_var": (NORM + ".running_var", _poke(-1.0)),
    "infinite running_var": (NORM + ".running_var", _poke(float("inf"))),
    "NaN running_mean": (NORM + ".running_mean", _poke(float("nan"))),
    "negative num_batches_tracked": (NORM + ".num_batches_tracked", lambda t: torch.full_like(t, -1)),
    "float num_batches_tracked": (NORM + ".num_batches_tracked", lambda t: t.float()),
    "bool factor": (FACTOR, lambda t: t > 0),
    "int factor": (FACTOR, lambda t: (t * 100).long()),
    "NaN task head": ("base_model.model.fc.ftn_head.weight", _poke(float("nan"))),
}


@pytest.mark.parametrize("key, fn", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_impossible_values_are_refused_by_key(tmp_path, key, fn):
    model = shared_backbone_model()
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    rewrite(tmp_path, _set(key, fn))
    before = snapshot(model)
    with pytest.raises(AdapterWeightsError, match=rf"impossible values: \[.{key}.*{SKIP_VALUE_CHECKS_ENV}=1"):
        model.load_adapter(str(tmp_path), adapter_name="third")
    assert_unchanged(model, before)


def test_value_checks_can_be_skipped_by_experts(tmp_path, monkeypatch):
    model = shared_backbone_model()
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    rewrite(tmp_path, _set(NORM + ".running_var", _poke(-1.0)))
    with skip_value_checks():
        loaded = PeftModel.from_pretrained(tiny_timm_resnet(), tmp_path)
    assert loaded.base_model.model.layer1[0].bn1.ftn_norm["default"].running_var[0] == -1.0
    monkeypatch.setenv(SKIP_VALUE_CHECKS_ENV, "1")
    PeftModel.from_pretrained(tiny_timm_resnet(), tmp_path)
    # the opt-out covers values only: foreign tensors are still refused
    rewrite(tmp_path, lambda t: t.__setitem__("base_model.model.conv1.weight", torch.zeros(8, 3, 7, 7)))
    with pytest.raises(AdapterWeightsError, match="conv1.weight"):
        PeftModel.from_pretrained(tiny_timm_resnet(), tmp_path)


def test_changed_bytes_fail_the_checksum(tmp_path):
    model = shared_backbone_model()
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    weights = tmp_path / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # a low bit of the last float: still finite, silently wrong without a checksum
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptAdapterFileError, match=rf"{weights} \({len(data)} bytes\).*checksum"):
        PeftModel.from_pretrained(tiny_timm_resnet(), tmp_path)


def test_truncated_ftn_file_names_file_and_size(tmp_path):
    model = shared_backbone_model()
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    weights = tmp_path / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CorruptAdapterFileError, match=rf"{weights} \(1000 bytes\).*truncated or corrupt"):
        PeftModel.from_pretrained(tiny_timm_resnet(), tmp_path)


def test_truncated_pickle_file_names_file_and_size(tmp_path):
    model = shared_backbone_model()
    model.save_pretrained(tmp_path, selected_adapters=["default"], safe_serialization=False)
    weights = tmp_path / "adapter_model.bin"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CorruptAdapterFileError, match=rf"{weights} \(1000 bytes\).*truncated or corrupt"):
        PeftModel.from_pretrained(tiny_timm_resnet(), tmp_path)


LORA_CASES = """
import json, os, shutil, sys, torch
sys.path.insert(0, {tests!r})
from peft import LoraConfig, PeftModel, get_peft_model
from conftest import tiny_timm_resnet
{maybe_import}
root = {root!r}
results = {{}}
def attempt(case, directory):
    try:
        PeftModel.from_pretrained(tiny_timm_resnet(), directory)
        results[case] = "loaded"
    except Exception as err:
        results[case] = [type(err).__module__ + "." + type(err).__qualname__, str(err)]
for case in ("truncated", "garbage", "no weights"):
    attempt(case, os.path.join(root, case))
print(json.dumps(results))
"""


@pytest.mark.slow  # two fresh interpreters
def test_corrupt_lora_files_fail_exactly_as_without_ftn_peft(tmp_path):
    model = get_peft_model(tiny_timm_resnet(), LoraConfig(target_modules=["conv1"], r=2))
    model.save_pretrained(tmp_path / "truncated")
    for case in ("garbage", "no weights"):
        model.save_pretrained(tmp_path / case)
    weights = tmp_path / "truncated" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    (tmp_path / "garbage" / WEIGHTS).write_bytes(b"\xff" * 64)
    (tmp_path / "no weights" / WEIGHTS).unlink()
    results = {}
    for label, maybe_import in (("plain", ""), ("with ftn_peft", "import ftn_peft")):
        code = LORA_CASES.format(tests=str(REPO / "tests"), maybe_import=maybe_import, root=str(tmp_path))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
        command = [sys.executable, "-c", textwrap.dedent(code)]
        run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        results[label] = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results["plain"]) == 3 and "loaded" not in results["plain"].values(), results["plain"]
    assert results["with ftn_peft"] == results["plain"]
