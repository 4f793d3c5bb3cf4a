"""Parameter accounting per adapter, in the form of the paper's "Params" column.

The paper reports a method's parameters as a multiple of the feature extractor (the backbone without its
classifier): ``(backbone + Σ_tasks task-specific parameters) / backbone``. Running statistics of task BatchNorm
are buffers, not parameters, and are not counted, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from .layer import FTNLayer
from .task_layers import TaskHead, TaskNorm


@dataclass(frozen=True)
class ParameterReport:
    adapter: str
    factor_params: int
    norm_params: int
    head_params: int
    backbone_params: int

    @property
    def total(self) -> int:
        return self.factor_params + self.norm_params + self.head_params

    @property
    def multiple(self) -> float:
        """Backbone plus this one task, as a multiple of the backbone (the paper's "Params" for one task)."""
        return 1.0 + self.total / self.backbone_params


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _adapter_param_ids(module: nn.Module) -> set[int]:
    return {id(p) for attr in module.adapter_layer_names for p in getattr(module, attr).parameters()}


def backbone_parameters(model: nn.Module) -> int:
    """Parameters of the base model without its classifier (the paper's feature extractor)."""
    excluded: set[int] = set()
    for module in model.modules():
        if isinstance(module, TaskHead):
            excluded |= {id(p) for p in module.parameters()}
        elif isinstance(module, (FTNLayer, TaskNorm)):
            excluded |= _adapter_param_ids(module)
    return sum(p.numel() for p in model.parameters() if id(p) not in excluded)


def parameter_report(model: nn.Module, adapter_names: Optional[list[str]] = None) -> dict[str, ParameterReport]:
    """Factor, normalization and head parameters of each adapter of an FTN model (a PeftModel or FTNModel)."""
    ftn_modules = [m for m in model.modules() if isinstance(m, (FTNLayer, TaskNorm, TaskHead))]
    if not ftn_modules:
        raise ValueError("model holds no FTN layers; wrap it with get_peft_model(model, FTNConfig(...)) first")
    known = sorted({a for m in ftn_modules for a in m._available()})
    names = known if adapter_names is None else list(adapter_names)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown adapters {unknown}; this model has {known}")
    backbone = backbone_parameters(model)
    reports = {}
    for name in names:
        counts = {FTNLayer: 0, TaskNorm: 0, TaskHead: 0}
        for m in ftn_modules:
            if name not in m._available():
                continue
            kind = next(t for t in counts if isinstance(m, t))
            counts[kind] += sum(
                p.numel() for attr in m.adapter_layer_names for k, p in getattr(m, attr).named_parameters()
                if k == name or k.startswith(name + ".")
            )
        reports[name] = ParameterReport(name, counts[FTNLayer], counts[TaskNorm], counts[TaskHead], backbone)
    return reports


def format_report(reports: dict[str, ParameterReport]) -> str:
    """A markdown table; the last row gives the paper's "Params" for all adapters together."""
    lines = [
        "| adapter | factors | norm | head | task total | params (× backbone) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for rep in reports.values():
        lines.append(
            f"| {rep.adapter} | {rep.factor_params:,} | {rep.norm_params:,} | {rep.head_params:,} | "
            f"{rep.total:,} | {rep.multiple:.4f}× |"
        )
    if reports:
        backbone = next(iter(reports.values())).backbone_params
        together = 1.0 + sum(r.total for r in reports.values()) / backbone
        lines.append(f"| all ({len(reports)}) | | | | | {together:.4f}× (backbone {backbone:,}) |")
    return "\n".join(lines)
