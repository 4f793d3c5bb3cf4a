"""Procedural indoor scenes with four consistent dense labels, generated at run time (no download).

Each scene is ray-cast from a pinhole camera at a nearly fixed height (1.05 to 1.15 m, looking level): a floor, a
back wall 4.5 to 7.5 m away (sometimes a side wall) and a few boxes (turned about the vertical axis) and spheres
standing on the floor at random depths; how far down an object meets the floor tells its depth. For every pixel the nearest surface gives
- the semantic class (`CLASSES`: floor, wall, box, sphere),
- the depth (the camera's z distance),
- the surface normal (unit vector in camera coordinates),
- the edges: where the object or its face changes (occlusion boundaries and the creases between box faces),
and the image is shaded from the same normals (Lambert with a random light and ambient term) with a random color
per object, a checker texture on the floor and a little noise, so the labels are exactly what the picture shows.
Colors are random per object, so a class must be told by its shape and shading, not its color.

A scene is a pure function of ``(seed, index)``: `SceneDataset` generates each one when it is read and holds
nothing. The encoder is pretrained on a *source* split (other seeds) with a different task, scene-level
attributes (which objects are present, where the light comes from, how many objects; `source_targets`), as an
ImageNet encoder is pretrained on classification before being adapted to NYUD's dense tasks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

CLASSES = ("floor", "wall", "box", "sphere")
TASKS = {"semseg": len(CLASSES), "depth": 1, "normals": 3, "edges": 1}  # output channels per task
IMAGE_SIZE = 32
MAX_DEPTH = 8.0  # the back wall is at most 7.5 m away
SOURCE_SEED = 10_000  # source scenes use seeds from here on; target seeds are small ints
NUM_SOURCE_TARGETS = 6
_CREASE_COS = math.cos(math.radians(30))


def _rotation_y(angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rays(size: int) -> torch.Tensor:
    """Ray directions (H, W, 3) with z = 1, so the ray parameter t is the depth; 60 degree field of view."""
    half = math.tan(math.radians(30))
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    v, u = torch.meshgrid(coords * half, coords * half, indexing="ij")  # image y grows downwards, like camera y
    return torch.stack([u, v, torch.ones_like(u)], dim=-1)


def _plane(d: torch.Tensor, normal: torch.Tensor, offset: float):
    """Hits of the plane n·p = offset (camera at the origin): depth and normal facing the camera."""
    denom = d @ normal
    t = offset / denom
    t = torch.where((denom.abs() > 1e-6) & (t > 0), t, torch.full_like(t, math.inf))
    n = normal if offset < 0 else -normal
    return t, n.expand(*t.shape, 3)


def _sphere(d: torch.Tensor, center: torch.Tensor, radius: float):
    a = (d * d).sum(-1)
    b = -2 * (d @ center)
    c = float(center @ center) - radius**2
    disc = b * b - 4 * a * c
    t = (-b - disc.clamp_min(0).sqrt()) / (2 * a)
    t = torch.where((disc > 0) & (t > 0), t, torch.full_like(t, math.inf))
    n = F.normalize(t[..., None] * d - center, dim=-1)
    return t, n, torch.zeros_like(t, dtype=torch.long)


def _box(d: torch.Tensor, center: torch.Tensor, half: torch.Tensor, angle: float):
    """Slab test in the box frame; returns depth, normal and which face (0..5) was hit."""
    rot = _rotation_y(angle)
    o = -center @ rot  # camera origin in box coordinates (rot is orthonormal: R^T x = x @ R)
    db = d @ rot
    safe = torch.where(db.abs() < 1e-9, torch.full_like(db, 1e-9), db)
    t1, t2 = (-half - o) / safe, (half - o) / safe
    tmin, tmax = torch.minimum(t1, t2), torch.maximum(t1, t2)
    t_near, axis = tmin.max(-1)
    t_far = tmax.min(-1).values
    hit = (t_near <= t_far) & (t_near > 0)
    t = torch.where(hit, t_near, torch.full_like(t_near, math.inf))
    sign = -torch.sign(torch.gather(db, -1, axis[..., None]))[..., 0]
    n_box = F.one_hot(axis, 3).float() * sign[..., None]
    face = axis * 2 + (sign > 0).long()
    return t, n_box @ rot.T, face


def render(seed: int, index: int, size: int = IMAGE_SIZE) -> dict[str, torch.Tensor]:
    """Scene ``index`` of ``seed``: ``image`` (3, H, W) in [0, 1], ``semseg`` (H, W) long, ``depth`` (1, H, W),
    ``normals`` (3, H, W), ``edges`` (1, H, W) in {0, 1}, and ``attributes`` (the source task's targets)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)

    def uniform(lo, hi, n=()):
        return lo + (hi - lo) * torch.rand(n, generator=g)

    d = _rays(size)
    surfaces = []  # (depth, normal, class, face id)
    floor_y = float(uniform(1.05, 1.15))  # the camera's height: nearly fixed, so an image row tells the floor's depth
    wall_z = float(uniform(4.5, 7.5))
    surfaces.append((*_plane(d, torch.tensor([0.0, 1.0, 0.0]), floor_y), 0))
    surfaces.append((*_plane(d, torch.tensor([0.0, 0.0, 1.0]), wall_z), 1))
    side_wall = bool(torch.rand((), generator=g) < 0.5)
    if side_wall:
        x = float(uniform(2.0, 3.5)) * (1 if torch.rand((), generator=g) < 0.5 else -1)
        surfaces.append((*_plane(d, torch.tensor([1.0, 0.0, 0.0]), x), 1))
    counts = [0, 0]
    for _ in range(int(torch.randint(1, 5, (), generator=g))):
        z = float(uniform(2.0, wall_z - 1.5))
        x = float(uniform(-0.5, 0.5)) * z * 0.9
        if torch.rand((), generator=g) < 0.5:
            half = uniform(0.3, 0.8, (3,))
            center = torch.tensor([x, floor_y - float(half[1]), z])
            t, n, face = _box(d, center, half, float(uniform(0, math.pi / 2)))
            surfaces.append((t, n, 2, face))
            counts[0] += 1
        else:
            r = float(uniform(0.35, 0.8))
            t, n, face = _sphere(d, torch.tensor([x, floor_y - r, z]), r)
            surfaces.append((t, n, 3, face))
            counts[1] += 1
    depth = torch.full(d.shape[:2], math.inf)
    normal = torch.zeros(*d.shape[:2], 3)
    semseg = torch.zeros(d.shape[:2], dtype=torch.long)
    surface_id = torch.zeros(d.shape[:2], dtype=torch.long)
    albedo = torch.zeros(*d.shape[:2], 3)
    for k, (t, n, cls, *face) in enumerate(surfaces):
        nearer = t < depth
        depth = torch.where(nearer, t, depth)
        normal = torch.where(nearer[..., None], n, normal)
        semseg[nearer] = cls
        part = face[0] if face else torch.zeros_like(semseg)
        surface_id = torch.where(nearer, k * 8 + part, surface_id)
        color = uniform(0.2, 1.0, (3,))
        albedo = torch.where(nearer[..., None], color, albedo)
    depth = depth.clamp(max=MAX_DEPTH)
    # The floor's checker texture: a cue for perspective that does not change any label.
    p = depth[..., None] * d
    checker = ((p[..., 0].floor() + p[..., 2].floor()) % 2 == 0) & (semseg == 0)
    albedo = torch.where(checker[..., None], albedo * 0.6, albedo)
    light = F.normalize(torch.tensor([float(uniform(-1, 1)), float(uniform(-1, -0.2)), -1.0]), dim=0)
    ambient = float(uniform(0.15, 0.35))
    shade = ambient + (1 - ambient) * (normal @ light).clamp_min(0)  # light: towards the light source
    image = (albedo * shade[..., None] + 0.03 * torch.randn(*albedo.shape, generator=g)).clamp(0, 1)
    edges = _boundaries(surface_id, normal)
    attributes = torch.tensor([
        counts[0] > 0, counts[1] > 0, side_wall, light[0] > 0, light[1] < -0.6, counts[0] + counts[1] >= 3,
    ], dtype=torch.float32)
    return {
        "image": image.permute(2, 0, 1).contiguous(),
        "semseg": semseg,
        "depth": depth[None],
        "normals": normal.permute(2, 0, 1).contiguous(),
        "edges": edges[None].float(),
        "attributes": attributes,
    }


def _boundaries(surface_id: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
    """One-pixel edges: a pixel whose right or lower neighbour lies on another surface, or across a crease."""
    edges = torch.zeros_like(surface_id, dtype=torch.bool)
    for dim in (0, 1):
        a = surface_id.narrow(dim, 0, surface_id.shape[dim] - 1)
        b = surface_id.narrow(dim, 1, surface_id.shape[dim] - 1)
        na = normal.narrow(dim, 0, normal.shape[dim] - 1)
        nb = normal.narrow(dim, 1, normal.shape[dim] - 1)
        crease = (na * nb).sum(-1) < _CREASE_COS
        edges.narrow(dim, 0, surface_id.shape[dim] - 1).logical_or_((a != b) & crease | (a // 8 != b // 8))
    return edges


class SceneDataset(Dataset):
    """``length`` scenes of ``seed``, each rendered when read: ``(image, {task: label map})``.

    Images are standardized with fixed statistics; `flip` mirrors image and labels (the normals' x flips sign).
    """

    MEAN, STD = 0.4, 0.25

    def __init__(self, seed: int, length: int, size: int = IMAGE_SIZE, flip: bool = False):
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.seed, self.length, self.size, self.flip = seed, length, size, flip

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        if not 0 <= i < self.length:
            raise IndexError(i)
        scene = render(self.seed, i, self.size)
        image = (scene.pop("image") - self.MEAN) / self.STD
        if self.flip and torch.rand(()) < 0.5:
            image, scene = image.flip(-1), {k: v.flip(-1) if v.dim() >= 2 else v for k, v in scene.items()}
            scene["normals"] = scene["normals"] * torch.tensor([-1.0, 1.0, 1.0])[:, None, None]
        return image, scene


def source_targets(scene: dict) -> torch.Tensor:
    """The source task's targets: `NUM_SOURCE_TARGETS` binary scene attributes."""
    return scene["attributes"]


# ---------------------------------------------------------------- the demo's model and its source pretraining
RECIPE_VERSION = 2
ARCH = dict(encoder="resnet18", channels=(16, 32, 64, 128), stem_width=16, layers=(1, 1, 1, 1), decoder_channels=32,
            low_level_channels=16, rates=(1, 2, 3), output_stride=8)


def build_model(num_outputs: int = 1):
    """The demo's `DenseModel`: a tiny timm ResNet encoder (one BasicBlock per stage, widths 16 to 128, output
    stride 8) and a DeepLabv3+ decoder with 32 channels; dilation rates 1, 2, 3 fit the 4×4 deepest features of a
    32 px scene."""
    from ..dense import build_model as build

    return build(num_outputs=num_outputs, **ARCH)


def render_many(seed: int, length: int, size: int = IMAGE_SIZE) -> dict[str, torch.Tensor]:
    """Scenes ``0..length-1`` of ``seed`` stacked per key (the demo's splits are about 2 MB at 32 px)."""
    scenes = [render(seed, i, size) for i in range(length)]
    return {k: torch.stack([s[k] for s in scenes]) for k in scenes[0]}


def standardize(images: torch.Tensor) -> torch.Tensor:
    return (images - SceneDataset.MEAN) / SceneDataset.STD


def load_source_model(cache_dir=None, seed: int = 0, scenes: int = 512, epochs: int = 12, lr: float = 3e-3,
                      batch_size: int = 32, size: int = IMAGE_SIZE):
    """The demo's `DenseModel` whose encoder was pretrained on source scenes (seeds from `SOURCE_SEED`, never
    used as targets) to predict scene attributes; trained once, then cached atomically (like the digits demo's
    source model). The decoder is freshly initialized from `seed`. Returns the model in eval mode."""
    from safetensors.torch import load_file

    from .digits import _cache_file, save_cached

    for name, value in (("scenes", scenes), ("epochs", epochs), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    settings = dict(kind="scenes_encoder", version=RECIPE_VERSION, seed=seed, scenes=scenes, epochs=epochs, lr=lr,
                    batch_size=batch_size, image_size=size, arch=repr(ARCH))
    path = _cache_file(cache_dir, settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model()
    if path.exists():
        model.encoder.load_state_dict(load_file(str(path)))
        return model.eval()
    data = render_many(SOURCE_SEED + seed, scenes, size)
    x, y = standardize(data["image"]), data["attributes"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = torch.nn.Linear(model.encoder.feature_info.channels()[-1], y.shape[1])
        params = list(model.encoder.parameters()) + list(probe.parameters())
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
        steps = epochs * math.ceil(len(x) / batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        model.encoder.train()
        for _ in range(epochs):
            order = torch.randperm(len(x))
            for i in range(0, len(x), batch_size):
                b = order[i:i + batch_size]
                features = model.encoder(x[b])[-1].mean((2, 3))
                loss = F.binary_cross_entropy_with_logits(probe(features), y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    model.eval()
    save_cached(model.encoder, path, settings)
    return model
