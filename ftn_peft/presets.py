"""Ready FTNConfigs for the paper's backbones, so that nobody has to write target regexes.

- `resnet`: timm and torchvision ResNets: every Conv2d of the residual stages (3×3, 1×1 and downsample convs),
  not the stem; task BatchNorm; the classifier `fc` as task head. ResNet-50 at r=1: 49,204 factor parameters.
- `clip_vision`: the CLIP vision tower (`CLIPVisionModel`, `CLIPForImageClassification`, or the vision half of
  `CLIPModel`): query+value (`"qv"`) or output projection (`"o"`), head-tensorized as d_model × d × n; the paper's
  Gaussian init (σ = 0.05) and alpha (10 for Q&V, 100 for O) at r = 4.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

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
    average pool first): the targets are then listed from the model's own Conv2d layers.
    """
    targets = RESNET_TARGETS
    if model is not None:
        targets = [
            name for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and name.startswith("layer")
        ]
        if not targets:
            raise ValueError("model has no Conv2d under layer1..layer4; is it a timm / torchvision ResNet?")
    return FTNConfig(
        r=r,
        target_modules=targets,
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
    **kwargs,
) -> FTNConfig:
    """FTN for the CLIP vision tower: `targets="qv"` (query and value) or `"o"` (output projection).

    `alpha=None` takes the paper's value for the chosen targets. For `CLIPForImageClassification`, pass
    `head_module="classifier"` and `num_classes` to give each adapter its own classifier.
    """
    if targets not in CLIP_VISION_TARGETS:
        raise ValueError(f"targets={targets!r} must be one of {sorted(CLIP_VISION_TARGETS)}")
    return FTNConfig(
        r=r,
        alpha=CLIP_PAPER_ALPHA[targets] if alpha is None else alpha,
        target_modules=CLIP_VISION_TARGETS[targets],
        init_weights=init_weights,
        attention_heads=attention_heads,
        head_module=head_module,
        head_num_outputs=num_classes,
        **kwargs,
    )
