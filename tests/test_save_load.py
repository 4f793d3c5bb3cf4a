"""Saving and loading: PEFT's layout, a fresh process, several adapters, atomic writes, clear load errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model

import ftn_peft
from ftn_peft.saving import CorruptAdapterFileError  # still importable from saving.py

from conftest import tiny_clip_classifier, tiny_timm_resnet, tiny_torchvision_resnet
from test_model import train_steps

TESTS = Path(__file__).parent
REPO = TESTS.parent


def run_python(code: str, tmp_path: Path) -> None:
    # the checkout first: the child must import the ftn_peft under test, not an installed copy
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(code))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def two_task_model(images):
    model = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=2, num_classes=10), adapter_name="default")
    train_steps(model, images, 10)
    model.add_adapter("seven", ftn_peft.presets.resnet(r=3, num_classes=7))
    model.set_adapter("seven")
    train_steps(model, images, 7, seed=1)
    return model


def test_round_trip_in_a_new_process(tmp_path, images):
    model = two_task_model(images)
    expected = {}
    for name in ("default", "seven"):
        model.set_adapter(name)
        expected[name] = model(images).detach()
    model.save_pretrained(tmp_path / "adapters")
    assert sorted(os.listdir(tmp_path / "adapters")) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "seven"]
    torch.save({"images": images, "expected": expected}, tmp_path / "io.pt")
    run_python(
        f"""
        import torch, ftn_peft
        from peft import PeftModel
        from conftest import tiny_timm_resnet
        assert ftn_peft.__file__.startswith({str(REPO)!r}), ftn_peft.__file__
        io = torch.load({str(tmp_path / "io.pt")!r})
        model = PeftModel.from_pretrained(tiny_timm_resnet(), {str(tmp_path / "adapters")!r})
        model.load_adapter({str(tmp_path / "adapters" / "seven")!r}, adapter_name="seven")
        for name, out in io["expected"].items():
            model.set_adapter(name)
            got = model(io["images"])
            assert got.shape == out.shape, (name, got.shape)
            torch.testing.assert_close(got, out, rtol=0, atol=1e-6)
        print("ok")
        """,
        tmp_path,
    )


def test_config_and_card_on_disk(tmp_path, images):
    model = get_peft_model(tiny_clip_classifier(), ftn_peft.presets.clip_vision(r=2, targets="o", head_module="classifier", num_classes=3))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "FTN" and config["r"] == 2 and config["head_num_outputs"] == 3
    assert type(PeftConfig.from_pretrained(tmp_path)) is ftn_peft.FTNConfig
    card = (tmp_path / "README.md").read_text()
    assert "- ftn" in card and "- transformers" in card
    assert not [p for p in os.listdir(tmp_path.parent) if ".tmp-" in p]  # no temporary directory left behind


def test_bn_statistics_survive_the_round_trip(tmp_path, images):
    model = two_task_model(images)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_timm_resnet(), tmp_path / "seven", adapter_name="seven")
    saved_bn = model.base_model.model.layer1[0].bn1.ftn_norm["seven"]
    loaded_bn = loaded.base_model.model.layer1[0].bn1.ftn_norm["seven"]
    assert not torch.equal(saved_bn.running_mean, tiny_timm_resnet().layer1[0].bn1.running_mean)
    torch.testing.assert_close(loaded_bn.running_mean, saved_bn.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(loaded_bn.running_var, saved_bn.running_var, rtol=0, atol=0)


def test_failed_save_never_leaves_a_loadable_half_written_adapter(tmp_path, images, monkeypatch):
    model = two_task_model(images)
    target = tmp_path / "adapter"
    model.save_pretrained(target)
    good = (target / "adapter_model.safetensors").read_bytes()

    import peft.peft_model

    def dying_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 64)  # a partial write, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", dying_save)
    with torch.no_grad():
        model.base_model.model.layer1[0].conv1.ftn_a["default"].add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(target)
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path / "fresh")
    # the earlier complete adapter is untouched, the new directory holds nothing that loads, no temp dirs remain
    assert (target / "adapter_model.safetensors").read_bytes() == good
    assert not (tmp_path / "fresh" / "adapter_config.json").exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    PeftModel.from_pretrained(tiny_timm_resnet(), target)


def test_truncated_weights_file_is_named(tmp_path, images):
    model = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=1))
    model.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CorruptAdapterFileError, match="adapter_model.safetensors.*truncated"):
        PeftModel.from_pretrained(tiny_timm_resnet(), tmp_path)


def test_adapter_for_another_architecture_names_keys(tmp_path):
    model = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=1))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not fit this model.*(missing|unexpected|shape)"):
        PeftModel.from_pretrained(tiny_torchvision_resnet(), tmp_path)


def test_adapter_with_another_rank_names_shapes(tmp_path):
    model = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=2, num_classes=5))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["r"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"shape mismatch.*ftn_a.*\(2, .*\(3, "):
        PeftModel.from_pretrained(tiny_timm_resnet(), tmp_path)


def test_registration_and_auto_classes_in_a_fresh_process(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base = tiny_clip_classifier()
    base.save_pretrained(base_dir)
    model = get_peft_model(base, ftn_peft.presets.clip_vision(r=2, targets="qv"))
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(adapter_dir)
    run_python(
        f"""
        import ftn_peft, torch
        from peft import AutoPeftModel, PeftConfig, PeftType, get_model_status
        from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
        config = PeftConfig.from_pretrained({str(adapter_dir)!r})
        assert type(config).__name__ == "FTNConfig" and config.peft_type.value == "FTN"
        assert PEFT_TYPE_TO_PREFIX_MAPPING["FTN"] == "ftn_"
        model = AutoPeftModel.from_pretrained({str(adapter_dir)!r})
        assert type(model.base_model).__name__ == "FTNModel"
        status = get_model_status(model)
        assert status.peft_types == {{"default": "FTN"}}, status
        """,
        tmp_path,
    )
