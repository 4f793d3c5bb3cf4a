"""FTN adapted layers: a frozen base layer plus per-adapter CP factors.

`FTNLayer` holds the factors, merging and the forward shared by every layer kind; the subclasses only say how the
base op is run with a given weight and how ΔW acts on an input without being built. The other concerns have their
own modules: `functional.py` (factor layouts and maths), `compute_path.py` (materialized or factorized, per call),
`routing.py` (mixed-adapter batches), `task_layers.py` (task BatchNorm and task heads), `weight_cache.py` (cached
W + ΔW for inference without gradients, the merged fast path), `grouped.py` (mixed batches in one op per layer).
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import functional as FF
from .compat import check_adapters_to_merge
from .compute_path import (  # noqa: F401  (re-exported: the cost model used to live here)
    ComputePathMixin,
    conv_extra_macs,
    conv_positions,
    conv_transpose_extra_macs,
    conv_transpose_positions,
    factorized_cost_ratio,
)
from .routing import BASE_ADAPTER, FTNTunerLayer  # noqa: F401  (re-exported for `from ftn_peft.layer import ...`)
from .grouped import grouped_forward
from .weight_cache import InferenceCacheMixin, LayerWeightCache, has_forward_hooks

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def adapter_compute_dtype(x: torch.Tensor, adapter_dtype: torch.dtype) -> torch.dtype:
    """The dtype an adapter computes in: its own (fp32 when PEFT autocast it), as LoRA casts its input.

    Under torch.autocast the ops choose their own dtype, so the activations are left as they come.
    """
    # The meta device has no autocast state to ask (torch raises); shape-only passes run there.
    if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
        return x.dtype
    return adapter_dtype


class FTNLayer(InferenceCacheMixin, nn.Module, ComputePathMixin, FTNTunerLayer):
    """A frozen base layer plus, per adapter, the factors of ``ΔW = scale · Σ a ⊗ b ⊗ c``."""

    adapter_layer_names = ("ftn_a", "ftn_b", "ftn_c")
    other_param_names = ("r", "alpha", "scaling", "kind", "num_heads", "compute")

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.ftn_a = nn.ParameterDict()
        self.ftn_b = nn.ParameterDict()
        self.ftn_c = nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.alpha: dict[str, Optional[float]] = {}
        self.scaling: dict[str, float] = {}
        self.kind: dict[str, str] = {}
        self.num_heads: dict[str, Optional[int]] = {}
        self.compute: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self._path_cache: dict[tuple, bool] = {}
        self._weight_cache = LayerWeightCache()  # eval without gradients: cached W + ΔW (weight_cache.py)
        # PEFT's tuner layers expose the base layer's sizes (channels for convs); code written for LoRA reads them.
        self.in_features, self.out_features = self._in_out_features()
        self.update_layer(adapter_name, **kwargs)

    # --- what the subclasses define ---------------------------------------------------------------
    def _default_kind(self, num_heads: Optional[int], style: Optional[str]) -> str:
        raise NotImplementedError

    def _linear_layout_shape(self) -> tuple[int, ...]:
        """Shape of the base weight in nn.Linear / nn.Conv layout (the layout of docs/design.md's table)."""
        return tuple(self.get_base_layer().weight.shape)

    def _in_out_features(self) -> tuple[int, int]:
        out_f, in_f = self._linear_layout_shape()[:2]
        return in_f, out_f

    def _to_base_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta

    def _forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _delta_activations(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        raise NotImplementedError

    # --- adapter management --------------------------------------------------------------------------
    def update_layer(
        self,
        adapter_name: str,
        r: int,
        alpha: Optional[float],
        init_weights=True,
        init_std: float = 0.05,
        num_heads: Optional[int] = None,
        style: Optional[str] = None,
        compute: str = "auto",
        inference_mode: bool = False,
    ) -> None:
        kind = self._default_kind(num_heads, style)
        dims = FF.factor_dims(kind, self._linear_layout_shape(), num_heads)
        self._path_cache.clear()
        self._weight_cache.clear()  # a re-added adapter's new factors
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = 1.0 if alpha is None else alpha / r
        self.kind[adapter_name] = kind
        self.num_heads[adapter_name] = num_heads if kind in (FF.QKV, FF.OUT) else None
        self.compute[adapter_name] = compute
        weight = self.get_base_layer().weight
        containers = (self.ftn_a, self.ftn_b, self.ftn_c)
        for container, dim in zip(containers, dims):
            container[adapter_name] = nn.Parameter(torch.empty(r, dim, device=weight.device, dtype=torch.float32))
        self.reset_factors(adapter_name, init_weights, init_std)
        # As LoRA: the factors take the base layer's device and float dtype; PEFT's _cast_adapter_dtype then
        # upcasts fp16/bf16 factors to fp32 unless get_peft_model(..., autocast_adapter_dtype=False).
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_factors(self, adapter_name: str, init_weights=True, init_std: float = 0.05) -> None:
        factors = self.factors(adapter_name)
        for f in factors:
            if init_weights == "gaussian":
                nn.init.normal_(f, std=init_std)
            else:
                nn.init.xavier_uniform_(f)
        if init_weights is True:
            # Zero the output-side factor only: ΔW = 0 exactly, yet the gradient w.r.t. it (a ⊗ b) is not zero.
            nn.init.zeros_(factors[-1])

    def factors(self, adapter_name: str) -> list[nn.Parameter]:
        return [c[adapter_name] for c in (self.ftn_a, self.ftn_b, self.ftn_c) if adapter_name in c]

    def factor_dims(self, adapter_name: str) -> tuple[int, ...]:
        return tuple(f.shape[1] for f in self.factors(adapter_name))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW of one adapter in the base layer's own weight layout, in the base weight's dtype.

        Half-precision factors are multiplied in fp32 (as LoRA does on CPU): the factors are small, and the product
        of r·3 half-precision terms would otherwise be rounded at every step.
        """
        factors = self.factors(adapter_name)
        if factors[0].dtype in _HALF_DTYPES:
            factors = [f.float() for f in factors]
        delta = FF.delta_weight(
            self.kind[adapter_name], factors, self._linear_layout_shape(), self.scaling[adapter_name]
        )
        return self._to_base_layout(delta).to(self.get_base_layer().weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        self._weight_cache.clear()  # merged layers run the base layer; the entries would only hold memory
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self._available():
                continue
            base = self.get_base_layer()
            merged = base.weight.data + self.get_delta_weight(name)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {name} seems to be broken: merging it into "
                    f"{type(base).__name__} would give non-finite weights (NaN/inf factors); it was not merged"
                )
            base.weight.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        self._weight_cache.clear()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self._available():
                self.get_base_layer().weight.data -= self.get_delta_weight(name)

    # --- forward ---------------------------------------------------------------------------------
    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.get_base_layer()(x)

    def _forward_adapters(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        base = self.get_base_layer()
        if not adapters:
            return self._base_forward(x)
        cached = self._cached_weight(adapters)
        if cached is not None:
            return self._forward_with_weight(x, cached)
        # Forward hooks on the base layer see its own output, as with LoRA: only the factorized path calls it.
        if has_forward_hooks(base) or all(self._use_factorized(a, x) for a in adapters):
            out = self._base_forward(x)
            for a in adapters:
                out = out + self._delta_activations(x, a).to(out.dtype)
            return out
        weight = base.weight
        for a in adapters:
            weight = weight + self.get_delta_weight(a)
        return self._forward_with_weight(x, weight)

    def forward(self, x: torch.Tensor, *args: Any, adapter_names: Optional[list[str]] = None, **kwargs: Any):
        if adapter_names is None and not args and not kwargs:
            out = self._fast_forward(x)  # the last cache hit, re-checked (weight_cache.FastPath)
            if out is not None:
                return out
            out = self._inference_forward(x)  # merged, or eval without gradients: one base op (weight_cache.py)
            if out is not None:
                return out
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged and adapter_names is None:
            return self.base_layer(x, *args, **kwargs)
        if args or kwargs:
            self._check_extra_arguments(x, args, kwargs)
        if adapter_names is not None:
            out = grouped_forward(self, x, adapter_names)  # eval without gradients: all groups in one op
            if out is None:
                out = self._route(x, adapter_names, lambda xs, a: self._forward_adapters(xs, [a] if a else []))
            return out
        return self._forward_adapters(x, self._active_here())

    # Arguments besides the input that the adapted path honours (ConvTranspose: output_size, applied per call).
    _honoured_arguments: tuple[str, ...] = ()

    def _check_extra_arguments(self, x: torch.Tensor, args: tuple, kwargs: dict) -> None:
        """The adapted path runs the base op on ``x`` alone: refuse, rather than drop, anything else. What the base
        layer itself refuses gets its own TypeError, as on the disabled and merged paths."""
        base = self.get_base_layer()
        try:
            bound = inspect.signature(base.forward).bind(x, *args, **kwargs)
        except TypeError as err:
            raise TypeError(f"{type(base).__name__}.forward() {err}") from None
        dropped = [name for name in list(bound.arguments)[1:] if name not in self._honoured_arguments]
        if dropped:
            raise TypeError(
                f"{type(self).__name__} (FTN) cannot pass {dropped} on to its base {type(base).__name__} while "
                "adapters are active; call the layer with the input only, or disable the adapters for this call"
            )

    def _adapter_inputs(self, x: torch.Tensor, adapter: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``x`` and the factors, both in the dtype the adapter computes in (see `adapter_compute_dtype`)."""
        dtype = adapter_compute_dtype(x, self.ftn_a[adapter].dtype)
        return x.to(dtype), [f if f.dtype == dtype else f.to(dtype) for f in self.factors(adapter)]

    def __repr__(self) -> str:
        return "ftn." + super().__repr__()


class Conv(FTNLayer):
    """nn.Conv1d / nn.Conv2d (any kernel, stride, padding, dilation, groups): ΔW as k² × (Cin/g) × Cout."""

    def _default_kind(self, num_heads, style) -> str:
        return FF.CONV

    def _in_out_features(self):
        base = self.get_base_layer()
        return base.in_channels, base.out_channels

    def _positions(self, x):
        return conv_positions(x, self.get_base_layer())

    def _extra_macs(self, adapter: str) -> tuple[float, float]:
        return conv_extra_macs(self.r[adapter], self.factor_dims(adapter), self.get_base_layer())

    def _forward_with_weight(self, x, weight):
        base = self.get_base_layer()
        return base._conv_forward(x, weight, base.bias)

    def _fast_op(self, weight):
        base = self.get_base_layer()
        op = F.conv2d if isinstance(base, nn.Conv2d) else F.conv1d if isinstance(base, nn.Conv1d) else None
        if op is None or base.padding_mode != "zeros":
            return super()._fast_op(weight)
        return op, (weight, base.bias, base.stride, base.padding, base.dilation, base.groups)

    def _delta_activations(self, x, adapter):
        base = self.get_base_layer()
        x, factors = self._adapter_inputs(x, adapter)
        padding = base.padding
        if base.padding_mode != "zeros":  # pad as nn.Conv does, then convolve without padding
            x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            padding = 0
        return FF.conv_delta(
            x,
            factors,
            base.kernel_size,
            base.stride,
            padding,
            base.dilation,
            base.groups,
            self.scaling[adapter],
            two_op=self._use_two_op(adapter, x),
        )


class ConvTranspose(FTNLayer):
    """nn.ConvTranspose1d / nn.ConvTranspose2d: ΔW as k² × Cin × (Cout/g).

    torch stores a transposed-conv weight as (Cin, Cout/g, *kernel): the input channels are whole and the output
    channels are the ones split by the groups, so b runs over Cin and c over Cout/g (shared by the groups), the
    mirror of `Conv`. Per layer r·(k² + Cin + Cout/g) parameters.
    """

    _output_padding_now: Optional[tuple[int, ...]] = None  # set while a forward with output_size= runs
    _honoured_arguments = ("output_size",)

    def _default_kind(self, num_heads, style) -> str:
        return FF.CONV_T

    def _in_out_features(self):
        base = self.get_base_layer()
        return base.in_channels, base.out_channels

    def _positions(self, x):
        return conv_transpose_positions(x, self.get_base_layer())

    def _extra_macs(self, adapter: str) -> tuple[float, float]:
        return conv_transpose_extra_macs(self.r[adapter], self.factor_dims(adapter), self.get_base_layer())

    def _output_padding(self) -> tuple[int, ...]:
        return self._output_padding_now if self._output_padding_now is not None else self.get_base_layer().output_padding

    def _base_forward(self, x):
        return self._forward_with_weight(x, self.get_base_layer().weight)  # with this call's output padding

    def _forward_with_weight(self, x, weight):
        base = self.get_base_layer()
        op = F.conv_transpose2d if isinstance(base, nn.ConvTranspose2d) else F.conv_transpose1d
        return op(x, weight, base.bias, base.stride, base.padding, self._output_padding(), base.groups, base.dilation)

    def _delta_activations(self, x, adapter):
        base = self.get_base_layer()
        x, factors = self._adapter_inputs(x, adapter)
        return FF.conv_transpose_delta(
            x,
            factors,
            base.kernel_size,
            base.stride,
            base.padding,
            self._output_padding(),
            base.dilation,
            base.groups,
            self.scaling[adapter],
        )

    def forward(self, x: torch.Tensor, output_size: Optional[list[int]] = None, *, adapter_names=None):
        if output_size is None:
            return super().forward(x, adapter_names=adapter_names)
        # nn.ConvTranspose*d turns output_size into an output_padding per call; every path must use that one.
        base = self.get_base_layer()
        dims = len(base.kernel_size)
        self._output_padding_now = tuple(
            base._output_padding(x, output_size, base.stride, base.padding, base.kernel_size, dims, base.dilation)
        )
        try:
            return super().forward(x, output_size=output_size, adapter_names=adapter_names)
        finally:
            self._output_padding_now = None


class Linear(FTNLayer):
    """nn.Linear: head-tensorized (query/key/value or output projection) or a plain rank-r matrix."""

    def _default_kind(self, num_heads, style) -> str:
        if num_heads is None:
            return FF.MATRIX
        return FF.OUT if style == "out" else FF.QKV

    def _forward_with_weight(self, x, weight):
        return F.linear(x, weight, self.get_base_layer().bias)

    def _fast_op(self, weight):
        return F.linear, (weight, self.get_base_layer().bias)

    def _delta_activations(self, x, adapter):
        x, factors = self._adapter_inputs(x, adapter)
        return FF.linear_delta(self.kind[adapter], x, factors, self.scaling[adapter])


class TransformersConv1D(Linear):
    """transformers' Conv1D (GPT-2): weight stored as (in, out), i.e. the transpose of nn.Linear."""

    def _linear_layout_shape(self):
        return tuple(self.get_base_layer().weight.shape[::-1])

    def _to_base_layout(self, delta):
        return delta.t()

    _fast_op = FTNLayer._fast_op  # not Linear's: the weight is stored transposed

    def _forward_with_weight(self, x, weight):
        out = torch.addmm(self.get_base_layer().bias, x.reshape(-1, x.shape[-1]), weight)
        return out.reshape(*x.shape[:-1], weight.shape[1])


LAYER_CLASSES: dict[type, type[FTNLayer]] = {
    nn.Conv2d: Conv,
    nn.Conv1d: Conv,
    nn.ConvTranspose2d: ConvTranspose,
    nn.ConvTranspose1d: ConvTranspose,
    nn.Linear: Linear,
    Conv1D: TransformersConv1D,
}
