"""What each layer of an FTN adapter learned, and what follows from it: norms, heatmaps, pruning, data-chosen ranks,
and conversion of a fully fine-tuned model into an FTN adapter.

The paper uses one rank everywhere and leaves per-layer ranks open; its appendices show that layers matter unequally
(B: removing low-norm layers, C: per-layer ΔW norms as heatmaps, E: CP-decomposing a fine-tuned ΔW after training).
This module turns those analyses into tools:

- `layer_norms`: per-layer ΔW Frobenius norm and per-component norms (component i of ``ΔW = s·Σ a_i ⊗ b_i ⊗ c_i`` has
  Frobenius norm ``|s|·‖a_i‖‖b_i‖‖c_i‖``, the norm of an outer product being the product of the norms).
- `plot_norm_heatmap`: layers × columns (adapters, or ranks of one domain), each column normalized to [0, 1].
- `plan_pruning` + `prune_adapter`: keep chosen CP components (whole layers above a threshold, or the strongest
  components up to a parameter budget) as a new, smaller adapter with a `rank_pattern` on the same model.
- `group_sparsity_penalty`: λ Σ_layers Σ_components ‖component‖, a group lasso whose groups are CP components, added
  to the training loss so that the data choose each layer's rank (then prune).
- `convert_finetuned`: an FTN adapter from ``W_finetuned − W`` by CP decomposition (tensorly), with per-layer error.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from . import functional as FF
from .layer import FTNLayer, TransformersConv1D
from .task_layers import TaskHead, TaskNorm


@dataclass(frozen=True)
class LayerNorms:
    """Norms of one adapted layer of one adapter (scaling included, so they are norms of ΔW itself)."""

    name: str
    kind: str
    delta_norm: float  # ‖ΔW‖_F
    component_norms: tuple[float, ...]  # ‖s · a_i ⊗ b_i ⊗ c_i‖_F, one per rank-1 component
    params_per_component: int  # Σ factor dims: what keeping one component costs

    @property
    def rank(self) -> int:
        return len(self.component_norms)


def _tuner_root(model: nn.Module) -> nn.Module:
    """The wrapped base model, whose module names are the ones FTNConfig patterns match (``layer1.0.conv1``)."""
    base = getattr(model, "base_model", model)  # PeftModel -> FTNModel
    return getattr(base, "model", base)  # FTNModel -> the user's model


def _ftn_layers(model: nn.Module, adapter: str) -> dict[str, FTNLayer]:
    layers = {n: m for n, m in _tuner_root(model).named_modules() if isinstance(m, FTNLayer) and adapter in m.r}
    if not layers:
        raise ValueError(f"adapter={adapter!r} has no FTN factor layers in this model; check the adapter name")
    return layers


@torch.no_grad()
def layer_norms(model: nn.Module, adapter: str) -> dict[str, LayerNorms]:
    """Per adapted layer (keyed by module name): ΔW norm and per-component norms of `adapter`."""
    result = {}
    for name, layer in _ftn_layers(model, adapter).items():
        factors = [f.detach().float() for f in layer.factors(adapter)]
        scale = abs(layer.scaling[adapter])
        result[name] = LayerNorms(
            name=name,
            kind=layer.kind[adapter],
            delta_norm=float(layer.get_delta_weight(adapter).float().norm()),
            component_norms=tuple((FF.component_norms(factors) * scale).tolist()),
            params_per_component=sum(layer.factor_dims(adapter)),
        )
    return result


def group_sparsity_penalty(model: nn.Module, adapter: str, weight: float) -> torch.Tensor:
    """``weight · Σ_layers Σ_i ‖s · a_i ⊗ b_i ⊗ c_i‖_F``: add it to the loss to let the data choose the ranks.

    Why this penalty: it is the group lasso whose groups are whole CP components. Like the ℓ1 norm on scalars, a sum
    of (unsquared) norms is not differentiable where a group vanishes, so the optimum sets whole components to zero
    instead of shrinking all of them a little, as weight decay (a squared norm) does. It is also a function of ΔW's
    components only, not of how a component's scale is split between its factors (rescaling a_i by t and b_i by
    1/t changes nothing), so it cannot be lowered by moving scale between factors; a per-factor penalty can.
    Since ‖ΔW‖_F ≤ Σ_i ‖component_i‖, it also bounds each layer's ΔW norm, which pruning by norm then reads.
    Components are pruned afterwards (`prune_adapter`): Adam only drives them close to zero, never exactly.
    """
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight!r}")
    terms = []
    for layer in _ftn_layers(model, adapter).values():
        terms.append(FF.component_norms(layer.factors(adapter)).sum() * abs(layer.scaling[adapter]))
    return torch.stack(terms).sum() * weight


# --- heatmaps ---------------------------------------------------------------------------------------------------
def normalize_columns(columns: dict[str, dict[str, float]]) -> tuple[list[str], torch.Tensor]:
    """Rows (layer names, first-seen order) and a (layers × columns) matrix, each column scaled to [0, 1].

    As in the paper's figures 4 to 6 the colors are relative within a column: ``(v − min) / (max − min)``. A layer
    that a column does not adapt is NaN (drawn blank).
    """
    rows = list(dict.fromkeys(name for col in columns.values() for name in col))
    mat = torch.full((len(rows), len(columns)), float("nan"))
    for j, col in enumerate(columns.values()):
        values = torch.tensor([col.get(r, float("nan")) for r in rows])
        known = values[~values.isnan()]
        lo, hi = known.min(), known.max()
        mat[:, j] = (values - lo) / (hi - lo) if hi > lo else torch.where(values.isnan(), values, 1.0)
    return rows, mat


def plot_norm_heatmap(columns: dict[str, dict[str, float]], path, title: str = "", xlabel: str = "adapter") -> None:
    """Write a PNG heatmap of per-layer norms: one row per layer, one column per entry of `columns`.

    `columns` maps a column label (an adapter, or a rank) to ``{layer name: norm}``, e.g.
    ``{a: {n: v.delta_norm for n, v in layer_norms(model, a).items()} for a in adapters}``.
    """
    if not columns:
        raise ValueError("columns is empty: pass {column label: {layer name: norm}}")
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    rows, mat = normalize_columns(columns)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(columns), 1.2 + 0.28 * len(rows)))
    image = ax.imshow(mat.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(columns)), [str(c) for c in columns], rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_title(title or "‖ΔW‖ per layer, normalized per column", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- pruning ----------------------------------------------------------------------------------------------------
def plan_pruning(
    norms: dict[str, LayerNorms], threshold: Optional[float] = None, budget: Optional[int] = None
) -> dict[str, list[int]]:
    """Which components each layer keeps (sorted indices; an empty list drops the layer).

    - `threshold`: the paper's appendix B: drop every layer whose ‖ΔW‖_F is below it, keep the others whole.
    - `budget`: keep the globally strongest components (by norm) while their factor parameters fit in `budget`.
    """
    if (threshold is None) == (budget is None):
        raise ValueError("pass exactly one of threshold= (drop weak layers) or budget= (factor parameters to keep)")
    if threshold is not None:
        return {n: list(range(v.rank)) if v.delta_norm >= threshold else [] for n, v in norms.items()}
    if budget < 0:
        raise ValueError(f"budget must be >= 0 factor parameters, got {budget!r}")
    ranked = sorted(
        ((c, n, i) for n, v in norms.items() for i, c in enumerate(v.component_norms)), key=lambda t: -t[0]
    )
    keep: dict[str, list[int]] = {n: [] for n in norms}
    left = budget
    for _, name, i in ranked:
        cost = norms[name].params_per_component
        if cost <= left:
            keep[name].append(i)
            left -= cost
    return {n: sorted(k) for n, k in keep.items()}


def pruned_config(config, keep: dict[str, list[int]], ranks: dict[str, int], alphas: dict[str, Optional[float]]):
    """A copy of `config` that adapts only the kept layers (explicit target list) at the kept ranks.

    Ranks go to `rank_pattern` keyed by the escaped full module name. Where ΔW is scaled by alpha / r, the layer's
    alpha becomes ``alpha · r_new / r_old`` so that the kept components keep their exact scale.
    """
    kept = {n: k for n, k in keep.items() if k}
    if not kept:
        raise ValueError("pruning keeps no layer; lower threshold= or raise budget=")
    new = copy.deepcopy(config)
    new.target_modules = set(kept)
    new.exclude_modules = None  # the explicit target list already leaves every other module out
    new.rank_pattern = {re.escape(n): len(k) for n, k in kept.items()}
    new.alpha_pattern = {
        re.escape(n): alphas[n] * len(k) / ranks[n] for n, k in kept.items() if alphas[n] is not None
    }
    return new


@torch.no_grad()
def _copy_task_modules(model: nn.Module, src: str, dst: str) -> None:
    """Copy `src`'s BatchNorm copies (statistics included), task head and modules_to_save into `dst`."""
    for module in model.modules():
        if isinstance(module, (TaskNorm, TaskHead)) and src in module.modules_by_adapter:
            module.modules_by_adapter[dst].load_state_dict(module.modules_by_adapter[src].state_dict())
        saved = getattr(module, "modules_to_save", None)
        if isinstance(saved, nn.ModuleDict) and src in saved and dst in saved:
            saved[dst].load_state_dict(saved[src].state_dict())


@torch.no_grad()
def prune_adapter(
    model,
    adapter: str,
    new_name: str,
    threshold: Optional[float] = None,
    budget: Optional[int] = None,
    keep: Optional[dict[str, list[int]]] = None,
):
    """Add `new_name` to the PeftModel `model`: `adapter` with only the chosen CP components.

    Choose components with `threshold` or `budget` (see `plan_pruning`) or give `keep` ({layer name: indices}; a
    layer not listed, or listed with [], is dropped). The new adapter has its own FTNConfig (explicit target list,
    `rank_pattern`), so it saves, loads and merges like any other; the BatchNorm copies and the head are copied.
    Returns the plan that was applied.
    """
    if new_name in model.peft_config:
        raise ValueError(f"new_name={new_name!r} already exists; pick another name or delete_adapter() it first")
    layers = _ftn_layers(model, adapter)
    if keep is None:
        keep = plan_pruning(layer_norms(model, adapter), threshold=threshold, budget=budget)
    unknown = sorted(set(keep) - set(layers))
    if unknown:
        raise ValueError(f"keep names layers {unknown} that adapter {adapter!r} does not adapt")
    keep = {n: sorted(set(keep.get(n, []))) for n in layers}
    for n, idx in keep.items():
        if idx and not 0 <= idx[0] <= idx[-1] < layers[n].r[adapter]:
            raise ValueError(f"keep[{n!r}] has indices outside 0..{layers[n].r[adapter] - 1}: {idx}")
    ranks = {n: m.r[adapter] for n, m in layers.items()}
    alphas = {n: m.alpha[adapter] for n, m in layers.items()}
    config = pruned_config(model.peft_config[adapter], keep, ranks, alphas)
    active = list(model.base_model.active_adapters)
    model.add_adapter(new_name, config)
    for name, idx in keep.items():
        if idx:
            rows = torch.tensor(idx, device=layers[name].ftn_a[adapter].device)
            for src, dst in zip(layers[name].factors(adapter), layers[name].factors(new_name)):
                dst.copy_(src.index_select(0, rows))
    _copy_task_modules(model, adapter, new_name)
    model.base_model.set_adapter(active)  # add_adapter may not change which adapter is active
    return keep


def factor_parameters(keep: dict[str, list[int]], norms: dict[str, LayerNorms]) -> int:
    """Factor parameters of a pruning plan."""
    return sum(len(k) * norms[n].params_per_component for n, k in keep.items())


# --- conversion of a fine-tuned model -----------------------------------------------------------------------------
def cp_tensor_from_delta(kind: str, delta: torch.Tensor, num_heads: Optional[int] = None) -> torch.Tensor:
    """The tensor FTN's CP acts on, from ΔW in nn.Linear / nn.Conv layout: the inverse of `delta_weight`'s layout.

    conv: (Cout, Cin/g, kh, kw) -> k² × Cin/g × Cout; conv_transpose: (Cin, Cout/g, kh, kw) -> k² × Cin × Cout/g;
    qkv: (n·d, d_model) -> d_model × d × n; out: (d_model, n·d) -> d_model × d × n; matrix: (out, in) -> in × out.
    """
    if kind == FF.CONV:
        return delta.reshape(delta.shape[0], delta.shape[1], -1).permute(2, 1, 0)
    if kind == FF.CONV_T:
        return delta.reshape(delta.shape[0], delta.shape[1], -1).permute(2, 0, 1)
    if kind == FF.MATRIX:
        return delta.t()
    if kind == FF.QKV:
        return delta.reshape(num_heads, -1, delta.shape[1]).permute(2, 1, 0)
    if kind == FF.OUT:
        return delta.reshape(delta.shape[0], num_heads, -1).permute(0, 2, 1)
    raise ValueError(f"unknown factor kind {kind!r}; expected one of {FF.KINDS}")


def cp_decompose(tensor: torch.Tensor, rank: int, n_iter_max: int = 200, seed: int = 0) -> list[torch.Tensor]:
    """Rank-`rank` CP factors of `tensor` as (rank, dim) rows, balanced so every factor of a component has the same
    norm. Matrices use the truncated SVD (the optimal rank-r approximation); higher orders use tensorly's ALS."""
    t = tensor.detach().double().cpu()
    if t.ndim == 2:
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        factors = [u[:, :rank].t() * s[:rank, None], vh[:rank]]
    else:
        import tensorly as tl
        from tensorly.decomposition import parafac

        init = "svd" if rank <= min(t.shape) else "random"
        weights, mats = parafac(tl.tensor(t.numpy()), rank=rank, init=init, n_iter_max=n_iter_max, random_state=seed)
        factors = [torch.as_tensor(m).t().clone() for m in mats]
        factors[0] = factors[0] * torch.as_tensor(weights)[:, None]
    norms = torch.stack([f.norm(dim=1) for f in factors])  # (order, rank)
    target = norms.prod(0).pow(1.0 / len(factors))  # the geometric mean: the same component, balanced factors
    return [f * (target / n.clamp_min(1e-30))[:, None] for f, n in zip(factors, norms)]


@torch.no_grad()
def convert_finetuned(model, finetuned: nn.Module, adapter: str, config, n_iter_max: int = 200) -> dict[str, float]:
    """Add `adapter` to the PeftModel `model` by CP-decomposing ``W_finetuned − W`` for every layer `config` adapts.

    `finetuned` is the fully fine-tuned copy of the base model (same module names). Its BatchNorm layers and its head
    are copied into the adapter's task BatchNorm and task head. Returns the relative approximation error per layer,
    ``‖ΔW − ΔŴ‖_F / ‖ΔW‖_F``.
    """
    model.add_adapter(adapter, config)
    tuned = dict(finetuned.named_modules())
    errors = {}
    for name, layer in _ftn_layers(model, adapter).items():
        if name not in tuned:
            raise ValueError(f"finetuned has no module {name!r}; it must be a fine-tuned copy of the base model")
        base = layer.get_base_layer().weight
        delta = (tuned[name].weight.to(base.device, torch.float64) - base.double())
        if isinstance(layer, TransformersConv1D):
            delta = delta.t()  # Conv1D stores (in, out); the CP layout is defined on nn.Linear's (out, in)
        tensor = cp_tensor_from_delta(layer.kind[adapter], delta, layer.num_heads[adapter])
        factors = cp_decompose(tensor, layer.r[adapter], n_iter_max=n_iter_max)
        unscale = layer.scaling[adapter] ** (-1.0 / len(factors))  # alpha / r > 0; spread 1/scale over the factors
        for dst, src in zip(layer.factors(adapter), factors):
            dst.copy_(src * unscale)
        approx = layer.get_delta_weight(adapter).double()
        target = delta.t() if isinstance(layer, TransformersConv1D) else delta
        errors[name] = float((approx - target).norm() / target.norm().clamp_min(1e-30))
    for name, module in _tuner_root(model).named_modules():
        if isinstance(module, (TaskNorm, TaskHead)) and adapter in module.modules_by_adapter:
            module.modules_by_adapter[adapter].load_state_dict(tuned[name].state_dict())
    return errors


def adapter_factor_count(model: nn.Module, adapter: str) -> int:
    """Factor parameters of one adapter (the paper's count for the low-rank part)."""
    return sum(math.prod(f.shape) for m in _ftn_layers(model, adapter).values() for f in m.factors(adapter))
