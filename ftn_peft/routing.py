"""Mixed-adapter batches: each FTN tuner layer runs every sample with the adapter named for it.

`FTNModel` passes ``adapter_names`` (one per sample) to every FTN tuner layer through forward pre-hooks; the layer
groups the samples by adapter, runs each group, and puts the outputs back in batch order. ``"__base__"`` (and any
adapter this layer does not hold) selects the frozen base layer, as in PEFT's LoRA.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .compat import BaseTunerLayer

BASE_ADAPTER = "__base__"  # the name that selects the frozen base model in a mixed batch

MERGED_MESSAGE = (
    "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first. "
    "adapter_names= (mixed-adapter batches) cannot run on a merged model, whose weights already contain one adapter"
)

Run = Callable[[torch.Tensor, Optional[str]], Any]


def check_batch(adapter_names: list[str], batch_size: int, merged: bool) -> None:
    """The per-layer checks of a mixed batch, with PEFT's messages (code written against LoRA matches on them)."""
    if len(adapter_names) != batch_size:
        raise ValueError(
            "Length of `adapter_names` should be the same as the number of inputs, but got "
            f"{len(adapter_names)} and {batch_size} respectively. adapter_names has {len(adapter_names)} entries but "
            f"the batch has {batch_size} samples; pass one adapter name per sample"
        )
    if merged:
        raise ValueError(MERGED_MESSAGE)


def route(x: torch.Tensor, adapter_names: list[str], run: Run, available: set[str]) -> torch.Tensor:
    """Run ``run(x_subset, adapter_or_None)`` on each adapter's samples and put the results back in batch order."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(adapter_names):
        groups.setdefault(name, []).append(i)
    if len(groups) == 1:  # the whole batch uses one adapter: no gather / scatter
        name = adapter_names[0]
        return run(x, name if name in available else None)
    if all(rows[-1] - rows[0] + 1 == len(rows) for rows in groups.values()):
        # Contiguous blocks (forward_all_tasks' replicated batch): slices are views, one concatenation.
        blocks = [run(x[rows[0] : rows[-1] + 1], name if name in available else None) for name, rows in groups.items()]
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


def route_per_sample(x: torch.Tensor, adapter_names: list[str], run: Run, available: set[str]) -> list[torch.Tensor]:
    """Like `route`, for outputs of different sizes per adapter (task heads): a list with one tensor per sample."""
    out: list[Optional[torch.Tensor]] = [None] * x.shape[0]
    for name in dict.fromkeys(adapter_names):
        rows = [i for i, n in enumerate(adapter_names) if n == name]
        y = run(x[rows], name if name in available else None)
        for i, row in zip(rows, y):
            out[i] = row
    return out


class FTNTunerLayer(BaseTunerLayer):
    """What every FTN tuner layer (factors, task BatchNorm, task head) shares: adapter routing."""

    # The adapter containers are read from _modules: nn.Module.__getattr__ costs ~1 µs, paid by every layer call.
    def _available(self) -> set[str]:
        return set(self._modules[self.adapter_layer_names[0]].keys())

    def _active_here(self) -> list[str]:
        container = self._modules[self.adapter_layer_names[0]]
        active = self._active_adapter
        return [name for name in ([active] if isinstance(active, str) else active) if name in container]

    def _route(self, x: torch.Tensor, adapter_names: list[str], run: Run) -> Any:
        check_batch(adapter_names, x.shape[0], self.merged)
        return route(x, adapter_names, run, self._available())
