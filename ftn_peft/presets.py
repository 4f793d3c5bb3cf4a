"""Ready FTNConfigs for the paper's backbones, so that nobody has to write target regexes.

For any other timm / transformers vision model, `ftn_peft.auto_config(model, ...)` finds the targets by looking at
the model; both presets use it when given `model`.

- `resnet`: timm and torchvision ResNets: every Conv2d of the residual stages (3×3, 1×1 and downsample convs),
  not the stem; task BatchNorm; the classifier `fc` as task head. ResNet-50 at r=1: 49,204 factor parameters.
- `clip_vision`: the CLIP vision tower (`CLIPVisionModel`, `CLIPForImageClassification`, or the vision half of
  `CLIPModel`): query+value (`"qv"`) or output projection (`"o"`), head-tensorized as d_model × d × n; the paper's
  Gaussian init (σ = 0.05) and alpha (10 for Q&V, 100 for O) at r = 4.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from .auto import auto_config, find_layers
from .config import FTNConfig

# timm and torchvision share this layout: layer{1..4}.{block}.conv{1,2,3} and layer{i}.{block}.downsample.0
RESNET_TARGETS = r"^layer\d+\.\d+\.(conv\d+|downsample\.0)$"
CLIP_VISION_TARGETS = {
    "qv": r"^(.*vision_model\.)?encoder\.layers\.\d+\.self_attn\.(q_proj|v_proj)$",
    "o": r"^(.*vision_model\.)?encoder\.layers\.\d+\.self_attn\.out_proj$",
}
CLIP_PAPER_ALPHA = {"qv": 10.0, "o": 100.0}


def resnet(
    r: int = 1,
    num_classes: Optional[int] = None,
    head_module: Optional[str] = "fc",
    model: Optional[nn.Module] = None,
    init_weights="xavier",
    **kwargs,
) -> FTNConfig:
    """FTN for a ResNet: all convs but the stem, task BatchNorm, and a task head with `num_classes` outputs.

    Pass `model` for ResNet variants whose downsample path is not `downsample.0` (timm's `resnet50d`, with an
    average pool first): the targets are then found by `ftn_peft.auto_config` from the model's own layers.
    """
    if model is not None:
        # The residual stages only: a deep stem (resnet50d's conv1.0/.3/.6) stays frozen as a whole.
        stem = [name for name in find_layers(model).by_kind["conv"] if not name.startswith("layer")]
        config = auto_config(
            model, r=r, targets="convs", num_classes=num_classes, init_weights=init_weights,
            head=head_module or False, task_batchnorm=True, **kwargs,
        )
        config.target_modules = config.target_modules - set(stem)
        if not config.target_modules:
            raise ValueError("model has no Conv2d under layer1..layer4; is it a timm / torchvision ResNet?")
        return config
    return FTNConfig(
        r=r,
        target_modules=RESNET_TARGETS,
        init_weights=init_weights,
        head_module=head_module,
        head_num_outputs=num_classes,
        task_batchnorm=True,
        **kwargs,
    )


def clip_vision(
    r: int = 4,
    targets: str = "o",
    num_classes: Optional[int] = None,
    head_module: Optional[str] = None,
    alpha: Optional[float] = None,
    init_weights="gaussian",
    attention_heads="auto",
    model: Optional[nn.Module] = None,
    **kwargs,
) -> FTNConfig:
    """FTN for the CLIP vision tower: `targets="qv"` (query and value) or `"o"` (output projection).

    `alpha=None` takes the paper's value for the chosen targets. For `CLIPForImageClassification`, pass
    `head_module="classifier"` and `num_classes` to give each adapter its own classifier. With `model`, the
    projections are found by `ftn_peft.auto_config` (any CLIP-like tower: SigLIP, ...).
    """
    if targets not in CLIP_VISION_TARGETS:
        raise ValueError(f"targets={targets!r} must be one of {sorted(CLIP_VISION_TARGETS)}")
    alpha = CLIP_PAPER_ALPHA[targets] if alpha is None else alpha
    if model is not None:
        return auto_config(
            model, r=r, targets=targets, num_classes=num_classes, alpha=alpha, init_weights=init_weights,
            head=head_module or False, attention_heads=attention_heads, **kwargs,
        )
    return FTNConfig(
        r=r,
        alpha=alpha,
        target_modules=CLIP_VISION_TARGETS[targets],
        init_weights=init_weights,
        attention_heads=attention_heads,
        head_module=head_module,
        head_num_outputs=num_classes,
        **kwargs,
    )
