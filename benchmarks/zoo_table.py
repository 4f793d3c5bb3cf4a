"""The model zoo of `ftn_peft.auto_config`: what it adapts in each architecture and what one task costs at r = 1.

    python benchmarks/zoo_table.py                 # writes outputs/zoo_table/zoo.md
    python benchmarks/zoo_table.py --out docs      # the docs page
    python benchmarks/zoo_table.py --models timm/efficientnet_b4 hf/vit-b16

Every model is built at full size with random weights (nothing is downloaded) and only counted, never run. Each
task gets a 100-class head. The parameter columns come from `ftn_peft.parameter_report`.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

import timm
import torch
import transformers as T
from peft import get_peft_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

import ftn_peft  # noqa: E402
from ftn_peft.layer import FTNLayer  # noqa: E402

NUM_CLASSES = 100


def timm_model(name):
    return lambda: timm.create_model(name, pretrained=False)


def hf_model(model_cls, config_cls, **kwargs):
    return lambda: getattr(T, model_cls)(getattr(T, config_cls)(**kwargs))


def hf_vision_classifier(model_cls, config_cls, vision_cls):
    return lambda: getattr(T, model_cls)(getattr(T, config_cls)(vision_config=getattr(T, vision_cls)().to_dict()))


CONV = ("convs",)
ATTN = ("qv", "o")
FUSED = ("qkv", "o")
# name: (builder, targets, one row each)
MODELS = {
    "timm/resnet50": (timm_model("resnet50"), CONV),
    "timm/resnext50_32x4d": (timm_model("resnext50_32x4d"), CONV),
    "timm/efficientnet_b0": (timm_model("efficientnet_b0"), CONV),
    "timm/efficientnet_b4": (timm_model("efficientnet_b4"), CONV),
    "timm/mobilenetv3_large_100": (timm_model("mobilenetv3_large_100"), CONV),
    "timm/convnext_tiny": (timm_model("convnext_tiny"), ("convs", "all")),
    "timm/regnety_002": (timm_model("regnety_002"), CONV),
    "timm/vit_small_patch16_224": (timm_model("vit_small_patch16_224"), FUSED),
    "timm/deit_tiny_patch16_224": (timm_model("deit_tiny_patch16_224"), FUSED),
    "timm/swin_tiny_patch4_window7_224": (timm_model("swin_tiny_patch4_window7_224"), FUSED),
    "hf/vit-b16": (hf_model("ViTForImageClassification", "ViTConfig"), ATTN),
    "hf/dinov2-small": (hf_model("Dinov2ForImageClassification", "Dinov2Config", hidden_size=384,
                                 num_attention_heads=6), ATTN),
    "hf/swin-tiny": (hf_model("SwinForImageClassification", "SwinConfig"), ATTN),
    "hf/convnext-tiny": (hf_model("ConvNextForImageClassification", "ConvNextConfig"), CONV),
    "hf/resnet-50": (hf_model("ResNetForImageClassification", "ResNetConfig"), CONV),
    "hf/clip-vit-b32": (hf_vision_classifier("CLIPForImageClassification", "CLIPConfig", "CLIPVisionConfig"), ATTN),
    "hf/siglip-b16": (hf_vision_classifier("SiglipForImageClassification", "SiglipConfig", "SiglipVisionConfig"),
                      ATTN),
}
KIND_NAMES = {"conv": "conv", "qkv": "q/k/v", "out": "out", "matrix": "matrix"}


def row(name: str, model: torch.nn.Module, targets: str) -> str:
    config = ftn_peft.auto_config(model, r=1, targets=targets, num_classes=NUM_CLASSES)
    peft_model = get_peft_model(model, config)
    kinds: dict[str, int] = {}
    for layer in peft_model.modules():
        if isinstance(layer, FTNLayer):
            kinds[layer.kind["default"]] = kinds.get(layer.kind["default"], 0) + 1
    adapted = ", ".join(f"{n} {KIND_NAMES[k]}" for k, n in kinds.items())
    rep = ftn_peft.parameter_report(peft_model)["default"]
    return (f"| {name} | `{targets}` | {adapted} | {config.head_module} | {rep.factor_params:,} | "
            f"{rep.norm_params:,} | {rep.head_params:,} | {rep.backbone_params / 1e6:.1f} M | {rep.multiple:.4f}× |")


PAGE = """# Model zoo: `auto_config` on timm and transformers backbones

`ftn_peft.auto_config(model, r, targets, num_classes)` builds the FTN configuration by looking at the model: every
convolution but the stem (`targets="convs"`), attention query/value (`"qv"`), query/key/value including fused `qkv`
layers (`"qkv"`), output projections (`"o"`), both (`"attention"`), the remaining Linear layers (`"mlp"`), or all of
them (`"all"`); task BatchNorm wherever the model has BatchNorm; the classifier as each task's own head.

```python
import timm
from peft import get_peft_model
import ftn_peft

backbone = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10)
model = get_peft_model(backbone, ftn_peft.auto_config(backbone, r=1, targets="convs", num_classes=10))
print(ftn_peft.parameter_report(model)["default"])
```

Anything `auto_config` cannot place (no layer of the asked kind, `targets="qv"` on a fused `qkv`, `num_classes`
without an `nn.Linear` classifier) is a `ValueError` that lists what it found, by kind and name; such models take
`FTNConfig(target_modules=[...], head_module=...)` by hand. Layers with their own forward (timm's `Conv2dSame`,
`StdConv2d`) are left out with a warning, because FTN runs the stock op with W + ΔW.

Per-task parameters at r = 1 with a {num_classes}-class head, full-size models with random weights (only counted;
every architecture is also trained, merged, saved and loaded at toy size in `tests/test_auto_zoo.py`). *Adapted*
counts FTN layers by tensorization: `conv` (k² × Cin/g × Cout), `q/k/v` (d_model × d × n; a fused `qkv` is 3n heads),
`out` (output projection), `matrix` (plain rank-r Linear). *Norm* is the task BatchNorm's affine parameters (its
running statistics are buffers, not counted), *Params* the paper's multiple: (backbone + one task) / backbone, the
backbone without its classifier. Generated by `python benchmarks/zoo_table.py --out docs`.

| model | targets | adapted | task head | factors | norm | head | backbone | Params |
|---|---|---|---|---:|---:|---:|---:|---:|
{rows}

ConvNeXt's pointwise layers are Linear (transformers, timm `convnext_tiny`) or 1×1 convs (timm `convnext_atto`): with
`"convs"` only the depthwise and downsampling convolutions are adapted on the former, `"all"` adds the pointwise
layers as rank-r matrices. The transformers ConvNeXt, ViT, DINOv2, Swin and SigLIP rows use their default configs
(DINOv2 at the "small" width), CLIP the default ViT-B/32 vision tower.
"""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help=C.OUT_HELP)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        build, target_list = MODELS[name]
        base = build()
        for i, targets in enumerate(target_list):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # PEFT's notes on fan_in_fan_out etc. are not ours
                rows.append(row(name, base if i == len(target_list) - 1 else copy.deepcopy(base), targets))
            print(rows[-1], flush=True)
    path = os.path.join(C.output_dir(args.out, "zoo_table"), "zoo.md")
    with open(path, "w") as f:
        f.write(PAGE.format(num_classes=NUM_CLASSES, rows="\n".join(rows)))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
