"""Backbones and domains for train_multidomain.py: the built-in digits demo, timm / Hugging Face models, and
domains from a domains file (domains.py), `datasets` names or local imagefolder directories.

Every domain becomes three datasets (train / val / test) of (image tensor, label) pairs. The demo's are small
in-memory tensors; every other source is streamed (image_data.py): images are read and transformed per batch by
DataLoader workers, with the model's own preprocessing and, for training, random resized crops and flips.
Where a data set ships no validation or test split, one is carved from its training split with the seed.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

import domains as domains_lib
import image_data
import ftn_peft.auto
from ftn_peft import FTNConfig, presets
from ftn_peft.demo.digits import Domain

HF_RESNET_TARGETS = r"^resnet\.encoder\.stages\.\d+\.layers\.\d+\.(layer\.\d+|shortcut)\.convolution$"


def logits_of(output) -> torch.Tensor:
    """Tensor logits from a timm model (a tensor) or a transformers model (an output with `.logits`)."""
    return output.logits if hasattr(output, "logits") else output


@dataclass
class Spec:
    """The frozen source model, where to adapt it, and how to make each domain's splits."""

    source: nn.Module
    target_modules: object
    head_module: str
    domain_names: list
    make_domain: Callable[[str, int], Domain]
    has_batchnorm: bool = True
    backbone_params: int = 0
    extra: dict = field(default_factory=dict)
    # seed -> the frozen source model for that seed's jobs; None: `source` for every seed
    source_for_seed: Optional[Callable[[int], nn.Module]] = None

    def domain(self, name: str, seed: int) -> Domain:
        return self.make_domain(name, seed)

    def source_for(self, seed: int) -> nn.Module:
        if self.source_for_seed is None:
            return self.source
        return self.source_for_seed(seed)

    def ftn_config(self, r: int, num_classes: int, init_weights="xavier") -> FTNConfig:
        if self.target_modules == presets.RESNET_TARGETS and self.head_module == "fc":
            return presets.resnet(r=r, num_classes=num_classes, init_weights=init_weights)
        return FTNConfig(r=r, target_modules=self.target_modules, init_weights=init_weights,
                         head_module=self.head_module, head_num_outputs=num_classes, task_batchnorm=self.has_batchnorm)


# ------------------------------------------------------------------------------------------------ backbones
def load_backbone(args) -> tuple[nn.Module, Optional[object]]:
    """(model in eval mode, image processor or None) for --backbone (and --backbone_weights).

    timm names load their pretrained weights (from the Hub cache, or `--backbone_weights FILE`, a local
    .safetensors / .pth file, through timm's `pretrained_cfg_overlay`); "local-dir:<dir>" and "hf-hub:<id>" are
    timm's own sources; a Hugging Face id or a local `save_pretrained` directory loads with transformers.
    """
    name = args.backbone
    weights = getattr(args, "backbone_weights", None)
    if name == "demo":
        return load_demo_source(args, 0), None
    if weights and not os.path.isfile(weights):
        raise ValueError(f"--backbone_weights {weights} is not a file; give a .safetensors / .pth / .bin state dict")
    if name.startswith(("local-dir:", "hf-hub:")):  # timm's own sources, e.g. a timm.models.save_for_hf folder
        return timm_backbone(name, weights), None
    if os.path.isdir(name) or "/" in name:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        if weights:
            raise ValueError(f"--backbone_weights is for timm names; {name} is a transformers model: put its "
                             "weights in a save_pretrained directory and pass that directory as --backbone")
        model = AutoModelForImageClassification.from_pretrained(name)
        try:
            processor = AutoImageProcessor.from_pretrained(name)
        except (OSError, ValueError):
            processor = None  # a bare save_pretrained dir may have no preprocessor_config.json
        return model.eval(), processor
    return timm_backbone(name, weights), None


def timm_backbone(name: str, weights: Optional[str] = None) -> nn.Module:
    import timm

    overlay = {"pretrained_cfg_overlay": dict(file=os.path.abspath(weights))} if weights else {}
    return timm.create_model(name, pretrained=True, **overlay).eval()


def load_demo_source(args, seed: int) -> nn.Module:
    from ftn_peft.demo import digits

    return digits.load_source_model(cache_dir=args.cache_dir, seed=seed, epochs=args.source_epochs)


def default_targets(model: nn.Module, args) -> tuple[object, str]:
    """(target_modules, head_module): from the flags, known layouts (timm/torchvision ResNet, HF ResNet, CLIP), or
    else ftn_peft.auto_config."""
    if args.target_modules and args.head_module:
        return parse_targets(args.target_modules), args.head_module
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if hasattr(model, "layer1") and isinstance(getattr(model, "fc", None), nn.Linear):
        found = (presets.RESNET_TARGETS, "fc")
    elif model_type == "resnet":
        found = (HF_RESNET_TARGETS, "classifier.1")
    elif model_type == "clip":
        found = (presets.CLIP_VISION_TARGETS["o"], "classifier")
    else:
        found = auto_targets(model)
    return parse_targets(args.target_modules) or found[0], args.head_module or found[1]


def auto_targets(model: nn.Module) -> tuple[list, str]:
    """Any other timm / transformers model: ftn_peft.auto_config's attention projections (a transformer) or convs."""
    layers = ftn_peft.auto.find_layers(model)
    attention = any(layers.by_kind[k] for k in ("q", "k", "v", "qkv", "o"))
    config = ftn_peft.auto_config(model, targets="attention" if attention else "convs")
    if config.head_module is None:
        raise ValueError(f"found no classifier nn.Linear in {type(model).__name__}; pass --head_module")
    return sorted(config.target_modules), config.head_module


def parse_targets(flag: Optional[str]):
    """--target_modules: a comma list of layer names / suffixes, or one regex."""
    if not flag:
        return None
    names = [n.strip() for n in flag.split(",")]
    if len(names) > 1 and all(re.fullmatch(r"[\w.]+", n) for n in names):
        return names
    return flag


def backbone_parameters(model: nn.Module, head_module: str) -> int:
    head = {id(p) for p in model.get_submodule(head_module).parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in head)


# ------------------------------------------------------------------------------------------------ data
def streamed_domain_maker(args, model: nn.Module, processor) -> tuple[list, Callable[[str, int], Domain]]:
    """Domains from a domains file (`--domains FILE.yaml|json`), a local dir with one imagefolder per domain, or a
    `datasets` name with one config per domain; images stay on disk and are transformed per batch."""
    if domains_lib.is_domains_file(args.domains):
        if args.dataset != "demo":
            raise ValueError(f"--domains {args.domains} is a domains file, which names every source itself; "
                             f"drop --dataset {args.dataset}")
        sources = domains_lib.load_file(args.domains)
    else:
        sources = domains_lib.from_flags(args.dataset, args.domains.split(",") if args.domains else None)
    by_name = {s.name: s for s in sources}
    # A timm model carries its pretrained_cfg; a transformers model its image processor; else ImageNet's defaults.
    config = image_data.data_config(model if hasattr(model, "pretrained_cfg") else None, processor, args.image_size)
    augment = not getattr(args, "no_augment", False)
    train_tf, eval_tf = image_data.transforms(config, augment=augment)
    opened = functools.cache(lambda name: domains_lib.open_source(by_name[name]))

    def make(name: str, seed: int) -> Domain:
        domain = opened(name)
        train, val, test = domains_lib.build_domain(domain, seed, train_tf, eval_tf, augment)
        return Domain(name, len(domain.class_names), train, val, test)

    return list(by_name), make


def load_spec(args) -> Spec:
    source, processor = load_backbone(args)
    source.requires_grad_(False)
    targets, head = default_targets(source, args)
    if args.dataset == "demo" and not domains_lib.is_domains_file(args.domains):
        from ftn_peft.demo import digits

        # Three domains keep the default run within minutes on a laptop CPU; --domains adds the others.
        names = args.domains.split(",") if args.domains else list(digits.DOMAINS[:3])

        make = digits.make_domain
    else:
        names, make = streamed_domain_maker(args, source, processor)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in source.modules())
    spec = Spec(source, targets, head, names, make, has_bn, backbone_parameters(source, head))
    if args.backbone == "demo":
        # The demo pretrains its own source model, and how well each method adapts depends on that model as much
        # as on the split: seed s uses the source trained with seed s, so the reported spread covers both.
        spec.source_for_seed = functools.cache(
            lambda seed: source if seed == 0 else load_demo_source(args, seed).requires_grad_(False)
        )
    return spec
