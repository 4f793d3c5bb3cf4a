"""Loading FTN adapters: only the adapter's own tensors, checked values, and errors that name the file and field.

Every FTN adapter shares one frozen backbone, so a load must never write anything but the adapter being loaded:
`check_adapter_state_dict` (called by `FTNModel._remap_adapter_state_dict_for_load`, i.e. before PEFT copies a single
tensor) accepts exactly the adapter's factors, task BatchNorm copies (running statistics included), task head and its
own `modules_to_save` entries, and refuses anything else by name. Values are checked too: non-finite or non-floating
tensors and impossible BatchNorm statistics are refused, unless `FTN_PEFT_SKIP_VALUE_CHECKS=1` is set or the load runs
inside `skip_value_checks()` (the key checks cannot be switched off).

`install()` hooks PEFT's readers as narrowly as possible, so LoRA and other methods load exactly as without ftn_peft:
- `PeftConfig.from_json_file`: a file that is not a JSON object, or names a PEFT type nobody registered, gets an
  `AdapterConfigError` naming the file (subclassing the `JSONDecodeError` / `KeyError` PEFT raised before, so existing
  handlers still match); an FTN config is also checked field by field.
- `PeftConfig._get_peft_type` (the first read of a model load): a missing `peft_type`, and an FTN directory without
  weights (PEFT would take the local path for a Hub repo id).
- `PeftModel.from_pretrained`: an FTN config whose `task_type` needs a transformers model, given a model without
  `.config`. `PeftModel.load_adapter`: a refused FTN load removes the adapter PEFT added before reading the weights.
- `set_peft_model_state_dict` (as `PeftModel.load_adapter` calls it): an FTN file that lacks a modules_to_save tensor
  its config lists.
- the weight readers of `peft.utils.save_and_load`: for files whose `adapter_config.json` says FTN only, an unreadable
  file raises `CorruptAdapterFileError` naming it and its size, and the checksum written by `seal` is verified.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import pickle
import typing
import zipfile
from contextlib import contextmanager
from contextvars import ContextVar
from enum import Enum

import torch
from peft import PeftConfig, PeftModel, peft_model
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from .compat import (
    CONFIG_NAME,
    SAFETENSORS_WEIGHTS_NAME,
    WEIGHTS_NAME,
    AuxiliaryTrainingWrapper,
    _filter_state_dict_by_key_prefixes,
    _get_tuner_state_dict_key_prefixes,
    delete_layers,
    save_and_load,
)
from .layer import FTNTunerLayer
from .peft_type import FTN_PEFT_TYPE, PREFIX

SKIP_VALUE_CHECKS_ENV = "FTN_PEFT_SKIP_VALUE_CHECKS"
DIGEST_KEY = "ftn_sha256"
_MAX_LISTED = 5
_skip_values: ContextVar[bool] = ContextVar("ftn_skip_value_checks", default=False)
_source: ContextVar[str] = ContextVar("ftn_adapter_source", default="")  # the adapter being loaded, for messages


class AdapterLoadError(ValueError):
    """An FTN adapter that cannot be loaded; the message names the file, and the field or tensor at fault."""


class CorruptAdapterFileError(AdapterLoadError):
    """An adapter weight file that is truncated, not valid safetensors, or fails its checksum."""


class AdapterConfigError(AdapterLoadError):
    """An adapter_config.json that cannot describe an adapter; the message names the file and the field."""


class AdapterWeightsError(AdapterLoadError):
    """Tensors of an adapter file that do not belong to the adapter, or values it cannot hold."""


class _ConfigJSONError(AdapterConfigError, json.JSONDecodeError):
    pass


class _PeftTypeError(AdapterConfigError, KeyError):
    __str__ = BaseException.__str__  # KeyError would print the message as a quoted repr


@contextmanager
def skip_value_checks():
    """Load adapters whose tensors hold non-finite values or impossible BatchNorm statistics (experts only)."""
    token = _skip_values.set(True)
    try:
        yield
    finally:
        _skip_values.reset(token)


def _value_checks_enabled() -> bool:
    return not (_skip_values.get() or os.environ.get(SKIP_VALUE_CHECKS_ENV, "") not in ("", "0"))


def _in_source() -> str:
    return f"{_source.get()}: " if _source.get() else ""


def _listed(items) -> str:
    items = list(items)
    return f"{items[:_MAX_LISTED]}{' ...' if len(items) > _MAX_LISTED else ''}"


# --- the state dict of one adapter ----------------------------------------------------------------------
def check_adapter_state_dict(model: torch.nn.Module, adapter_name: str, checkpoint: dict, state_dict: dict) -> None:
    """Refuse a checkpoint (remapped to model keys: `state_dict`) that is not exactly this FTN adapter's tensors, or
    that holds impossible values. Messages name the keys as they are in the file."""
    model_state = model.state_dict()
    prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
    expected = _filter_state_dict_by_key_prefixes(model_state, prefixes)
    if len(state_dict) != len(checkpoint):
        # a key spelled with the adapter name and the same key without it both map to one model tensor
        twice = sorted(k for k in checkpoint if k in expected)
        raise AdapterWeightsError(
            f"{_in_source()}the checkpoint of FTN adapter {adapter_name!r} holds some tensors twice, with and "
            f"without the adapter name: {_listed(twice)}. Save the adapter again with save_pretrained."
        )
    in_file = dict(zip(state_dict, checkpoint))  # the remapping keeps the order
    allowed = set(expected) | _auxiliary_keys(model, adapter_name)
    foreign = [k for k in state_dict if k not in allowed]
    if foreign:
        overwrites = [k for k in foreign if k in model_state]
        raise AdapterWeightsError(
            f"{_in_source()}the checkpoint of FTN adapter {adapter_name!r} holds {len(foreign)} tensors that are not "
            f"this adapter's: {_listed(sorted(in_file[k] for k in foreign))}"
            + (f"; {len(overwrites)} of them would overwrite the frozen model or another adapter" if overwrites else "")
            + ". An FTN adapter file holds only its factors, task BatchNorms, task head and modules_to_save; "
            "save it with save_pretrained, or drop those keys from the file. Nothing was loaded."
        )
    missing = sorted(set(expected) - set(state_dict))
    mismatched = [
        f"{in_file[k]}: checkpoint {tuple(v.shape)} vs model {tuple(model_state[k].shape)}"
        for k, v in state_dict.items() if v.shape != model_state[k].shape
    ]
    if missing or mismatched:
        details = [
            f"{title} ({len(keys)}): {_listed(keys)}"
            for title, keys in (("missing", missing), ("shape mismatch", mismatched)) if keys
        ]
        raise AdapterWeightsError(
            f"{_in_source()}the saved FTN adapter {adapter_name!r} does not fit this model: " + "; ".join(details)
            + ". It was saved for another architecture, rank or head size: load it into the base model it was "
            "trained on, with its own adapter_config.json"
        )
    if _value_checks_enabled():
        problems = [p for k, v in state_dict.items() if (p := _value_problem(in_file[k], v, model_state[k]))]
        if problems:
            raise AdapterWeightsError(
                f"{_in_source()}FTN adapter {adapter_name!r} holds impossible values: {_listed(problems)}. "
                "The file is damaged or was saved from a diverged run; retrain or save it again (experts: set "
                f"{SKIP_VALUE_CHECKS_ENV}=1 or load inside ftn_peft.loading.skip_value_checks() to load it anyway)"
            )


def _checked_set_state_dict(original):
    @functools.wraps(original)
    def set_peft_model_state_dict(model, peft_model_state_dict, adapter_name="default", *args, **kwargs):
        config = getattr(model, "peft_config", {}).get(adapter_name)
        if getattr(config, "peft_type", None) == FTN_PEFT_TYPE:
            # PEFT looks up every modules_to_save tensor before the tuner sees the checkpoint (a bare KeyError)
            saved = _auxiliary_keys(model, adapter_name, saved=True)
            missing = sorted(k for k in saved if k not in peft_model_state_dict)
            if missing:
                raise AdapterWeightsError(
                    f"{_in_source()}the checkpoint of FTN adapter {adapter_name!r} lacks {len(missing)} "
                    f"modules_to_save tensors: {_listed(missing)}. Its adapter_config.json lists modules the file "
                    "does not hold; load it with the adapter_config.json it was saved with. Nothing was loaded."
                )
        return original(model, peft_model_state_dict, adapter_name, *args, **kwargs)

    set_peft_model_state_dict._ftn_checked = True
    return set_peft_model_state_dict


def _auxiliary_keys(model: torch.nn.Module, adapter_name: str, saved: bool = False) -> set[str]:
    """Keys of this adapter's modules_to_save (and other auxiliary wrappers): as saved, or as loaded into the model."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):  # the same walk as set_peft_model_state_dict
            name = name.removeprefix("_fsdp_wrapped_module.")
            key_map = module.adapter_state_dict_load_map(adapter_name)
            keys.update(f"{name}.{k if saved else v}" for k, v in key_map.items())
    return keys


def _value_problem(key: str, value: torch.Tensor, target: torch.Tensor):
    if target.is_floating_point():
        if not value.is_floating_point():
            return f"{key} is {value.dtype}, expected a floating-point tensor"
        if not torch.isfinite(value).all():
            return f"{key} holds {int((~torch.isfinite(value)).sum())} NaN/inf values"
        if key.endswith("running_var") and (value < 0).any():
            return f"{key} holds a negative variance"
        return None
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        return f"{key} is {value.dtype}, expected an integer tensor like the model's {target.dtype}"
    if (value < 0).any():
        return f"{key} is negative"
    return None


# --- weight files -------------------------------------------------------------------------------------
def _digest(tensors: dict) -> str:
    return hashlib.sha256(save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})).hexdigest()


def seal(path: str) -> None:
    """Add a checksum of the tensors to a saved FTN safetensors file; loads then refuse a file whose bytes changed."""
    digest = _digest(load_file(path))
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        data = f.read()
    header["__metadata__"] = {**header.get("__metadata__", {}), DIGEST_KEY: digest}
    # Written by hand, keys sorted: safetensors' own writer orders metadata keys at random per process, so the same
    # adapter would not give the same bytes twice. Padded with spaces to 8 bytes, as safetensors does.
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + data)


def _is_ftn_file(filename) -> bool:
    try:
        with open(os.path.join(os.path.dirname(os.fspath(filename)), CONFIG_NAME)) as f:
            config = json.load(f)
    except (OSError, ValueError, TypeError):
        return False
    return isinstance(config, dict) and config.get("peft_type") == FTN_PEFT_TYPE.value


def _corrupt(filename, err: Exception) -> CorruptAdapterFileError:
    size = os.path.getsize(filename) if os.path.exists(filename) else 0
    return CorruptAdapterFileError(
        f"{filename} ({size} bytes) is not a complete adapter weight file ({type(err).__name__}: {err}): it is "
        "truncated or corrupt. Save or download the adapter again."
    )


def _checked_safe_load(original):
    @functools.wraps(original)
    def safe_load_file(filename, *args, **kwargs):
        if not _is_ftn_file(filename):
            return original(filename, *args, **kwargs)
        try:
            tensors = original(filename, *args, **kwargs)
            with safe_open(filename, "pt") as f:
                expected = (f.metadata() or {}).get(DIGEST_KEY)
        except (SafetensorError, OSError, ValueError, OverflowError) as err:
            raise _corrupt(filename, err) from err
        if expected is not None and expected != _digest(tensors):
            raise _corrupt(filename, ValueError(f"the tensors do not match the {DIGEST_KEY} checksum written on save"))
        return tensors

    safe_load_file._ftn_checked = True
    return safe_load_file


def _checked_torch_load(original):
    @functools.wraps(original)
    def torch_load(filename, *args, **kwargs):
        if not _is_ftn_file(filename):
            return original(filename, *args, **kwargs)
        try:
            return original(filename, *args, **kwargs)
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as err:
            raise _corrupt(filename, err) from err

    torch_load._ftn_checked = True
    return torch_load


# --- adapter_config.json --------------------------------------------------------------------------------
def _checked_from_json_file(original):
    @functools.wraps(original)
    def from_json_file(cls, path_json_file, **kwargs):
        try:
            with open(path_json_file) as f:
                content = json.load(f)
        except json.JSONDecodeError as err:
            exc = _ConfigJSONError(err.msg, err.doc, err.pos)
            exc.args = (
                f"{path_json_file} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); it is "
                "truncated or was edited by hand. Save the adapter again or fix the file.",
            )
            raise exc from err
        except UnicodeDecodeError as err:
            raise AdapterConfigError(f"{path_json_file} is not UTF-8 text ({err}); it is not an adapter config") from err
        if not isinstance(content, dict):
            raise AdapterConfigError(f"{path_json_file} holds a JSON {type(content).__name__}, not an object of fields")
        if "peft_type" in content:
            _check_peft_type(path_json_file, content["peft_type"])
        if content.get("peft_type") == FTN_PEFT_TYPE.value:
            _check_ftn_fields(path_json_file, content)
        return original(cls, path_json_file, **kwargs)

    from_json_file._ftn_checked = True
    return from_json_file


def _check_peft_type(path, peft_type) -> None:
    from .compat import PEFT_TYPE_TO_CONFIG_MAPPING

    if isinstance(peft_type, str) and peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    known = sorted(str(getattr(k, "value", k)) for k in PEFT_TYPE_TO_CONFIG_MAPPING)
    raise _PeftTypeError(
        f"{path}: peft_type={peft_type!r} is not a registered PEFT method (known: {', '.join(known)}); fix the "
        "field, or import the package that registers the method (for FTN: import ftn_peft)"
    )


def _check_ftn_fields(path, content: dict) -> None:
    from .config import FTNConfig

    hints = typing.get_type_hints(FTNConfig)
    fields = {f.name for f in dataclasses.fields(FTNConfig) if f.init}
    for name, value in content.items():
        if name in fields and name != "peft_type" and not _matches(value, hints[name]):
            raise AdapterConfigError(f"{path}: field {name!r} = {value!r} is not a valid {_type_name(hints[name])}")
        bad = _non_finite(value)
        if bad is not None:
            raise AdapterConfigError(f"{path}: field {name!r} holds the non-finite number {bad}")
    if content.get("target_modules") is None:
        raise AdapterConfigError(
            f"{path}: field 'target_modules' is missing or null, so the adapter fits no layer; save the adapter again"
        )
    try:
        FTNConfig(**{k: v for k, v in content.items() if k in fields})
    except (ValueError, TypeError) as err:
        raise AdapterConfigError(f"{path}: {err}") from err


def _non_finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return value
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((bad for v in children if (bad := _non_finite(v)) is not None), None)


def _matches(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if origin in (list, set) or hint in (list, set):
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value) if args else isinstance(value, list)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str or (isinstance(hint, type) and issubclass(hint, Enum)):
        return isinstance(value, str)
    return True


def _type_name(hint) -> str:
    return str(hint).replace("typing.", "").replace("NoneType", "None")


def _local_config_file(model_id, subfolder=None):
    path = os.path.join(model_id, subfolder) if subfolder is not None else model_id
    config_file = os.path.join(os.fspath(path), CONFIG_NAME)
    return config_file if os.path.isfile(config_file) else None


def _checked_get_peft_type(original):
    @functools.wraps(original)
    def _get_peft_type(cls, model_id, **hf_hub_download_kwargs):
        config_file = _local_config_file(model_id, hf_hub_download_kwargs.get("subfolder"))
        if config_file is not None:
            content = PeftConfig.from_json_file(config_file)
            if "peft_type" not in content:
                raise _PeftTypeError(
                    f"{config_file} has no field 'peft_type', so it does not say which PEFT method saved it; "
                    "save the adapter again (for FTN: \"peft_type\": \"FTN\")"
                )
            if content["peft_type"] == FTN_PEFT_TYPE.value:
                folder = os.path.dirname(config_file)
                if not any(os.path.isfile(os.path.join(folder, w)) for w in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)):
                    raise AdapterConfigError(
                        f"{folder} holds {CONFIG_NAME} but no weights ({SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME}): "
                        "the save did not finish or the file was removed; save the adapter again"
                    )
        return original(cls, model_id, **hf_hub_download_kwargs)

    _get_peft_type._ftn_checked = True
    return _get_peft_type


def _ftn_config_file(model_id, subfolder=None):
    """The local adapter_config.json of an FTN adapter, or None (Hub ids and other methods are left to PEFT)."""
    config_file = _local_config_file(model_id, subfolder)
    if config_file is None or PeftConfig.from_json_file(config_file).get("peft_type") != FTN_PEFT_TYPE.value:
        return None
    return config_file


@contextmanager
def _naming(config_file):
    """Name the adapter file in a plain ValueError from PEFT (e.g. target_modules that match no layer)."""
    try:
        yield
    except AdapterLoadError:
        raise
    except ValueError as err:
        if config_file is None:
            raise
        raise AdapterLoadError(f"{config_file}: {err}") from err


def _checked_from_pretrained(original):
    @functools.wraps(original)
    def from_pretrained(cls, model, model_id, *args, **kwargs):
        config = args[2] if len(args) > 2 else kwargs.get("config")  # after adapter_name, is_trainable
        config_file = _ftn_config_file(model_id, kwargs.get("subfolder")) if config is None else None
        if config_file is not None:
            _check_task_type(model, config_file)
        with _naming(config_file):
            return original(cls, model, model_id, *args, **kwargs)

    from_pretrained._ftn_checked = True
    return from_pretrained


def _rolled_back_load_adapter(original):
    @functools.wraps(original)
    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        new = adapter_name not in self.peft_config
        token = _source.set(_weights_file(model_id, kwargs.get("subfolder")))
        try:
            with _naming(_ftn_config_file(model_id, kwargs.get("subfolder"))):
                return original(self, model_id, adapter_name, *args, **kwargs)
        except Exception:
            # PEFT adds the adapter before reading its weights; a refused FTN load takes it out again
            if new and getattr(self.peft_config.get(adapter_name), "peft_type", None) == FTN_PEFT_TYPE:
                self.delete_adapter(adapter_name)
            elif new and adapter_name not in self.peft_config:
                # add_adapter failed after FTN had given the adapter its task BatchNorms and head; PEFT already
                # dropped the config, so the per-layer entries go the same way delete_adapter removes them
                delete_layers(self.base_model.model, adapter_name, prefix=PREFIX, layer_cls=FTNTunerLayer)
            raise
        finally:
            _source.reset(token)

    load_adapter._ftn_checked = True
    return load_adapter


def _weights_file(model_id, subfolder=None) -> str:
    folder = os.path.join(os.fspath(model_id), subfolder) if subfolder is not None else os.fspath(model_id)
    for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return folder


def _check_task_type(model, config_file) -> None:
    from .compat import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

    task_type = PeftConfig.from_json_file(config_file).get("task_type")
    if task_type in MODEL_TYPE_TO_PEFT_MODEL_MAPPING and getattr(model, "config", None) is None:
        raise AdapterConfigError(
            f"{config_file}: task_type={task_type!r} needs a transformers model (PEFT's "
            f"{MODEL_TYPE_TO_PEFT_MODEL_MAPPING[task_type].__name__} reads model.config), but the base model is a "
            f"{type(model).__name__} without .config; set \"task_type\": null in the file to load it into this model"
        )


def _wrap_classmethod(cls, name: str, wrapper) -> None:
    owner = next(c for c in cls.__mro__ if name in c.__dict__)  # wrap where PEFT defines it, for every subclass
    current = owner.__dict__[name]
    if not getattr(current.__func__, "_ftn_checked", False):
        setattr(owner, name, classmethod(wrapper(current.__func__)))


def install() -> None:
    """Hook PEFT's config and weight readers; idempotent. Non-FTN adapters load exactly as without ftn_peft."""
    _wrap_classmethod(PeftConfig, "from_json_file", _checked_from_json_file)
    _wrap_classmethod(PeftConfig, "_get_peft_type", _checked_get_peft_type)
    _wrap_classmethod(PeftModel, "from_pretrained", _checked_from_pretrained)
    if not getattr(PeftModel.load_adapter, "_ftn_checked", False):
        PeftModel.load_adapter = _rolled_back_load_adapter(PeftModel.load_adapter)
    if not getattr(peft_model.set_peft_model_state_dict, "_ftn_checked", False):
        peft_model.set_peft_model_state_dict = _checked_set_state_dict(peft_model.set_peft_model_state_dict)
    if not getattr(save_and_load.safe_load_file, "_ftn_checked", False):
        save_and_load.safe_load_file = _checked_safe_load(save_and_load.safe_load_file)
    if not getattr(save_and_load.torch_load, "_ftn_checked", False):
        save_and_load.torch_load = _checked_torch_load(save_and_load.torch_load)
