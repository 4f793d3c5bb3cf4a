"""Every PEFT name ftn_peft relies on that PEFT does not promise to keep, in one place, with shims per PEFT version.

Other modules import these names from here, never from `peft.tuners.tuners_utils` / `peft.utils.*` directly, so a
PEFT release that moves or changes one of them breaks this file (and tests/test_compat.py) only.

Supported: PEFT >= 0.18 (`MIN_PEFT`). PEFT 0.18 made `BaseTuner` drive adapter activation, trainability, deletion and
merge/unload from `tuner_layer_cls`; FTNModel relies on that and PEFT 0.17 has no such generic code. What differs
between 0.18 and the newest release, and the shim for it:

- PEFT 0.21 moved the choice of which state-dict keys belong to an adapter into the tuner class
  (`BaseTuner._remap_adapter_state_dict_for_load`, `_get_tuner_state_dict_key_prefixes`). Before it,
  `get_peft_model_state_dict` refused any method not in its fixed `PeftType` enum ("Unknown PEFT type passed: FTN")
  and `set_peft_model_state_dict` inserted adapter names by string search. `install()` makes both functions, on
  those versions only and for FTN adapters only, do what 0.21 does: keys chosen structurally (everything on a tuner
  layer except its `base_layer`), adapter name removed on save and put back on load by the tuner's own mapping.
  `BaseTuner` here adds 0.21's hooks, and its "Target modules ... not found" error where older PEFT gave a vaguer one.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re
import sys
from typing import Any, Optional

import peft
from packaging.version import Version
from peft import mapping
from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
from peft.tuners import tuners_utils as _tu
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge, check_target_module_exists
from peft.tuners.tuners_utils import delete_adapter as delete_layers
from peft.utils import save_and_load
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from peft.utils.other import AuxiliaryTrainingWrapper, get_pattern_key
from torch import nn

MIN_PEFT = "0.18"
PEFT_VERSION = Version(peft.__version__)
if PEFT_VERSION < Version(MIN_PEFT):
    raise ImportError(
        f"ftn_peft needs peft>={MIN_PEFT} (found {peft.__version__}): PEFT 0.17 and older lack the generic "
        f"adapter handling FTN builds on. Upgrade with `pip install -U 'peft>={MIN_PEFT}'`"
    )

# The registration tables PEFT's own register_peft_method fills (it only accepts members of its PeftType enum).
PEFT_TYPE_TO_CONFIG_MAPPING = mapping.PEFT_TYPE_TO_CONFIG_MAPPING
PEFT_TYPE_TO_TUNER_MAPPING = mapping.PEFT_TYPE_TO_TUNER_MAPPING
PEFT_TYPE_TO_PREFIX_MAPPING = mapping.PEFT_TYPE_TO_PREFIX_MAPPING

HAS_TUNER_STATE_DICT_HOOKS = hasattr(_tu.BaseTuner, "_remap_adapter_state_dict_for_load")


# --- state-dict key helpers (PEFT 0.21's, backported verbatim in behaviour) ------------------------------------------
def _remove_adapter_name_from_state_dict_key(key: str, adapter_name: str) -> str:
    """'m.ftn_a.default' -> 'm.ftn_a'; 'm.ftn_norm.default.weight' -> 'm.ftn_norm.weight' (only at the end)."""
    if "." not in key:
        return key
    if key.endswith(f".{adapter_name}"):
        return key[: -len(adapter_name) - 1]
    key, _, suffix = key.rpartition(".")
    key = re.sub(re.escape(f".{adapter_name}") + r"$", "", key)
    return f"{key}.{suffix}"


def _backport_get_tuner_state_dict_key_prefixes(model: nn.Module, adapter_name: Optional[str] = None) -> set[str]:
    """State-dict key prefixes of everything on a tuner layer (or the tuner) except the module it wraps."""
    from peft.tuners._buffer_dict import BufferDict

    containers = (nn.ModuleDict, nn.ParameterDict, BufferDict)
    prefixes: set[str] = set()
    aux_names: list[str] = []
    for module_name, module in model.named_modules():
        module_name = module_name.removeprefix("_fsdp_wrapped_module.")
        if isinstance(module, AuxiliaryTrainingWrapper):
            aux_names.append(module_name)
            continue
        if not isinstance(module, _tu.BaseTuner) and not (
            isinstance(module, BaseTunerLayer) and not any(module_name.startswith(a + ".") for a in aux_names)
        ):
            continue
        attrs = [n for n, _ in module.named_children()] + [n for n, _ in module.named_parameters(recurse=False)]
        attrs += [n for n, _ in module.named_buffers(recurse=False)]
        for attr in attrs:
            if attr in ("base_layer", "model"):
                continue
            prefix = f"{module_name}.{attr}" if module_name else attr
            child = getattr(module, attr)
            if adapter_name is not None and isinstance(child, containers):
                if adapter_name in child:
                    prefixes.add(f"{prefix}.{adapter_name}")
            else:
                prefixes.add(prefix)
    return prefixes


def _backport_filter_state_dict_by_key_prefixes(state_dict: dict[str, Any], prefixes: set[str]) -> dict[str, Any]:
    return {k: v for k, v in state_dict.items() if any(k == p or k.startswith(p + ".") for p in prefixes)}


if HAS_TUNER_STATE_DICT_HOOKS:
    from peft.tuners.tuners_utils import (  # noqa: F401  (re-exported)
        _filter_state_dict_by_key_prefixes,
        _get_tuner_state_dict_key_prefixes,
    )

    BaseTuner = _tu.BaseTuner
else:
    _get_tuner_state_dict_key_prefixes = _backport_get_tuner_state_dict_key_prefixes
    _filter_state_dict_by_key_prefixes = _backport_filter_state_dict_by_key_prefixes

    class BaseTuner(_tu.BaseTuner):  # type: ignore[no-redef]
        """PEFT's BaseTuner plus the 0.21 state-dict hooks that FTNModel overrides (used by `install()`'s shims)."""

        def inject_adapter(self, model, adapter_name, *args, **kwargs):
            try:
                super().inject_adapter(model, adapter_name, *args, **kwargs)
            except ValueError as err:
                config = self.peft_config[adapter_name]
                if not str(err).startswith("No modules were targeted") or getattr(config, "exclude_modules", None):
                    raise
                # PEFT < 0.21 counts the modules inside existing tuner layers (FTN's task BatchNorm and head) as
                # excluded ones, so a target list that matches nothing got this vaguer message; say what 0.21 says.
                raise ValueError(
                    f"Target modules {config.target_modules} not found in the base model. Please check the target "
                    "modules and try again."
                ) from err

        @classmethod
        def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
            return _remove_adapter_name_from_state_dict_key(key, adapter_name)

        @classmethod
        def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names=()):
            prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
            return _filter_state_dict_by_key_prefixes(state_dict, prefixes)

        @classmethod
        def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
            prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
            checkpoint_to_model = {}
            for model_key in _filter_state_dict_by_key_prefixes(model.state_dict(), prefixes):
                checkpoint_key = cls._remove_adapter_name_from_key(model_key, adapter_name)
                checkpoint_to_model[checkpoint_key] = model_key
                if not model_key.startswith("base_model.model."):
                    checkpoint_to_model["base_model.model." + checkpoint_key] = model_key
            return {checkpoint_to_model.get(k, k): v for k, v in state_dict.items()}


# --- PEFT < 0.21: get/set_peft_model_state_dict for tuners PEFT does not know ----------------------------------------
def _tuner_for(config) -> Optional[type]:
    tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(getattr(config, "peft_type", None))
    return tuner if tuner is not None and issubclass(tuner, BaseTuner) and tuner is not BaseTuner else None


def _ours(config) -> bool:
    # Only methods registered by ftn_peft take the shim; PEFT's own types keep PEFT's code path untouched.
    return not isinstance(config.peft_type, peft.PeftType) and _tuner_for(config) is not None


def _aux_wrappers(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            yield name.removeprefix("_fsdp_wrapped_module."), module


def _get_state_dict(original, model, state_dict=None, adapter_name="default", *args, **kwargs):
    config = model.peft_config[adapter_name]
    if not _ours(config):
        return original(model, state_dict, adapter_name, *args, **kwargs)
    if state_dict is None:
        state_dict = model.state_dict()
    tuner = _tuner_for(config)
    selected = tuner._get_adapter_state_dict(model, config, adapter_name, state_dict)
    for name, module in _aux_wrappers(model):  # modules_to_save
        local = {k.removeprefix(f"{name}."): v for k, v in state_dict.items() if k.startswith(f"{name}.")}
        selected.update({f"{name}.{k}": v for k, v in module.adapter_state_dict(adapter_name, local).items()})
    return {tuner._remove_adapter_name_from_key(k, adapter_name): v for k, v in selected.items()}


def _set_state_dict(original, model, peft_model_state_dict, adapter_name="default", ignore_mismatched_sizes=False,
                    low_cpu_mem_usage=False):
    config = model.peft_config[adapter_name]
    if not _ours(config):
        return original(model, peft_model_state_dict, adapter_name, ignore_mismatched_sizes, low_cpu_mem_usage)
    state_dict = dict(peft_model_state_dict)
    for name, module in _aux_wrappers(model):
        for saved, loaded in module.adapter_state_dict_load_map(adapter_name).items():
            state_dict[f"{name}.{loaded}"] = state_dict.pop(f"{name}.{saved}")
    state_dict = _tuner_for(config)._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
    if not any(n.startswith("base_model.model.") for n, _ in model.named_parameters()):
        state_dict = {k.removeprefix("base_model.model."): v for k, v in state_dict.items()}
    state_dict, mismatched = save_and_load._find_mismatched_keys(model, state_dict, ignore_mismatched_sizes)
    result = model.load_state_dict(state_dict, strict=False, assign=low_cpu_mem_usage)
    if low_cpu_mem_usage:
        for module in model.modules():
            if hasattr(module, "_move_adapter_to_device_of_base_layer"):
                module._move_adapter_to_device_of_base_layer(adapter_name)
    return result


def _shimmed(original, shim):
    wrapper = functools.wraps(original)(functools.partial(shim, original))
    wrapper._ftn_shim = True
    return wrapper


def install() -> None:
    """Patch PEFT < 0.21's module-level state-dict functions (idempotent; a no-op on PEFT >= 0.21)."""
    if HAS_TUNER_STATE_DICT_HOOKS:
        return
    for name in ("peft.peft_model", "peft.functional"):
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
    # `peft`, `peft.utils`, `peft.peft_model`, ... bound the names at import time: patch every binding. (A module
    # outside PEFT that did `from peft import get_peft_model_state_dict` before ftn_peft was imported keeps PEFT's.)
    modules = [m for n, m in list(sys.modules.items()) if m is not None and (n == "peft" or n.startswith("peft."))]
    for fname, shim in (("get_peft_model_state_dict", _get_state_dict), ("set_peft_model_state_dict", _set_state_dict)):
        original = getattr(save_and_load, fname)
        if getattr(original, "_ftn_shim", False):
            continue
        patched = _shimmed(original, shim)
        for module in modules:
            if getattr(module, fname, None) is original:
                setattr(module, fname, patched)


__all__ = [
    "AuxiliaryTrainingWrapper",
    "BaseTuner",
    "BaseTunerLayer",
    "CONFIG_NAME",
    "HAS_TUNER_STATE_DICT_HOOKS",
    "MIN_PEFT",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_PREFIX_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "PEFT_VERSION",
    "SAFETENSORS_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "_filter_state_dict_by_key_prefixes",
    "_get_tuner_state_dict_key_prefixes",
    "check_adapters_to_merge",
    "check_target_module_exists",
    "delete_layers",
    "get_pattern_key",
    "install",
    "save_and_load",
]
