"""Resumable training state saved as safetensors + JSON: loading a checkpoint can never run code.

A pickle (`torch.save`, `torch.load(weights_only=False)`) runs whatever its `__reduce__` says when it is loaded,
so a checkpoint planted in an output directory would run on `--resume_from_checkpoint latest`. Here every tensor
of the state (adapter weights, optimizer moments, scheduler values) goes into one safetensors file and the
structure around them (dicts, lists, numbers, strings) into a JSON file that names that tensor file. Neither
format can hold code.

The JSON file is the commit point: it is written last, atomically, and names its tensor file
(`checkpoint-<n>.safetensors`), so a kill at any moment leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

POINTER = "checkpoint.json"
LEGACY_PICKLE = "checkpoint.pt"
FORMAT = "ftn_peft-checkpoint-v1"


class UnsafeCheckpointError(ValueError):
    """A checkpoint in a format that can run code when loaded (a pickle) was refused."""


def _encode(obj: Any, tensors: dict, key: str, where: str) -> Any:
    # Tagged JSON: dict keys keep their type (optimizer states are keyed by int), tuples stay tuples.
    # `key` (positions) names tensors uniquely; `where` (dict keys) names a location for error messages.
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().clone()  # a copy: safetensors refuses tensors sharing memory
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_encode(k, tensors, f"{key}.k{i}", f"{where} key"),
                              _encode(v, tensors, f"{key}.{i}", f"{where}[{k!r}]")]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, tensors, f"{key}.{i}", f"{where}[{i}]") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {where} in a checkpoint: only tensors, dicts, lists, "
                    "tuples, numbers, strings and None (convert it to one of these first)")


def _decode(obj: Any, tensors: dict) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
    return obj


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(state: dict, directory, tag: int) -> Path:
    """Write `state` into `directory` as checkpoint-<tag>.safetensors + checkpoint.json; older tensor files go."""
    directory = Path(directory)
    tensors: dict = {}
    structure = _encode(state, tensors, "s", "state")
    weights = directory / f"checkpoint-{tag}.safetensors"
    _write_atomically(weights, lambda p: save_file(tensors, p))
    document = json.dumps({"format": FORMAT, "tensors": weights.name, "state": structure})
    _write_atomically(directory / POINTER, lambda p: Path(p).write_text(document))
    for old in directory.glob("checkpoint-*.safetensors"):
        if old != weights:
            old.unlink()
    return directory / POINTER


def find_checkpoint(directory) -> Path | None:
    """The checkpoint.json in `directory`, None if there is none; a pickle checkpoint there is refused."""
    directory = Path(directory)
    if (directory / POINTER).exists():
        return directory / POINTER
    if (directory / LEGACY_PICKLE).exists():
        _refuse_pickle(directory / LEGACY_PICKLE)
    return None


def _refuse_pickle(path: Path) -> None:
    raise UnsafeCheckpointError(
        f"{path} is a pickle checkpoint; it is not loaded, because unpickling a file can run any code in it. "
        f"Checkpoints are now {POINTER} + safetensors: delete {path} and start the run again, or pass the "
        f"{POINTER} of a checkpoint written by this version"
    )


def load_checkpoint(path) -> dict:
    """The state saved by `save_checkpoint`, read from its checkpoint.json (or the directory holding it)."""
    path = Path(path)
    if path.is_dir():
        found = find_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no {POINTER} in {path}")
        path = found
    if path.suffix != ".json":
        _refuse_pickle(path)
    try:
        document = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a checkpoint written by this script (not JSON: {e})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"{path} is not a checkpoint written by this script (no \"format\": \"{FORMAT}\")")
    weights = path.parent / Path(document["tensors"]).name  # never outside the checkpoint's directory
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights} (named by {path}) is missing or not a safetensors file: {e}; "
                         "delete the checkpoint and start the run again") from None
    return _decode(document["state"], tensors)
