"""FTN with `transformers.Trainer`: CLIPForImageClassification (and a timm ResNet) on the built-in digits domains.

Checkpoints hold the adapter only (adapter_model.safetensors: factors, task head), `resume_from_checkpoint`
reloads it together with the optimizer state, and `load_best_model_at_end` puts the best checkpoint's adapter back.
The optimizer is the paper's recipe from `ftn_peft.optim`, handed over with `optimizers=`.

    python examples/trainer_clip.py                     # a small random CLIP config (nothing is downloaded)
    python examples/trainer_clip.py --model openai/clip-vit-base-patch32   # for users with Hub access
    python examples/trainer_clip.py --timm              # the same with a timm ResNet
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from peft import get_peft_model
from transformers.modeling_outputs import ImageClassifierOutput
from transformers import CLIPConfig, CLIPForImageClassification, Trainer, TrainingArguments

import ftn_peft
from ftn_peft import optim
from ftn_peft.demo import digits
from ftn_peft.metrics import load_accuracy


def small_clip(num_labels: int = 10, num_channels: int = 1, image_size: int = digits.IMAGE_SIZE):
    """A 2-layer CLIP with random weights, shaped for 16x16 digits (the real one: --model openai/clip-...)."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=4, num_channels=num_channels)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99)
    config = CLIPConfig(vision_config=vision, text_config=text, num_labels=num_labels)
    torch.manual_seed(0)
    return CLIPForImageClassification(config)


def ftn_clip(model=None, r: int = 4):
    model = small_clip() if model is None else model
    return get_peft_model(model, ftn_peft.presets.clip_vision(r=r, targets="o", head_module="classifier"))


class TimmForTrainer(torch.nn.Module):
    """Returns a ModelOutput: the Trainer reads a bare tensor as (loss, logits...) and would drop a sample."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return ImageClassifierOutput(logits=self.model(x))


def ftn_timm(num_classes: int = 10):
    """A timm ResNet through the Trainer: its forward takes `x`, so the dataset column is called `x`."""
    timm_model = digits.build_source_model()
    # The preset lists the timm model's own conv names; PEFT matches them as suffixes under the wrapper.
    config = ftn_peft.presets.resnet(r=1, num_classes=num_classes, model=timm_model)
    return get_peft_model(TimmForTrainer(timm_model), config)


def timm_loss(outputs, labels, num_items_in_batch=None):
    # The wrapper computes no loss; the Trainer calls this instead of reading outputs.loss.
    return F.cross_entropy(outputs.logits, labels)


def datasets_for(domain: str, seed: int = 0, input_name: str = "pixel_values"):
    d = digits.make_domain(domain, seed)
    train, val = digits.to_hf_dataset(d.train), digits.to_hf_dataset(d.val)
    if input_name != "pixel_values":
        train, val = (ds.rename_column("pixel_values", input_name) for ds in (train, val))
    return train, val


def compute_metrics(eval_pred):
    logits, labels = eval_pred
    logits = logits[0] if isinstance(logits, tuple) else logits
    return load_accuracy().compute(predictions=np.argmax(logits, -1), references=labels)


def make_trainer(model, train, val, output_dir: str, max_steps: int = 60, eval_steps: int = 20,
                 timm_model: bool = False, **overrides) -> Trainer:
    settings = dict(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=32, per_device_eval_batch_size=128,
        eval_strategy="steps", eval_steps=eval_steps, save_strategy="steps", save_steps=eval_steps,
        load_best_model_at_end=True, metric_for_best_model="accuracy", greater_is_better=True,
        label_names=["labels"], remove_unused_columns=False, report_to=[], seed=0, data_seed=0,
        use_cpu=True, dataloader_num_workers=0, logging_steps=eval_steps, disable_tqdm=True,
    )
    args = TrainingArguments(**{**settings, **overrides})
    optimizers = optim.create_optimizer_and_scheduler(model, num_training_steps=max_steps, factor_lr=5e-3,
                                                      head_lr=5e-2)
    return Trainer(model=model, args=args, train_dataset=train, eval_dataset=val, compute_metrics=compute_metrics,
                   optimizers=optimizers, compute_loss_func=timm_loss if timm_model else None)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a CLIP id or dir; default: a small random CLIP")
    p.add_argument("--timm", action="store_true", help="train a timm ResNet instead of CLIP")
    p.add_argument("--domain", default="rotated")
    p.add_argument("--max_steps", type=int, default=60)
    p.add_argument("--output_dir", default="ftn_trainer_output")
    p.add_argument("--resume_from_checkpoint", default=None)
    args = p.parse_args(argv)
    if args.timm:
        model, input_name = ftn_timm(), "x"
    else:
        base = CLIPForImageClassification.from_pretrained(args.model, num_labels=10) if args.model else None
        model, input_name = ftn_clip(base), "pixel_values"
    model.print_trainable_parameters()
    train, val = datasets_for(args.domain, input_name=input_name)
    trainer = make_trainer(model, train, val, args.output_dir, max_steps=args.max_steps, timm_model=args.timm)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    print(trainer.evaluate())
    model.save_pretrained(f"{args.output_dir}/best_adapter")


if __name__ == "__main__":
    main()
