"""Behavioural tests that kill mutants of saving.py (see docs/mutation.md).

Each test checks what a user sees (the files on disk after a save, what loads back), not how it is computed. The
fallback paths of the crash-safe save (rename aside, file by file) run in a fresh interpreter in
tests/test_atomic_save.py, which mutation testing cannot see; here they run in this process.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from peft import PeftModel, get_peft_model

import ftn_peft
from ftn_peft import saving

from conftest import tiny_timm_resnet

USER_FILE = "optimizer.pt"


def _model():
    return get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=1))


def _bump(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)


def _first_factor(model):
    return model.base_model.model.layer1[0].conv1.ftn_a["default"].detach().clone()


def _saved_twice(model, target, images):
    """Save, add a file of the user's, change the adapter, save again; the expected output of the second save."""
    model.save_pretrained(target)
    (target / USER_FILE).write_bytes(b"state")
    (target / "logs").mkdir()
    (target / "logs" / "run.txt").write_text("epoch 1")
    _bump(model)
    model.eval()
    expected = model(images).detach()
    model.save_pretrained(target)
    return expected


def _check_second_save(model, target, images, expected):
    assert (target / USER_FILE).read_bytes() == b"state"  # files the save does not write survive
    assert (target / "logs" / "run.txt").read_text() == "epoch 1"
    assert sorted(os.listdir(target.parent)) == [target.name]  # no staging or displaced tree left beside it
    loaded = PeftModel.from_pretrained(tiny_timm_resnet(), target).eval()
    assert torch.equal(_first_factor(loaded), _first_factor(model))
    torch.testing.assert_close(loaded(images), expected)


def test_save_by_renames_where_the_exchange_is_unavailable(tmp_path, images, monkeypatch):
    monkeypatch.setattr(saving, "_exchange", lambda a, b: False)
    model = _model()
    target = tmp_path / "adapter"
    expected = _saved_twice(model, target, images)
    _check_second_save(model, target, images, expected)


def test_save_file_by_file_where_the_target_cannot_move(tmp_path, images, monkeypatch):
    monkeypatch.setattr(saving, "_exchange", lambda a, b: False)
    monkeypatch.setattr(saving, "_swap_by_renames", lambda target, staging: False)
    replaced = []
    real_replace = os.replace

    def recording_replace(src, dest):
        replaced.append(os.path.relpath(dest, tmp_path / "adapter"))
        real_replace(src, dest)

    model = _model()
    target = tmp_path / "adapter"
    model.save_pretrained(target)
    model.add_adapter("second", ftn_peft.presets.resnet(r=1))
    (target / USER_FILE).write_bytes(b"state")
    (target / "logs").mkdir()
    (target / "logs" / "run.txt").write_text("epoch 1")
    _bump(model)
    model.eval()
    expected = model(images).detach()
    monkeypatch.setattr(os, "replace", recording_replace)
    steps = []
    monkeypatch.setattr(saving, "_on_step", steps.append)
    model.save_pretrained(target)
    monkeypatch.undo()
    assert steps.count("replaced") == len(replaced)  # a kill point after each file
    _check_second_save(model, target, images, expected)
    # the second adapter's subfolder is created in the target; weights first, then configs, the card last
    assert (target / "second" / "adapter_config.json").is_file()
    assert replaced[-1] == "README.md"
    configs = [i for i, rel in enumerate(replaced) if rel.endswith("adapter_config.json")]
    weights = [i for i, rel in enumerate(replaced) if rel.endswith(".safetensors")]
    assert len(configs) == len(weights) == 2 and max(weights) < min(configs)


def test_a_save_killed_between_the_renames_is_repaired_by_the_next_save(tmp_path, images, monkeypatch):
    monkeypatch.setattr(saving, "_exchange", lambda a, b: False)
    model = _model()
    target = tmp_path / "adapter"
    model.save_pretrained(target)
    (target / USER_FILE).write_bytes(b"state")

    def die(step):
        if step == "displaced":
            raise KeyboardInterrupt  # stands in for the process being killed right there

    monkeypatch.setattr(saving, "_on_step", die)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(target)
    # the old tree waits beside the path, complete, under the name the next save looks for
    assert not target.exists()
    (displaced,) = os.listdir(tmp_path)
    assert saving.is_leftover(displaced) and displaced.endswith("-old")
    assert (tmp_path / displaced / USER_FILE).read_bytes() == b"state"
    monkeypatch.setattr(saving, "_on_step", None)
    model.save_pretrained(target)
    assert (target / USER_FILE).read_bytes() == b"state"  # put back, then saved over
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    PeftModel.from_pretrained(tiny_timm_resnet(), target)


def test_a_failed_rename_in_puts_the_old_tree_back(tmp_path, monkeypatch):
    monkeypatch.setattr(saving, "_exchange", lambda a, b: False)
    model = _model()
    target = tmp_path / "adapter"
    model.save_pretrained(target)
    weights = (target / "adapter_model.safetensors").read_bytes()
    real_rename = os.rename

    def failing_rename(src, dest):
        if os.path.basename(src).startswith(".adapter.tmp-") and not src.endswith("-old"):
            raise OSError("rename refused")
        real_rename(src, dest)

    monkeypatch.setattr(os, "rename", failing_rename)
    _bump(model)
    with pytest.raises(OSError, match="rename refused"):
        model.save_pretrained(target)
    monkeypatch.undo()
    assert (target / "adapter_model.safetensors").read_bytes() == weights
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_install_wraps_peft_save_once(monkeypatch):
    calls = []

    def plain_save(self, save_directory, **kwargs):
        calls.append(save_directory)

    monkeypatch.setattr(PeftModel, "save_pretrained", plain_save)
    saving.install()
    wrapped = PeftModel.save_pretrained
    assert wrapped is not plain_save and wrapped._ftn_atomic and wrapped.__wrapped__ is plain_save
    saving.install()
    assert PeftModel.save_pretrained is wrapped  # a second install does not wrap the wrapper


def test_non_main_process_and_other_methods_go_straight_to_peft(tmp_path):
    calls = []

    def plain_save(self, save_directory, *args, **kwargs):
        calls.append((save_directory, args, kwargs))

    save = saving.atomic_save_pretrained(plain_save)
    model = _model()
    save(model, str(tmp_path / "a"), "pos", is_main_process=False)
    assert calls == [(str(tmp_path / "a"), ("pos",), {"is_main_process": False})]
    assert os.listdir(tmp_path) == []  # nothing created: the call was PEFT's alone
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file; pass a directory"):
        save(model, str(tmp_path / "file"))


def test_a_lora_model_goes_straight_to_peft(tmp_path):
    from peft import LoraConfig

    calls = []
    save = saving.atomic_save_pretrained(lambda self, d, *a, **k: calls.append(d))
    lora = get_peft_model(tiny_timm_resnet(), LoraConfig(target_modules=["fc"]))
    save(lora, str(tmp_path / "lora"))
    assert calls == [str(tmp_path / "lora")] and os.listdir(tmp_path) == []


def test_the_target_path_always_holds_a_directory_during_a_save_on_linux(tmp_path, monkeypatch):
    if not hasattr(os, "sched_getaffinity"):  # Linux: the exchange is one renameat2 call
        pytest.skip("renameat2 exchange is Linux-only")
    model = _model()
    target = tmp_path / "adapter"
    model.save_pretrained(target)
    missing = []
    monkeypatch.setattr(saving, "_on_step", lambda step: missing.append(step) if not target.is_dir() else None)
    model.save_pretrained(target)
    assert missing == []  # no step of the save sees the path without a directory (renames would: "displaced")


def test_a_failed_exchange_raises_the_os_error(tmp_path):
    (tmp_path / "a").mkdir()
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("renameat2 exchange is Linux-only")
    with pytest.raises(FileNotFoundError) as info:
        saving._exchange(str(tmp_path / "a"), str(tmp_path / "missing"))
    assert (info.value.filename, info.value.filename2) == (str(tmp_path / "a"), str(tmp_path / "missing"))
    assert info.value.strerror == os.strerror(info.value.errno)
    (tmp_path / "a" / "b").mkdir()  # the kernel refuses (EINVAL) to swap a folder with its own subfolder: no exchange
    assert saving._exchange(str(tmp_path / "a"), str(tmp_path / "a" / "b")) is False
    assert (tmp_path / "a" / "b").is_dir()
    assert saving._exchange(str(tmp_path / "a"), str(tmp_path / "a")) is True  # swapping a path with itself


def test_only_this_targets_leftovers_are_removed(tmp_path):
    model = _model()
    target = tmp_path / "adapter"
    hexname = "0123456789abcdef0123456789abcdef"
    (tmp_path / f".adapter.tmp-{hexname}").mkdir()  # an interrupted save's folder
    (tmp_path / f".adapter.tmp-{hexname}" / "adapter_config.json").write_text("{}")
    (tmp_path / f".adapter.tmp-{hexname[::-1]}").write_text("partial")  # a leftover that is a file
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep.txt").write_text("keep")
    (tmp_path / ".adapter.tmp-abcdefgh").symlink_to(tmp_path / "elsewhere")  # an older version's name, a link
    kept = [f".other.tmp-{hexname}", ".adapter.tmp-my-notes"]  # another adapter's save; not a leftover name
    for name in kept:
        (tmp_path / name).write_text("mine")
    model.save_pretrained(target)
    assert sorted(os.listdir(tmp_path)) == sorted(["adapter", "elsewhere", *kept])
    assert (tmp_path / "elsewhere" / "keep.txt").read_text() == "keep"  # the link went, not what it points to


def test_a_target_that_cannot_be_renamed_is_updated_file_by_file(tmp_path, images, monkeypatch):
    import errno

    monkeypatch.setattr(saving, "_exchange", lambda a, b: False)
    model = _model()
    target = tmp_path / "adapter"
    model.save_pretrained(target)
    real_rename = os.rename

    def busy_target(src, dest):
        if os.path.abspath(src) == str(target.resolve()):
            raise OSError(errno.EBUSY, "a mount point")
        real_rename(src, dest)

    monkeypatch.setattr(os, "rename", busy_target)
    _bump(model)
    model.save_pretrained(target)
    monkeypatch.undo()
    loaded = PeftModel.from_pretrained(tiny_timm_resnet(), target)
    assert torch.equal(_first_factor(loaded), _first_factor(model))
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_the_users_links_are_kept_as_links_and_the_saves_file_wins_over_a_folder(tmp_path):
    model = _model()
    target = tmp_path / "adapter"
    model.save_pretrained(target)
    (target / USER_FILE).write_bytes(b"state")
    (target / "latest").symlink_to(USER_FILE)  # a relative link to a file
    for name in ("a_logs", "m_logs", "z_logs"):  # folders walked before and after the clash below
        (target / name).mkdir()
        (target / name / "run.txt").write_text(name)
    (target / "current").symlink_to("m_logs", target_is_directory=True)  # a link to a folder: not walked
    clash = target / "adapter_model.safetensors"  # where the new save writes a file, the target has a folder
    clash.unlink()
    (clash / "sub").mkdir(parents=True)
    (clash / "sub" / "stale.txt").write_text("old")
    _bump(model)
    model.save_pretrained(target)
    assert os.readlink(target / "latest") == USER_FILE and (target / "latest").read_bytes() == b"state"
    assert os.readlink(target / "current") == "m_logs"
    for name in ("a_logs", "m_logs", "z_logs"):
        assert (target / name / "run.txt").read_text() == name
    assert clash.is_file()  # the save's file, which loads
    loaded = PeftModel.from_pretrained(tiny_timm_resnet(), target)
    assert torch.equal(_first_factor(loaded), _first_factor(model))
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_a_save_reports_its_steps_in_order(tmp_path, monkeypatch):
    """The step names are the kill points of tests/test_atomic_save.py (a fresh process, unseen by mutmut)."""
    model = _model()
    target = tmp_path / "adapter"
    model.save_pretrained(target)
    (target / USER_FILE).write_bytes(b"state")
    steps = []
    monkeypatch.setattr(saving, "_on_step", steps.append)
    model.save_pretrained(target)
    assert steps == ["cleaned", "card", "written", "tagged", "link", "linked", "synced", "swapped", "published",
                     "removed"]


def test_every_file_and_folder_of_the_new_tree_is_fsynced(tmp_path, monkeypatch):
    model = _model()
    target = tmp_path / "adapter"
    model.save_pretrained(target)
    (target / "logs").mkdir()
    (target / "logs" / "run.txt").write_text("epoch 1")
    synced = set()
    real_fsync = os.fsync

    def recording_fsync(fd):
        st = os.fstat(fd)
        synced.add((st.st_dev, st.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    model.save_pretrained(target)
    monkeypatch.undo()
    paths = [tmp_path, target, *target.rglob("*")]  # the new tree, now at the target, and the parent folder
    assert len(paths) == 7
    for path in paths:
        st = path.stat()
        assert (st.st_dev, st.st_ino) in synced, path


def test_a_file_that_cannot_be_hard_linked_is_copied(tmp_path, monkeypatch):
    model = _model()
    target = tmp_path / "adapter"
    model.save_pretrained(target)
    (target / USER_FILE).write_bytes(b"state")

    def no_links(src, dest):
        raise OSError(1, "links not supported here")

    monkeypatch.setattr(os, "link", no_links)
    model.save_pretrained(target)
    assert (target / USER_FILE).read_bytes() == b"state"
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_a_read_only_parent_folder_is_named_with_the_fix(tmp_path, monkeypatch):
    model = _model()
    target = tmp_path / "adapter"
    target.mkdir()

    def refused(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "mkdir", refused)  # as in a read-only parent (chmod does not stop root)
    with pytest.raises(PermissionError) as info:
        model.save_pretrained(target)
    staging = re.fullmatch(r"cannot create '(.*)': .*", str(info.value)).group(1)
    assert os.path.dirname(staging) == str(tmp_path) and saving.is_leftover(os.path.basename(staging))
    assert str(info.value).endswith(
        f": a crash-safe save builds the new adapter beside {str(target)!r}, so its parent folder must be writable; "
        "make it writable or save into a folder whose parent is"
    )
    assert isinstance(info.value.__cause__, PermissionError)


def test_save_arguments_reach_peft_by_position_and_by_keyword(tmp_path):
    model = _model()
    model.add_adapter("b", ftn_peft.presets.resnet(r=1))
    model.save_pretrained(tmp_path / "positional", True, ["b"])  # safe_serialization, selected_adapters
    model.save_pretrained(tmp_path / "keyword", selected_adapters=["b"])
    for name in ("positional", "keyword"):
        assert sorted(os.listdir(tmp_path / name)) == ["README.md", "b"]  # only adapter "b", in its subfolder


def test_a_working_directory_inside_the_target_follows_the_new_tree(tmp_path, monkeypatch):
    model = _model()
    target = tmp_path / "adapter"
    model.save_pretrained(target)
    (target / "logs").mkdir()
    monkeypatch.chdir(target / "logs")
    model.save_pretrained(target)
    assert os.getcwd() == str((target / "logs").resolve())  # the same folder, in the new tree
    (target / "logs").rmdir()
    clash = target / "adapter_model.safetensors"  # a folder of the old tree where the save writes a file
    clash.unlink()
    (clash / "sub").mkdir(parents=True)
    monkeypatch.chdir(clash / "sub")
    model.save_pretrained(target)
    assert os.getcwd() == str(target.resolve()) and clash.is_file()  # its folder is gone: the target instead


def test_a_save_whose_old_tree_cannot_be_removed_still_succeeds(tmp_path, monkeypatch):
    model = _model()
    target = tmp_path / "adapter"
    model.save_pretrained(target)
    real_unlink = os.unlink

    def stuck_unlink(path, *, dir_fd=None):
        if dir_fd is not None and path == "adapter_config.json":  # inside shutil.rmtree of the old tree
            raise PermissionError(13, "Permission denied", path)
        real_unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", stuck_unlink)
    _bump(model)
    model.save_pretrained(target)  # published: the old tree's removal is best effort
    monkeypatch.undo()
    loaded = PeftModel.from_pretrained(tiny_timm_resnet(), target)
    assert torch.equal(_first_factor(loaded), _first_factor(model))
    (leftover,) = set(os.listdir(tmp_path)) - {"adapter"}
    assert saving.is_leftover(leftover)
    model.save_pretrained(target)  # the next save removes it
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
