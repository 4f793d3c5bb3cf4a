"""examples/safe_checkpoint.py: training state round-trips exactly, and loading a checkpoint never runs code."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

import ftn_peft
from ftn_peft import optim

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import safe_checkpoint  # noqa: E402

from conftest import tiny_timm_resnet  # noqa: E402


class Payload:
    """Unpickling this writes a marker file: what a planted checkpoint would do to a user's machine."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "payload ran"))


def plant(path: Path, marker: Path) -> None:
    torch.save({"step": 3, "model": Payload(marker)}, path)  # what the script used to write, plus a payload


def trained_step(model, optimizer, scheduler, x):
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def test_optimizer_and_scheduler_state_round_trip_and_resume_identically(tmp_path):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=2, num_classes=5)).train()
    optimizer, scheduler = optim.create_optimizer_and_scheduler(model, num_training_steps=10)
    trained_step(model, optimizer, scheduler, x)
    state = {"job": "a/seed0", "step": 1, "betas": (0.9, 0.999), "model": copy.deepcopy(model.state_dict()),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    safe_checkpoint.save_checkpoint(state, tmp_path, tag=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1.safetensors", "checkpoint.json"]
    loaded = safe_checkpoint.load_checkpoint(tmp_path)
    assert loaded["job"] == "a/seed0" and loaded["betas"] == (0.9, 0.999)
    # int keys (optimizer states are keyed by parameter index) and every tensor come back as they were
    assert loaded["optimizer"]["optimizers"][0]["state"].keys() == state["optimizer"]["optimizers"][0]["state"].keys()
    torch.testing.assert_close(loaded["optimizer"], state["optimizer"], rtol=0, atol=0)
    assert loaded["scheduler"] == state["scheduler"]

    # a fresh model, optimizer and scheduler restored from the checkpoint take the very same next step
    twin = get_peft_model(tiny_timm_resnet(), ftn_peft.presets.resnet(r=2, num_classes=5)).train()
    twin.load_state_dict(loaded["model"])
    twin_opt, twin_sched = optim.create_optimizer_and_scheduler(twin, num_training_steps=10)
    twin_opt.load_state_dict(loaded["optimizer"])
    twin_sched.load_state_dict(loaded["scheduler"])
    trained_step(model, optimizer, scheduler, x)
    trained_step(twin, twin_opt, twin_sched, x)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name


def test_a_newer_checkpoint_replaces_the_older_tensor_file(tmp_path):
    safe_checkpoint.save_checkpoint({"w": torch.zeros(2)}, tmp_path, tag=3)
    safe_checkpoint.save_checkpoint({"w": torch.ones(2)}, tmp_path, tag=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6.safetensors", "checkpoint.json"]
    assert torch.equal(safe_checkpoint.load_checkpoint(tmp_path / "checkpoint.json")["w"], torch.ones(2))


def test_unstorable_objects_are_refused_by_name(tmp_path):
    with pytest.raises(TypeError, match=r"cannot store Payload at state\['model'\]"):
        safe_checkpoint.save_checkpoint({"model": Payload(tmp_path / "m")}, tmp_path, tag=0)


def test_the_planted_payload_is_live(tmp_path):
    """Guards the tests below: the planted file does run its payload when unpickled the old way."""
    marker = tmp_path / "marker"
    plant(tmp_path / "checkpoint.pt", marker)
    torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert marker.read_text() == "payload ran"


def test_resume_latest_refuses_a_planted_pickle_and_runs_nothing(tmp_path):
    import train_multidomain

    out, marker = tmp_path / "out", tmp_path / "marker"
    out.mkdir()
    plant(out / "checkpoint.pt", marker)
    args = train_multidomain.parse_args(["--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    with pytest.raises(safe_checkpoint.UnsafeCheckpointError, match="not loaded, because unpickling"):
        train_multidomain.load_done(args)
    args = train_multidomain.parse_args(["--output_dir", str(out), "--resume_from_checkpoint",
                                         str(out / "checkpoint.pt")])
    with pytest.raises(safe_checkpoint.UnsafeCheckpointError, match="delete .*checkpoint.pt"):
        train_multidomain.load_done(args)
    assert not marker.exists()


def test_pickles_disguised_as_checkpoint_files_are_refused(tmp_path):
    marker = tmp_path / "marker"
    # a pickle in place of the tensor file that a valid checkpoint.json names
    safe_checkpoint.save_checkpoint({"w": torch.zeros(2)}, tmp_path, tag=1)
    plant(tmp_path / "checkpoint-1.safetensors", marker)
    with pytest.raises(ValueError, match="not a safetensors file"):
        safe_checkpoint.load_checkpoint(tmp_path)
    # a pickle named checkpoint.json
    plant(tmp_path / "checkpoint.json", marker)
    with pytest.raises(ValueError, match="not JSON"):
        safe_checkpoint.load_checkpoint(tmp_path)
    # a JSON that points outside its directory only ever reads a file of that name beside it
    (tmp_path / "checkpoint.json").write_text(json.dumps(
        {"format": safe_checkpoint.FORMAT, "tensors": "../../etc/evil.safetensors", "state": 1}))
    with pytest.raises(ValueError, match=str(tmp_path / "evil.safetensors")):
        safe_checkpoint.load_checkpoint(tmp_path)
    assert not marker.exists()
