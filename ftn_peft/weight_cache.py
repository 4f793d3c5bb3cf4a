"""Inference cache of adapted weights: ``W + Σ ΔW`` built once and reused while nothing it depends on changes.

In eval mode without gradients an FTN layer with ``compute="auto"`` runs ONE base op with a cached adapted weight,
so that unmerged inference costs what the base model costs. An entry is reused only while every tensor it was
built from is the same object with the same version counter (bumped by every in-place op, optimizer steps and
``load_state_dict`` included), storage, dtype and device, and the adapter's scaling is unchanged; `train()`,
`.to()`, merging, unmerging and `delete_adapter` drop a layer's entries outright. Edits through ``tensor.data``
bypass version counters: call `clear_inference_cache` after them.

All FTN layers of a model share one `CacheBudget`: a least-recently-used set of entries whose bytes stay within
``max_bytes`` (`set_inference_cache`); `inference_cache_bytes` reports what is held. docs/design.md has the design.
"""

from __future__ import annotations

import operator
import weakref
from collections import OrderedDict
from typing import Callable, Hashable, Optional

import torch
from torch import nn
from torch.nn.modules import module as _nn_module

DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB per model: ResNet-50 adapted everywhere holds ~94 MB per adapter


def _check_max_bytes(max_bytes) -> Optional[int]:
    if max_bytes is None:
        return None
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
        raise TypeError(
            f"max_bytes must be an int number of bytes (0 disables the cache) or None (no limit), got "
            f"{type(max_bytes).__name__}; e.g. max_bytes=2**30"
        )
    if max_bytes < 0:
        raise ValueError(f"max_bytes={max_bytes} is negative; pass a size in bytes, 0 to disable, or None for no limit")
    return max_bytes


class CacheBudget:
    """Bytes held by the cached weights of a set of layers, evicting the least recently used entry first."""

    def __init__(self, max_bytes: Optional[int] = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = _check_max_bytes(max_bytes)
        self.bytes = 0
        self._lru: OrderedDict[tuple[int, Hashable], tuple["LayerWeightCache", int]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.max_bytes != 0

    def _fits(self, nbytes: int) -> bool:
        return self.max_bytes is None or nbytes <= self.max_bytes

    def touch(self, cache: "LayerWeightCache", key: Hashable) -> None:
        self._lru.move_to_end((id(cache), key))

    def entry_toucher(self) -> Callable[[tuple[int, Hashable]], None]:
        """``touch`` for hot loops: called with ``(id(cache), key)``, it marks that entry as just used. It is the
        LRU's own C method, so `FastPath` pays no Python frame for it on every layer call."""
        return self._lru.move_to_end

    def admit(self, cache: "LayerWeightCache", key: Hashable, nbytes: int) -> bool:
        """Make room for a new entry (evicting others); False when it can never fit."""
        if not self._fits(nbytes):
            return False
        while self._lru and not self._fits(self.bytes + nbytes):
            (_, old_key), (owner, old_bytes) = self._lru.popitem(last=False)
            owner._drop(old_key)
            self.bytes -= old_bytes
        self._lru[(id(cache), key)] = (cache, nbytes)
        self.bytes += nbytes
        return True

    def release(self, cache: "LayerWeightCache", key: Hashable, nbytes: int) -> None:
        if self._lru.pop((id(cache), key), None) is not None:
            self.bytes -= nbytes

    def clear(self) -> None:
        for (_, key), (owner, _) in list(self._lru.items()):
            owner.drop(key)

    def __deepcopy__(self, memo) -> "CacheBudget":  # a copied model starts with an empty cache of the same size
        return CacheBudget(self.max_bytes)

    def __getstate__(self) -> dict:
        return {"max_bytes": self.max_bytes, "bytes": 0, "_lru": OrderedDict()}


def _signature(tensors: tuple[torch.Tensor, ...], extra: tuple) -> Optional[tuple]:
    try:
        return tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors) + extra
    except RuntimeError:  # inference tensors (created under torch.inference_mode) have no version counter
        return None


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run forward (pre-)hooks, its own or global ones: paths that skip the call
    would skip them."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or _nn_module._global_forward_hooks
        or _nn_module._global_forward_pre_hooks
    )


_version = operator.attrgetter("_version")
_data_ptr = torch.Tensor.data_ptr


class FastPath:
    """A layer's last cache hit, re-checked on each call in a few µs instead of redoing the whole lookup.

    The lookup (`InferenceCacheMixin._cached_weight`: the active adapters, the source tensors, their signature, the
    entry) ran ~58 Python calls, ~12 µs a call in a hot loop and more inside a forward, against ~5 µs for a small
    conv: on ResNet-50's 52 adapted convs most of what unmerged inference cost over the base model
    (docs/benchmarks.md, "Where the overhead was"). The re-check keeps every
    condition of the lookup: the same active adapters, the same source tensors (identity, version counter and
    storage), the same scalings and compute modes, no forward hooks on the base layer; the entry's removal (budget
    eviction, `clear`, `train()`, `.to()`, merging, `delete_adapter`) drops this record with it.
    """

    __slots__ = ("active", "adapters", "holders", "names", "tensors", "versions", "ptrs", "scalings", "autos", "base",
                 "op", "args", "touch", "key")


class LayerWeightCache:
    """One layer's cached tensors, each valid while the tensors it was built from are unchanged."""

    def __init__(self, budget: Optional[CacheBudget] = None) -> None:
        self.budget = budget if budget is not None else CacheBudget()
        # key -> (weak references to the sources, their signature, the cached value, its bytes)
        self._entries: dict[Hashable, tuple] = {}
        self.fast: Optional[FastPath] = None  # the last hit, for the single-adapter fast path (`FastPath`)

    @property
    def enabled(self) -> bool:
        return self.budget.enabled

    @property
    def bytes(self) -> int:
        return sum(entry[3] for entry in self._entries.values())

    def get_or_build(self, key: Hashable, tensors: tuple[torch.Tensor, ...], extra: tuple, build: Callable[[], object]):
        """The cached value for ``key`` if ``tensors`` and ``extra`` are unchanged since it was built, else ``build()``
        (stored for next time when the budget allows)."""
        signature = _signature(tensors, extra)
        entry = self._entries.get(key)
        if entry is not None:
            refs, old_signature, value, _ = entry
            if old_signature == signature and all(r() is t for r, t in zip(refs, tensors)):
                self.budget.touch(self, key)
                return value
            self.drop(key)
        value = build()
        if signature is not None:
            values = value if isinstance(value, tuple) else (value,)
            nbytes = sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))
            if self.budget.admit(self, key, nbytes):
                self._entries[key] = (tuple(weakref.ref(t) for t in tensors), signature, value, nbytes)
        return value

    def _drop(self, key: Hashable) -> None:  # called by the budget, which already forgot the entry
        self.fast = None
        self._entries.pop(key, None)

    def drop(self, key: Hashable) -> None:
        self.fast = None
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.budget.release(self, key, entry[3])

    def clear(self) -> None:
        self.fast = None
        for key in list(self._entries):
            self.drop(key)

    def __deepcopy__(self, memo) -> "LayerWeightCache":
        from copy import deepcopy

        return LayerWeightCache(deepcopy(self.budget, memo))

    def __getstate__(self) -> dict:
        return {"budget": self.budget, "_entries": {}, "fast": None}


class InferenceCacheMixin:
    """What an FTN layer needs to use the cache: when it applies, and the events that drop its entries."""

    _weight_cache: LayerWeightCache

    def _cache_applies(self, adapters: list[str]) -> bool:
        """Eval mode, no gradients, the cache on, ``compute="auto"`` (explicit compute modes run as named)."""
        if self.training or torch.is_grad_enabled() or not self._weight_cache.enabled:
            return False
        if torch.compiler.is_compiling():  # graphs would guard on version counters: let the compiler decide
            return False
        compute = self.compute
        return all(compute[a] == "auto" for a in adapters)

    def _cache_sources(self, adapters) -> tuple[tuple[torch.Tensor, ...], tuple]:
        """The tensors ``W + Σ ΔW`` is built from, and the adapters' scalings. Read from the modules' own parameter
        dicts: ``self.ftn_a[name]`` costs ~3 µs a lookup, as much as a small op (this runs on every call)."""
        base = self.get_base_layer()
        params = base._parameters
        if "weight" not in params:  # a parametrized weight: not cached, it is recomputed on every access
            return (), ()
        bias = params.get("bias")
        tensors = [params["weight"]] if bias is None else [params["weight"], bias]
        containers = [self._modules[n]._parameters for n in self.adapter_layer_names]
        for a in adapters:
            if a is not None:
                tensors.extend(c[a] for c in containers if a in c)
        return tuple(tensors), tuple(None if a is None else self.scaling[a] for a in adapters)

    def _adapted_weight(self, adapters) -> torch.Tensor:
        """W + Σ ΔW, exactly as the materialized path builds it."""
        weight = self.get_base_layer().weight
        for a in adapters:
            if a is not None:
                weight = weight + self.get_delta_weight(a)
        return weight

    def _cached_weight(self, adapters: list[str], fast: bool = False) -> Optional[torch.Tensor]:
        """The cached ``W + Σ ΔW`` of the active ``adapters``, or None where the cache does not apply (or the base
        layer has forward hooks: the cached op would skip its call, so the uncached paths run, as LoRA calls it).
        ``fast``: record the hit for `_fast_forward`."""
        if not self._cache_applies(adapters) or has_forward_hooks(self.get_base_layer()):
            return None
        tensors, extra = self._cache_sources(adapters)
        if not tensors:
            return None
        key = tuple(adapters)
        cache = self._weight_cache
        weight = cache.get_or_build(key, tensors, extra, lambda: self._adapted_weight(adapters))
        if fast and key in cache._entries:
            cache.fast = self._fast_path(adapters, key, tensors, extra, weight)
        return weight

    def _fast_path(self, adapters, key, tensors, extra, weight) -> FastPath:
        base = self.get_base_layer()
        names = ["weight"] if base._parameters.get("bias") is None else ["weight", "bias"]
        holders = [base._parameters] * len(names)
        containers = [self._modules[n]._parameters for n in self.adapter_layer_names]
        for a in adapters:
            holders.extend(c for c in containers if a in c)
            names.extend(a for c in containers if a in c)
        fast = FastPath()
        active = self._active_adapter
        fast.active = list(active) if isinstance(active, list) else active  # a copy: lists can change in place
        fast.adapters, fast.holders, fast.names, fast.tensors = list(adapters), holders, names, tensors
        fast.versions, fast.ptrs = list(map(_version, tensors)), list(map(_data_ptr, tensors))
        fast.scalings, fast.autos, fast.base = list(extra), ["auto"] * len(adapters), base
        fast.op, fast.args = self._fast_op(weight)
        fast.touch, fast.key = self._weight_cache.budget.entry_toucher(), (id(self._weight_cache), key)
        return fast

    def _fast_op(self, weight: torch.Tensor) -> tuple[Callable, tuple]:
        """``(op, args)``: ``op(x, *args)`` is the base op with ``weight`` (the layer kinds name their functional op
        directly, one Python frame fewer)."""
        return self._forward_with_weight, (weight,)

    def _fast_forward(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The recorded cache hit's op if every condition of its lookup still holds (`FastPath`), else None. Inlined
        checks, one frame: this runs on every call of every adapted layer."""
        fast = self._weight_cache.fast  # train() drops it: no training check
        if (
            fast is None
            or self._disable_adapters
            or torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or self._active_adapter != fast.active
            or not all(map(operator.is_, map(dict.get, fast.holders, fast.names), fast.tensors))
            or list(map(_version, fast.tensors)) != fast.versions
            or list(map(_data_ptr, fast.tensors)) != fast.ptrs
            or list(map(self.scaling.get, fast.adapters)) != fast.scalings
            or list(map(self.compute.get, fast.adapters)) != fast.autos
            or has_forward_hooks(fast.base)
        ):
            return None
        fast.touch(fast.key)  # keep the budget's least-recently-used order
        return fast.op(x, *fast.args)

    def _inference_forward(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """One base op when merged (the base layer itself) or when the cache applies; None otherwise."""
        if self._disable_adapters:
            return None
        if self.merged_adapters:
            return self._modules["base_layer"](x)
        adapters = self._active_here()
        weight = self._cached_weight(adapters, fast=True) if adapters else None
        return None if weight is None else self._forward_with_weight(x, weight)

    def get_base_layer(self) -> nn.Module:
        """PEFT's get_base_layer without its hasattr walk (~3 µs a call through nn.Module.__getattr__)."""
        base = self._modules["base_layer"]
        while "base_layer" in base._modules:
            base = base._modules["base_layer"]
        return base

    def clear_inference_cache(self) -> None:
        self._weight_cache.clear()

    # --- events that drop the cached weights, whatever the version counters say ---------------------------
    def train(self, mode: bool = True):
        if mode:
            self._weight_cache.clear()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .half(): entries would stay on the old device/dtype
        self._weight_cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._weight_cache.clear()


def _layers(model: nn.Module) -> list[InferenceCacheMixin]:
    return [m for m in model.modules() if isinstance(m, InferenceCacheMixin)]


def set_inference_cache(model: nn.Module, max_bytes: Optional[int] = DEFAULT_MAX_BYTES, enabled: bool = True) -> None:
    """Size (or switch off) the cache of adapted weights used by unmerged inference in eval mode without gradients.

    Args:
        model: a model with FTN layers (`PeftModel`, `FTNModel` or any module holding them).
        max_bytes: the most bytes all its cached weights may hold together; the least recently used are evicted
            first. ``None``: no limit. ``0``: no cache (each call then runs the uncached paths).
        enabled: ``False`` is the same as ``max_bytes=0``.

    Each adapter (or combination of active adapters) costs one copy of every adapted base weight, in the base
    weight's dtype; a mixed-adapter batch over T adapters holds T copies per layer. Existing entries are dropped.
    """
    budget = CacheBudget(max_bytes if enabled else 0)
    layers = _layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no FTN layer; pass a model made by get_peft_model(FTNConfig)")
    for module in model.modules():  # the FTNModel: layers of adapters added later share the new budget too
        if "_ftn_cache_budget" in module.__dict__:
            module.__dict__["_ftn_cache_budget"] = budget
    for layer in layers:
        layer._weight_cache.clear()
        layer._weight_cache.budget = budget


def inference_cache_bytes(model: nn.Module) -> int:
    """Bytes currently held by the cached adapted weights of ``model``'s FTN layers."""
    return sum(layer._weight_cache.bytes for layer in _layers(model))


def clear_inference_cache(model: nn.Module) -> None:
    """Drop every cached weight of ``model`` (needed only after edits through ``tensor.data``)."""
    for layer in _layers(model):
        layer._weight_cache.clear()


def share_budget(model: nn.Module, layer: InferenceCacheMixin) -> None:
    """Give a new layer the budget its model's other FTN layers share (FTNModel calls this on injection)."""
    budget = getattr(model, "_ftn_cache_budget", None)
    if budget is None:
        budget = CacheBudget()
        model.__dict__["_ftn_cache_budget"] = budget
    layer._weight_cache.budget = budget
