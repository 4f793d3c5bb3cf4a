"""examples/trainer_clip.py on streamed real-size images: the Trainer through the training script's data layer."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "benchmarks")]

import trainer_clip as tc  # noqa: E402
from make_image_domains import write_domains  # noqa: E402


@pytest.mark.slow
def test_trainer_trains_clip_vit_b32_on_a_streamed_domain(tmp_path):
    """The real CLIP ViT-B/32 vision tower's shape (random weights), 224 px through its image processor's
    settings, 3 classes from a domains file, two optimizer steps with DataLoader workers and augmentation."""
    from peft import get_peft_model_state_dict
    from transformers import CLIPConfig, CLIPForImageClassification, CLIPImageProcessor

    (folder,) = write_domains(str(tmp_path / "images"), domains=1, classes=3, per_class=6, size=40)
    (tmp_path / "domains.json").write_text(json.dumps({"seed": 0, "domains": {
        "shapes": {"imagefolder": folder, "carve": {"val": 0.25, "test": 0.2}}}}))
    opened = tc.open_named_domain(str(tmp_path / "domains.json"), "shapes")
    torch.manual_seed(0)
    clip = CLIPForImageClassification(CLIPConfig(num_labels=len(opened.class_names)))
    assert (clip.config.vision_config.hidden_size, clip.config.vision_config.patch_size,
            clip.config.vision_config.num_hidden_layers, clip.config.vision_config.image_size) == (768, 32, 12, 224)
    model = tc.ftn_clip(clip)
    import image_data

    config = image_data.data_config(processor=CLIPImageProcessor())  # openai/clip-vit-base-patch32's settings
    assert config["input_size"] == (3, 224, 224)
    train, val = tc.domain_datasets(opened, config, augment=True)
    assert (len(train), len(val)) == (10, 4)  # 18 images: 4 carved for test (0.2), 4 for val (0.25)
    seen = []
    model.base_model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["pixel_values"].shape), with_kwargs=True)
    before = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    trainer = tc.make_trainer(model, train, val, str(tmp_path / "out"), max_steps=2, eval_steps=2,
                              per_device_train_batch_size=4, per_device_eval_batch_size=8, dataloader_num_workers=2)
    trainer.train()
    assert len(seen) == 3 and set(seen) == {(4, 3, 224, 224)}  # two training batches, then the val split
    after = get_peft_model_state_dict(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert any("eval_accuracy" in e for e in trainer.state.log_history)


def test_the_trainer_script_needs_a_real_model_for_a_domains_file(tmp_path):
    with pytest.raises(SystemExit):
        tc.main(["--domains", str(tmp_path / "d.yaml")])
