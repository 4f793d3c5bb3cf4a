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


def test_a_saved_clip_gets_its_image_processors_size_channels_and_normalisation(tmp_path):
    """`--model DIR`: the 16x16 one-channel digits reach the model as the processor makes them (32 px, RGB)."""
    from transformers import CLIPImageProcessor

    mean, std = [0.1, 0.5, 0.9], [0.5, 0.25, 0.2]
    tc.small_clip(num_channels=3, image_size=32).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                       image_mean=mean, image_std=std).save_pretrained(tmp_path / "clip")
    model, input_name, preprocess = tc.build(str(tmp_path / "clip"))
    train, val = tc.datasets_for("inverted", input_name=input_name, preprocess=preprocess)
    seen = []
    model.base_model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["pixel_values"].detach().clone()), with_kwargs=True)
    tc.make_trainer(model, train, val, str(tmp_path / "out"), max_steps=1, eval_steps=1,
                    per_device_train_batch_size=8).train()
    x = seen[0]
    assert x.shape == (8, 3, 32, 32)
    # undoing the processor's per-channel normalisation gives one grey image in [0, 1] in all three channels,
    # with the inverted digits' white background at exactly 1
    grey = x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    torch.testing.assert_close(grey[:, 1:], grey[:, :1].expand(-1, 2, -1, -1), rtol=0, atol=1e-5)
    assert grey.min() >= -1e-5 and grey.max() <= 1 + 1e-5
    torch.testing.assert_close(grey.amax(dim=(1, 2, 3)), torch.ones(8))
    assert len(seen) > 1  # the evaluation batches went through the same processor
    assert all(s.shape[1:] == (3, 32, 32) for s in seen)


def test_a_timm_model_gets_its_own_input_size_and_normalisation():
    """`--timm NAME`: timm's transform for the model's pretrained config (here 3 x 24 px and its mean/std)."""
    mean, std = (0.2, 0.4, 0.6), (0.3, 0.2, 0.1)
    model = tc.timm_classifier("resnet18", pretrained=False, pretrained_cfg_overlay=dict(
        input_size=(3, 24, 24), mean=mean, std=std, crop_pct=1.0, interpolation="bilinear"))
    preprocess = tc.timm_transform_for(model.base_model.model.model)
    train, _ = tc.datasets_for("inverted", input_name="x", preprocess=preprocess)
    batch = train[:4]
    assert batch["x"].shape == (4, 3, 24, 24) and batch["labels"].shape == (4,)
    grey = batch["x"] * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    torch.testing.assert_close(grey[:, 1:], grey[:, :1].expand(-1, 2, -1, -1), rtol=0, atol=1e-5)
    torch.testing.assert_close(grey.amax(dim=(1, 2, 3)), torch.ones(4))
    assert model(x=batch["x"]).logits.shape == (4, 10)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "payload ran"))


def test_resuming_from_a_planted_trainer_checkpoint_runs_no_code(tmp_path, data):
    """The Trainer reads optimizer.pt / scheduler.pt / rng_state.pth with torch.load(weights_only=True)."""
    import pickle

    model = tc.ftn_clip()
    tc.make_trainer(model, *data, str(tmp_path), max_steps=2, eval_steps=2, load_best_model_at_end=False).train()
    marker = tmp_path / "marker"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        if (tmp_path / "checkpoint-2" / name).exists():
            torch.save({"state": _Payload(marker)}, tmp_path / "checkpoint-2" / name)
    trainer = tc.make_trainer(tc.ftn_clip(), *data, str(tmp_path), max_steps=4, eval_steps=2,
                              load_best_model_at_end=False)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert not marker.exists()


def _adapted(model):
    from ftn_peft.layer import FTNLayer

    return sorted(n for n, m in model.named_modules() if isinstance(m, FTNLayer))


@pytest.fixture
def saved_vit(tmp_path):
    """A tiny transformers ViT classifier (not CLIP) with its own image processor, saved like a Hub checkpoint."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8, num_labels=3)
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    return str(tmp_path / "vit")


def test_any_transformers_classifier_gets_auto_config_targets_and_trains(tmp_path, saved_vit):
    """`--model DIR` of a ViT (no preset): attention projections found by auto_config, a 10-class head, one step."""
    model, input_name, preprocess = tc.build(saved_vit)
    names = _adapted(model)
    # transformers 5 names ViT's projections q_proj / k_proj / v_proj / o_proj, 4.x query / key / value / output.dense
    kinds = {n.split(".")[-1] for n in names}
    assert len(names) == 8 and kinds in ({"q_proj", "k_proj", "v_proj", "o_proj"}, {"query", "key", "value", "dense"})
    train, val = tc.datasets_for("inverted", input_name=input_name, preprocess=preprocess)
    before = adapter_tensors(model)
    tc.make_trainer(model, train, val, str(tmp_path / "out"), max_steps=1, eval_steps=1,
                    per_device_train_batch_size=8).train()
    after = adapter_tensors(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert model.base_model.model.classifier.ftn_head["default"].out_features == 10


def test_target_and_head_overrides_are_used(saved_vit):
    from transformers import AutoModelForImageClassification

    layer_names = [n for n, _ in AutoModelForImageClassification.from_pretrained(saved_vit).named_modules()]
    q, v = ("q_proj", "v_proj") if any(n.endswith("q_proj") for n in layer_names) else ("query", "value")
    model, _, _ = tc.build(saved_vit, target_modules=f"{q},{v}", head_module="classifier")
    names = _adapted(model)
    assert len(names) == 4 and {n.split(".")[-1] for n in names} == {q, v}
    # a regex for a timm model names its own layers; the Trainer wrapper's prefix is handled
    timm_model, _, _ = tc.build(None, "demo", target_modules=r"layer4\.\d+\.conv\d", head_module="fc")
    timm_names = _adapted(timm_model)
    assert timm_names and all(".layer4." in n for n in timm_names)
