"""The paper's optimizer recipe (appendix A) as one object that plain PyTorch, Accelerate and the Trainer accept.

FTN trains two kinds of parameters at very different scales: the low-rank factors (Adam, lr 0.005 in the paper)
and the task BatchNorm + head (SGD, lr 0.008 / 0.005), with a cosine schedule over the whole run. Accelerate's
`prepare` and the Trainer's `optimizers=(optimizer, scheduler)` each expect *one* optimizer, so the two are held by
`CombinedOptimizer`, a `torch.optim.Optimizer` whose `param_groups` are the very dicts of its parts: an LR scheduler
(or a GradScaler unscaling gradients) sees every group, and each step runs Adam on one part and SGD on the other.

    optimizer, scheduler = ftn_peft.optim.create_optimizer_and_scheduler(model, num_training_steps=1000)
    trainer = Trainer(model, args, ..., optimizers=(optimizer, scheduler))
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn
from torch.optim import Optimizer

from .layer import FTNLayer
from .task_layers import TaskHead, TaskNorm

PAPER_FACTOR_LR = 0.005
PAPER_HEAD_LR = 0.008

__all__ = ["CombinedOptimizer", "create_optimizer", "create_optimizer_and_scheduler", "split_parameters"]


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Trainable parameters as (factor-like, BatchNorm-and-head), each parameter once.

    Task BatchNorm and task heads of FTN, and any trainable BatchNorm or the parameters of a module named like a
    classifier (baselines built without FTN), go to the second list; every other trainable parameter (FTN factors,
    LoRA matrices, a fine-tuned backbone) goes to the first.
    """
    head_ids: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, (TaskNorm, TaskHead, nn.modules.batchnorm._BatchNorm)):
            head_ids |= {id(p) for p in module.parameters()}
        elif not isinstance(module, FTNLayer) and name.split(".")[-1] in ("fc", "classifier", "head"):
            head_ids |= {id(p) for p in module.parameters()}
    factors, heads, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (heads if id(p) in head_ids else factors).append(p)
    return factors, heads


class CombinedOptimizer(Optimizer):
    """Several optimizers on disjoint parameters, stepped together and seen as one `torch.optim.Optimizer`."""

    def __init__(self, optimizers: Iterable[Optimizer]):
        self.optimizers = [o for o in optimizers]
        if not self.optimizers:
            raise ValueError("optimizers is empty; pass at least one torch.optim.Optimizer")
        groups = [g for o in self.optimizers for g in o.param_groups]
        # Optimizer.__init__ appends these same dicts, so schedulers that edit param_groups edit the parts too.
        super().__init__(groups, defaults={})

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        parts = state_dict.get("optimizers")
        if parts is None or len(parts) != len(self.optimizers):
            raise ValueError("state_dict was not saved by a CombinedOptimizer with the same number of optimizers")
        for optimizer, part in zip(self.optimizers, parts):
            optimizer.load_state_dict(part)


def create_optimizer(
    model: nn.Module,
    factor_lr: float = PAPER_FACTOR_LR,
    head_lr: float = PAPER_HEAD_LR,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> Optimizer:
    """Adam (`factor_lr`) for factor-like parameters, SGD (`head_lr`, `momentum`) for BatchNorm and heads."""
    for name, value in (("factor_lr", factor_lr), ("head_lr", head_lr)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")
    factors, heads = split_parameters(model)
    if not factors and not heads:
        raise ValueError("model has no trainable parameters; did you wrap it with get_peft_model and set_adapter?")
    parts: list[Optimizer] = []
    if factors:
        parts.append(torch.optim.Adam(factors, lr=factor_lr, weight_decay=weight_decay))
    if heads:
        parts.append(torch.optim.SGD(heads, lr=head_lr, momentum=momentum, weight_decay=weight_decay))
    return CombinedOptimizer(parts)


def create_optimizer_and_scheduler(
    model: nn.Module, num_training_steps: int, **optimizer_kwargs
) -> tuple[Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """`create_optimizer` plus cosine annealing to 0 over `num_training_steps` (the paper's schedule).

    The pair goes straight into `Trainer(optimizers=...)` or `accelerator.prepare(...)`. Under Accelerate, count the
    steps of the *unsharded* data loader: a prepared scheduler steps once per process.
    """
    if not isinstance(num_training_steps, int) or num_training_steps < 1:
        raise ValueError(f"num_training_steps must be an int >= 1, got {num_training_steps!r}")
    optimizer = create_optimizer(model, **optimizer_kwargs)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=num_training_steps)
    return optimizer, scheduler
