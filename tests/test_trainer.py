"""transformers.Trainer with FTN: adapter-only checkpoints, exact resume, best adapter restored at the end."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import trainer_clip as tc  # noqa: E402


def adapter_tensors(model):
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


@pytest.fixture(scope="module")
def data():
    return tc.datasets_for("rotated")


def test_checkpoints_hold_only_the_adapter_and_best_is_restored(tmp_path, data):
    model = tc.ftn_clip()
    trainer = tc.make_trainer(model, *data, str(tmp_path), max_steps=6, eval_steps=2)
    trainer.train()
    checkpoints = sorted(tmp_path.glob("checkpoint-*"))
    assert len(checkpoints) == 3
    for ckpt in checkpoints:
        files = {p.name for p in ckpt.iterdir()}
        assert "adapter_model.safetensors" in files
        assert not files & {"model.safetensors", "pytorch_model.bin"}
        weights = load_file(str(ckpt / "adapter_model.safetensors"))
        assert all("ftn_" in k for k in weights)  # factors and task head only, no backbone tensor
    best = trainer.state.best_model_checkpoint
    saved = load_file(str(Path(best) / "adapter_model.safetensors"))
    now = adapter_tensors(model)
    assert saved.keys() == now.keys()
    for k in saved:
        torch.testing.assert_close(now[k], saved[k])
    # the best is the checkpoint with the highest eval accuracy in the log
    evals = [(e["eval_accuracy"], e["step"]) for e in trainer.state.log_history if "eval_accuracy" in e]
    assert best.endswith(f"checkpoint-{max(evals, key=lambda t: (t[0], -t[1]))[1]}")


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path, data):
    full = tc.ftn_clip()
    tc.make_trainer(full, *data, str(tmp_path / "full"), max_steps=4, eval_steps=2,
                    load_best_model_at_end=False).train()
    first = tc.ftn_clip()
    tc.make_trainer(first, *data, str(tmp_path / "part"), max_steps=4, eval_steps=2,
                    load_best_model_at_end=False).train()
    resumed = tc.ftn_clip()  # a fresh process would start from a fresh model
    trainer = tc.make_trainer(resumed, *data, str(tmp_path / "part"), max_steps=4, eval_steps=2,
                              load_best_model_at_end=False)
    trainer.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-2"))
    a, b = adapter_tensors(full), adapter_tensors(resumed)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(a[next(iter(a))], adapter_tensors(tc.ftn_clip())[next(iter(a))])


def test_timm_model_trains_with_the_trainer(tmp_path):
    model = tc.ftn_timm()
    before = adapter_tensors(model)
    trainer = tc.make_trainer(model, *tc.datasets_for("inverted", input_name="x"), str(tmp_path), max_steps=2,
                              eval_steps=2, timm_model=True)
    trainer.train()
    assert "eval_accuracy" in trainer.evaluate()
    after = adapter_tensors(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "checkpoint-2" / "adapter_model.safetensors").exists()
