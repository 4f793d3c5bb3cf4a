"""The transformer twin of the digits demo: a tiny CLIP vision transformer on the same data.

`digits.py` pretrains a tiny ResNet on the SOURCE half of scikit-learn's digits and builds target domains from the
TARGET half. This module pretrains a tiny `transformers.CLIPForImageClassification` (random initialisation, nothing
downloaded) on exactly the same SOURCE pool, caches it the same way, and builds the methods of the paper's CLIP
comparison on it: linear probe, fine-tuning, LoRA on query+value, and FTN on query+value or on the attention output
projection (`ftn_peft.presets.clip_vision`, r = 4, Gaussian init, alpha 10 / 100).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import digits

# 16x16 digits cut into 4x4 patches: 16 tokens + CLS. Four heads of 16 channels keep the head tensorization of FTN
# (d_model x d x n = 64 x 16 x 4) as non-trivial as in the real ViT-B (768 x 64 x 12).
PATCH_SIZE = 4
HIDDEN_SIZE = 64
NUM_LAYERS = 4
NUM_HEADS = 4
HEAD = "classifier"
# Bump when the architecture or the source recipe changes, so stale caches are not reused.
RECIPE_VERSION = 1
# (label, what it trains); the labels are the rows of the demo's table.
METHODS = ("linear_probe", "finetune", "lora_qv", "ftn_qv", "ftn_o")

__all__ = [
    "METHODS", "HEAD", "build_source_vit", "load_source_vit", "build_method", "logits", "evaluate",
    "lora_rank_matching", "backbone_parameters",
]


class _Logits(nn.Module):
    """model(x).logits as a plain tensor, for loops written for timm models (digits._train_source)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return logits(self.model(x))


def logits(output) -> torch.Tensor:
    """The logits of a transformers output (`.logits`), or the tensor itself."""
    return output.logits if hasattr(output, "logits") else output


def build_source_vit(num_classes: int = 10, hidden_size: int = HIDDEN_SIZE, num_layers: int = NUM_LAYERS,
                     num_heads: int = NUM_HEADS, patch_size: int = PATCH_SIZE) -> nn.Module:
    """A randomly initialised `CLIPForImageClassification` for 1 x 16 x 16 digits (head `classifier`)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be a multiple of num_heads={num_heads}")
    if digits.IMAGE_SIZE % patch_size:
        raise ValueError(f"patch_size={patch_size} must divide the image size {digits.IMAGE_SIZE}")
    from transformers import CLIPConfig, CLIPForImageClassification

    vision = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, image_size=digits.IMAGE_SIZE, patch_size=patch_size,
                  num_channels=1)
    # The classifier uses only the vision tower; a minimal, self-consistent text config keeps CLIPConfig quiet.
    text = dict(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1, vocab_size=8,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    config = CLIPConfig(vision_config=vision, text_config=text, num_labels=num_classes)
    return CLIPForImageClassification(config)


def load_source_vit(cache_dir=None, seed: int = 0, epochs: int = 20, lr: float = 3e-3, batch_size: int = 32,
                    device="cpu") -> nn.Module:
    """The tiny CLIP ViT pretrained on the digits SOURCE pool, trained once and then cached.

    Same recipe, pools and cache directory as `digits.load_source_model` (AdamW, one-cycle schedule, one-pixel
    shifts; ~/.cache/ftn_peft by default); the cache key also covers the architecture. Defaults: about 15 s on one
    CPU core, about 97% on the held-apart original TARGET-pool images. Returns the model in eval mode.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    from safetensors.torch import load_file

    settings = dict(model="clip_vit", version=RECIPE_VERSION, digits_version=digits.RECIPE_VERSION, seed=seed,
                    epochs=epochs, lr=lr, batch_size=batch_size, image_size=digits.IMAGE_SIZE,
                    patch_size=PATCH_SIZE, hidden_size=HIDDEN_SIZE, layers=NUM_LAYERS, heads=NUM_HEADS)
    path = digits._cache_file(cache_dir, settings)
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left untouched
        torch.manual_seed(seed)
        model = build_source_vit()
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.to(device).eval()

    model.to(device)
    digits._train_source(_Logits(model), digits.source_dataset()[0], epochs, lr, batch_size, seed, device)
    model.eval()
    digits.save_cached(model, path, settings)
    return model


@torch.no_grad()
def evaluate(model: nn.Module, data, batch_size: int = 512) -> float:
    """Top-1 accuracy of `model` (in its current train/eval mode) on a `TensorDataset`."""
    return digits.evaluate(_Logits(model), data, batch_size)


def backbone_parameters(model: nn.Module) -> int:
    """Parameters of the source model without its classifier (the paper's "feature extractor")."""
    head = {id(p) for p in model.get_submodule(HEAD).parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in head)


def _dims(model: nn.Module) -> tuple[int, int, int, int]:
    cfg = model.config.vision_config
    return cfg.num_hidden_layers, cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads, cfg.num_attention_heads


def lora_rank_matching(model: nn.Module, ftn_rank: int = 4) -> int:
    """The LoRA rank on query+value whose parameter count is closest to FTN's on query+value at `ftn_rank`.

    Per layer FTN (Q&V) trains 2 r (d_model + d + n), LoRA 2 r' (2 d_model) (A and B of both projections).
    """
    _, d_model, d, n = _dims(model)
    ftn = 2 * ftn_rank * (d_model + d + n)
    return max(1, round(ftn / (4 * d_model)))


def build_method(method: str, source: nn.Module, num_classes: int, r: int = 4,
                 alpha: Optional[float] = None) -> nn.Module:
    """A new model for one domain, with exactly the parameters `method` trains set `requires_grad=True`.

    `r` is LoRA's or FTN's rank; `alpha` overrides FTN's paper alpha (10 for Q&V, 100 for O).
    """
    from .. import baselines, presets

    if method == "linear_probe":
        return baselines.feature_extractor(source, num_classes, HEAD)
    if method == "finetune":
        return baselines.finetune(source, num_classes, HEAD)
    if method == "lora_qv":
        # No BatchNorm in a ViT: LoRA differs from FTN only in how the update is parameterized.
        return baselines.lora(source, num_classes, presets.CLIP_VISION_TARGETS["qv"], r=r, head_module=HEAD,
                              task_batchnorm=False)
    if method in ("ftn_qv", "ftn_o"):
        config = presets.clip_vision(r=r, targets=method[4:], num_classes=num_classes, head_module=HEAD,
                                     alpha=alpha)
        return baselines.ftn(source, num_classes, config=config)
    raise ValueError(f"method={method!r} is not one of {METHODS}")
