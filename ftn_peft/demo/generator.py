"""A small image generator pretrained on the digits, for the paper's multi-domain generation setting (Appendix F).

A generator G(z; W) maps a latent code to an image. Given a frozen G and a set of images, the latent codes that
reproduce them are found by gradient descent on ``Σ_i ‖x_i − G(z_i; W)‖²`` (the paper's eq. 7). For images of a
domain G never saw, no latent code may reproduce them; FTN widens what G can draw by optimizing, with the codes,
per-domain CP factors ΔW_t on its transposed convolutions and per-domain BatchNorm: ``G(z_i; W + ΔW_t)``.

Here G is a DCGAN-style stack of `nn.ConvTranspose2d` + `nn.BatchNorm2d`, 16×16 RGB out, trained as a GLO
(Bojanowski et al., "Optimizing the latent space of generative networks"): one free latent code per source image,
optimized jointly with the weights. That is the same latent optimization the adaptation then runs, so the source
model is trained for exactly how it is used. The source domain is the SOURCE pool of `digits` (grey digits); the
target domains are made from its TARGET pool, which the generator never saw.

Every BatchNorm runs in eval mode during adaptation: the source statistics stay, and each domain trains the
affine parameters of its own copy, so a domain's BatchNorm is a learned per-channel scale and shift.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import digits

IMAGE_SIZE = digits.IMAGE_SIZE  # 16
LATENT_DIM = 32
RECIPE_VERSION = 1  # bump when the generator, its data or its training changes: old caches are then not reused

# Colours of the "colour" domain (RGB in [0, 1]): orange strokes on a dark blue ground.
STROKE_RGB = (1.0, 0.55, 0.1)
GROUND_RGB = (0.1, 0.15, 0.45)


class Generator(nn.Module):
    """z (B, latent_dim) -> image (B, 3, 16, 16) in [0, 1]: four transposed convs, BatchNorm and ReLU between.

    The code is put on the unit sphere first (GLO's constraint), so a latent is only a direction and latent
    optimization needs no projection step.
    """

    def __init__(self, latent_dim: int = LATENT_DIM, widths: Sequence[int] = (32, 16, 8), out_channels: int = 3):
        super().__init__()
        w1, w2, w3 = widths
        self.latent_dim = latent_dim
        self.up1 = nn.ConvTranspose2d(latent_dim, w1, 4, bias=False)  # 1 -> 4
        self.bn1 = nn.BatchNorm2d(w1)
        self.up2 = nn.ConvTranspose2d(w1, w2, 4, stride=2, padding=1, bias=False)  # 4 -> 8
        self.bn2 = nn.BatchNorm2d(w2)
        self.up3 = nn.ConvTranspose2d(w2, w3, 4, stride=2, padding=1, bias=False)  # 8 -> 16
        self.bn3 = nn.BatchNorm2d(w3)
        self.to_rgb = nn.ConvTranspose2d(w3, out_channels, 3, padding=1)  # 16 -> 16

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = F.normalize(z, dim=1)[:, :, None, None]
        x = F.relu(self.bn1(self.up1(x)))
        x = F.relu(self.bn2(self.up2(x)))
        x = F.relu(self.bn3(self.up3(x)))
        return torch.sigmoid(self.to_rgb(x))


# ---------------------------------------------------------------- data
def _rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1).contiguous()


def _coloured(x: torch.Tensor) -> torch.Tensor:
    stroke = torch.tensor(STROKE_RGB)[None, :, None, None]
    ground = torch.tensor(GROUND_RGB)[None, :, None, None]
    return ground * (1 - x) + stroke * x


def _stripes(x: torch.Tensor) -> torch.Tensor:
    # Strokes filled with diagonal stripes: a texture no grey source digit has.
    h, w = x.shape[-2:]
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pattern = 0.35 + 0.65 * ((i + j) % 4 < 2).float()
    return _rgb(x * pattern)


# name -> (N, 1, H, W) grey digits in [0, 1] -> (N, 3, H, W) RGB in [0, 1]
DOMAINS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "original": _rgb,  # a control: the source domain's look, on digits G never saw
    "inverted": lambda x: _rgb(1 - x),
    "rotated": lambda x: _rgb(torch.rot90(x, 1, dims=(2, 3))),
    "edges": lambda x: _rgb(digits._edges(x)),
    "colour": _coloured,
    "stripes": _stripes,
}


def source_images() -> torch.Tensor:
    """The SOURCE pool of the digits as grey RGB images, (N, 3, 16, 16) in [0, 1]: what G is trained on."""
    x, _ = digits.load_images()
    src, _ = digits.pool_indices()
    return _rgb(x[torch.as_tensor(src)])


def domain_images(name: str, count: int, seed: int, offset: int = 0) -> torch.Tensor:
    """`count` images of domain `name` from the TARGET pool (never seen by G), (count, 3, 16, 16) in [0, 1].

    `seed` fixes a permutation of the pool; ``offset`` starts further along it, so ``offset=count`` gives a second,
    disjoint set of the same seed.
    """
    if name not in DOMAINS:
        raise ValueError(f"domain {name!r} is not one of {sorted(DOMAINS)}; pick one of those or add it to DOMAINS")
    x, _ = digits.load_images()
    _, tgt = digits.pool_indices()
    if count < 1 or offset < 0 or offset + count > len(tgt):
        raise ValueError(f"count={count} from offset={offset} must fit in the {len(tgt)} held-out digits")
    order = torch.randperm(len(tgt), generator=torch.Generator().manual_seed(seed))[offset:offset + count]
    return DOMAINS[name](x[torch.as_tensor(tgt)[order]]).clamp(0.0, 1.0)


# ---------------------------------------------------------------- source generator
def train_generator(images: torch.Tensor, steps: int, batch_size: int = 64, lr: float = 3e-3, latent_lr: float = 3e-2,
                    seed: int = 0) -> Generator:
    """A GLO: G and one latent code per image, trained together on the mean squared error."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Generator()
    latents = nn.Parameter(torch.randn(len(images), LATENT_DIM, generator=g))
    opt = torch.optim.Adam([{"params": model.parameters(), "lr": lr}, {"params": [latents], "lr": latent_lr}])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=g)
        loss = F.mse_loss(model(latents[idx]), images[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def load_generator(cache_dir=None, seed: int = 0, steps: int = 600, batch_size: int = 64) -> Generator:
    """The source generator, trained once on the SOURCE pool and then cached (safetensors, atomic, keyed by the
    recipe) like the digits demo's source model. Returns it in eval mode."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    from safetensors.torch import load_file

    settings = dict(version=RECIPE_VERSION, seed=seed, steps=steps, batch_size=batch_size, image_size=IMAGE_SIZE,
                    latent_dim=LATENT_DIM, kind="glo_generator")
    path = digits._cache_file(cache_dir, settings)
    path = path.with_name(path.name.replace("digits_source_", "digits_generator_"))
    if path.exists():
        model = Generator()
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    model = train_generator(source_images(), steps, batch_size, seed=seed)
    digits.save_cached(model, Path(path), settings)
    return model


# ---------------------------------------------------------------- reconstruction by latent optimization
def fit_latents(generator: nn.Module, images: torch.Tensor, steps: int, latent_lr: float = 0.05,
                groups: Sequence[dict] = (), seed: int = 0, latents: Optional[torch.Tensor] = None):
    """Minimize ``Σ_i ‖x_i − G(z_i)‖²`` over the codes z_i and the parameter `groups` (Adam param groups with
    their own "lr"; none: the paper's eq. 7, codes only). Adam, cosine schedule, full batch; `generator` is run in
    eval mode. Returns (reconstructions, codes), both detached."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    g = torch.Generator().manual_seed(seed)
    z = nn.Parameter(torch.randn(len(images), LATENT_DIM, generator=g) if latents is None else latents.clone())
    opt = torch.optim.Adam([{"params": [z], "lr": latent_lr}, *groups])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    generator.eval()
    for _ in range(steps):
        loss = F.mse_loss(generator(z), images, reduction="sum") / len(images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return generator(z).clamp(0.0, 1.0), z.detach()


@torch.no_grad()
def image_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """PSNR (dB, mean over images, data range 1) and SSIM (7×7 Gaussian window, σ 1.5: the usual 11×11 leaves
    only 6×6 positions on a 16-pixel image) from torchmetrics."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"pred and target must be (N, C, H, W) of one shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    psnr = peak_signal_noise_ratio(pred, target, data_range=1.0, dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(pred, target, data_range=1.0, kernel_size=7, sigma=1.5)
    return {"psnr": float(psnr), "ssim": float(ssim)}


# ---------------------------------------------------------------- LoRA on transposed convolutions
def lora_conv_transpose_class():
    """PEFT's LoRA for `nn.ConvTranspose1d/2d`, which peft (0.21) does not adapt: register it with
    ``LoraConfig._register_custom_module({nn.ConvTranspose2d: cls})``, PEFT's hook for layer types it lacks.

    It mirrors PEFT's own conv LoRA: lora_A is a transposed conv of the layer's kernel, stride, padding, output
    padding and dilation from Cin to r channels, lora_B a 1×1 map from r to Cout, so ``ΔW[i, o, k] = scale ·
    Σ_j A[i, j, k] B[j, o]`` has r·(Cin·k² + Cout) parameters, as LoRA on a Conv2d has. groups must be 1.
    """
    from peft.tuners.lora.layer import _ConvNd

    class LoraConvTranspose(_ConvNd):
        def __init__(self, base_layer, adapter_name, **kwargs):
            base = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
            if base.groups != 1:
                raise ValueError(f"LoRA on {type(base).__name__} supports groups=1 only, got groups={base.groups}; "
                                 "leave that layer out of target_modules")
            super().__init__(base_layer, adapter_name, **kwargs)

        def _get_in_out_features(self, module):
            return module.in_channels, module.out_channels

        def update_layer(self, adapter_name, *args, **kwargs):
            base = self.get_base_layer()
            # peft < 0.19 has no _get_in_out_features hook and leaves these None for a layer type it does not know
            self.in_features, self.out_features = base.in_channels, base.out_channels
            super().update_layer(adapter_name, *args, **kwargs)
            self.lora_A[adapter_name].output_padding = base.output_padding
            self.lora_A[adapter_name].dilation = base.dilation

        def get_delta_weight(self, adapter):
            a = self.lora_A[adapter].weight  # (Cin, r, *k)
            b = self.lora_B[adapter].weight.flatten(1)  # (r, Cout)
            delta = torch.einsum("ij...,jo->io...", a, b) * self.scaling[adapter]
            return delta.to(self.get_base_layer().weight.dtype)

    return LoraConvTranspose
