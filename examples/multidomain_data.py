"""Backbones and domains for train_multidomain.py: the built-in digits demo, timm / Hugging Face models, and
`datasets` names or local imagefolder directories, all turned into the same in-memory splits.

Every domain becomes three `TensorDataset`s (train / val / test). Where a data set ships no validation split,
one is carved from its training split with the seed; where it ships no test split, one is carved as well.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

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
    """(model in eval mode, image processor or None) for --backbone."""
    name = args.backbone
    if name == "demo":
        from ftn_peft.demo import digits

        return load_demo_source(args, 0), None
    if name.startswith(("local-dir:", "hf-hub:")):  # timm's own sources, e.g. a timm.models.save_for_hf folder
        import timm

        return timm.create_model(name, pretrained=True).eval(), None
    if os.path.isdir(name) or "/" in name:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(name)
        try:
            processor = AutoImageProcessor.from_pretrained(name)
        except (OSError, ValueError):
            processor = None  # a bare save_pretrained dir may have no preprocessor_config.json
        return model.eval(), processor
    import timm

    return timm.create_model(name, pretrained=True).eval(), None


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
def _split(x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int):
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    counts = np.bincount(y.numpy())
    stratify = y.numpy() if counts[counts > 0].min() >= 2 else None
    a, b = train_test_split(idx, test_size=fraction, random_state=seed, stratify=stratify)
    return (x[a], y[a]), (x[b], y[b])


def _to_tensors(ds, processor, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    image_col = next(c for c in ("image", "img", "pixel_values") if c in ds.column_names)
    label_col = next(c for c in ("label", "labels", "fine_label") if c in ds.column_names)
    images = [im.convert("RGB") for im in ds[image_col]]
    if processor is not None:
        x = processor(images=images, return_tensors="pt")["pixel_values"]
    else:
        from torchvision.transforms import functional as TF

        x = torch.stack([TF.normalize(TF.to_tensor(TF.resize(im, [image_size, image_size])),
                                      [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]) for im in images])
    return x.float(), torch.as_tensor(ds[label_col], dtype=torch.long)


def hf_domain_maker(args, processor) -> tuple[list, Callable[[str, int], Domain]]:
    """Domains from a local dir (one imagefolder subdir per domain) or a `datasets` name (one config per domain)."""
    import datasets

    local = os.path.isdir(args.dataset)
    if args.domains:
        names = args.domains.split(",")
    elif local:
        names = sorted(p.name for p in Path(args.dataset).iterdir() if p.is_dir())
    else:
        names = datasets.get_dataset_config_names(args.dataset)
    cache: dict = {}

    def load(name: str):
        if name not in cache:
            if local:
                dd = datasets.load_dataset("imagefolder", data_dir=str(Path(args.dataset) / name))
            else:
                dd = datasets.load_dataset(args.dataset, name)
            cache[name] = {split: _to_tensors(ds, processor, args.image_size) for split, ds in dd.items()}
        return cache[name]

    def make(name: str, seed: int) -> Domain:
        splits = load(name)
        train = splits["train"]
        test = splits.get("test")
        if test is None:
            train, test = _split(*train, 1 / 3, seed)
        val = splits.get("validation")
        if val is None:
            train, val = _split(*train, 0.2, seed)
        num_classes = int(max(int(t[1].max()) for t in (train, val, test))) + 1
        return Domain(name, num_classes, TensorDataset(*train), TensorDataset(*val), TensorDataset(*test))

    return names, make


def load_spec(args) -> Spec:
    source, processor = load_backbone(args)
    source.requires_grad_(False)
    targets, head = default_targets(source, args)
    if args.dataset == "demo":
        from ftn_peft.demo import digits

        # Three domains keep the default run within minutes on a laptop CPU; --domains adds the others.
        names = args.domains.split(",") if args.domains else list(digits.DOMAINS[:3])

        make = digits.make_domain
    else:
        names, make = hf_domain_maker(args, processor)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in source.modules())
    spec = Spec(source, targets, head, names, make, has_bn, backbone_parameters(source, head))
    if args.backbone == "demo":
        # The demo pretrains its own source model, and how well each method adapts depends on that model as much
        # as on the split: seed s uses the source trained with seed s, so the reported spread covers both.
        spec.source_for_seed = functools.cache(
            lambda seed: source if seed == 0 else load_demo_source(args, seed).requires_grad_(False)
        )
    return spec
