"""The comparison methods of the paper's tables, built on the same source model and the same targets as FTN.

Each builder takes the source (pretrained) model and returns a *new* model for one domain with exactly the
parameters that method trains set `requires_grad=True`; the source model is never modified.

- `finetune`: every parameter, and a new head.
- `feature_extractor`: only a new head. The source BatchNorm layers stay in eval mode even under `model.train()`:
  letting them re-estimate statistics on the target domain would silently turn this baseline into "BN + head".
- `bn_head`: the BatchNorm affine parameters and statistics, and a new head (the paper's "FC and BN only").
- `lora`: PEFT's LoRA on the FTN targets, plus task BatchNorm and a new head (via `modules_to_save`), so that it
  differs from FTN only in how the weight update is parameterized.
- `ftn`: FTN with task BatchNorm and head (`ftn_peft.presets.resnet` for ResNets, or any FTNConfig).
"""

from __future__ import annotations

import copy
from typing import Optional, Union

from torch import nn

METHODS = ("ftn", "finetune", "feature_extractor", "bn_head", "lora")
_BN = nn.modules.batchnorm._BatchNorm


def _with_new_head(model: nn.Module, head_module: str, num_classes: int) -> nn.Module:
    model = copy.deepcopy(model)
    head = model.get_submodule(head_module)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"head_module={head_module!r} is a {type(head).__name__}; it must name an nn.Linear")
    parent_name, _, child = head_module.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    new = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    setattr(parent, child, new.to(head.weight.device, head.weight.dtype))
    return model


def _freeze_all_but(model: nn.Module, trainable: list[nn.Module]) -> nn.Module:
    model.requires_grad_(False)
    for module in trainable:
        module.requires_grad_(True)
    return model


class FrozenBatchNormModel(nn.Module):
    """Wraps a model so that its BatchNorm layers stay in eval mode (source statistics) whatever `train()` says."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.train(True)

    def train(self, mode: bool = True) -> "FrozenBatchNormModel":
        super().train(mode)
        for module in self.model.modules():
            if isinstance(module, _BN):
                module.eval()
        return self

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def finetune(model: nn.Module, num_classes: int, head_module: str = "fc") -> nn.Module:
    new = _with_new_head(model, head_module, num_classes)
    return new.requires_grad_(True)


def feature_extractor(model: nn.Module, num_classes: int, head_module: str = "fc") -> nn.Module:
    new = _with_new_head(model, head_module, num_classes)
    _freeze_all_but(new, [new.get_submodule(head_module)])
    return FrozenBatchNormModel(new)


def bn_head(model: nn.Module, num_classes: int, head_module: str = "fc") -> nn.Module:
    new = _with_new_head(model, head_module, num_classes)
    norms = [m for m in new.modules() if isinstance(m, _BN)]
    if not norms:
        raise ValueError("model has no BatchNorm layers; bn_head would train the head only (use feature_extractor)")
    return _freeze_all_but(new, norms + [new.get_submodule(head_module)])


def lora(
    model: nn.Module,
    num_classes: int,
    target_modules: Union[str, list[str]],
    r: int = 1,
    head_module: str = "fc",
    task_batchnorm: bool = True,
    lora_alpha: Optional[int] = None,
) -> nn.Module:
    """PEFT LoRA on `target_modules`, with a new head and (by default) task BatchNorm in `modules_to_save`."""
    from peft import LoraConfig, get_peft_model

    new = _with_new_head(model, head_module, num_classes)
    to_save = [head_module]
    if task_batchnorm:
        to_save += [name for name, m in new.named_modules() if isinstance(m, _BN)]
    config = LoraConfig(
        r=r, lora_alpha=r if lora_alpha is None else lora_alpha, target_modules=target_modules,
        modules_to_save=to_save,
    )
    return get_peft_model(new, config)


def ftn(model: nn.Module, num_classes: int, r: int = 1, config=None) -> nn.Module:
    """FTN with the ResNet preset (or `config`) on a copy of `model`; see `train_multidomain.py` for many domains."""
    from peft import get_peft_model

    from . import presets

    config = presets.resnet(r=r, num_classes=num_classes) if config is None else config
    return get_peft_model(copy.deepcopy(model), config)


def build(method: str, model: nn.Module, num_classes: int, r: int = 1, head_module: str = "fc",
          target_modules=None) -> nn.Module:
    """One of `METHODS` for one domain; `r` is the rank of FTN and LoRA, `target_modules` LoRA's targets."""
    if method == "ftn":
        return ftn(model, num_classes, r=r)
    if method == "finetune":
        return finetune(model, num_classes, head_module)
    if method == "feature_extractor":
        return feature_extractor(model, num_classes, head_module)
    if method == "bn_head":
        return bn_head(model, num_classes, head_module)
    if method == "lora":
        if target_modules is None:
            from .presets import RESNET_TARGETS as target_modules
        return lora(model, num_classes, target_modules, r=r, head_module=head_module)
    raise ValueError(f"method={method!r} is not one of {METHODS}")


def trainable_parameters(model: nn.Module) -> int:
    """Parameters this method adds per domain: the ones it trains."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
