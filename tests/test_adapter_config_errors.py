"""A broken adapter_config.json, or an adapter directory without weights, gets an error naming the file and field."""

from __future__ import annotations

import json

import pytest
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model

import ftn_peft
from ftn_peft.loading import AdapterConfigError

from conftest import tiny_timm_resnet

CONFIG = "adapter_config.json"


@pytest.fixture
def ftn_dir(tmp_path):
    model = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=2, num_classes=5))
    model.save_pretrained(tmp_path)
    return tmp_path


def edit_config(directory, edit):
    config = json.loads((directory / CONFIG).read_text())
    edit(config)
    (directory / CONFIG).write_text(json.dumps(config))


def load(directory):
    return PeftModel.from_pretrained(tiny_timm_resnet(), directory)


def test_invalid_json_names_the_file(ftn_dir):
    path = ftn_dir / CONFIG
    path.write_text(path.read_text()[:40])
    for read in (load, PeftConfig.from_pretrained):
        with pytest.raises(AdapterConfigError, match=rf"{path} is not valid JSON \(.* at line \d+ column") as info:
            read(ftn_dir)
        assert isinstance(info.value, json.JSONDecodeError)  # handlers written for PEFT's error still match


def test_json_that_is_not_an_object_names_the_file(ftn_dir):
    (ftn_dir / CONFIG).write_text("[1, 2]")
    with pytest.raises(AdapterConfigError, match=rf"{ftn_dir / CONFIG} holds a JSON list"):
        load(ftn_dir)
    (ftn_dir / CONFIG).write_bytes(b"\xff\xfe{}")
    with pytest.raises(AdapterConfigError, match=rf"{ftn_dir / CONFIG} is not UTF-8 text"):
        load(ftn_dir)


def test_missing_peft_type_names_the_file_and_field(ftn_dir):
    edit_config(ftn_dir, lambda c: c.pop("peft_type"))
    with pytest.raises(AdapterConfigError, match=rf"{ftn_dir / CONFIG} has no field 'peft_type'") as info:
        load(ftn_dir)
    assert isinstance(info.value, KeyError)


@pytest.mark.parametrize("value", ["FTN2", 3, None])
def test_unknown_peft_type_names_the_file_and_value(ftn_dir, value):
    edit_config(ftn_dir, lambda c: c.__setitem__("peft_type", value))
    expected = rf"{ftn_dir / CONFIG}: peft_type={value!r} is not a registered PEFT method \(known: .*FTN.*LORA"
    with pytest.raises(AdapterConfigError, match=expected):
        load(ftn_dir)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("r", "2", r"field 'r' = '2' is not a valid <class 'int'>"),
        ("r", 0, r"r must be an int >= 1, got 0"),
        ("head_module", 5, r"field 'head_module' = 5 is not a valid Optional\[str\]"),
        ("target_modules", None, r"field 'target_modules' is missing or null"),
        ("target_modules", [1], r"field 'target_modules' = \[1\] is not a valid"),
        ("compute", "fast", r"compute='fast' is not one of"),
        ("init_std", float("inf"), r"field 'init_std' holds the non-finite number inf"),
        ("rank_pattern", {"conv1": -1}, r"rank_pattern\['conv1'\] must be an int >= 1"),
        ("task_type", "IMAGE_CLS", r"Invalid task type: 'IMAGE_CLS'"),
    ],
)
def test_bad_ftn_field_names_the_file_and_field(ftn_dir, field, value, message):
    edit_config(ftn_dir, lambda c: c.__setitem__(field, value))
    with pytest.raises(AdapterConfigError, match=rf"{ftn_dir / CONFIG}: .*{message}"):
        load(ftn_dir)


def test_transformers_task_type_on_a_timm_model_names_the_file(ftn_dir):
    edit_config(ftn_dir, lambda c: c.__setitem__("task_type", "SEQ_CLS"))
    with pytest.raises(AdapterConfigError, match=rf"{ftn_dir / CONFIG}: task_type='SEQ_CLS' needs a transformers"):
        load(ftn_dir)


def test_directory_without_weights_names_the_directory(ftn_dir):
    (ftn_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterConfigError, match=rf"{ftn_dir} holds {CONFIG} but no weights \(adapter_model"):
        load(ftn_dir)
    model = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=1))
    with pytest.raises(AdapterConfigError, match="no weights"):
        model.load_adapter(str(ftn_dir), adapter_name="other")


def test_a_valid_lora_adapter_is_read_as_before(tmp_path):
    get_peft_model(tiny_timm_resnet(), LoraConfig(target_modules=["conv1"], r=2)).save_pretrained(tmp_path)
    config = PeftConfig.from_pretrained(tmp_path)
    assert type(config) is LoraConfig and config.r == 2
    assert type(load(tmp_path).peft_config["default"]) is LoraConfig
