"""Each PEFT internal in ftn_peft.compat resolves and behaves on the installed PEFT version (the shims included)."""

from __future__ import annotations

import importlib.util
import re

import peft
import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils import save_and_load

import ftn_peft
from ftn_peft import compat

from conftest import tiny_timm_resnet


def two_adapter_model():
    model = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=2, num_classes=10), adapter_name="a")
    model.add_adapter("b", ftn_peft.presets.resnet(r=3, num_classes=7))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".b" in name and "ftn_" in name:
                p.normal_()
    return model


def test_every_name_resolves():
    for name in compat.__all__:
        assert getattr(compat, name) is not None, name
    assert compat.PEFT_VERSION >= compat.Version(compat.MIN_PEFT)
    assert compat.HAS_TUNER_STATE_DICT_HOOKS == (compat.PEFT_VERSION >= compat.Version("0.21"))
    assert issubclass(compat.BaseTuner, peft.tuners.tuners_utils.BaseTuner)


def test_too_old_peft_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(peft, "__version__", "0.17.1")
    spec = importlib.util.spec_from_file_location("_compat_copy", compat.__file__)
    with pytest.raises(ImportError, match=r"peft>=0\.18 \(found 0\.17\.1\).*pip install -U"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_registration_tables_are_peft_s_own():
    from peft import mapping

    assert compat.PEFT_TYPE_TO_TUNER_MAPPING is mapping.PEFT_TYPE_TO_TUNER_MAPPING
    assert compat.PEFT_TYPE_TO_TUNER_MAPPING[ftn_peft.FTN_PEFT_TYPE] is ftn_peft.FTNModel
    assert compat.PEFT_TYPE_TO_CONFIG_MAPPING["FTN"] is ftn_peft.FTNConfig  # JSON's plain string finds it too
    assert compat.PEFT_TYPE_TO_PREFIX_MAPPING["FTN"] == "ftn_"


def test_pattern_and_target_matching():
    assert compat.get_pattern_key(["conv1", "layer2.*conv2"], "model.layer2.0.conv2") == "layer2.*conv2"
    assert compat.get_pattern_key(["conv1"], "model.layer1.0.conv2") == "model.layer1.0.conv2"  # no match: the key
    config = ftn_peft.FTNConfig(target_modules=["conv1"])
    assert compat.check_target_module_exists(config, "layer1.0.conv1")
    assert not compat.check_target_module_exists(config, "layer1.0.conv2")


def test_check_adapters_to_merge_skips_merged_ones():
    model = two_adapter_model()
    layer = model.base_model.model.layer1[0].conv1
    assert compat.check_adapters_to_merge(layer, ["a", "b"]) == ["a", "b"]
    layer.merged_adapters.append("a")
    with pytest.warns(UserWarning, match="(?i)already.*merged a"):
        assert compat.check_adapters_to_merge(layer, ["a", "b"]) == ["b"]


@pytest.mark.parametrize(
    "key, expected",
    [
        ("base_model.model.conv1.ftn_a.b", "base_model.model.conv1.ftn_a"),  # ParameterDict entry
        ("bn1.ftn_norm.b.running_mean", "bn1.ftn_norm.running_mean"),  # ModuleDict entry
        ("b.conv.ftn_a.b", "b.conv.ftn_a"),  # a module named like the adapter is kept
        ("fc.weight", "fc.weight"),
    ],
)
def test_adapter_name_removed_only_at_the_end(key, expected):
    assert compat._remove_adapter_name_from_state_dict_key(key, "b") == expected


def test_key_prefixes_select_one_adapter_and_skip_base_layers():
    model = two_adapter_model()
    prefixes = compat._get_tuner_state_dict_key_prefixes(model, adapter_name="b")
    # The reference, built independently: every FTN container entry for "b", found by walking the modules.
    expected = {
        f"{name}.{attr}.b"
        for name, m in model.named_modules()
        for attr in ("ftn_a", "ftn_b", "ftn_c", "ftn_norm", "ftn_head")
        if "b" in getattr(m, attr, {})
    }
    assert prefixes == expected
    assert compat._backport_get_tuner_state_dict_key_prefixes(model, adapter_name="b") == expected
    selected = compat._filter_state_dict_by_key_prefixes(model.state_dict(), prefixes)
    assert selected and all(".b." in k or k.endswith(".b") for k in selected)
    assert not any("base_layer" in k for k in selected)
    assert compat._backport_filter_state_dict_by_key_prefixes(model.state_dict(), prefixes).keys() == selected.keys()


def test_adapter_state_dict_round_trip():
    """get/set_peft_model_state_dict through whichever path the installed PEFT takes (native on 0.21+, shim before)."""
    model = two_adapter_model()
    saved = save_and_load.get_peft_model_state_dict(model, adapter_name="b")
    assert saved and not any(re.search(r"\.b(\.|$)", k) for k in saved)
    assert not any("base_layer" in k or ".a." in k or k.endswith(".a") for k in saved)
    fresh = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=2, num_classes=10), adapter_name="a")
    fresh.add_adapter("other", ftn_peft.presets.resnet(r=3, num_classes=7))
    result = save_and_load.set_peft_model_state_dict(fresh, saved, adapter_name="other")
    assert not result.unexpected_keys
    original = model.state_dict()
    loaded = {k: v for k, v in fresh.state_dict().items() if ".other" in k}
    assert loaded
    for key, value in loaded.items():
        torch.testing.assert_close(value, original[key.replace(".other", ".b")], rtol=0, atol=0)


def test_shapes_are_checked_on_load():
    model = two_adapter_model()
    saved = save_and_load.get_peft_model_state_dict(model, adapter_name="b")  # r=3
    fresh = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=2, num_classes=7), adapter_name="b")
    with pytest.raises(ValueError, match="shape mismatch"):
        save_and_load.set_peft_model_state_dict(fresh, saved, adapter_name="b")


def test_shims_leave_peft_s_own_methods_alone():
    lora = get_peft_model(tiny_timm_resnet(), LoraConfig(target_modules=["conv1"], r=2))
    saved = save_and_load.get_peft_model_state_dict(lora)
    assert saved and all("lora_" in k for k in saved)
    if not compat.HAS_TUNER_STATE_DICT_HOOKS:
        import peft.functional
        import peft.peft_model

        for module in (peft, save_and_load, peft.utils, peft.peft_model, peft.functional):
            for fname in ("get_peft_model_state_dict", "set_peft_model_state_dict"):
                assert getattr(getattr(module, fname), "_ftn_shim", False), (module.__name__, fname)
        assert saved.keys() == save_and_load.get_peft_model_state_dict.__wrapped__(lora).keys()
