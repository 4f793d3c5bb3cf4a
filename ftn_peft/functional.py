"""Pure functions for the CP factor maths of FTN.

Every adapted weight is a rank-r CP tensor ``ΔW = scale · Σ_r a_r ⊗ b_r ⊗ c_r``, laid out in the base weight as
the "Factor layout" table of docs/design.md shows.
Factors are stored as ``(r, dim)`` matrices so that row ``i`` of every factor is the i-th rank-1 component:
pruning and per-component norms then index rows.

Two ways to apply ``ΔW`` to an input are provided and kept equal by the tests:
- *materialized*: build ``ΔW`` (one einsum) and run the base op once with ``W + ΔW``;
- *factorized*: run the factors as small ops on the activations (tensorly-torch's CP convolution:
  a 1×1 projection to r channels, a depthwise k×k on those r channels, a 1×1 projection back).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# The layouts a factor triple can take; see the table in docs/design.md.
CONV = "conv"  # (k², Cin/g, Cout) -> weight (Cout, Cin/g, *kernel)
CONV_T = "conv_transpose"  # (k², Cin, Cout/g) -> ConvTranspose weight (Cin, Cout/g, *kernel)
QKV = "qkv"  # (d_model, d, n) -> Linear weight (n·d, d_model), feature h·d + j
OUT = "out"  # (d_model, d, n) -> Linear weight (d_model, n·d)
MATRIX = "matrix"  # (in, out) -> Linear weight (out, in)
KINDS = (CONV, QKV, OUT, MATRIX, CONV_T)


def factor_dims(kind: str, weight_shape: tuple[int, ...], num_heads: Optional[int] = None) -> tuple[int, ...]:
    """Lengths of the factor vectors for a torch weight of ``weight_shape`` (the base layer's own layout)."""
    if kind in (CONV, CONV_T):
        k = 1
        for s in weight_shape[2:]:
            k *= s
        # conv: (Cout, Cin/g, *k) -> (k², Cin/g, Cout); transposed: (Cin, Cout/g, *k) -> (k², Cin, Cout/g)
        first, second = weight_shape[:2]
        return (k, second, first) if kind == CONV else (k, first, second)
    out_f, in_f = weight_shape
    if kind == MATRIX:
        return (in_f, out_f)
    if num_heads is None or num_heads < 1:
        raise ValueError(f"kind={kind!r} needs a positive num_heads, got {num_heads!r}")
    width = out_f if kind == QKV else in_f
    d_model = in_f if kind == QKV else out_f
    if width % num_heads:
        raise ValueError(f"num_heads={num_heads} does not divide the projection width {width}")
    return (d_model, width // num_heads, num_heads)


def delta_weight(kind: str, factors: list[torch.Tensor], weight_shape: tuple[int, ...], scale: float = 1.0) -> torch.Tensor:
    """``ΔW`` in the torch layout of the base weight (nn.Conv / nn.ConvTranspose / nn.Linear), one einsum."""
    if kind == CONV:
        a, b, c = factors  # (r, k²), (r, Cin/g), (r, Cout)
        delta = torch.einsum("rk,ri,ro->oik", a, b, c).reshape(weight_shape)
    elif kind == CONV_T:
        a, b, c = factors  # (r, k²), (r, Cin), (r, Cout/g)
        delta = torch.einsum("rk,ri,ro->iok", a, b, c).reshape(weight_shape)
    elif kind == QKV:
        a, b, c = factors  # (r, d_model), (r, d), (r, n)
        delta = torch.einsum("ri,rj,rh->hji", a, b, c).reshape(weight_shape)
    elif kind == OUT:
        a, b, c = factors
        delta = torch.einsum("ri,rj,rh->ihj", a, b, c).reshape(weight_shape)
    elif kind == MATRIX:
        a, b = factors  # (r, in), (r, out)
        delta = b.t() @ a
    else:
        raise ValueError(f"unknown factor kind {kind!r}; expected one of {KINDS}")
    return delta * scale if scale != 1.0 else delta


def component_norms(factors: list[torch.Tensor]) -> torch.Tensor:
    """Frobenius norm of each rank-1 component: the product of its factors' norms, shape (r,)."""
    norms = factors[0].norm(dim=1)
    for f in factors[1:]:
        norms = norms * f.norm(dim=1)
    return norms


def _head_mixer(b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    # (r, n·d): row r is vec(c_r ⊗ b_r) in the h·d + j feature order. A broadcast product, not an einsum:
    # on these tiny operands einsum's parsing costs more than the multiply, forward and backward.
    return (c.unsqueeze(2) * b.unsqueeze(1)).reshape(b.shape[0], -1)


def linear_delta(kind: str, x: torch.Tensor, factors: list[torch.Tensor], scale: float) -> torch.Tensor:
    """``x @ ΔWᵀ`` for a Linear-layout ``ΔW`` without building it: two thin matmuls through r.

    The scale multiplies an (r, ·) factor, not the (tokens, width) output: same result, a far smaller op.
    """
    if kind == MATRIX:
        a, b = factors
        return (x @ a.t()) @ (b if scale == 1.0 else b * scale)
    a, b, c = factors
    mixer = _head_mixer(b, c if scale == 1.0 else c * scale)  # (r, n·d)
    if kind == QKV:
        return (x @ a.t()) @ mixer  # (.., d_model) -> (.., r) -> (.., n·d)
    if kind == OUT:
        return (x @ mixer.t()) @ a  # (.., n·d) -> (.., r) -> (.., d_model)
    raise ValueError(f"linear_delta does not take kind={kind!r}")


def conv_delta(
    x: torch.Tensor,
    factors: list[torch.Tensor],
    kernel_size: tuple[int, ...],
    stride,
    padding,
    dilation,
    groups: int,
    scale: float,
    two_op: bool = False,
) -> torch.Tensor:
    """``conv(x, ΔW)`` through r channels per group, for 1-d and 2-d convs.

    Three ops (CP convolution): 1×1 down, depthwise k×k, 1×1 up. With ``two_op`` (and always for 1-element
    kernels): the r × Cin/g × k kernel ``b ⊗ a`` is built first (r·Cin/g·k elements, a tiny op), then one k×k conv
    down to r channels per group and a 1×1 up, the two ops LoRA runs. `compute_path.conv_path` chooses.
    """
    a, b, c = factors  # (r, k²), (r, Cin/g), (r, Cout)
    r = a.shape[0]
    conv = F.conv2d if len(kernel_size) == 2 else F.conv1d
    ones = (1,) * len(kernel_size)
    up = c.t().reshape(c.shape[1], r, *ones)
    if scale != 1.0:  # on the smallest factor: one tiny op
        a = a * scale
    if two_op or a.shape[1] == 1:
        # For a 1-element kernel the spatial factor is one scalar per component: folding it costs nothing (the
        # third, overhead-bound conv cost ~6 % of a ResNet-50 training step on CPU).
        down = (b.unsqueeze(2) * a.unsqueeze(1)).reshape(r, b.shape[1], *kernel_size)
        down = _per_group(down, groups)
        z = conv(x, down, stride=stride, padding=padding, dilation=dilation, groups=groups)
        return conv(z, up, groups=groups)
    # Each group projects its own Cin/g channels to r channels with the same b.
    down = _per_group(b, groups).reshape(groups * r, b.shape[1], *ones)
    spatial = _per_group(a, groups).reshape(groups * r, 1, *kernel_size)
    z = conv(x, down, groups=groups)  # (B, g·r, *L)
    z = conv(z, spatial, stride=stride, padding=padding, dilation=dilation, groups=groups * r)  # (B, g·r, *L')
    return conv(z, up, groups=groups)  # (B, Cout, *L')


def conv_transpose_delta(
    x: torch.Tensor,
    factors: list[torch.Tensor],
    kernel_size: tuple[int, ...],
    stride,
    padding,
    output_padding,
    dilation,
    groups: int,
    scale: float,
) -> torch.Tensor:
    """``conv_transpose(x, ΔW)`` as three small ops, for 1-d and 2-d transposed convs.

    ``ΔW[i, o, k] = Σ a[k] b[i] c[o]`` factors through r channels per group: a grouped 1×1 projection Cin -> g·r
    with b, a depthwise *transposed* conv of those g·r channels with a (the layer's stride, padding,
    output_padding and dilation: the output size and the scatter pattern are those of the base op), and a grouped
    1×1 projection g·r -> Cout with c, shared by the groups. Equal to the dense op up to rounding.
    """
    a, b, c = factors  # (r, k²), (r, Cin), (r, Cout/g)
    r = a.shape[0]
    two_d = len(kernel_size) == 2
    conv, conv_t = (F.conv2d, F.conv_transpose2d) if two_d else (F.conv1d, F.conv_transpose1d)
    ones = (1,) * len(kernel_size)
    if scale != 1.0:
        a = a * scale
    # Group G's rows of the down-projection are b restricted to G's Cin/g input channels.
    down = b.reshape(r, groups, -1).transpose(0, 1).reshape(groups * r, -1, *ones)
    spatial = _per_group(a, groups).reshape(groups * r, 1, *kernel_size)
    up = _per_group(c.t(), groups).reshape(groups * c.shape[1], r, *ones)
    z = conv(x, down, groups=groups)  # (B, g·r, *L)
    z = conv_t(
        z, spatial, stride=stride, padding=padding, output_padding=output_padding, dilation=dilation, groups=groups * r
    )  # (B, g·r, *L')
    return conv(z, up, groups=groups)  # (B, Cout, *L')


def _per_group(factor: torch.Tensor, groups: int) -> torch.Tensor:
    # Each group uses the same r rows: stack g copies along the first dimension.
    return factor if groups == 1 else factor.repeat(groups, *(1,) * (factor.dim() - 1))
