"""Property: a damaged FTN adapter directory ends in a clear error naming the file or key, or in a correct load; the
shared backbone and the adapter already loaded never change either way."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from peft import get_peft_model
from safetensors.torch import load_file, save_file

import ftn_peft

from conftest import tiny_timm_resnet

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
KINDS = ["flip", "truncate", "json_truncate", "json_delete", "json_set", "json_add", "keys"]
EXAMPLES_PER_KIND = 45  # 315 in all

# Fields whose every valid value describes the same tensors; alpha / alpha_pattern are left out on purpose: another
# positive alpha is a valid, different adapter, which no loader can tell from the saved one.
EDITED_FIELDS = [
    "peft_type", "r", "target_modules", "exclude_modules", "rank_pattern", "head_module", "head_num_outputs",
    "task_batchnorm", "modules_to_save", "task_type", "attention_heads", "init_weights", "init_std", "compute",
    "output_projections", "inference_mode", "base_model_name_or_path", "revision", "auto_mapping",
]
BACKBONE_AND_OTHER_ADAPTER = [
    "conv1.weight", "layer1.0.conv1.base_layer.weight", "bn1.base_layer.running_var", "fc.base_layer.bias",
    "layer2.0.bn2.ftn_norm.keep.weight",
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 40) | st.floats() | st.text(max_size=6)
    | st.sampled_from(["FTN", "LORA", "fc", "conv1", "SEQ_CLS", "layer1.0.conv1", "^layer1.*$"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=2),
    max_leaves=4,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved adapter, its outputs, and a model whose backbone and adapter "keep" no load may touch."""
    directory = tmp_path_factory.mktemp("saved")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=2, num_classes=5))
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if ".ftn_norm." in name and tensor.is_floating_point():
                tensor.mul_(1.5)
    expected = model.eval()(images).detach()
    model.save_pretrained(directory)
    host = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=1, num_classes=3), adapter_name="keep").eval()
    before = {k: v.clone() for k, v in host.state_dict().items()}
    return Saved(directory, images, expected, host, before)


class Saved(tuple):
    def __new__(cls, *items):
        return super().__new__(cls, items)

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return "saved"


def mutate(directory: Path, kind: str, data) -> str:
    """Apply one random damage of the given kind; returns a label for the failure report."""
    weights, config = directory / WEIGHTS, directory / CONFIG
    if kind == "flip":
        raw = bytearray(weights.read_bytes())
        data_start = 8 + int.from_bytes(raw[:8], "little")  # safetensors: u64 header length, JSON header, tensors
        for _ in range(data.draw(st.integers(1, 3))):
            low, high = data.draw(st.sampled_from([(0, data_start - 1), (data_start, len(raw) - 1)]))
            raw[data.draw(st.integers(low, high))] = data.draw(st.integers(0, 255))
        weights.write_bytes(bytes(raw))
    elif kind == "truncate":
        raw = weights.read_bytes()
        weights.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
    elif kind == "json_truncate":
        text = config.read_text()
        config.write_text(text[: data.draw(st.integers(0, len(text) - 1))])
    else:
        content = json.loads(config.read_text())
        if kind == "json_delete":
            content.pop(data.draw(st.sampled_from(sorted(content))))
        elif kind == "json_set":
            content[data.draw(st.sampled_from(EDITED_FIELDS))] = data.draw(json_values)
        elif kind == "json_add":
            new_field = data.draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in content))
            content[new_field] = data.draw(json_values)
        else:
            return mutate_keys(directory, data)
        config.write_text(json.dumps(content))
    return kind


def mutate_keys(directory: Path, data) -> str:
    """Drop, add or rename tensors, written back without FTN's checksum (as another tool would)."""
    tensors = load_file(directory / WEIGHTS)
    keys = sorted(tensors)
    action = data.draw(st.sampled_from(["drop", "add_backbone", "add_other", "rename"]))
    if action == "drop":
        tensors.pop(data.draw(st.sampled_from(keys)))
    elif action == "add_backbone":
        name = data.draw(st.sampled_from(BACKBONE_AND_OTHER_ADAPTER))
        tensors[f"base_model.model.{name}"] = torch.zeros(1)
    elif action == "add_other":
        tensors[data.draw(st.text(min_size=1, max_size=12))] = torch.zeros(2)
    else:
        key = data.draw(st.sampled_from(keys))
        tensors[key + data.draw(st.sampled_from([".keep", "_", ".weight", "x"]))] = tensors.pop(key)
    save_file(tensors, directory / WEIGHTS, metadata={"format": "pt"})
    return f"keys/{action}"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Unexpected keyword arguments", "ignore:You have passed exclude_modules")
@pytest.mark.parametrize("damage", KINDS)
@settings(max_examples=EXAMPLES_PER_KIND, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_adapter_directories_fail_clearly_or_load_correctly(saved, damage, data):
    source, images, expected, host, before = saved
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "adapter"
        shutil.copytree(source, directory)
        kind = mutate(directory, damage, data)
        try:
            host.load_adapter(str(directory), adapter_name="x")
        except Exception as err:  # noqa: BLE001 (the property is about which errors)
            message = str(err)
            assert isinstance(err, (ValueError, TypeError)), (kind, repr(err))
            assert str(directory) in message, (kind, message)
            event(f"{kind}: {type(err).__name__}")
        else:
            event(f"{kind}: loaded")
            host.set_adapter("x")
            torch.testing.assert_close(host(images), expected, rtol=1e-5, atol=1e-5, msg=kind)
            host.set_adapter("keep")
            host.delete_adapter("x")
        assert list(host.peft_config) == ["keep"], kind
        after = host.state_dict()
        assert after.keys() == before.keys(), kind
        assert all(torch.equal(after[k], v) for k, v in before.items()), kind
