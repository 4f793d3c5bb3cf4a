"""Mixed-adapter batches in one op per layer: the adapter groups of a batch as one grouped conv or batched matmul.

`routing.route` runs an adapted layer once per adapter group. In eval mode without gradients the per-adapter
weights ``W + ΔW_t`` can be built once (weight_cache.py) and stacked, and then every group runs in one op:
- convs: the T groups' inputs side by side as channels, ``(n, T·Cin, ...)``, one conv with ``groups = T·g``;
- Linear / transformers Conv1D: ``(T, n·tokens, in)`` against ``(T, in, out)``, one ``baddbmm``.
Groups of unequal size are padded to the largest (the padding rows are computed and dropped). The samples' order
is restored with one gather; where the batch is already in that order (``names[i] = adapters[i mod T]`` with B a
multiple of T, or sorted blocks for the batched matmul) no copy is made at all.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import functional as FF
from .routing import check_batch


@dataclass(frozen=True)
class Plan:
    """Where each sample goes: ``groups[t]`` is the adapter of group t (None: base), ``n`` slots per group."""

    groups: tuple[Optional[str], ...]
    n: int
    gather: Optional[torch.Tensor]  # slot -> sample (None: the batch is already in slot order)
    scatter: Optional[torch.Tensor]  # sample -> slot (None: identity)
    group_of: torch.Tensor  # sample -> its group t


_PLANS: OrderedDict[tuple, Plan] = OrderedDict()  # the same adapter_names reach every layer of a forward


def plan(names: tuple[Optional[str], ...], device: torch.device, group_major: bool) -> Plan:
    key = (names, device, group_major)
    found = _PLANS.get(key)
    if found is not None:
        _PLANS.move_to_end(key)
        return found
    rows: dict[Optional[str], list[int]] = {}
    for i, name in enumerate(names):
        rows.setdefault(name, []).append(i)
    n = max(len(r) for r in rows.values())
    padded = [r + [r[0]] * (n - len(r)) for r in rows.values()]  # pad slots recompute a sample of the group
    if group_major:  # slot t·n + j
        order = [i for r in padded for i in r]
    else:  # slot j·T + t: the groups sit side by side in the channels of one sample slot
        order = [r[j] for j in range(n) for r in padded]
    slot_of = {}
    for slot, i in enumerate(order):
        slot_of.setdefault(i, slot)
    scatter = [slot_of[i] for i in range(len(names))]
    identity = order == list(range(len(names)))
    as_tensor = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    group_of = {i: t for t, r in enumerate(rows.values()) for i in r}
    found = Plan(
        tuple(rows), n, None if identity else as_tensor(order), None if identity else as_tensor(scatter),
        as_tensor([group_of[i] for i in range(len(names))]),
    )
    _PLANS[key] = found
    if len(_PLANS) > 64:
        _PLANS.popitem(last=False)
    return found


def _stacked(layer, groups: tuple[Optional[str], ...], kind: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The groups' adapted weights stacked for the grouped op, and the bias repeated; cached as one entry."""

    def build():
        base = layer.get_base_layer()
        weights = [layer._adapted_weight([g]) for g in groups]
        if kind == "linear":
            weight = torch.stack(weights)  # (T, out, in)
        elif kind == "conv1d_t":
            weight = torch.stack(weights)  # (T, in, out)
        else:
            weight = torch.cat(weights)  # (T·Cout, Cin/g, *k) or, transposed, (T·Cin, Cout/g, *k)
        bias = base.bias
        if bias is not None and kind in ("conv", "conv_t"):
            bias = bias.repeat(len(groups))
        return weight, bias

    tensors, extra = layer._cache_sources(groups)
    return layer._weight_cache.get_or_build(("grouped", groups), tensors, extra, build)


def _kind(base: nn.Module) -> Optional[str]:
    if isinstance(base, (nn.Conv1d, nn.Conv2d)):
        return "conv"
    if isinstance(base, (nn.ConvTranspose1d, nn.ConvTranspose2d)):
        return "conv_t"
    if isinstance(base, nn.Linear):
        return "linear"
    if isinstance(base, Conv1D):
        return "conv1d_t"
    return None


FACTORIZED_SHARE = 0.5  # stacked small ops only while their MACs stay under this share of the base op's
# Convs that fail the share test: one grouped conv over the stacked cached weights (True, the configuration measured
# in docs/benchmarks.md), or each group on its own with its cached weight (False; better at few groups on CPU).
GROUPED_CONV = True


def grouped_forward(layer, x: torch.Tensor, adapter_names: list[str]) -> Optional[torch.Tensor]:
    """The layer's output on a mixed batch in one pass, or None where `route` should run each group (with its
    cached weight): training, gradients, the cache off, a single group, explicit compute modes, and convs whose
    groups are cheaper one by one.

    Convs and Linear layers run the base op once over the whole batch plus every group's factors stacked along the
    rank (``_stacked_factor_delta``: small ops, no weight copy) where `_factorized_is_cheaper`; otherwise Linear
    layers, transposed convs (and convs with ``GROUPED_CONV``) stack the groups' cached weights into one batched
    matmul or grouped conv (``_stacked_weight_forward``).
    """
    check_batch(adapter_names, x.shape[0], layer.merged)
    available = layer._modules[layer.adapter_layer_names[0]]
    names = tuple(n if n in available else None for n in adapter_names)
    first = names[0]
    if all(n == first for n in names):
        return None
    base = layer.get_base_layer()
    kind = _kind(base)
    adapters = [n for n in dict.fromkeys(names) if n is not None]
    if kind is None or not layer._cache_applies(adapters) or "weight" not in base._parameters:
        return None
    if kind in ("conv", "conv_t") and x.dim() != 2 + len(base.kernel_size):
        return None  # unbatched input
    if kind != "conv_t" and all(available._parameters[a].dtype == x.dtype for a in adapters):
        if _factorized_is_cheaper(layer, base, tuple(adapters)):
            p = plan(names, x.device, group_major=True)
            return layer._base_forward(x) + _stacked_factor_delta(layer, base, kind, x, p)
    if kind == "conv" and not GROUPED_CONV:
        return None
    return _stacked_weight_forward(layer, base, kind, x, names)


def _factorized_is_cheaper(layer, base, adapters: tuple[str, ...]) -> bool:
    """Stacked small ops cost Σ_t f_t MACs per output position (f: `_extra_macs`), the base op |W|; the other ways
    read T weights instead of one. Take the small ops while under FACTORIZED_SHARE of the base op. (Also weighing
    the (T - 1)·|W| weight reads against the activations' size was measured worse: 1.54 against 1.38 × base at
    T = 10 on ResNet-18.) Decided once per adapter set."""
    key = ("mixed", adapters)
    choice = layer._path_cache.get(key)
    if choice is None:
        stacked = sum(layer._extra_macs(a)[0] for a in adapters)
        choice = layer._path_cache[key] = stacked <= FACTORIZED_SHARE * base.weight.numel()
    return choice


def _stacked_factors(layer, groups, kind):
    """The groups' factors concatenated along the rank, scaled, as (down, spatial or None, up), and which group
    owns each component; cached as one small entry."""

    def build():
        downs, spatials, ups, owners = [], [], [], []
        for t, g in enumerate(groups):
            if g is None:
                continue
            f, scale, k = layer.factors(g), layer.scaling[g], layer.kind[g]
            if kind == "conv":  # a (r, k²), b (r, Cin/g), c (r, Cout)
                downs.append(f[1]), spatials.append(f[0] * scale), ups.append(f[2])
            elif k == FF.MATRIX:  # a (r, in), b (r, out)
                downs.append(f[0]), ups.append(f[1] * scale)
            elif k == FF.QKV:
                downs.append(f[0]), ups.append(FF._head_mixer(f[1], f[2] * scale))
            else:  # OUT
                downs.append(FF._head_mixer(f[1], f[2] * scale)), ups.append(f[0])
            owners.append(torch.full((f[0].shape[0],), t, dtype=torch.long, device=f[0].device))
        spatial = torch.cat(spatials) if spatials else None
        return torch.cat(downs), spatial, torch.cat(ups), torch.cat(owners)

    tensors, extra = layer._cache_sources(groups)
    return layer._weight_cache.get_or_build(("factors", groups), tensors, extra, build)


def _stacked_factor_delta(layer, base, kind, x, p: Plan) -> torch.Tensor:
    """Σ_t ΔW_t x for every sample with its own adapter t: all groups' components in one chain of small ops,
    the components of other adapters zeroed per sample before the up-projection."""
    down, spatial, up, owners = _stacked_factors(layer, p.groups, kind)
    mask = (owners.unsqueeze(0) == p.group_of.unsqueeze(1)).to(x.dtype)  # (B, R)
    if kind != "conv":
        z = x @ down.t()  # (B, ..., R)
        z = z * mask.view(x.shape[0], *([1] * (x.dim() - 2)), -1)
        return z @ up
    g, rank = base.groups, down.shape[0]
    conv = F.conv2d if isinstance(base, nn.Conv2d) else F.conv1d
    ones = (1,) * len(base.kernel_size)
    padding = base.padding
    if base.padding_mode != "zeros":
        x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
        padding = 0
    if spatial.shape[1] == 1:  # 1-element kernels: the spatial scalar folded into the down-projection
        z = conv(x, _tile(down * spatial, g).reshape(g * rank, -1, *ones), None, base.stride, padding, base.dilation, g)
    else:
        z = conv(x, _tile(down, g).reshape(g * rank, -1, *ones), groups=g)
        z = conv(z, _tile(spatial, g).reshape(g * rank, 1, *base.kernel_size), None, base.stride, padding,
                 base.dilation, g * rank)
    z = z * mask.repeat(1, g).view(x.shape[0], g * rank, *ones)
    return conv(z, up.t().reshape(up.shape[1], rank, *ones), groups=g)


def _tile(factor: torch.Tensor, groups: int) -> torch.Tensor:
    return factor if groups == 1 else factor.repeat(groups, 1)


def _stacked_weight_forward(layer, base, kind, x, names) -> torch.Tensor:
    p = plan(names, x.device, group_major=kind in ("linear", "conv1d_t"))
    weight, bias = _stacked(layer, p.groups, kind)
    t = len(p.groups)
    xs = x if p.gather is None else x.index_select(0, p.gather)
    if kind in ("linear", "conv1d_t"):
        xs = xs.reshape(t, -1, x.shape[-1])
        w = weight.transpose(1, 2) if kind == "linear" else weight
        y = torch.bmm(xs, w) if bias is None else torch.baddbmm(bias, xs, w)
        y = y.reshape(t * p.n, *x.shape[1:-1], y.shape[-1])
    else:
        xs = xs.reshape(p.n, t * x.shape[1], *x.shape[2:])
        y = _grouped_conv(layer, base, kind, xs, weight, bias, t)
        y = y.reshape(p.n * t, y.shape[1] // t, *y.shape[2:])
    return y if p.scatter is None else y.index_select(0, p.scatter)


def _grouped_conv(layer, base, kind, x, weight, bias, t):
    groups = t * base.groups
    if kind == "conv_t":
        op = F.conv_transpose2d if isinstance(base, nn.ConvTranspose2d) else F.conv_transpose1d
        return op(x, weight, bias, base.stride, base.padding, layer._output_padding(), groups, base.dilation)
    op = F.conv2d if isinstance(base, nn.Conv2d) else F.conv1d
    padding = base.padding
    if base.padding_mode != "zeros":  # as nn.Conv does: pad with the mode, then convolve without padding
        x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
        padding = 0
    return op(x, weight, bias, base.stride, padding, base.dilation, groups)


def grouped_batchnorm(layer, x: torch.Tensor, adapter_names: list[str]) -> Optional[torch.Tensor]:
    """A task BatchNorm on a mixed batch in eval mode as one per-sample affine op, or None where it does not apply
    (training, gradients, batch statistics, other norm types, adapters in another dtype): then `route` runs it.

    In eval mode a BatchNorm is ``x · s + h`` per channel with ``s = w / sqrt(running_var + eps)`` and
    ``h = b - running_mean · s``; each sample takes its adapter's ``s`` and ``h``.
    """
    if torch.is_grad_enabled() or x.dim() < 2:
        return None
    modules = layer._modules[layer.container_name]._modules
    names = tuple(n if n in modules else None for n in adapter_names)
    first = names[0]
    if all(n == first for n in names):
        return None
    check_batch(adapter_names, x.shape[0], layer.merged)
    p = plan(names, x.device, group_major=True)
    norms = [layer._module_for(g) for g in p.groups]
    for m in norms:
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) or m.training or m.running_var is None:
            return None
        if m.running_var.dtype != x.dtype or (m.weight is not None and m.weight.dtype != x.dtype):
            return None
    var = torch.stack([m.running_var for m in norms])
    mean = torch.stack([m.running_mean for m in norms])
    eps = torch.tensor([m.eps for m in norms], dtype=x.dtype, device=x.device).unsqueeze(1)
    scale = torch.rsqrt(var + eps)
    if norms[0].affine:
        scale = scale * torch.stack([m.weight for m in norms])
        shift = torch.stack([m.bias for m in norms]) - mean * scale
    else:
        shift = -mean * scale
    view = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift[p.group_of].view(view), x, scale[p.group_of].view(view))
