"""Streamed image domains: lazy datasets, the model's own transforms, seeded splits and loaders.

Nothing here holds images in memory. A domain split is a list of row numbers into an image source (files of a
local imagefolder, or the rows of a `datasets` table, which stays memory-mapped on disk), its integer labels and a
transform; each image is read, decoded and transformed when a DataLoader worker asks for it.

Preprocessing comes from the model: timm's `resolve_data_config` for a timm model, or the size, crop, resampling
and mean/std of a transformers image processor, turned into the same timm-style config; `create_transform` then
builds the deterministic evaluation transform (resize, centre crop, normalise) and the training one with the
augmentation used by the paper's ResNet experiments (random resized crop and horizontal flip, nothing else).
"""

from __future__ import annotations

import copy
import os
import random
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, get_worker_info

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PIL_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


# ------------------------------------------------------------------------------------------------ image sources
class ImageFiles:
    """Reads image i of a fixed list of files. Paths are one numpy bytes array, not a Python list: DataLoader
    workers touching a list's refcounts would copy it into every worker, for every epoch."""

    def __init__(self, root: str, relative_paths: Sequence[str]):
        self.root = str(root)
        self.paths = np.array([os.fsencode(p) for p in relative_paths], dtype=np.bytes_)

    def __len__(self) -> int:
        return len(self.paths)

    def __call__(self, i: int):
        from PIL import Image

        with open(os.path.join(self.root, os.fsdecode(self.paths[i])), "rb") as f:
            image = Image.open(f)
            return image.convert("RGB")  # also forces the decode while the file is open


class TableImages:
    """Reads the image column of row i of a `datasets.Dataset` (decoded only for that row)."""

    def __init__(self, table, column: str):
        self.table, self.column = table, column

    def __len__(self) -> int:
        return len(self.table)

    def __call__(self, i: int):
        from PIL import Image

        image = self.table[int(i)][self.column]
        if isinstance(image, str):  # a column of file paths
            image = Image.open(image)
        if isinstance(image, dict):  # an undecoded {"bytes", "path"} cell
            import io

            image = Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"])
        return image.convert("RGB")


class Images(Dataset):
    """Rows `indices` of an image source with their labels, as (transformed image, label) pairs.

    With `augment=True` the random transform draws from a generator seeded by (seed, epoch, row), so an image's
    augmentation depends on neither the worker that loads it, the number of workers or processes, nor where a
    resumed run starts: `with_epoch` (which `make_loader` calls) gives the view for one epoch. With `seed=None` (as
    built) the transform draws from the process's own generators, for a caller that seeds them itself (the
    Trainer seeds its workers, a per-sample seeding wrapper seeds each item).
    """

    def __init__(self, read: Callable[[int], object], labels: np.ndarray, indices: np.ndarray,
                 transform: Callable, augment: bool = False, seed: Optional[int] = None, epoch: int = 0):
        self.read, self.labels = read, np.asarray(labels, dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform, self.augment, self.seed, self.epoch = transform, augment, seed, epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = int(self.indices[k])
        image = self.read(i)
        if self.augment and self.seed is not None:
            # timm's random resized crop draws from Python's `random`, torchvision's flip from torch: seed both
            # (torch's CPU generator only: torch.manual_seed would also seed every accelerator, ~30x slower).
            # A worker's generators serve nothing else; in the main process they are put back afterwards.
            in_main = get_worker_info() is None
            states = (random.getstate(), torch.random.get_rng_state()) if in_main else None
            seed = hash((self.seed, self.epoch, i)) & 0x7FFF_FFFF_FFFF_FFFF
            random.seed(seed)
            torch.default_generator.manual_seed(seed)
            try:
                x = self.transform(image)
            finally:
                if in_main:
                    random.setstate(states[0])
                    torch.random.set_rng_state(states[1])
        else:
            x = self.transform(image)
        return x, int(self.labels[i])

    def with_epoch(self, seed: int, epoch: int) -> "Images":
        view = copy.copy(self)
        view.seed, view.epoch = seed, epoch
        return view

    def targets(self) -> np.ndarray:
        return self.labels[self.indices]


# ------------------------------------------------------------------------------------------------ splits
def _split_off(idx: np.ndarray, labels: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rest, part of `size` rows), stratified by label where every class can be represented, else random."""
    from sklearn.model_selection import train_test_split

    if size <= 0:
        return idx, idx[:0]
    try:
        rest, part = train_test_split(idx, test_size=size, random_state=seed, stratify=labels[idx])
    except ValueError:  # a class with one image, or fewer rows in the part than classes
        rest, part = train_test_split(idx, test_size=size, random_state=seed)
    return np.sort(rest), np.sort(part)


def carve(labels: np.ndarray, fractions: dict, seed: int, indices: Optional[np.ndarray] = None) -> dict:
    """Rows of a split carved into {"train", and each name in `fractions`} with the seed; each fraction is of all
    the rows, the parts are disjoint, and the order of `fractions` is the order they are cut in."""
    idx = np.arange(len(labels)) if indices is None else np.asarray(indices)
    out = {}
    total = len(idx)
    for name, fraction in fractions.items():
        idx, out[name] = _split_off(idx, labels, int(round(fraction * total)), seed)
    out["train"] = idx
    return out


# ------------------------------------------------------------------------------------------------ transforms
def data_config(model=None, processor=None, image_size: Optional[int] = None) -> dict:
    """timm-style data config (input_size, interpolation, mean, std, crop_pct, crop_mode) for a model.

    A transformers image processor gives its crop (or resize) size, resampling filter and mean/std; a timm model its
    `pretrained_cfg`; anything else ImageNet's statistics at 224 px. `image_size` overrides the input size.
    """
    if processor is not None:
        config = _processor_config(processor)
    else:
        from timm.data import resolve_data_config

        config = resolve_data_config({}, model=model) if model is not None else {}
        config = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": IMAGENET_MEAN,
                  "std": IMAGENET_STD, "crop_pct": 0.875, "crop_mode": "center", **config}
    if image_size:
        config["input_size"] = (config["input_size"][0], image_size, image_size)
    return config


def _size(size, *keys):
    if isinstance(size, int):
        return size
    size = size if isinstance(size, dict) else dict(size.items() if hasattr(size, "items") else vars(size))
    values = [size.get(k) for k in keys]
    if any(v is None for v in values):
        return None
    return values[0] if len(values) == 1 else values


def _processor_config(processor) -> dict:
    """A transformers image processor's preprocessing as a timm data config (resize, crop, mean/std)."""
    size = getattr(processor, "size", None) or {}
    shortest = _size(size, "shortest_edge")
    fixed = _size(size, "height", "width")
    crop = _size(getattr(processor, "crop_size", None) or {}, "height", "width")
    do_crop = bool(getattr(processor, "do_center_crop", False)) and crop is not None
    if shortest is not None:
        out = crop if do_crop else [shortest, shortest]
        crop_pct, mode = (out[0] / shortest, "center")
    elif fixed is not None:
        out = crop if do_crop else fixed
        crop_pct, mode = (out[0] / fixed[0], "center") if do_crop else (1.0, "squash")
    else:
        raise ValueError(f"{type(processor).__name__} has size {size!r}: neither shortest_edge nor height/width; "
                         "pass --image_size to choose the input size")
    resample = getattr(processor, "resample", 3)
    if resample is not None and hasattr(resample, "value"):
        resample = resample.value
    mean = getattr(processor, "image_mean", None) or IMAGENET_MEAN
    std = getattr(processor, "image_std", None) or IMAGENET_STD
    if not getattr(processor, "do_normalize", True):
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return {"input_size": (3, int(out[0]), int(out[1])), "interpolation": PIL_NAMES.get(resample, "bicubic"),
            "mean": tuple(mean), "std": tuple(std), "crop_pct": float(crop_pct), "crop_mode": mode}


def transforms(config: dict, augment: bool = True) -> tuple[Callable, Callable]:
    """(training, evaluation) transforms of PIL images for a data config. Training: random resized crop and
    horizontal flip (no colour jitter), or the evaluation transform when `augment` is False."""
    from timm.data import create_transform

    common = dict(input_size=config["input_size"], interpolation=config["interpolation"], mean=config["mean"],
                  std=config["std"])
    evaluation = create_transform(**common, crop_pct=config.get("crop_pct"), crop_mode=config.get("crop_mode"))
    if not augment:
        return evaluation, evaluation
    return create_transform(**common, is_training=True, hflip=0.5, color_jitter=None), evaluation


# ------------------------------------------------------------------------------------------------ loaders
def make_loader(dataset, batch_size: int, order=None, num_workers: int = 0, seed: int = 0, epoch: int = 0,
                **kwargs) -> DataLoader:
    """A DataLoader over `dataset` in `order` (row positions; None: as stored). An augmented `Images` gets the
    (seed, epoch) of its random transforms; workers decode and transform, the main process only collates."""
    if isinstance(dataset, Images) and dataset.augment:
        dataset = dataset.with_epoch(seed, epoch)
    if order is not None:
        dataset = Subset(dataset, order)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=num_workers > 0 and torch.cuda.is_available(), **kwargs)
