"""FTN with `transformers.Trainer`: CLIPForImageClassification (and a timm ResNet) on the built-in digits domains.

Checkpoints hold the adapter only (adapter_model.safetensors: factors, task head), `resume_from_checkpoint`
reloads it together with the optimizer state, and `load_best_model_at_end` puts the best checkpoint's adapter back.
The optimizer is the paper's recipe from `ftn_peft.optim`, handed over with `optimizers=`.

    python examples/trainer_clip.py                     # a small random CLIP config (nothing is downloaded)
    python examples/trainer_clip.py --model openai/clip-vit-base-patch32   # for users with Hub access
    python examples/trainer_clip.py --timm              # the same with the demo's tiny timm ResNet
    python examples/trainer_clip.py --timm resnet50     # a pretrained timm model (Hub access)

The small random CLIP and the demo ResNet are shaped for the 16x16 one-channel digits and take them as they are.
A real model expects its own input size, channels and normalisation: with `--model` the images go through the
model's own image processor settings (`AutoImageProcessor`: size, crop, mean/std), with `--timm NAME` through
timm's transform for the model (`resolve_data_config` + `create_transform`), applied lazily per batch. Real data
comes from a domains file, through the training script's data layer (examples/domains.py, image_data.py): images
are read and transformed by DataLoader workers, with random resized crops and flips for training:

    python examples/trainer_clip.py --model openai/clip-vit-base-patch32 --domains domains.yaml --domain flowers
"""

from __future__ import annotations

import argparse
import re

import numpy as np
import torch
import torch.nn.functional as F
from peft import get_peft_model
from transformers.modeling_outputs import ImageClassifierOutput
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    CLIPConfig,
    CLIPForImageClassification,
    Trainer,
    TrainingArguments,
)

import ftn_peft
from ftn_peft import optim
from ftn_peft.demo import digits
from ftn_peft.metrics import load_accuracy

import domains as domains_lib  # noqa: E402  (examples/ is on sys.path)
import image_data  # noqa: E402
import multidomain_data as data_lib  # the training script's choice of targets


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


def timm_classifier(name: str, target_modules=None, head_module=None, num_classes: int = 10, pretrained: bool = True,
                    **kwargs):
    """A named timm model with a fresh head, FTN on its convs (all but the stem) and attention projections (a
    ViT, Swin, ...), as `ftn_peft.auto_config` finds them, or on `target_modules` / `head_module`; wrapped for the
    Trainer."""
    import timm

    timm_model = (digits.build_source_model() if name == "demo"
                  else timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs))
    if target_modules or head_module:
        targets, head = data_lib.default_targets(timm_model, argparse.Namespace(target_modules=target_modules,
                                                                                head_module=head_module))
        if isinstance(targets, str):  # a regex names the model's own layers; the wrapper adds a "model." prefix
            targets = [n for n, _ in timm_model.named_modules() if re.fullmatch(targets, n)]
        config = ftn_peft.FTNConfig(r=1, target_modules=targets, head_module=head)
    else:
        config = ftn_peft.auto_config(timm_model, r=1, targets=["convs", "attention"], num_classes=num_classes,
                                      init_weights="xavier")
    return get_peft_model(TimmForTrainer(timm_model), config)


def datasets_for(domain: str, seed: int = 0, input_name: str = "pixel_values", preprocess=None):
    """(train, val) of a digits domain. `preprocess` (see `image_processor_for`, `timm_transform_for`) turns
    PIL images into a model's input; without it the 16x16 one-channel tensors are fed as they are."""
    d = digits.make_domain(domain, seed)
    if preprocess is not None:
        return tuple(with_preprocessing(images_of(part), preprocess, input_name) for part in (d.train, d.val))
    train, val = digits.to_hf_dataset(d.train), digits.to_hf_dataset(d.val)
    if input_name != "pixel_values":
        train, val = (ds.rename_column("pixel_values", input_name) for ds in (train, val))
    return train, val


def images_of(data):
    """The digits as 8-bit greyscale PIL images (the standardisation undone) with their labels."""
    import datasets
    from PIL import Image

    x, y = data.tensors
    pixels = ((x[:, 0] * digits.STD + digits.MEAN).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return datasets.Dataset.from_dict({"image": [Image.fromarray(p) for p in pixels],
                                       "labels": y.numpy()})


def image_processor_for(name_or_dir: str):
    """The evaluation transform of one PIL image made from the model's own `AutoImageProcessor` (size, crop,
    resampling, mean/std), as the training script builds it (image_data.data_config)."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(name_or_dir)
    return image_data.transforms(image_data.data_config(processor=processor), augment=False)[1]


def timm_transform_for(model):
    """timm's evaluation transform for `model` (its input size, crop, mean/std), on one PIL image."""
    return image_data.transforms(image_data.data_config(model), augment=False)[1]


def with_preprocessing(images, preprocess, input_name: str = "pixel_values"):
    """`images` with `preprocess` applied lazily, per batch as it is read: nothing preprocessed is stored."""

    def transform(batch):
        return {input_name: torch.stack([preprocess(im.convert("RGB")) for im in batch["image"]]),
                "labels": torch.as_tensor(batch["labels"])}

    return images.with_transform(transform)


class Features(torch.utils.data.Dataset):
    """An `image_data.Images` view as the Trainer's dict rows ({input_name: image, "labels": label})."""

    def __init__(self, images, input_name: str = "pixel_values"):
        self.images, self.input_name = images, input_name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, k):
        x, y = self.images[k]
        return {self.input_name: x, "labels": y}


def open_named_domain(domains_file: str, name: str):
    """Domain `name` of a domains file, opened (files listed, labels read; no image decoded)."""
    sources = {s.name: s for s in domains_lib.load_file(domains_file)}
    if name not in sources:
        raise ValueError(f"--domain {name!r} is not in {domains_file}, which has {list(sources)}; pick one of them")
    return domains_lib.open_source(sources[name])


def domain_datasets(opened, config: dict, input_name: str = "pixel_values", augment: bool = True, seed: int = 0):
    """(train, val) of an opened domain, streamed through the training script's data layer with a model's data
    config (`image_data.data_config`): random resized crop + flip for training, the model's eval transform else."""
    train_tf, eval_tf = image_data.transforms(config, augment)
    train, val, _ = domains_lib.build_domain(opened, seed, train_tf, eval_tf, augment)
    # train.seed stays None: the Trainer seeds its DataLoader workers per epoch (data_seed) itself
    return Features(train, input_name), Features(val, input_name)


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
    p.add_argument("--model", default=None,
                   help="a transformers image classifier (CLIP or any other) id or dir; default: a small random CLIP")
    p.add_argument("--timm", nargs="?", const="demo", default=None,
                   help="train a timm model instead of CLIP: alone, the demo's tiny ResNet; or a timm model name")
    p.add_argument("--domains", default=None, help="a domains file (docs/data.md); default: the built-in digits")
    p.add_argument("--domain", default="rotated", help="the domain to train: a digits domain or one of --domains")
    p.add_argument("--num_workers", type=int, default=2, help="DataLoader workers for --domains images")
    p.add_argument("--no_augment", action="store_true", help="no random resized crop / flip for --domains")
    p.add_argument("--max_steps", type=int, default=60)
    p.add_argument("--output_dir", default="outputs/trainer_clip")
    p.add_argument("--resume_from_checkpoint", default=None)
    p.add_argument("--target_modules", default=None,
                   help="layers to adapt: a comma list of names / suffixes, or one regex (default: found by auto_config)")
    p.add_argument("--head_module", default=None, help="the classifier to give each adapter (default: found)")
    args = p.parse_args(argv)
    if args.domains and not (args.model or (args.timm and args.timm != "demo")):
        p.error("--domains needs a model for real images: --model ID_OR_DIR or --timm NAME")
    opened = open_named_domain(args.domains, args.domain) if args.domains else None
    num_labels = len(opened.class_names) if opened else 10
    model, input_name, preprocess = build(args.model, args.timm, args.target_modules, args.head_module, num_labels)
    model.print_trainable_parameters()
    overrides = {}
    if opened:
        config = data_config_for(model, args.model)
        train, val = domain_datasets(opened, config, input_name, augment=not args.no_augment)
        overrides = dict(dataloader_num_workers=args.num_workers)
    else:
        train, val = datasets_for(args.domain, input_name=input_name, preprocess=preprocess)
    trainer = make_trainer(model, train, val, args.output_dir, max_steps=args.max_steps,
                           timm_model=args.timm is not None, **overrides)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    print(trainer.evaluate())
    model.save_pretrained(f"{args.output_dir}/best_adapter")


def data_config_for(model, model_name=None) -> dict:
    """The data config of a built model: its image processor's (--model) or timm's pretrained_cfg (--timm)."""
    if model_name is not None:
        from transformers import AutoImageProcessor

        try:
            return image_data.data_config(processor=AutoImageProcessor.from_pretrained(model_name))
        except (OSError, ValueError):  # a save_pretrained dir without preprocessor_config.json
            return image_data.data_config()
    return image_data.data_config(model.base_model.model.model)


def build(model_name=None, timm_name=None, target_modules=None, head_module=None, num_labels: int = 10):
    """(FTN model, name of its input column, preprocessing or None) for the command-line choices.

    `--model` takes a CLIP (the paper's output-projection preset) or any other transformers image classifier, whose
    targets come from `ftn_peft.auto_config` like the training script's; `--target_modules` / `--head_module` override
    the found ones (for timm models too).
    """
    if timm_name == "demo" and not (target_modules or head_module):
        return ftn_timm(num_labels), "x", None
    if timm_name is not None:
        model = timm_classifier(timm_name, target_modules, head_module, num_classes=num_labels)
        return model, "x", timm_transform_for(model.base_model.model.model)
    if model_name is None:
        base = small_clip(num_labels)
    elif AutoConfig.from_pretrained(model_name).model_type == "clip":
        base = CLIPForImageClassification.from_pretrained(model_name, num_labels=num_labels)
    else:
        base = AutoModelForImageClassification.from_pretrained(model_name, num_labels=num_labels,
                                                               ignore_mismatched_sizes=True)
    preprocess = None if model_name is None else image_processor_for(model_name)
    if base.config.model_type == "clip" and not (target_modules or head_module):
        return ftn_clip(base), "pixel_values", preprocess
    return ftn_by_targets(base, target_modules, head_module), "pixel_values", preprocess


def ftn_by_targets(model, target_modules=None, head_module=None, r: int = 1):
    """The training script's choice of targets (presets for known layouts, else auto_config) with the overrides."""
    flags = argparse.Namespace(target_modules=target_modules, head_module=head_module)
    targets, head = data_lib.default_targets(model, flags)
    return get_peft_model(model, ftn_peft.FTNConfig(r=r, target_modules=targets, head_module=head))


if __name__ == "__main__":
    main()
