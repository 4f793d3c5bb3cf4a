"""Choosing how an adapted forward is computed: materialized (W + ΔW, one base op) or factorized (small ops),
and for k×k convs, which small-op path: three ops (1×1 down, depthwise k×k, 1×1 up) or two (a k×k conv down with
the kernel built from the factors, 1×1 up).

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


# The k×k and 1×1 conv paths on CPU, chosen from measured times, not from FLOPs alone. Two linear fits of a time
# difference (µs per call of the whole adapted layer, forward + backward "train" or no_grad forward "infer"):
# - "two_op": two-op minus three-op, on (1, N, M2, M3): N images, M2 = r·Cin·k·P_out MACs of the two-op k×k down
#   conv, M3 = r·Cin·P_in + g·r·k·P_out of the three-op 1×1 down and depthwise convs (millions; P = images × pixels);
# - "materialized": W + ΔW minus the better small-op path, on (1, N, Mw, Mb, Ms): Mw = |W|·P_out (the dense weight
#   gradient, and the base op), Mb = r·|W| (building ΔW), Ms = the small-op path's MACs (millions).
# Least squares over the conv shapes × r = 1, 4, 16 of `python benchmarks/calibrate_conv_paths.py` (thread CPU
# time, 1 thread, this project's 2-core CPU; table and fit in docs/benchmarks.md). What the fits encode: the
# three-op path pays a fixed cost per image (its depthwise conv), so the two-op path wins on batches of many small
# images although its k×k conv has ~k² times the MACs of the 1×1 it replaces; and on narrow layers one dense conv
# (W + ΔW, with its weight gradient) beats three or four overhead-bound small ops, although it has more FLOPs.
# Without gradients materializing stays the FLOP rule's call (`factorized_cost_ratio`: build W + ΔW once against
# work at every output position), which the measurements agree with. Calibrated on CPU only: on other devices the
# FLOP rule and the three-op path (the behaviour before the two-op path existed) are kept.
CONV_PATH_FIT = {
    "two_op": {"train": (11.928, -6.257, 48.595, 91.842), "infer": (14.03, -3.198, 18.004, -55.0)},
    "materialized": {"train": (-540.185, -4.519, 195.915, 621.116, -1790.285)},
}


def conv_path_features(r: int, dims: tuple[int, ...], base: nn.Module, x: torch.Tensor) -> dict[str, tuple]:
    """The features of `CONV_PATH_FIT` for one call of a conv with factor dims (k, Cin/g, Cout) on input x."""
    k, cin_g, cout = dims
    g = base.groups
    images = x.shape[0] if x.dim() == len(base.kernel_size) + 2 else 1
    p_in = x.numel() / (cin_g * g)
    p_out = p_in / math.prod(base.stride)
    m2 = r * cin_g * g * k * p_out
    m3 = r * cin_g * g * p_in + g * r * k * p_out
    small = (m2 if k == 1 else min(m2, m3)) + r * cout * p_out
    size = k * cin_g * cout
    return {"two_op": (1.0, float(images), m2 / 1e6, m3 / 1e6),
            "materialized": (1.0, float(images), size * p_out / 1e6, r * size / 1e6, small / 1e6)}


def conv_path(r: int, dims: tuple[int, ...], base: nn.Module, x: torch.Tensor, needs_grad: bool) -> Optional[str]:
    """"three_op", "two_op" or "materialized" by `CONV_PATH_FIT`; None where it is not calibrated (off the CPU)."""
    if x.device.type != "cpu":
        return None
    if base.padding_mode != "zeros":
        return "materialized"  # keeps the rule of conv_extra_macs: no pre-padding copy of the input per call
    features = conv_path_features(r, dims, base, x)
    if needs_grad:
        materialize = _fit(CONV_PATH_FIT["materialized"]["train"], features["materialized"]) < 0.0
    else:
        per_position, size = conv_extra_macs(r, dims, base)
        materialize = factorized_cost_ratio(per_position, size, conv_positions(x, base), r, False) >= 1.0
    if materialize:
        return "materialized"
    mode = "train" if needs_grad else "infer"
    two = dims[0] == 1 or _fit(CONV_PATH_FIT["two_op"][mode], features["two_op"]) < 0.0
    return "two_op" if two else "three_op"


def _fit(coef: tuple, features: tuple) -> float:
    return sum(c * f for c, f in zip(coef, features))


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
            return mode != "materialized"
        return self._auto_path(adapter, x) != "materialized"

    def _use_two_op(self, adapter: str, x: torch.Tensor) -> bool:
        """For a conv on the small-op path: two ops (k×k kernel built from the factors, 1×1 up) or three."""
        mode = self.compute[adapter]
        if mode in ("two_op", "three_op"):
            return mode == "two_op"
        return self._auto_path(adapter, x) == "two_op"

    def _auto_path(self, adapter: str, x: Optional[torch.Tensor]) -> str:
        """"materialized", "two_op" or "three_op" ("factorized" where the small ops have one form), per shape."""
        # Decided per call from the shapes (guards under torch.compile): small batches / late low-resolution
        # layers favour the small ops, big activations without gradients favour building W + ΔW once.
        needs_grad = torch.is_grad_enabled() and self.ftn_a[adapter].requires_grad
        if x is None or torch.compiler.is_compiling():
            return self._choose_path(adapter, x, needs_grad)
        # The cost model is pure Python arithmetic, ~15 µs a call: as much as a small op. Remember it per shape.
        key = (adapter, self.r[adapter], x.shape, x.device.type, needs_grad)
        choice = self._path_cache.get(key)
        if choice is None:
            if len(self._path_cache) > 1024:  # many sequence lengths: start over rather than grow without bound
                self._path_cache.clear()
            choice = self._path_cache[key] = self._choose_path(adapter, x, needs_grad)
        return choice

    def _choose_path(self, adapter: str, x: Optional[torch.Tensor], needs_grad: bool) -> str:
        base = self.get_base_layer()
        if x is not None and isinstance(base, (nn.Conv1d, nn.Conv2d)):
            measured = conv_path(self.r[adapter], self.factor_dims(adapter), base, x, needs_grad)
            if measured is not None:
                return measured
        if self._factorized_cost_ratio(adapter, x, needs_grad) >= 1.0:
            return "materialized"
        return "factorized"
