"""Data for train_dense.py: the built-in procedural scenes, or NYUD-v2 streamed from a directory or `datasets`.

Every sample is ``(image (3, H, W) standardized, {"semseg": (H, W) long, 255 = ignore, "depth": (1, H, W) metres,
0 = missing, "normals": (3, H, W) unit vectors, 0 = missing, "edges": (1, H, W) in {0, 1}})``.

NYUD-v2 directory layout (the NYUD-MT layout of the multi-task literature; each map may be .png or .npy):

    <root>/gt_sets/train.txt, gt_sets/val.txt      image ids, one per line (or <root>/train.txt, <root>/val.txt)
    <root>/images/<id>.jpg|png                      RGB
    <root>/segmentation/<id>.png|npy                class ids; with --seg_void_zero (default for NYUD) 0 is void
                                                    and 1..40 become 0..39
    <root>/depth/<id>.npy|png                       metres (a 16-bit png holds millimetres); 0 = missing
    <root>/normals/<id>.npy|png                     (H, W, 3) in [-1, 1], or a png with n = rgb / 127.5 - 1
    <root>/edge/<id>.npy|png  (or edges/)           boundary map; > 0 is an edge

A `datasets` name is streamed (`load_dataset(name, split=..., streaming=True)`) and must have the columns
image, semseg, depth, normals, edges holding the same arrays.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, IterableDataset, TensorDataset

from ftn_peft.demo import scenes

TASK_KEYS = ("semseg", "depth", "normals", "edges")
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


class DemoSplit(TensorDataset):
    """A split of procedural scenes, rendered once (about 2 MB at 32 px); flips as augmentation when `train`."""

    def __init__(self, seed: int, length: int, size: int, train: bool):
        data = scenes.render_many(seed, length, size)
        self.train = train
        super().__init__(scenes.standardize(data["image"]), *(data[k] for k in TASK_KEYS))

    def __getitem__(self, i):
        image, *maps = super().__getitem__(i)
        sample = dict(zip(TASK_KEYS, maps))
        if self.train and random.random() < 0.5:
            image, sample = _flip(image, sample)
        return image, sample


def _flip(image, sample):
    sample = {k: v.flip(-1) for k, v in sample.items()}
    sample["normals"] = sample["normals"] * torch.tensor([-1.0, 1.0, 1.0])[:, None, None]
    return image.flip(-1), sample


def _read(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    from PIL import Image

    with Image.open(path) as img:
        return np.array(img)


def _find(root: Path, folders, stem: str) -> Path:
    for folder in folders:
        for ext in (".npy", ".png", ".jpg", ".jpeg"):
            path = root / folder / f"{stem}{ext}"
            if path.exists():
                return path
    raise FileNotFoundError(f"no {'/'.join(folders)}/{stem}.(npy|png|jpg) under {root}; see the layout in "
                            "examples/dense_data.py")


def to_sample(image, semseg, depth, normals, edges, seg_void_zero: bool):
    """Arrays as read from disk or a dataset row, to the tensors every split yields (not yet resized)."""
    image = torch.as_tensor(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[:3] / 255.0
    semseg = torch.as_tensor(np.asarray(semseg).astype(np.int64))
    if semseg.dim() == 3:
        semseg = semseg[..., 0]
    if seg_void_zero:
        semseg = torch.where(semseg == 0, torch.full_like(semseg, 256), semseg) - 1
    depth = np.asarray(depth)
    depth = depth.astype(np.float32) / (1000.0 if depth.dtype == np.uint16 else 1.0)  # 16-bit png: millimetres
    depth = torch.as_tensor(depth).reshape(1, *semseg.shape)
    normals = np.asarray(normals)
    normals = normals.astype(np.float32) / 127.5 - 1.0 if normals.dtype == np.uint8 else normals.astype(np.float32)
    normals = torch.as_tensor(normals).permute(2, 0, 1)
    edges = (torch.as_tensor(np.asarray(edges, dtype=np.float32)) > 0).float()
    if edges.dim() == 3:
        edges = edges[..., 0]
    return image, {"semseg": semseg, "depth": depth, "normals": normals, "edges": edges[None]}


def augment(image, sample, size, train: bool, scale=(0.5, 2.0)):
    """The paper's augmentation when `train`: random scale in `scale`, random crop (padding with 'missing') to
    `size`, horizontal flip; otherwise a resize to `size`. Images are standardized with ImageNet statistics."""
    h, w = size
    if train:
        s = random.uniform(*scale)
        new = (max(1, round(image.shape[1] * s)), max(1, round(image.shape[2] * s)))
    else:
        new = (h, w)
    image = F.interpolate(image[None], size=new, mode="bilinear", align_corners=False)[0]
    sample = {k: _nearest(v, new) for k, v in sample.items()}
    if train:
        pad_h, pad_w = max(0, h - new[0]), max(0, w - new[1])
        image = F.pad(image, (0, pad_w, 0, pad_h))
        fill = {"semseg": 255}
        sample = {k: F.pad(v, (0, pad_w, 0, pad_h), value=fill.get(k, 0)) for k, v in sample.items()}
        top, left = random.randint(0, image.shape[1] - h), random.randint(0, image.shape[2] - w)
        image = image[:, top:top + h, left:left + w]
        sample = {k: v[..., top:top + h, left:left + w] for k, v in sample.items()}
        if random.random() < 0.5:
            image, sample = _flip(image, sample)
    return (image - IMAGENET_MEAN) / IMAGENET_STD, sample


def _nearest(v: torch.Tensor, size) -> torch.Tensor:
    x = v[None, None] if v.dim() == 2 else v[None]
    out = F.interpolate(x.float(), size=size, mode="nearest")[0]
    return (out[0] if v.dim() == 2 else out).to(v.dtype)


class NYUDFolder(Dataset):
    """NYUD-v2 in the layout above, read one sample at a time."""

    def __init__(self, root, split: str, size=(425, 560), train: bool = False, seg_void_zero: bool = True):
        self.root = Path(root)
        ids = next((p for p in (self.root / "gt_sets" / f"{split}.txt", self.root / f"{split}.txt") if p.exists()),
                   None)
        if ids is None:
            raise FileNotFoundError(f"{root} has no gt_sets/{split}.txt or {split}.txt listing the {split} ids")
        self.ids = [line.strip() for line in ids.read_text().splitlines() if line.strip()]
        self.size, self.train, self.seg_void_zero = tuple(size), train, seg_void_zero

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        stem = self.ids[i]
        arrays = [_read(_find(self.root, folders, stem)) for folders in
                  (("images",), ("segmentation",), ("depth",), ("normals",), ("edge", "edges"))]
        image, sample = to_sample(*arrays, seg_void_zero=self.seg_void_zero)
        return augment(image, sample, self.size, self.train)


class NYUDStream(IterableDataset):
    """NYUD-v2 streamed from the `datasets` hub name or script `name` (never downloaded as a whole)."""

    def __init__(self, name: str, split: str, size=(425, 560), train: bool = False, seg_void_zero: bool = True):
        import datasets

        self.data = datasets.load_dataset(name, split=split, streaming=True)
        self.size, self.train, self.seg_void_zero = tuple(size), train, seg_void_zero

    def __iter__(self):
        for row in self.data:
            arrays = [row[k] for k in ("image", "semseg", "depth", "normals", "edges")]
            image, sample = to_sample(*arrays, seg_void_zero=self.seg_void_zero)
            yield augment(image, sample, self.size, self.train)


def load(args, seed: int):
    """(train, test, num_classes) for `args.dataset`: "demo", a directory, or a `datasets` name."""
    if args.dataset == "demo":
        return (DemoSplit(seed, args.train_size, args.image_size, train=True),
                DemoSplit(seed + 100, args.test_size, args.image_size, train=False), len(scenes.CLASSES))
    size = tuple(args.crop_size)
    cls = NYUDFolder if Path(args.dataset).is_dir() else NYUDStream
    return (cls(args.dataset, args.train_split, size, train=True, seg_void_zero=args.seg_void_zero),
            cls(args.dataset, args.test_split, size, train=False, seg_void_zero=args.seg_void_zero),
            args.num_classes)


def steps_per_epoch(dataset, batch_size: int, stream_samples: int) -> int:
    """Optimizer steps per epoch (a stream's length is not known in advance: `stream_samples` gives it)."""
    n = len(dataset) if hasattr(dataset, "__len__") else stream_samples
    return math.ceil(n / batch_size)
