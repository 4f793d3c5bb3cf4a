"""Serving many FTN tasks at once: every adapter's output for one input batch from one call.

Mixed batches themselves need no helper: ``model(x, adapter_names=[...])`` routes each sample through its own
adapter (see docs/serving.md). `forward_all_tasks` answers the other serving question, "what does every task say
about this batch?", either with one pass over the batch replicated once per adapter (``strategy="batched"``) or
with one pass per adapter (``strategy="loop"``).

What the batched pass can and cannot share: an FTN adapter changes W itself, so after the first adapted layer
the tasks share no computation; the replicated pass still runs every adapted layer once per adapter on that
adapter's rows. What it saves is per-call overhead: every unadapted op (pooling, activations, the stem, CLIP's
MLPs and LayerNorms) runs once on T·B rows instead of T times on B rows, and small per-adapter groups are
cheaper inside one pass than as T passes. It costs T times the activation memory. docs/serving.md has the
measurements behind the default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch
from transformers.utils import ModelOutput

STRATEGIES = ("loop", "batched")
DEFAULT_STRATEGY = "batched"  # equal at T <= 2, 11-16 % faster at T = 5, 10 (CPU, resnet18): docs/serving.md

Inputs = Union[torch.Tensor, Mapping[str, Any]]


def forward_all_tasks(
    model: torch.nn.Module, inputs: Inputs, adapter_names: Sequence[str], strategy: str = DEFAULT_STRATEGY
) -> dict[str, Any]:
    """Every adapter's output on the same input batch, as ``{adapter_name: output}``.

    Each output is exactly what ``model`` returns with that adapter alone active (``set_adapter(name)``), or with
    adapters disabled for ``"__base__"``: a tensor (timm), or a `ModelOutput` (transformers) whose fields hold
    that adapter's B rows. The model's active adapter is not changed.

    Args:
        model: a `PeftModel` (or `FTNModel`) with FTN adapters, in eval mode and not merged.
        inputs: the batch: a tensor passed positionally (timm), or a mapping of keyword arguments such as
            ``{"pixel_values": x}`` (transformers). Every tensor in it must have the batch as its first dimension.
        adapter_names: the adapters to run (``"__base__"`` for the frozen base model), each at most once.
        strategy: ``"batched"`` (default): one pass of T·B rows with ``adapter_names=`` routing (T times the
            activation memory). ``"loop"``: one pass of B rows per adapter, for when memory is the limit or the
            model's output type cannot be split per task.
    """
    names = _check_names(adapter_names)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} must be one of {STRATEGIES}")
    args, kwargs = _as_call(inputs)
    batch = _batch_size(args, kwargs)
    if strategy == "loop":
        # A uniform adapter_names selects one adapter without touching the active one (no set_adapter state).
        return {name: model(*args, **kwargs, adapter_names=[name] * batch) for name in names}
    t = len(names)
    out = model(*_repeat(args, t), **_repeat(kwargs, t), adapter_names=[n for n in names for _ in range(batch)])
    return {name: _take(out, i, batch, t) for i, name in enumerate(names)}


def _check_names(adapter_names: Sequence[str]) -> list[str]:
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_names must be a list of adapter names, got {adapter_names!r}")
    names = list(adapter_names)
    if not names:
        raise ValueError("adapter_names is empty; name at least one adapter")
    if len(set(names)) != len(names):
        raise ValueError(f"adapter_names={names} names an adapter twice; each adapter's output is returned once")
    return names


def _as_call(inputs: Inputs) -> tuple[tuple, dict]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        if "labels" in inputs:
            raise ValueError("inputs has 'labels': a loss would mix every task's rows; pass the inputs only")
        return (), dict(inputs)
    raise TypeError(f"inputs must be a tensor or a mapping of keyword arguments, got {type(inputs).__name__}")


def _batch_size(args: tuple, kwargs: dict) -> int:
    tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() > 0]
    if not tensors:
        raise ValueError("inputs holds no batched tensor; pass the batch as a tensor or e.g. {'pixel_values': x}")
    return tensors[0].shape[0]


def _repeat(value: Any, t: int) -> Any:
    """The batch stacked t times along dim 0 (task-major: rows [i·B, (i+1)·B) are copy i)."""
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return value.repeat(t, *([1] * (value.dim() - 1)))
    if isinstance(value, tuple):
        return tuple(_repeat(v, t) for v in value)
    if isinstance(value, dict):
        return {k: _repeat(v, t) for k, v in value.items()}
    return value


def _take(value: Any, i: int, batch: int, t: int) -> Any:
    """Task i's rows of a batched output: tensors are sliced, per-sample lists (heads of different sizes) stacked."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or value.shape[0] != batch * t:
            raise ValueError(
                f"cannot split an output of shape {tuple(value.shape)} into {t} tasks of {batch} rows; "
                "use strategy='loop' for models whose outputs have no batch dimension"
            )
        return value[i * batch : (i + 1) * batch]
    if isinstance(value, ModelOutput):
        return type(value)(**{k: _take(v, i, batch, t) for k, v in value.items()})
    if isinstance(value, list) and len(value) == batch * t and all(isinstance(v, torch.Tensor) for v in value):
        return torch.stack(value[i * batch : (i + 1) * batch])  # one task's rows share its head size
    if isinstance(value, (list, tuple)):
        return type(value)(_take(v, i, batch, t) for v in value)
    if isinstance(value, dict):
        return {k: _take(v, i, batch, t) for k, v in value.items()}
    raise TypeError(f"cannot split a model output of type {type(value).__name__} per task; use strategy='loop'")
