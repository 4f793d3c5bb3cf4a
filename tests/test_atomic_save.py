"""A save killed at any moment leaves the old or the new adapter, complete; the next save cleans up; the Hub skips leftovers.

Each kill runs in a forked child of a fresh interpreter (this file run as a script, so pytest's threads are not
forked): the child saves a new adapter over a directory holding an old one, plus files that are not the save's
(optimizer state, another adapter's folder, the user's edited model card), and is SIGKILLed at a named step of
`ftn_peft.saving` or after a random delay. The directory must then equal, byte for byte, the old or the new
directory, and load as that adapter (outputs compared with the model that saved it).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
USER_NOTE = "User notes: trained on the sketch domain, keep me."


def run_harness(modes: str, tmp_path: Path, kills: int = 0) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    cmd = [sys.executable, __file__, modes, str(tmp_path), str(kills)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    tallies = json.loads(result.stdout.strip().splitlines()[-1])
    print(tallies)
    return tallies


@pytest.fixture(scope="module")
def tallies(tmp_path_factory):
    """One interpreter for the deterministic kills (importing torch and PEFT dominates the time)."""
    return run_harness("steps,renames,per-file", tmp_path_factory.mktemp("kills"))


def test_kill_at_every_step_leaves_old_or_new(tallies):
    tally = tallies["steps"]
    assert tally["broken"] == 0 and tally["missing"] == 0, tally
    assert tally["kills"] == len(tally["steps"]) and tally["old"] > 0 and tally["new"] > 0, tally
    # every step of the save was a kill point, the weights half-written by PEFT and each hard link included
    names = {s.split("#")[0] for s in tally["steps"]}
    assert {"cleaned", "card", "weights", "written", "tagged", "link", "linked", "synced", "swapped", "removed"} <= names
    assert tally["leftovers_seen"] > 0  # the kills did leave temporary folders, which the checks saw cleaned


def test_kill_between_the_fallback_renames_is_repaired_by_the_next_save(tallies):
    """Without RENAME_EXCHANGE: a kill between the two renames leaves no directory, and the old one is put back."""
    tally = tallies["renames"]
    assert tally["broken"] == 0 and tally["missing"] == 1 and "displaced#1" in tally["steps"], tally


def test_per_file_fallback_and_fresh_directory(tallies):
    assert tallies["per-file"] == {"per_file": "new", "fresh": "ok"}, tallies["per-file"]


@pytest.mark.slow
def test_kill_at_random_moments_leaves_old_or_new(tmp_path):
    tally = run_harness("random", tmp_path, kills=36)["random"]
    assert tally["broken"] == 0 and tally["missing"] == 0, tally
    assert tally["kills"] == 36 and tally["old"] > 0, tally


def test_second_save_keeps_the_users_card_and_files_it_does_not_write(tmp_path):
    import torch
    from peft import get_peft_model

    import ftn_peft
    from conftest import tiny_clip_classifier

    # a transformers model: PEFT replaces the card's tags with its own ("transformers"), the user's are put back
    model = get_peft_model(tiny_clip_classifier(), ftn_peft.presets.clip_vision(r=2, targets="o"))
    model.save_pretrained(tmp_path / "adapter")
    card = tmp_path / "adapter" / "README.md"
    card.write_text(card.read_text().replace("tags:\n", "tags:\n- my-own-tag\n") + f"\n{USER_NOTE}\n")
    (tmp_path / "adapter" / "optimizer.pt").write_bytes(b"state")
    inode = (tmp_path / "adapter" / "optimizer.pt").stat().st_ino
    weights = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() != weights
    text = card.read_text()
    assert USER_NOTE in text and "- transformers" in text
    assert "- my-own-tag" in text and "- ftn" in text and "- factorized-tensor-network" in text
    assert (tmp_path / "adapter" / "optimizer.pt").stat().st_ino == inode  # the same file, linked, not copied
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_saving_into_the_working_directory_keeps_it_usable(tmp_path, monkeypatch):
    from peft import PeftModel, get_peft_model

    import ftn_peft
    from conftest import tiny_timm_resnet

    model = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=1))
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    model.save_pretrained(".")
    model.save_pretrained(".")  # the directory is swapped: the process must follow it, not stay in the deleted tree
    assert os.getcwd() == str((tmp_path / "run").resolve()) and "adapter_config.json" in os.listdir(".")
    PeftModel.from_pretrained(tiny_timm_resnet(), ".")


# ---------------------------------------------------------------------------------------------------------------
# The harness (runs in a fresh interpreter).


def _fingerprint(folder: Path) -> dict:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _harness(modes: list, work: Path, n_random: int) -> dict:
    import torch
    from peft import PeftModel, get_peft_model

    import ftn_peft
    from conftest import tiny_timm_resnet
    from ftn_peft import hub, saving

    torch.set_num_threads(1)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def adapters(seed: int, r: int):
        model = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=r, num_classes=3))
        model.add_adapter("b", ftn_peft.presets.resnet(r=r + 1, num_classes=5))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        return model.eval()

    def outputs(model) -> dict:
        result = {}
        for name in ("default", "b"):
            model.set_adapter(name)
            result[name] = model(images).detach()
        return result

    old, new = adapters(seed=1, r=1), adapters(seed=2, r=2)  # other ranks: a mixed directory would not load
    expected = {"old": outputs(old), "new": outputs(new)}

    # The old directory: an adapter, the user's edited card, optimizer state, another adapter's folder.
    pristine = work / "pristine" / "adapter"
    old.save_pretrained(str(pristine))
    card = pristine / "README.md"
    card.write_text(card.read_text() + f"\n{USER_NOTE}\n")
    (pristine / "optimizer.pt").write_bytes(os.urandom(4096))
    other = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=1), adapter_name="other")
    other.save_pretrained(str(work / "other_src"))
    shutil.copytree(work / "other_src" / "other", pristine / "other")
    old_fp = _fingerprint(pristine)

    run = work / "run"
    target = run / "adapter"

    def reset() -> None:
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(pristine.parent, run, symlinks=True)

    reset()
    new.save_pretrained(str(target))
    new_fp = _fingerprint(target)
    for kept in ("optimizer.pt", "other/adapter_config.json", "other/adapter_model.safetensors"):
        assert new_fp[kept] == old_fp[kept], kept
    assert new_fp["adapter_model.safetensors"] != old_fp["adapter_model.safetensors"]
    new_card = target.joinpath("README.md").read_text()
    assert USER_NOTE in new_card and "- ftn" in new_card, new_card

    class FakeHub:
        def create_repo(self, repo_id, **kwargs):
            pass

        def upload_folder(self, repo_id, folder_path, **kwargs):
            self.uploaded = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*"))
            return "url"

    def check_hub() -> None:
        assert set(hub.adapter_dirs(run)) == {"adapter"}, hub.adapter_dirs(run)
        fake = FakeHub()
        hub.push_to_hub(str(run), "me/x", api=fake)
        assert not [p for p in fake.uploaded if ".tmp-" in p], fake.uploaded

    def loads_as(which: str) -> None:
        model = PeftModel.from_pretrained(tiny_timm_resnet(), str(target))
        model.load_adapter(str(target / "b"), adapter_name="b")
        model.load_adapter(str(target / "other"), adapter_name="other")
        for name, out in outputs(model.eval()).items():
            torch.testing.assert_close(out, expected[which][name], rtol=0, atol=0)

    def child(kill_at=None, ready_fd=None) -> None:
        """In the forked child: save `new` over the target, SIGKILLed at step `kill_at` ("name#n")."""
        try:
            seen: dict = {}

            def hook(name):
                seen[name] = seen.get(name, 0) + 1
                if f"{name}#{seen[name]}" == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

            saving._on_step = hook
            import peft.peft_model

            real_save = peft.peft_model.safe_save_file

            def save_weights(tensors, filename, metadata=None):
                real_save(tensors, filename, metadata=metadata)
                data = Path(filename).read_bytes()
                Path(filename).write_bytes(data[: len(data) // 2])
                hook("weights")  # killed with the weight file half written
                Path(filename).write_bytes(data)

            peft.peft_model.safe_save_file = save_weights  # `saving` is patched as the parent left it
            if ready_fd is not None:
                os.write(ready_fd, b"x")
            new.save_pretrained(str(target))
            if ready_fd is not None:
                os.write(ready_fd, b"y")
            os._exit(0)
        except BaseException:
            import traceback

            traceback.print_exc()
            os._exit(1)

    def fork(kill_at=None, delay=None, timing=None) -> bool:
        """Run one save in a child; True if it was killed before finishing. `timing` gets the save's duration."""
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            child(kill_at, write_fd)
        os.close(write_fd)
        os.read(read_fd, 1)
        if timing is not None:
            start = time.perf_counter()
            os.read(read_fd, 1)
            timing.append(time.perf_counter() - start)
        if delay is not None:
            time.sleep(delay)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, status = os.waitpid(pid, 0)
        os.close(read_fd)  # only now: the child may still write its "done" byte
        if os.WIFSIGNALED(status):
            return True
        assert os.WEXITSTATUS(status) == 0, f"the child's save failed (kill_at={kill_at})"
        return False

    def run_mode(mode: str) -> dict:
        real = saving._exchange, saving._swap_by_renames
        try:
            return _run_mode(mode)
        finally:
            saving._exchange, saving._swap_by_renames = real
            saving._on_step = None

    def _run_mode(mode: str) -> dict:
        tally = {"kills": 0, "old": 0, "new": 0, "missing": 0, "broken": 0, "leftovers_seen": 0, "steps": []}

        def after_kill(label: str) -> None:
            fp = _fingerprint(target)
            state = "old" if fp == old_fp else "new" if fp == new_fp else "missing" if not target.exists() else "broken"
            tally[state] += 1
            if state == "broken":
                tally.setdefault("broken_at", []).append(label)
                return
            tally["leftovers_seen"] += bool(saving._leftovers(str(target)))
            if state == "missing":  # only between the fallback's two renames: the next save puts the old tree back
                assert mode == "renames", label
                saving._clean_leftovers(str(target))
                assert _fingerprint(target) == old_fp, label
                state = "old"
            loads_as(state)
            check_hub()
            new.save_pretrained(str(target))  # the next save: complete, and nothing left beside it
            assert _fingerprint(target) == new_fp and not saving._leftovers(str(target)), label
            assert sorted(os.listdir(run)) == ["adapter"], os.listdir(run)

        if mode in ("steps", "renames"):
            # Record the steps of one complete save, then kill a fresh save at each of them.
            reset()
            recorded = []
            saving._on_step = lambda name: recorded.append(name)
            import peft.peft_model

            if mode == "renames":
                saving._exchange = lambda a, b: False
            real_save = peft.peft_model.safe_save_file
            peft.peft_model.safe_save_file = lambda *a, **k: (real_save(*a, **k), recorded.append("weights"))
            new.save_pretrained(str(target))
            peft.peft_model.safe_save_file, saving._on_step = real_save, None
            counts: dict = {}
            for name in recorded:
                counts[name] = counts.get(name, 0) + 1
                tally["steps"].append(f"{name}#{counts[name]}")
            for kill_at in tally["steps"]:
                reset()
                assert fork(kill_at), f"the child was not killed at {kill_at}"
                tally["kills"] += 1
                after_kill(kill_at)
        elif mode == "random":
            # Delays spread over a typical save; a save that finishes first does not count, and another is started.
            reset()
            durations: list = []
            for _ in range(5):
                fork(timing=durations)
            window = sorted(durations)[2]
            rng = random.Random(0)
            tally["completed"] = 0
            while tally["kills"] < n_random and tally["completed"] < 3 * n_random:
                reset()
                delay = rng.uniform(0, window)
                if fork(delay=delay):
                    tally["kills"] += 1
                    after_kill(f"random {delay:.4f}s")
                else:
                    tally["completed"] += 1
                    assert _fingerprint(target) == new_fp and not saving._leftovers(str(target))
            tally["window_s"] = round(window, 4)
        elif mode == "per-file":
            reset()
            saving._exchange = lambda a, b: False
            saving._swap_by_renames = lambda a, b: False
            new.save_pretrained(str(target))
            tally = {"per_file": "new" if _fingerprint(target) == new_fp else "broken"}
            fresh = work / "fresh" / "adapter"
            new.save_pretrained(str(fresh))
            # is_trainable: factors that require grad, as in `new`, so that the same compute path runs (bit-exact)
            loads = PeftModel.from_pretrained(tiny_timm_resnet(), str(fresh), is_trainable=True).eval()(images)
            torch.testing.assert_close(loads, expected["new"]["default"], rtol=0, atol=0)
            tally["fresh"] = "ok" if sorted(os.listdir(fresh.parent)) == ["adapter"] else "leftovers"
        return tally

    return {mode: run_mode(mode) for mode in modes}


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(json.dumps(_harness(sys.argv[1].split(","), Path(sys.argv[2]), int(sys.argv[3]))))
