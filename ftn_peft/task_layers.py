"""Per-adapter BatchNorm and task heads.

Both keep one module per adapter in an `nn.ModuleDict` on a PEFT tuner layer, so PEFT saves, loads, activates and
deletes them like any adapter weight: BatchNorm running statistics travel with the adapter (unlike PEFT's
`modules_to_save`, huggingface/peft#1732), and heads of different sizes load (huggingface/peft#2136, #2422).
Merging swaps in the adapter's module instead of changing the base one.
"""

from __future__ import annotations

import copy
from itertools import chain
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .compat import check_adapters_to_merge
from .grouped import grouped_batchnorm
from .layer import adapter_compute_dtype
from .routing import FTNTunerLayer, check_batch, route_per_sample
from .weight_cache import has_forward_hooks


def _float_dtype(module: nn.Module) -> Optional[torch.dtype]:
    if not module._modules:  # a leaf (every task norm and head): its own dicts, not the ~5 µs recursive walk
        tensors = chain(module._parameters.values(), module._buffers.values())
    else:
        tensors = chain(module.parameters(), module.buffers())
    return next((t.dtype for t in tensors if t is not None and t.is_floating_point()), None)


_BATCHNORM_DIMS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}


def eval_batchnorm(module: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """What an ``nn.BatchNorm*d`` in eval mode computes, without its Python checks (~5 µs a call, as much as the
    op at ResNet-50's sizes); None where its own forward must run (training, no running statistics, hooks, another
    dtype or module type, an input it would reject)."""
    dims = _BATCHNORM_DIMS.get(type(module))
    if dims is None or module.training or has_forward_hooks(module) or x.dim() not in dims:
        return None
    buffers, params = module._buffers, module._parameters
    mean, var, weight = buffers["running_mean"], buffers["running_var"], params["weight"]
    if mean is None or var is None or mean.dtype != x.dtype or (weight is not None and weight.dtype != x.dtype):
        return None
    return F.batch_norm(x, mean, var, weight, params["bias"], False, 0.0, module.eps)


def _rows_of(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """``value`` with every tensor whose first dimension is the batch cut to ``rows`` (inside tuples, lists, dicts)."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_rows_of(v, rows, batch) for v in value)
    if isinstance(value, dict):
        return {k: _rows_of(v, rows, batch) for k, v in value.items()}
    return value


class _SwappedModuleLayer(nn.Module, FTNTunerLayer):
    """A frozen base module and, per adapter, a whole replacement module of its own."""

    container_name: str

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
        super().__init__()
        self.base_layer = base_layer
        setattr(self, self.container_name, nn.ModuleDict())
        self.in_features, self.out_features = self._in_out_features()
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    @property
    def modules_by_adapter(self) -> nn.ModuleDict:
        return getattr(self, self.container_name)

    def _new_module(self, **kwargs) -> nn.Module:
        raise NotImplementedError

    def _in_out_features(self) -> tuple[int, int]:
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
        modules = self._modules  # not through nn.Module.__getattr__: this runs on every call
        return modules["base_layer"] if adapter is None else modules[self.container_name]._modules[adapter]

    def _run(self, adapter: Optional[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The adapter's module on ``x``; an fp32 adapter in a half-precision model computes in fp32, as LoRA does,
        and hands its output back in the model's dtype."""
        module = self._module_for(adapter)
        dtype = _float_dtype(module)
        if adapter is None or dtype is None or dtype == x.dtype or not x.is_floating_point():
            return module(x, *args, **kwargs)
        dtype = adapter_compute_dtype(x, dtype)
        if dtype == x.dtype:
            return module(x, *args, **kwargs)
        return module(x.to(dtype), *args, **kwargs).to(x.dtype)

    def forward(self, x: torch.Tensor, *args: Any, adapter_names: Optional[list[str]] = None, **kwargs: Any):
        if self._disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            if not args and not kwargs:
                out = self._grouped(x, adapter_names)
                return self._route(x, adapter_names, self._run_routed) if out is None else out
            # Several inputs (a decoder's skip features): route the row numbers, and give every adapter its rows of
            # each batched input.
            batch = x.shape[0]

            def run(rows: torch.Tensor, adapter: Optional[str]) -> torch.Tensor:
                return self._run(adapter, x[rows], *_rows_of(args, rows, batch), **_rows_of(kwargs, rows, batch))

            return self._route(torch.arange(batch, device=x.device), adapter_names, run)
        adapter = self._selected()
        if adapter is not None and not args and not kwargs:
            out = eval_batchnorm(self._module_for(adapter), x)  # task BatchNorm at inference: the op alone
            if out is not None:
                return out
        return self._run(adapter, x, *args, **kwargs)

    def _grouped(self, x: torch.Tensor, adapter_names: list[str]) -> Optional[torch.Tensor]:
        return None  # route each adapter group through its own module

    def _run_routed(self, x: torch.Tensor, adapter: Optional[str]) -> torch.Tensor:
        return self._run(adapter, x)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.modules_by_adapter]
        if len(names) + len(self.merged_adapters) > 1:
            raise ValueError(f"{type(self).__name__} can merge one adapter, not {self.merged_adapters + names}")
        if safe_merge:
            for name in names:
                values = self.modules_by_adapter[name].state_dict().values()
                if not all(torch.isfinite(t).all() for t in values if t.is_floating_point()):
                    raise ValueError(
                        f"NaNs detected in the merged weights. The adapter {name} seems to be broken: its "
                        f"{type(self).__name__} has non-finite values; it was not merged"
                    )
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        self.merged_adapters.clear()

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names: Optional[list[str]]):
        """What PEFT puts back in the model on `merge_and_unload()` / `unload()`."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        # As with LoRA, whose unload() keeps a merged delta in the base weight, a merged task module stays: otherwise
        # merge_adapter() + unload() would pair merged factor weights with the base BatchNorm and head.
        chosen = self.merged_adapters[-1] if self.merged_adapters else None
        if not chosen:
            return self.base_layer
        unloaded = copy.deepcopy(self._module_for(chosen))
        dtype = _float_dtype(self.base_layer)
        # Like a merged LoRA delta, the unloaded module takes the base model's dtype (an fp32 adapter copy would
        # not run on half-precision activations).
        return unloaded if dtype is None else unloaded.to(dtype)


class TaskNorm(_SwappedModuleLayer):
    """A normalization layer (BatchNorm; LayerNorm / GroupNorm with ``task_norms="all"``) with a private copy
    (affine parameters and running statistics) per adapter."""

    container_name = "ftn_norm"
    adapter_layer_names = ("ftn_norm",)

    def _new_module(self) -> nn.Module:
        return copy.deepcopy(self.base_layer)

    def _grouped(self, x, adapter_names):
        return grouped_batchnorm(self, x, adapter_names)  # eval without gradients: one per-sample affine op

    def _in_out_features(self) -> tuple[int, int]:
        base = self.base_layer
        n = getattr(base, "num_features", None) or getattr(base, "num_channels", None)
        if n is None:  # LayerNorm: the size of the normalized shape
            n = int(torch.Size(base.normalized_shape).numel())
        return n, n

    def __repr__(self) -> str:
        return "ftn." + super().__repr__()


class TaskHead(_SwappedModuleLayer):
    """A task head replaced, per adapter, by a copy with that task's number of outputs.

    The head is an ``nn.Linear`` classifier or any module whose output layer (its last registered ``nn.Linear`` /
    ``nn.Conv1d/2d/3d``) sets its number of outputs, such as a whole dense decoder. A task with another number of
    outputs gets a copy of the base head whose output layer is a fresh one of the same kind with that many outputs;
    everything else starts from the base head's weights. A decoder may take several batched inputs (skip
    features): in a mixed batch every tensor argument is split by sample like ``x``.

    In a mixed batch whose adapters' heads differ in size, the output is a list with one tensor per sample, in
    batch order; where all sizes match it is one tensor.
    """

    container_name = "ftn_head"
    adapter_layer_names = ("ftn_head",)
    other_param_names = ("num_outputs",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
        self.num_outputs: dict[str, int] = {}
        if output_layer(base_layer) is None:
            raise TypeError(
                f"head_module must name an nn.Linear classifier or a module whose last Linear / Conv layer is its "
                f"output layer (a decoder), got {type(base_layer).__name__}, which holds neither; wrap other heads "
                "with modules_to_save instead"
            )
        super().__init__(base_layer, adapter_name, **kwargs)

    def _in_out_features(self) -> tuple[int, int]:
        layer = output_layer(self.base_layer)[1]
        return _inputs_of(layer), head_outputs(layer)

    def _new_module(self, num_outputs: Optional[int] = None) -> nn.Module:
        return resized_head(self.base_layer, num_outputs)

    def update_layer(self, adapter_name: str, inference_mode: bool = False, num_outputs: Optional[int] = None) -> None:
        super().update_layer(adapter_name, inference_mode=inference_mode, num_outputs=num_outputs)
        self.num_outputs[adapter_name] = head_outputs(self.modules_by_adapter[adapter_name])

    def _route(self, x, adapter_names, run):
        sizes = {head_outputs(self._module_for(a if a in self.modules_by_adapter else None)) for a in adapter_names}
        if len(sizes) == 1:
            return super()._route(x, adapter_names, run)
        check_batch(adapter_names, x.shape[0], self.merged)
        return route_per_sample(x, adapter_names, run, self._available())

    def __repr__(self) -> str:
        return "ftn." + super().__repr__()


OUTPUT_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def output_layer(head: nn.Module) -> Optional[tuple[str, nn.Module]]:
    """``(name, layer)`` of the layer that sets a head's number of outputs: the head itself when it is a Linear /
    Conv, else its last registered Linear / Conv (register a decoder's classifier last); None if it has none."""
    found = None
    for name, module in head.named_modules():
        if isinstance(module, OUTPUT_LAYER_TYPES):
            found = (name, module)
    return found


def head_outputs(head: nn.Module) -> int:
    """Number of outputs (features or channels) of a head."""
    layer = output_layer(head)[1]
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _inputs_of(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def resized_head(head: nn.Module, num_outputs: Optional[int]) -> nn.Module:
    """A copy of ``head``; with another ``num_outputs``, its output layer is a fresh layer of that size."""
    new = copy.deepcopy(head)
    if num_outputs is None or num_outputs == head_outputs(head):
        return new
    name, layer = output_layer(new)
    weight = layer.weight
    if isinstance(layer, nn.Linear):
        fresh = nn.Linear(layer.in_features, num_outputs, bias=layer.bias is not None)
    else:
        if layer.groups != 1:
            raise ValueError(
                f"the output layer {name or type(head).__name__!r} of the head is a grouped conv (groups="
                f"{layer.groups}); a head of another size needs an ungrouped output conv"
            )
        fresh = type(layer)(
            layer.in_channels, num_outputs, layer.kernel_size, stride=layer.stride, padding=layer.padding,
            dilation=layer.dilation, bias=layer.bias is not None, padding_mode=layer.padding_mode,
        )
    fresh = fresh.to(device=weight.device, dtype=weight.dtype)
    if not name:
        return fresh
    parent_name, _, child = name.rpartition(".")
    setattr(new.get_submodule(parent_name) if parent_name else new, child, fresh)
    return new
