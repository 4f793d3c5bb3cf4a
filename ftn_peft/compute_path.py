"""Choosing how an adapted forward is computed: materialized (W + ΔW, one base op) or factorized (small ops).

`compute="auto"` decides per call from the shapes with the cost model below; docs/design.md explains it and
docs/benchmarks.md has the measured consequences.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


def linear_positions(x: Optional[torch.Tensor], in_features: int) -> float:
    """Output positions (batch × tokens) of one call; math.inf when unknown (the large-batch limit)."""
    return math.inf if x is None else x.numel() / in_features


def conv_positions(x: Optional[torch.Tensor], base: nn.Module) -> float:
    """Batch × output pixels of one call (padding ignored)."""
    return math.inf if x is None else x.numel() / (base.in_channels * math.prod(base.stride))


def conv_transpose_positions(x: Optional[torch.Tensor], base: nn.Module) -> float:
    """Batch × output pixels of a transposed conv: the input's pixels times the stride (padding ignored)."""
    return math.inf if x is None else x.numel() * math.prod(base.stride) / base.in_channels


def linear_extra_macs(r: int, dims: tuple[int, ...], weight_shape: tuple[int, ...]) -> tuple[float, float]:
    """(factorized MACs per output position, ΔW size): what the two paths cost beyond the base op."""
    return float(r * sum(dims)), float(math.prod(weight_shape))


def conv_extra_macs(r: int, dims: tuple[int, ...], base: nn.Module) -> tuple[float, float]:
    if base.padding_mode != "zeros":
        return math.inf, 1.0  # the small-op path pads with zeros only
    k, cin_g, cout = dims
    g = base.groups
    if k == 1:  # the spatial scalar is folded into the strided down-projection (functional.conv_delta)
        factorized = r * (cin_g * g + cout) + cout
    else:  # per output position: 1x1 down at input resolution, depthwise k on g·r channels, 1x1 up, the add
        factorized = r * (cin_g * g * math.prod(base.stride) + g * k + cout) + cout
    return float(factorized), float(k * cin_g * cout)


def conv_transpose_extra_macs(r: int, dims: tuple[int, ...], base: nn.Module) -> tuple[float, float]:
    k, cin, cout_g = dims
    g, stride = base.groups, math.prod(base.stride)
    # Per output position: the 1x1 down-projection and the depthwise scatter run at input resolution (1/stride of
    # the output positions), the 1x1 up-projection and the add at output resolution.
    factorized = r * (cin + g * k) / stride + r * cout_g * g + cout_g * g
    return float(factorized), float(k * cin * cout_g)


def factorized_cost_ratio(per_position: float, size: float, positions: float, r: int, needs_grad: bool) -> float:
    """(factorized extra MACs) / (materialized extra MACs); < 1 favours the factorized path.

    Per output position the factorized path costs ``f`` MACs forward and about 2f backward. Materializing costs
    ``(r + 1)·|W|`` per call to build W + ΔW (and ~3r·|W| more to backpropagate the einsum) and, with gradients,
    the dense weight gradient: ``|W|`` per position, as costly as the base op itself.
    """
    if not math.isfinite(per_position):
        return math.inf
    if needs_grad:
        if math.isinf(positions):
            return 3 * per_position / size
        return 3 * per_position * positions / (size * positions + (4 * r + 1) * size)
    if math.isinf(positions):
        return math.inf
    return per_position * positions / ((r + 1) * size)


class ComputePathMixin:
    """The per-call choice for an FTN layer; the layer kinds say how to count positions and extra MACs."""

    _path_cache: dict

    def _positions(self, x: Optional[torch.Tensor]) -> float:
        return linear_positions(x, self._linear_layout_shape()[-1])

    def _extra_macs(self, adapter: str) -> tuple[float, float]:
        return linear_extra_macs(self.r[adapter], self.factor_dims(adapter), self._linear_layout_shape())

    def _factorized_cost_ratio(self, adapter: str, x: Optional[torch.Tensor] = None, needs_grad: bool = True) -> float:
        per_position, size = self._extra_macs(adapter)
        return factorized_cost_ratio(per_position, size, self._positions(x), self.r[adapter], needs_grad)

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
