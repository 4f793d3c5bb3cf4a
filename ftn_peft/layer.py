"""FTN adapted layers: a frozen base layer plus per-adapter CP factors.

`FTNLayer` holds the factors and the logic shared by every layer kind; the subclasses only say how the base op is
run with a given weight and how ΔW acts on an input without being built. Task BatchNorm and task heads live in
`task_layers.py`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from transformers.pytorch_utils import Conv1D

from . import functional as FF

BASE_ADAPTER = "__base__"  # the name that selects the frozen base model in a mixed batch


class FTNTunerLayer(BaseTunerLayer):
    """What every FTN tuner layer (factors, task BatchNorm, task head) shares: adapter routing."""

    def _available(self) -> set[str]:
        return set(getattr(self, self.adapter_layer_names[0]).keys())

    def _active_here(self) -> list[str]:
        container = getattr(self, self.adapter_layer_names[0])
        return [name for name in self.active_adapters if name in container]

    def _route(self, x: torch.Tensor, adapter_names: list[str], run) -> Any:
        """Run ``run(x_subset, adapter_or_None)`` on each adapter's samples and put the results back in order."""
        if self.merged:
            raise ValueError(
                "adapter_names= (mixed-adapter batches) cannot run on a merged model; call unmerge_adapter() first"
            )
        if len(adapter_names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {x.shape[0]} samples")
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(adapter_names):
            groups.setdefault(name, []).append(i)
        if len(groups) == 1:  # the whole batch uses one adapter: no gather / scatter
            name = adapter_names[0]
            return run(x, name if name in self._available() else None)
        available = self._available()
        if all(rows[-1] - rows[0] + 1 == len(rows) for rows in groups.values()):
            # Contiguous blocks (forward_all_tasks' replicated batch): slices are views, one concatenation.
            blocks = [
                run(x[rows[0] : rows[-1] + 1], name if name in available else None) for name, rows in groups.items()
            ]
            return torch.cat([b.to(blocks[0].dtype) for b in blocks])
        outputs = {}
        for name, rows in groups.items():
            idx = torch.tensor(rows, device=x.device)
            outputs[name] = (idx, run(x.index_select(0, idx), name if name in available else None))
        first = next(iter(outputs.values()))[1]
        result = first.new_empty((x.shape[0], *first.shape[1:]))
        for idx, out in outputs.values():
            result.index_copy_(0, idx, out.to(result.dtype))
        return result


class FTNLayer(nn.Module, FTNTunerLayer):
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
        self.update_layer(adapter_name, **kwargs)

    # --- what the subclasses define ---------------------------------------------------------------
    def _default_kind(self, num_heads: Optional[int], style: Optional[str]) -> str:
        raise NotImplementedError

    def _linear_layout_shape(self) -> tuple[int, ...]:
        """Shape of the base weight in nn.Linear / nn.Conv layout (the layout SPEC.md's table uses)."""
        return tuple(self.get_base_layer().weight.shape)

    def _to_base_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta

    def _forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _delta_activations(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        raise NotImplementedError

    def _positions(self, x: Optional[torch.Tensor]) -> float:
        """Output positions (batch × tokens) of one call; math.inf when unknown (the large-batch limit)."""
        if x is None:
            return math.inf
        return x.numel() / self._linear_layout_shape()[-1]

    def _extra_macs(self, adapter: str) -> tuple[float, float]:
        """(factorized MACs per output position, ΔW size): what the two paths cost beyond the base op."""
        return float(self.r[adapter] * sum(self.factor_dims(adapter))), float(math.prod(self._linear_layout_shape()))

    def _factorized_cost_ratio(self, adapter: str, x: Optional[torch.Tensor] = None, needs_grad: bool = True) -> float:
        """(factorized extra MACs) / (materialized extra MACs) for one call on ``x``; < 1 favours the factorized path.

        Per output position the factorized path costs ``f`` MACs forward and about 2f backward. Materializing costs
        ``(r + 1)·|W|`` per call to build W + ΔW (and ~3r·|W| more to backpropagate the einsum) and, with gradients,
        the dense weight gradient: ``|W|`` per position, as costly as the base op itself.
        """
        per_position, size = self._extra_macs(adapter)
        if not math.isfinite(per_position):
            return math.inf
        positions, r = self._positions(x), self.r[adapter]
        if needs_grad:
            if math.isinf(positions):
                return 3 * per_position / size
            return 3 * per_position * positions / (size * positions + (4 * r + 1) * size)
        if math.isinf(positions):
            return math.inf
        return per_position * positions / ((r + 1) * size)

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
        """ΔW of one adapter in the base layer's own weight layout, in the base weight's dtype."""
        delta = FF.delta_weight(
            self.kind[adapter_name], self.factors(adapter_name), self._linear_layout_shape(), self.scaling[adapter_name]
        )
        return self._to_base_layout(delta).to(self.get_base_layer().weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self._available():
                continue
            base = self.get_base_layer()
            merged = base.weight.data + self.get_delta_weight(name)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"merging adapter {name!r} into {type(base).__name__} would give non-finite weights; "
                    "the adapter is broken (NaN/inf factors) and was not merged"
                )
            base.weight.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self._available():
                self.get_base_layer().weight.data -= self.get_delta_weight(name)

    # --- forward ---------------------------------------------------------------------------------
    def _use_factorized(self, adapter: str, x: Optional[torch.Tensor] = None) -> bool:
        mode = self.compute[adapter]
        if mode != "auto":
            return mode == "factorized"
        # Decided per call from the shapes (guards under torch.compile): small batches / late low-resolution
        # layers favour the small ops, big activations without gradients favour building W + ΔW once.
        needs_grad = torch.is_grad_enabled() and self.ftn_a[adapter].requires_grad
        if x is None or torch.compiler.is_compiling():
            return self._factorized_cost_ratio(adapter, x, needs_grad) < 1.0
        # The cost model is pure Python arithmetic, ~15 µs a call: as much as a small op. Remember it per shape.
        key = (adapter, self.r[adapter], x.shape, needs_grad)
        choice = self._path_cache.get(key)
        if choice is None:
            if len(self._path_cache) > 1024:  # many sequence lengths: start over rather than grow without bound
                self._path_cache.clear()
            choice = self._path_cache[key] = self._factorized_cost_ratio(adapter, x, needs_grad) < 1.0
        return choice

    def _forward_adapters(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        base = self.get_base_layer()
        if not adapters:
            return base(x)
        if all(self._use_factorized(a, x) for a in adapters):
            out = base(x)
            for a in adapters:
                out = out + self._delta_activations(x, a).to(out.dtype)
            return out
        weight = base.weight
        for a in adapters:
            weight = weight + self.get_delta_weight(a)
        return self._forward_with_weight(x, weight)

    def forward(self, x: torch.Tensor, *args: Any, adapter_names: Optional[list[str]] = None, **kwargs: Any):
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._route(x, adapter_names, lambda xs, a: self._forward_adapters(xs, [a] if a else []))
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        return self._forward_adapters(x, self._active_here())

    def _cast(self, adapter: str, dtype: torch.dtype) -> list[torch.Tensor]:
        return [f if f.dtype == dtype else f.to(dtype) for f in self.factors(adapter)]

    def __repr__(self) -> str:
        return "ftn." + super().__repr__()


class Conv(FTNLayer):
    """nn.Conv1d / nn.Conv2d (any kernel, stride, padding, dilation, groups): ΔW as k² × (Cin/g) × Cout."""

    def _default_kind(self, num_heads, style) -> str:
        return FF.CONV

    def _positions(self, x):
        if x is None:
            return math.inf
        base = self.get_base_layer()
        return x.numel() / (base.in_channels * math.prod(base.stride))  # batch × output pixels (padding ignored)

    def _extra_macs(self, adapter: str) -> tuple[float, float]:
        base = self.get_base_layer()
        if base.padding_mode != "zeros":
            return math.inf, 1.0  # the small-op path pads with zeros only
        k, cin_g, cout = self.factor_dims(adapter)
        g = base.groups
        if k == 1:  # the spatial scalar is folded into the strided down-projection (functional.conv_delta)
            factorized = self.r[adapter] * (cin_g * g + cout) + cout
        else:  # per output position: 1x1 down at input resolution, depthwise k on g·r channels, 1x1 up, the add
            factorized = self.r[adapter] * (cin_g * g * math.prod(base.stride) + g * k + cout) + cout
        return float(factorized), float(k * cin_g * cout)

    def _forward_with_weight(self, x, weight):
        base = self.get_base_layer()
        return base._conv_forward(x, weight, base.bias)

    def _delta_activations(self, x, adapter):
        base = self.get_base_layer()
        padding = base.padding
        if base.padding_mode != "zeros":  # pad as nn.Conv does, then convolve without padding
            x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            padding = 0
        return FF.conv_delta(
            x,
            self._cast(adapter, x.dtype),
            base.kernel_size,
            base.stride,
            padding,
            base.dilation,
            base.groups,
            self.scaling[adapter],
        )


class Linear(FTNLayer):
    """nn.Linear: head-tensorized (query/key/value or output projection) or a plain rank-r matrix."""

    def _default_kind(self, num_heads, style) -> str:
        if num_heads is None:
            return FF.MATRIX
        return FF.OUT if style == "out" else FF.QKV

    def _forward_with_weight(self, x, weight):
        return F.linear(x, weight, self.get_base_layer().bias)

    def _delta_activations(self, x, adapter):
        return FF.linear_delta(self.kind[adapter], x, self._cast(adapter, x.dtype), self.scaling[adapter])


class TransformersConv1D(Linear):
    """transformers' Conv1D (GPT-2): weight stored as (in, out), i.e. the transpose of nn.Linear."""

    def _linear_layout_shape(self):
        return tuple(self.get_base_layer().weight.shape[::-1])

    def _to_base_layout(self, delta):
        return delta.t()

    def _forward_with_weight(self, x, weight):
        out = torch.addmm(self.get_base_layer().bias, x.reshape(-1, x.shape[-1]), weight)
        return out.reshape(*x.shape[:-1], weight.shape[1])


LAYER_CLASSES: dict[type, type[FTNLayer]] = {
    nn.Conv2d: Conv,
    nn.Conv1d: Conv,
    nn.Linear: Linear,
    Conv1D: TransformersConv1D,
}
