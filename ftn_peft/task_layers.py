"""Per-adapter BatchNorm and task heads.

Both keep one module per adapter in an `nn.ModuleDict` on a PEFT tuner layer, so PEFT saves, loads, activates and
deletes them like any adapter weight: BatchNorm running statistics travel with the adapter (unlike PEFT's
`modules_to_save`, huggingface/peft#1732), and heads of different sizes load (huggingface/peft#2136, #2422).
Merging swaps in the adapter's module instead of changing the base one.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

from peft.tuners.tuners_utils import check_adapters_to_merge

from .layer import FTNTunerLayer


class _SwappedModuleLayer(nn.Module, FTNTunerLayer):
    """A frozen base module and, per adapter, a whole replacement module of its own."""

    container_name: str

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
        super().__init__()
        self.base_layer = base_layer
        setattr(self, self.container_name, nn.ModuleDict())
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    @property
    def modules_by_adapter(self) -> nn.ModuleDict:
        return getattr(self, self.container_name)

    def _new_module(self, **kwargs) -> nn.Module:
        raise NotImplementedError

    def update_layer(self, adapter_name: str, inference_mode: bool = False, **kwargs) -> None:
        module = self._new_module(**kwargs)
        for p in module.parameters():
            p.requires_grad_(True)
        self.modules_by_adapter[adapter_name] = module
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _selected(self) -> Optional[str]:
        if self.merged:
            return self.merged_adapters[-1]
        active = self._active_here()
        if len(active) > 1:
            raise ValueError(
                f"{type(self).__name__} serves one adapter at a time but adapters {active} are active; "
                "activate one with set_adapter(), or pass adapter_names= to mix adapters within a batch"
            )
        return active[0] if active else None

    def _module_for(self, adapter: Optional[str]) -> nn.Module:
        return self.base_layer if adapter is None else self.modules_by_adapter[adapter]

    def forward(self, x: torch.Tensor, *args: Any, adapter_names: Optional[list[str]] = None, **kwargs: Any):
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._route(x, adapter_names, lambda xs, a: self._module_for(a)(xs))
        return self._module_for(self._selected())(x, *args, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.modules_by_adapter]
        if len(names) + len(self.merged_adapters) > 1:
            raise ValueError(f"{type(self).__name__} can merge one adapter, not {self.merged_adapters + names}")
        if safe_merge:
            for name in names:
                if not all(torch.isfinite(t).all() for t in self.modules_by_adapter[name].state_dict().values()):
                    raise ValueError(f"adapter {name!r} has non-finite values in {type(self).__name__}; not merged")
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        self.merged_adapters.clear()

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names: Optional[list[str]]):
        """What PEFT puts back in the model on `merge_and_unload()` / `unload()`."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        chosen = self.merged_adapters[-1] if (merge and self.merged_adapters) else None
        return copy.deepcopy(self._module_for(chosen)) if chosen else self.base_layer


class TaskNorm(_SwappedModuleLayer):
    """A BatchNorm layer with a private copy (affine parameters and running statistics) per adapter."""

    container_name = "ftn_norm"
    adapter_layer_names = ("ftn_norm",)

    def _new_module(self) -> nn.Module:
        return copy.deepcopy(self.base_layer)

    def __repr__(self) -> str:
        return "ftn." + super().__repr__()


class TaskHead(_SwappedModuleLayer):
    """A classifier replaced, per adapter, by a task head with that task's number of outputs.

    In a mixed batch whose adapters' heads differ in size, the output is a list with one 1-d (or per-token) tensor
    per sample, in batch order; where all sizes match it is one tensor.
    """

    container_name = "ftn_head"
    adapter_layer_names = ("ftn_head",)
    other_param_names = ("num_outputs",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
        self.num_outputs: dict[str, int] = {}
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(
                f"head_module must name an nn.Linear classifier, got {type(base_layer).__name__}; "
                "wrap other heads with modules_to_save instead"
            )
        super().__init__(base_layer, adapter_name, **kwargs)

    def _new_module(self, num_outputs: Optional[int] = None) -> nn.Module:
        base = self.base_layer
        if num_outputs is None or num_outputs == base.out_features:
            return copy.deepcopy(base)
        return nn.Linear(
            base.in_features, num_outputs, bias=base.bias is not None, device=base.weight.device, dtype=base.weight.dtype
        )

    def update_layer(self, adapter_name: str, inference_mode: bool = False, num_outputs: Optional[int] = None) -> None:
        super().update_layer(adapter_name, inference_mode=inference_mode, num_outputs=num_outputs)
        self.num_outputs[adapter_name] = self.modules_by_adapter[adapter_name].out_features

    def _route(self, x, adapter_names, run):
        sizes = {self._module_for(a if a in self.modules_by_adapter else None).out_features for a in adapter_names}
        if len(sizes) == 1:
            return super()._route(x, adapter_names, run)
        if self.merged:
            return super()._route(x, adapter_names, run)  # raises the merged-model error
        if len(adapter_names) != x.shape[0]:
            return super()._route(x, adapter_names, run)  # raises the length error
        out: list[Optional[torch.Tensor]] = [None] * x.shape[0]
        for name in dict.fromkeys(adapter_names):
            rows = [i for i, n in enumerate(adapter_names) if n == name]
            y = run(x[rows], name if name in self.modules_by_adapter else None)
            for i, row in zip(rows, y):
                out[i] = row
        return out

    def __repr__(self) -> str:
        return "ftn." + super().__repr__()
