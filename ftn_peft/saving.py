"""Crash-safe saves and Hub tags for FTN adapters; PEFT's own save for every other method (loads: loading.py).

PEFT writes adapter files in place, so a save that dies half-way can leave a directory whose config points at a
truncated weight file. For a model holding an FTN adapter, `PeftModel.save_pretrained` instead builds the complete
new directory as a hidden sibling and swaps it in:

1. leftovers of earlier interrupted saves of this directory are removed, and the directory is created if missing;
2. the existing model card is copied into the sibling, so PEFT updates the user's card instead of writing a new one;
3. PEFT saves into the sibling, and the card gets the FTN tags;
4. every file already in the target that the save did not write (a Trainer's optimizer state, other adapters) is
   hard-linked into the sibling, so it survives unchanged;
5. files and folders are fsynced, then the two directories are exchanged with one `renameat2(RENAME_EXCHANGE)`
   (Linux); the sibling now holds the old tree, which is removed.

A process killed at any moment leaves the old or the new directory, each complete (tests/test_atomic_save.py kills
a save at every step and at random times). Where the exchange is not available (other systems, some network
filesystems) the target is renamed aside and the new tree renamed in: a kill between those two renames leaves no
directory at the path, with the old one intact beside it, and the next save of that path puts it back first. Where
the target itself cannot be renamed (a mount point), files are replaced one by one, weights before configs; each file
is whole, but a kill between files can leave an adapter whose config is older than its weights.

Models without an FTN adapter go straight to PEFT's own `save_pretrained`: the wrapper calls it with the same
arguments before doing anything else.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import shutil
import sys
import uuid
from typing import Callable, Optional

from huggingface_hub import ModelCard
from peft import PeftModel
from .compat import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from .loading import CorruptAdapterFileError, seal  # noqa: F401  (CorruptAdapterFileError: re-exported)
from .peft_type import FTN_PEFT_TYPE

FTN_TAGS = ("ftn", "factorized-tensor-network", "peft")
_CARD = "README.md"
# `.<name>.tmp-<hex>` (this version; `-old` marks a displaced old tree) or `.<name>.tmp-<8 chars>` (older versions).
_LEFTOVER = re.compile(r"^\..+\.tmp-(?:[0-9a-f]{32}(?:-old)?|[a-z0-9_]{8})$")

# Test hook: called with the name of each step of a save (tests kill the process there).
_on_step: Optional[Callable[[str], None]] = None


def _step(name: str) -> None:
    if _on_step is not None:
        _on_step(name)


def is_leftover(name: str) -> bool:
    """Whether a file name is a temporary folder of an interrupted save (never an adapter; safe to delete)."""
    return bool(_LEFTOVER.match(name))


def _has_ftn(model: PeftModel) -> bool:
    return any(getattr(c, "peft_type", None) == FTN_PEFT_TYPE for c in model.peft_config.values())


def _leftovers(target: str) -> list[str]:
    parent, prefix = os.path.dirname(target), f".{os.path.basename(target)}.tmp-"
    if not os.path.isdir(parent):
        return []
    return sorted(os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(prefix) and is_leftover(n))


def _clean_leftovers(target: str) -> None:
    """Remove what interrupted saves of `target` left; first put back an old tree that a kill left displaced."""
    leftovers = _leftovers(target)
    displaced = [p for p in leftovers if p.endswith("-old")]
    if displaced and not os.path.lexists(target):
        os.rename(displaced[0], target)
        leftovers.remove(displaced[0])
    for path in leftovers:
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


def _copy_card(target: str, staging: str) -> set:
    old = os.path.join(target, _CARD)
    if not os.path.isfile(old):
        return set()
    shutil.copy2(old, os.path.join(staging, _CARD))  # a copy, not a link: PEFT rewrites the card in place
    return set(ModelCard.load(old).data.tags or [])


def _add_tags(staging: str, user_tags: set) -> None:
    path = os.path.join(staging, _CARD)
    if not os.path.exists(path):
        return
    card = ModelCard.load(path)
    # PEFT replaces the card's tags with its own; the user's tags are kept too.
    card.data.tags = sorted(set(card.data.tags or []) | user_tags | set(FTN_TAGS))
    card.save(path)


def _files(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _link_unwritten(target: str, staging: str) -> None:
    """Hard-link into `staging` every file of `target` that the save did not write (copy where links fail)."""
    for folder, dirs, files in os.walk(target):
        rel = os.path.relpath(folder, target)
        dest_folder = os.path.normpath(os.path.join(staging, rel))
        if os.path.lexists(dest_folder) and not os.path.isdir(dest_folder):
            dirs[:] = []  # the save wrote a file where the target had a folder: the save's file wins
            continue
        os.makedirs(dest_folder, exist_ok=True)
        shutil.copymode(folder, dest_folder)
        for name in list(dirs) + files:
            src, dest = os.path.join(folder, name), os.path.join(dest_folder, name)
            if os.path.islink(src):
                if name in dirs:
                    dirs.remove(name)
                if not os.path.lexists(dest):
                    os.symlink(os.readlink(src), dest)
            elif name in files and not os.path.lexists(dest):
                _step("link")
                try:
                    os.link(src, dest)
                except OSError:
                    shutil.copy2(src, dest)


def _fsync_tree(root: str) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(folder)


def _fsync_dir(path: str) -> None:
    if os.name != "posix":
        return  # folders cannot be opened for fsync on Windows
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one syscall; False where the system or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False  # libc without renameat2 (glibc < 2.28)
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EXDEV, errno.EBUSY, errno.EPERM):
        return False  # kernel or filesystem without the flag, or a target that cannot move (a mount point)
    raise OSError(code, os.strerror(code), a, None, b)


def _swap_by_renames(target: str, staging: str) -> bool:
    """Rename the target aside and the new tree in; False if the target cannot be renamed (a mount point)."""
    displaced = staging + "-old"
    try:
        os.rename(target, displaced)
    except OSError:
        return False
    _step("displaced")
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(displaced, target)
        raise
    os.rename(displaced, staging)  # so the caller removes the old tree where it removes it after an exchange
    return True


def _replace_files(target: str, staging: str, written: list[str]) -> None:
    """Last resort: replace the written files one by one, weights before configs, the card last."""
    def order(rel):
        return (rel == _CARD, os.path.basename(rel) == CONFIG_NAME)

    for rel in sorted(written, key=order):
        os.makedirs(os.path.dirname(os.path.join(target, rel)), exist_ok=True)
        os.replace(os.path.join(staging, rel), os.path.join(target, rel))
        _step("replaced")


def _cwd_inside(target: str) -> Optional[str]:
    """The working directory if it is in `target`: after the swap it would be in the old tree, deleted next."""
    try:
        cwd = os.getcwd()
    except FileNotFoundError:
        return None
    return cwd if cwd == target or cwd.startswith(target + os.sep) else None


def _save_atomically(save, model, target: str, args, kwargs) -> None:
    parent = os.path.dirname(target)
    _clean_leftovers(target)
    # Created up front (as PEFT does) so there is always a tree to exchange with, even if other ranks of a
    # distributed job create its folders meanwhile (PEFT's save does that on non-main processes).
    os.makedirs(target, exist_ok=True)
    _step("cleaned")
    staging = os.path.join(parent, f".{os.path.basename(target)}.tmp-{uuid.uuid4().hex}")
    try:
        os.mkdir(staging)  # mode 0o777 & ~umask, as a directory PEFT would create
    except PermissionError as err:
        raise PermissionError(
            f"cannot create {staging!r}: a crash-safe save builds the new adapter beside {target!r}, so its parent "
            "folder must be writable; make it writable or save into a folder whose parent is"
        ) from err
    try:
        user_tags = _copy_card(target, staging)
        _step("card")
        save(model, staging, *args, **kwargs)
        _step("written")
        _add_tags(staging, user_tags)
        for folder, _, names in os.walk(staging):
            if SAFETENSORS_WEIGHTS_NAME in names:
                seal(os.path.join(folder, SAFETENSORS_WEIGHTS_NAME))
        _step("tagged")
        written = _files(staging)
        _link_unwritten(target, staging)
        shutil.copymode(target, staging)
        _step("linked")
        _fsync_tree(staging)
        _step("synced")
        cwd = _cwd_inside(target)
        if not (_exchange(target, staging) or _swap_by_renames(target, staging)):
            _replace_files(target, staging, written)
        _step("swapped")
        if cwd is not None:
            os.chdir(cwd if os.path.isdir(cwd) else target)
        _fsync_dir(parent)
        _step("published")
    finally:
        if os.path.lexists(staging):
            shutil.rmtree(staging, ignore_errors=True)
    _step("removed")


def atomic_save_pretrained(original):
    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, **kwargs):
        if not _has_ftn(self) or not kwargs.get("is_main_process", True):
            return original(self, save_directory, *args, **kwargs)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory={str(save_directory)!r} is a file; pass a directory")
        _save_atomically(original, self, os.path.realpath(save_directory), args, kwargs)

    save_pretrained._ftn_atomic = True
    return save_pretrained


def install() -> None:
    """Wrap `PeftModel.save_pretrained`: crash-safe for FTN models, PEFT's own call for any other model."""
    if not getattr(PeftModel.save_pretrained, "_ftn_atomic", False):
        PeftModel.save_pretrained = atomic_save_pretrained(PeftModel.save_pretrained)

