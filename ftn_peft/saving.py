"""Atomic saves and Hub tags for FTN adapters (the load side is in loading.py).

PEFT writes adapter files in place, so a save that dies half-way can leave a directory whose config points at a
truncated weight file. For models holding an FTN adapter, `PeftModel.save_pretrained` is wrapped: PEFT writes into a
temporary sibling directory, each file is flushed to disk, the old configs are removed, the weight files are moved into
place with `os.replace`, and the configs are moved last. A directory therefore loads only once every file is whole.
Other files in the target directory (a Trainer checkpoint's optimizer state, other adapters) are left alone.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile

from huggingface_hub import ModelCard
from peft import PeftModel
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

from .loading import CorruptAdapterFileError, seal  # noqa: F401  (CorruptAdapterFileError: re-exported)
from .peft_type import FTN_PEFT_TYPE

FTN_TAGS = ("ftn", "factorized-tensor-network", "peft")
_CARD = "README.md"


def _has_ftn(model: PeftModel) -> bool:
    return any(getattr(c, "peft_type", None) == FTN_PEFT_TYPE for c in model.peft_config.values())


def _fsync_tree(root: str) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())


def _add_tags(directory: str) -> None:
    path = os.path.join(directory, _CARD)
    if not os.path.exists(path):
        return
    card = ModelCard.load(path)
    card.data.tags = sorted(set(card.data.tags or []) | set(FTN_TAGS))
    card.save(path)


def _move_into_place(tmp: str, target: str) -> None:
    files = [os.path.relpath(os.path.join(d, f), tmp) for d, _, fs in os.walk(tmp) for f in fs]
    configs = [f for f in files if os.path.basename(f) == CONFIG_NAME]
    # Unpublish the old adapters first: between here and the last os.replace, no adapter in target loads.
    for rel in configs:
        old = os.path.join(target, rel)
        if os.path.exists(old):
            os.remove(old)
    for rel in [f for f in files if f not in configs] + configs:
        destination = os.path.join(target, rel)
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        os.replace(os.path.join(tmp, rel), destination)


def atomic_save_pretrained(original):
    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, **kwargs):
        if not _has_ftn(self) or not kwargs.get("is_main_process", True):
            return original(self, save_directory, *args, **kwargs)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file; pass a directory")
        save_directory = os.path.abspath(save_directory)
        parent = os.path.dirname(save_directory)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(save_directory)}.tmp-", dir=parent)
        try:
            original(self, tmp, *args, **kwargs)
            _add_tags(tmp)
            for folder, _, names in os.walk(tmp):
                if SAFETENSORS_WEIGHTS_NAME in names:
                    seal(os.path.join(folder, SAFETENSORS_WEIGHTS_NAME))
            _fsync_tree(tmp)
            os.makedirs(save_directory, exist_ok=True)
            _move_into_place(tmp, save_directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    save_pretrained._ftn_atomic = True
    return save_pretrained


def install() -> None:
    """Wrap PEFT's adapter save (atomic for FTN models); the load side lives in loading.py."""
    if not getattr(PeftModel.save_pretrained, "_ftn_atomic", False):
        PeftModel.save_pretrained = atomic_save_pretrained(PeftModel.save_pretrained)
