"""Multi-task dense prediction: one frozen encoder, and per task an FTN adapter with its own DeepLabv3+ decoder.

`DenseModel` is an encoder (any module returning ``[low-level features, deepest features]``, e.g. timm's
``features_only`` ResNet) followed by a `DeepLabV3PlusHead`. With `ftn_config`, FTN adapts the encoder's convs and
makes the whole decoder the adapter's task head: each task (segmentation with C classes, depth 1, normals 3,
edges 1) owns rank-r factors, task BatchNorm and a decoder, all saved and loaded with the adapter::

    model = get_peft_model(build_model(), ftn_config(r=10, num_outputs=13), adapter_name="semseg")
    model.add_adapter("depth", ftn_config(r=10, num_outputs=1))
    maps = ftn_peft.forward_all_tasks(model.eval(), images, ["semseg", "depth"])   # {task: (B, C_t, H, W)}

The baselines of the paper's dense table (fine-tuning, feature extractor, BatchNorm + decoder) are built on the
same model by `baseline`.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import FTNConfig
from .task_layers import resized_head

# Every conv of the encoder's residual stages (not the stem), as presets.resnet, under the attribute `encoder`.
ENCODER_TARGETS = r"^encoder\.layer\d+\.\d+\.(conv\d+|downsample\.0)$"
BASELINES = ("finetune", "feature_extractor", "bn_decoder")

__all__ = ["ASPP", "BASELINES", "DeepLabV3PlusHead", "DenseModel", "baseline", "build_model", "ftn_config"]


def _conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1×1 conv, three dilated 3×3 convs and image pooling, fused by a 1×1 conv."""

    def __init__(self, cin: int, cout: int, rates: Sequence[int] = (6, 12, 18)):
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(cin, cout)] + [_conv_bn_relu(cin, cout, 3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.ReLU())
        self.project = _conv_bn_relu(cout * (len(rates) + 2), cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])  # no BatchNorm on 1×1 maps: batches of one must work
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class DeepLabV3PlusHead(nn.Module):
    """The DeepLabv3+ decoder (Chen et al., ECCV 2018): ASPP on the deepest features, upsampled to the low-level
    features (stride 4), fused with their 1×1 projection by two 3×3 convs; a 1×1 classifier with `num_outputs`
    channels, upsampled to `size` (the input's). The classifier is registered last: FTN resizes it per task."""

    def __init__(self, high_channels: int, low_channels: int, num_outputs: int, channels: int = 256,
                 low_level_channels: int = 48, rates: Sequence[int] = (6, 12, 18)):
        super().__init__()
        self.aspp = ASPP(high_channels, channels, rates)
        self.low = _conv_bn_relu(low_channels, low_level_channels)
        self.fuse = nn.Sequential(
            _conv_bn_relu(channels + low_level_channels, channels, 3), _conv_bn_relu(channels, channels, 3)
        )
        self.classifier = nn.Conv2d(channels, num_outputs, 1)

    def forward(self, high: torch.Tensor, low: torch.Tensor, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        low = self.low(low)
        high = F.interpolate(self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
        out = self.classifier(self.fuse(torch.cat([high, low], dim=1)))
        size = tuple(size) if size is not None else tuple(4 * s for s in low.shape[-2:])
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)


class DenseModel(nn.Module):
    """An encoder returning ``[low-level, deepest]`` feature maps and a decoder; outputs maps at input size.

    `get_classifier()` (timm's name for the output module) returns the decoder, so FTN accepts a decoder with
    another number of output channels per adapter (`FTNConfig(head_module="decoder", head_num_outputs=...)`).
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def get_classifier(self) -> nn.Module:
        return self.decoder

    def forward(self, x: torch.Tensor):
        low, high = self.encoder(x)
        # A list (one map per sample) when a mixed batch's tasks have different channel counts.
        return self.decoder(high, low, size=tuple(x.shape[-2:]))


class _FrozenEncoder(nn.Module):
    """Keeps the encoder in eval mode whatever `train()` says: re-estimating its BatchNorm statistics on the task
    would silently turn the feature extractor into "BatchNorm + decoder"."""

    def __init__(self, model: DenseModel):
        super().__init__()
        self.model = model
        self.train(True)

    def train(self, mode: bool = True) -> "_FrozenEncoder":
        super().train(mode)
        self.model.encoder.eval()
        return self

    def forward(self, x: torch.Tensor):
        return self.model(x)


def build_model(encoder: str = "resnet18", num_outputs: int = 1, in_chans: int = 3, output_stride: int = 16,
                decoder_channels: int = 256, low_level_channels: int = 48, rates: Sequence[int] = (6, 12, 18),
                pretrained: bool = False, **encoder_kwargs) -> DenseModel:
    """A timm ``features_only`` encoder (stride-4 and deepest features; the paper: ResNet-18, output stride 16)
    with a DeepLabv3+ decoder. ``encoder_kwargs`` go to `timm.create_model` (e.g. ``channels=``, ``layers=``)."""
    import timm

    encoder_net = timm.create_model(encoder, pretrained=pretrained, features_only=True, in_chans=in_chans,
                                    out_indices=(1, -1), output_stride=output_stride, **encoder_kwargs)
    low, high = encoder_net.feature_info.channels()
    return DenseModel(encoder_net, DeepLabV3PlusHead(high, low, num_outputs, decoder_channels, low_level_channels,
                                                     rates))


def ftn_config(r: int = 1, num_outputs: Optional[int] = None, init_weights="xavier", **kwargs) -> FTNConfig:
    """FTN for a `DenseModel` with a ResNet encoder: every conv of the residual stages, task BatchNorm, and the
    whole decoder as the task head with `num_outputs` output channels."""
    return FTNConfig(r=r, target_modules=ENCODER_TARGETS, init_weights=init_weights, head_module="decoder",
                     head_num_outputs=num_outputs, task_batchnorm=True, **kwargs)


def baseline(method: str, model: DenseModel, num_outputs: int) -> nn.Module:
    """One task's model for a comparison method, on a copy of `model` with a decoder of `num_outputs` channels.

    ``finetune``: everything trains. ``feature_extractor``: the decoder only; the encoder's BatchNorm keeps the
    source statistics. ``bn_decoder``: the decoder and the encoder's BatchNorm (affine parameters and statistics).
    """
    if method not in BASELINES:
        raise ValueError(f"method={method!r} is not one of {BASELINES}; FTN is built with get_peft_model(ftn_config())")
    new = copy.deepcopy(model)
    new.decoder = resized_head(new.decoder, num_outputs)
    if method == "finetune":
        return new.requires_grad_(True)
    new.requires_grad_(False)
    new.decoder.requires_grad_(True)
    if method == "feature_extractor":
        return _FrozenEncoder(new)
    for module in new.encoder.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.requires_grad_(True)
    return new
