"""FTNModel: finds the targets of an FTNConfig in a model and wraps them in FTN layers."""

from __future__ import annotations

import re
from contextlib import contextmanager
from functools import partial
from typing import Optional

import torch
from torch import nn
from .compat import AuxiliaryTrainingWrapper, BaseTuner, BaseTunerLayer, check_target_module_exists, get_pattern_key

from .config import FTNConfig
from .layer import LAYER_CLASSES, FTNLayer
from .loading import check_adapter_state_dict
from .peft_type import PREFIX
from .routing import BASE_ADAPTER, MERGED_MESSAGE, FTNTunerLayer
from .task_layers import (
    OUTPUT_LAYER_TYPES, TaskHead, TaskNorm, _SwappedModuleLayer, head_outputs, output_layer,
)
from .weight_cache import share_budget

_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# task_norms="all": timm's LayerNorm2d and transformers' ConvNext LayerNorm subclass nn.LayerNorm.
_ALL_NORM_TYPES = _NORM_TYPES + (nn.LayerNorm, nn.GroupNorm)


def _task_norm_types(config: FTNConfig) -> tuple[type, ...]:
    if not config.task_batchnorm:
        return ()
    return _ALL_NORM_TYPES if config.task_norms == "all" else _NORM_TYPES
_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size")
_NUM_HEADS_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")


class FTNModel(BaseTuner):
    """
    Factorized Tensor Network tuner (Factorized Tensor Networks for Multi-Task and Multi-Domain Learning).

    Created by `peft.get_peft_model(model, FTNConfig(...))` once `ftn_peft` is imported. Each adapter adds rank-r CP
    factors to the targeted Conv / Linear / Conv1D weights, and, when configured, its own BatchNorm copies and task
    head; adding an adapter never changes what another adapter computes.

    Example:
        ```py
        >>> import timm, ftn_peft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(timm.create_model("resnet50"), ftn_peft.presets.resnet(r=1, num_classes=102))
        >>> model.print_trainable_parameters()
        ```
    """

    prefix: str = PREFIX
    tuner_layer_cls = FTNTunerLayer
    target_module_mapping: dict = {}

    # --- configuration ------------------------------------------------------------------------------
    def _prepare_adapter_config(self, peft_config: FTNConfig, model_config: dict) -> FTNConfig:
        if peft_config.target_modules is None:
            raise ValueError(
                "Please specify `target_modules` in `peft_config`: FTNConfig.target_modules is None. Name the layers "
                "to adapt (suffixes or a regex), or start from a preset such as ftn_peft.presets.resnet() or "
                "ftn_peft.presets.clip_vision()"
            )
        return peft_config

    def _prepare_model(self, peft_config: FTNConfig, model: nn.Module) -> None:
        """Wrap BatchNorm layers and the head for this adapter; PEFT calls this before matching targets."""
        adapter_name = self._adapter_being_injected()
        first_injection = not any(isinstance(m, BaseTunerLayer) for m in model.modules())
        if first_injection:
            # PEFT snapshots trainability after this hook; freezing here keeps the base model frozen.
            for p in model.parameters():
                p.requires_grad_(False)
        if peft_config.head_module is not None:
            self._wrap_head(model, peft_config, adapter_name)
        norm_types = _task_norm_types(peft_config)
        if norm_types:
            for name, module in list(model.named_modules()):
                if isinstance(module, TaskNorm):
                    if isinstance(module.base_layer, norm_types):
                        module.update_layer(adapter_name, inference_mode=peft_config.inference_mode)
                elif isinstance(module, norm_types) and not self._inside_tuner_layer(model, name):
                    self._swap(model, name, TaskNorm(module, adapter_name, inference_mode=peft_config.inference_mode))

    def _adapter_being_injected(self) -> str:
        # PEFT's _prepare_model hook gets the config, not the adapter name (one config object may serve several
        # adapters); PEFT calls it only from inject_adapter, which remembers the name.
        name = self.__dict__.get("_injecting_adapter")
        if name is None:
            raise ValueError(
                "FTNModel._prepare_model was called outside inject_adapter, so the adapter it prepares is unknown; "
                "add adapters with get_peft_model / PeftModel.add_adapter / PeftModel.load_adapter"
            )
        return name

    def _wrap_head(self, model: nn.Module, config: FTNConfig, adapter_name: str) -> None:
        name = _resolve_head(model, config)
        head = model.get_submodule(name)
        if isinstance(head, TaskHead):
            head.update_layer(adapter_name, inference_mode=config.inference_mode, num_outputs=config.head_num_outputs)
        else:
            kwargs = dict(inference_mode=config.inference_mode, num_outputs=config.head_num_outputs)
            self._swap(model, name, TaskHead(head, adapter_name, **kwargs))

    @staticmethod
    def _inside_tuner_layer(model: nn.Module, name: str) -> bool:
        parts = name.split(".")
        for i in range(1, len(parts)):
            if isinstance(model.get_submodule(".".join(parts[:i])), BaseTunerLayer):
                return True
        return False

    def _swap(self, model: nn.Module, name: str, new_module: nn.Module) -> None:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, new_module)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        if isinstance(child, (TaskNorm, TaskHead)):
            # PEFT's version copies the base weight into the module put back on unload; a merged task head or
            # BatchNorm must keep its own weights (and a head may even have another shape).
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    @staticmethod
    def _check_target_module_exists(ftn_config: FTNConfig, key: str):
        return check_target_module_exists(ftn_config, key)

    # --- creating the factor layers --------------------------------------------------------------------
    def _create_and_replace(self, config: FTNConfig, adapter_name, target, target_name, parent, current_key) -> None:
        if isinstance(target, (TaskNorm, TaskHead)):
            raise ValueError(
                f"target {current_key!r} is a task {'head' if isinstance(target, TaskHead) else 'BatchNorm'} of FTN; "
                "remove it from target_modules (or add it to exclude_modules)"
            )
        base = target.get_base_layer() if isinstance(target, FTNLayer) else target
        layer_cls = next((cls for t, cls in LAYER_CLASSES.items() if type(base) is t), None)
        if layer_cls is None:
            layer_cls = next((cls for t, cls in LAYER_CLASSES.items() if isinstance(base, t)), None)
        if layer_cls is None:
            supported = ", ".join(t.__name__ for t in LAYER_CLASSES)
            raise TypeError(
                f"FTN cannot adapt {current_key!r} of type {type(base).__name__}; supported layer types: {supported}. "
                "Remove it from target_modules or add it to exclude_modules."
            )
        r_key = get_pattern_key(config.rank_pattern.keys(), current_key)
        alpha_key = get_pattern_key(config.alpha_pattern.keys(), current_key)
        num_heads, style = self._resolve_heads(config, current_key, base)
        kwargs = dict(
            r=config.rank_pattern.get(r_key, config.r),
            alpha=config.alpha_pattern.get(alpha_key, config.alpha),
            init_weights=config.init_weights,
            init_std=config.init_std,
            num_heads=num_heads,
            style=style,
            compute=config.compute,
            inference_mode=config.inference_mode,
        )
        if isinstance(target, FTNLayer):
            target.update_layer(adapter_name, **kwargs)
        else:
            new_module = layer_cls(target, adapter_name, **kwargs)
            share_budget(self, new_module)  # one inference-cache budget per model (weight_cache.py)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)

    def _resolve_heads(self, config: FTNConfig, key: str, base: nn.Module) -> tuple[Optional[int], Optional[str]]:
        """How many heads a Linear / Conv1D target splits into, and whether it is an output projection."""
        if isinstance(base, nn.modules.conv._ConvNd) or config.attention_heads is None:  # convs, transposed too
            return None, None
        weight_shape = tuple(base.weight.shape)
        out_f, in_f = weight_shape if isinstance(base, nn.Linear) else weight_shape[::-1]
        style = "out" if any(key == s or key.endswith("." + s) for s in config.output_projections) else "qkv"
        width = in_f if style == "out" else out_f
        if isinstance(config.attention_heads, int):
            num_heads = config.attention_heads
            if width % num_heads:
                raise ValueError(
                    f"attention_heads={num_heads} does not divide the {'input' if style == 'out' else 'output'} "
                    f"width {width} of {key!r}; pick a divisor of {width} or attention_heads='auto'"
                )
            return num_heads, style
        head_dim = self._find_head_dim(key)
        if head_dim is None:
            return None, None
        if width % head_dim:
            raise ValueError(
                f"{key!r} has width {width}, not a multiple of the attention head size {head_dim}; set "
                "FTNConfig.attention_heads to an explicit head count, or None to adapt it as a plain matrix"
            )
        return width // head_dim, style

    def _find_head_dim(self, key: str) -> Optional[int]:
        parts = key.split(".")
        inside_attention = False
        for i in range(len(parts) - 1, 0, -1):
            module = self.model.get_submodule(".".join(parts[:i]))
            if "attention" not in type(module).__name__.lower():
                continue
            inside_attention = True
            # The module itself, or its self-attention child (transformers' Swin: SwinAttention.self)
            for holder in (module, *module.children()):
                for attr in _HEAD_DIM_ATTRS:
                    if isinstance(getattr(holder, attr, None), int):
                        return getattr(holder, attr)
            if isinstance(getattr(module, "num_heads", None), int) and isinstance(getattr(module, "dim", None), int):
                return module.dim // module.num_heads  # timm's WindowAttention (Swin) stores no head size
        if not inside_attention:
            return None
        cfg = getattr(self.model, "config", None)
        for c in (cfg, getattr(cfg, "vision_config", None), getattr(cfg, "text_config", None)):
            if c is None:
                continue
            if isinstance(getattr(c, "head_dim", None), int):
                return c.head_dim
            hidden = next((getattr(c, a) for a in ("hidden_size", "n_embd", "d_model") if hasattr(c, a)), None)
            heads = next((getattr(c, a) for a in _NUM_HEADS_ATTRS if hasattr(c, a)), None)
            if hidden and isinstance(heads, int):
                return hidden // heads
        return None

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's upcast of fp16/bf16 adapter weights to fp32, extended to the buffers of task BatchNorm copies.

        PEFT casts the factors and the parameters of the task modules but not their buffers, and a BatchNorm with
        fp32 weights and bf16 running statistics refuses to run. With ``autocast_adapter_dtype=False`` every
        adapter weight keeps the base model's dtype.
        """
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        if not autocast_adapter_dtype:
            return
        for layer in self.model.modules():
            if isinstance(layer, _SwappedModuleLayer) and adapter_name in layer.modules_by_adapter:
                for module in layer.modules_by_adapter[adapter_name].modules():
                    for name, buffer in module.named_buffers(recurse=False):
                        if buffer.is_floating_point() and buffer.dtype in (torch.float16, torch.bfloat16):
                            setattr(module, name, buffer.float())

    def inject_adapter(self, model, adapter_name, autocast_adapter_dtype=True, low_cpu_mem_usage=False, state_dict=None):
        """PEFT's injection, checked against the model first and undone if it still fails half-way.

        A failed `get_peft_model` / `add_adapter` / `load_adapter` leaves the model as it was: module tree,
        parameters, buffers, requires_grad, peft_config entries and active adapter.
        """
        snapshot = _Snapshot(self, model)
        self._injecting_adapter = adapter_name
        try:
            self._check_config_against_model(self.peft_config[adapter_name], model, state_dict)
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict)
        except BaseException:
            snapshot.restore()
            raise
        finally:
            self.__dict__.pop("_injecting_adapter", None)

    def _check_config_against_model(self, config: FTNConfig, model: nn.Module, state_dict) -> None:
        """The checks that need the model, run before anything is wrapped."""
        if config.head_module is not None:
            _resolve_head(model, config)
        if state_dict is not None or config.target_modules is None:
            return  # targets come from the checkpoint's keys; None is refused by _prepare_adapter_config
        skip = tuple(n + "." for n, m in model.named_modules() if n and isinstance(m, BaseTunerLayer))
        names = [n for n, _ in model.named_modules() if n and not n.startswith(skip)]
        targets = [n for n in names if self._check_target_module_exists(config, n)]
        if not targets:
            adaptable = [n for n in names if isinstance(model.get_submodule(n), tuple(LAYER_CLASSES))]
            excluded = ""
            if config.exclude_modules or config.modules_to_save:
                excluded = " outside exclude_modules / modules_to_save"
            raise ValueError(
                f"target_modules={_shown(config.target_modules)} matches no module of the model{excluded}: name "
                f"layers by exact name or suffix (a list) or by a regex matching the full name (a string); "
                f"layers FTN can adapt here: {adaptable[:6]}{' ...' if len(adaptable) > 6 else ''}"
            )
        self._check_patterns_matched(config, targets)
        self._check_ranks(config, model, targets)
        self._check_excludes_matched(config, names)
        head = _resolve_head(model, config) if config.head_module is not None else None
        if head in targets:
            raise ValueError(
                f"target {head!r} is a task head of FTN; remove it from target_modules (or add it to exclude_modules): "
                f"head_module={config.head_module!r} already gives each adapter a whole copy of it"
            )
        self._check_modules_to_save(config, model, names)

    def _check_patterns_matched(self, config: FTNConfig, targets: list[str]) -> None:
        # PEFT warns and ignores such keys; a per-layer rank that silently does nothing is an error here.
        for attr in ("rank_pattern", "alpha_pattern"):
            unmatched = [k for k in getattr(config, attr) if not any(re.match(rf"(.*\.)?({k})$", n) for n in targets)]
            if unmatched:
                raise ValueError(
                    f"{attr} keys {unmatched} match no adapted module (none of the target_modules); adapted "
                    f"modules are e.g. {targets[:3]}"
                )

    @staticmethod
    def _check_ranks(config: FTNConfig, model: nn.Module, targets: list[str]) -> None:
        # No tensor needs more CP components than it has entries: a larger rank is a typo that only exhausts memory.
        for name in targets:
            weight = getattr(model.get_submodule(name), "weight", None)
            if not isinstance(weight, torch.Tensor):
                continue
            key = get_pattern_key(config.rank_pattern.keys(), name)
            r = config.rank_pattern.get(key, config.r)
            if r > weight.numel():
                field = f"rank_pattern[{key!r}]" if key in config.rank_pattern else "r"
                raise ValueError(
                    f"{field}={r} exceeds the {weight.numel()} entries of {name!r}'s weight; no CP decomposition of it "
                    "needs more components than that: use a smaller rank"
                )

    @staticmethod
    def _check_excludes_matched(config: FTNConfig, names: list[str]) -> None:
        # PEFT only warns about an exclude_modules that excludes nothing; like a rank_pattern key, it is a typo here.
        exclude = config.exclude_modules
        if not exclude:
            return
        if isinstance(exclude, str):
            unused = [] if any(re.fullmatch(exclude, n) for n in names) else [exclude]
        else:
            unused = sorted(e for e in exclude if not any(n == e or n.endswith("." + e) for n in names))
        if unused:
            raise ValueError(
                f"exclude_modules {unused} match no module of the model; name modules by exact name or suffix "
                "(a list) or by a regex matching the full name (a string), or leave exclude_modules=None"
            )

    @staticmethod
    def _check_modules_to_save(config: FTNConfig, model: nn.Module, names: list[str]) -> None:
        if not config.modules_to_save:
            return
        wrappers = tuple(n + "." for n, m in model.named_modules() if n and isinstance(m, AuxiliaryTrainingWrapper))
        names = [n for n in names if not n.startswith(wrappers)]
        # PEFT's task-type wrappers add these two names whether or not the model has them.
        implicit = {"classifier", "score"} if config.task_type is not None else set()
        matched: dict[str, str] = {}
        for entry in config.modules_to_save:
            matches = [n for n in names if n.endswith(entry)]  # PEFT's matching for modules_to_save
            if not matches and entry not in implicit:
                raise ValueError(f"modules_to_save entry {entry!r} matches no module of the model")
            for name in matches:
                matched.setdefault(name, entry)
                for sub_name, sub in model.get_submodule(name).named_modules(prefix=name):
                    is_head = config.head_module is not None and _is_head_name(sub_name, config.head_module)
                    is_norm = isinstance(sub, _task_norm_types(config))
                    if is_head or is_norm or isinstance(sub, BaseTunerLayer):
                        raise ValueError(
                            f"modules_to_save entry {entry!r} covers {sub_name!r} ({type(sub).__name__}), which FTN "
                            "already keeps per adapter (task BatchNorm, task head or FTN layer); remove it from "
                            "modules_to_save"
                        )
                    if sub_name != name and isinstance(sub, AuxiliaryTrainingWrapper):
                        matched[sub_name] = "an earlier adapter's modules_to_save"
        for outer, entry in matched.items():
            inner = next((n for n in matched if n.startswith(outer + ".")), None)
            if inner is not None:
                raise ValueError(
                    f"modules_to_save entry {entry!r} covers {outer!r}, which contains {inner!r} (from "
                    f"{matched[inner]!r}): a module saved inside another one breaks saving; keep only the outer one"
                )

    # --- loading ---------------------------------------------------------------------------------------
    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # PEFT drops the adapter name only as the second-to-last key part; a task head may be a whole decoder, whose
        # keys hold it right after the container at any depth. Without this, the file could only be loaded back
        # under the adapter name it was saved with.
        marker = f".{TaskHead.container_name}.{adapter_name}."
        if marker in key:
            return key.replace(marker, f".{TaskHead.container_name}.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """PEFT's key remapping, then loading.check_adapter_state_dict: exactly this adapter's tensors, sane values."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_adapter_state_dict(model, adapter_name, state_dict, remapped)
        return remapped

    # --- merging and mixed batches ----------------------------------------------------------------------
    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        self._check_adapter_names(adapter_names)
        handles = []
        for module in self.model.modules():
            # modules_to_save copies (PEFT's AuxiliaryTrainingWrapper) route their samples too, as under LoRA.
            if isinstance(module, (FTNTunerLayer, AuxiliaryTrainingWrapper)):
                hook = partial(_inject_adapter_names, adapter_names=list(adapter_names))
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _check_adapter_names(self, adapter_names) -> None:
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError("adapter_names must be a list of adapter names, one per sample")
        # Checked in PEFT's order (training mode, unknown names, merged layers) and with PEFT's words, so code
        # written against LoRA's mixed batches keeps matching; FTN's explanation follows.
        if self.model.training:
            # In train mode each adapter's BatchNorm would normalise with its own group's batch statistics and
            # update its running statistics from that group only, and only the adapter made trainable by
            # set_adapter() would get gradients: a mixed batch would silently train something else than asked.
            raise ValueError(
                "Cannot pass `adapter_names` when the model is in training mode. adapter_names= (mixed-adapter "
                "batches) is for inference: call model.eval() first; train one adapter at a time with set_adapter()"
            )
        known = set(self.peft_config) | {BASE_ADAPTER}
        unknown = sorted(set(adapter_names) - known)
        if unknown:
            raise ValueError(
                f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}. adapter_names has unknown "
                f"adapters {unknown}; known: {sorted(known)}"
            )
        if any(m.merged for m in self.model.modules() if isinstance(m, FTNTunerLayer)):
            raise ValueError(MERGED_MESSAGE)

    def forward(self, *args, **kwargs):
        with self._enable_peft_forward_hooks(*args, **kwargs):
            kwargs.pop("adapter_names", None)
            return self.model(*args, **kwargs)


def _inject_adapter_names(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _is_head_name(name: str, head_module: str) -> bool:
    return name == head_module or name.endswith("." + head_module)


def _linear_of(module: nn.Module) -> Optional[nn.Linear]:
    base = module.base_layer if isinstance(module, TaskHead) else module
    return base if isinstance(base, nn.Linear) else None


def _head_of(module: nn.Module) -> Optional[nn.Module]:
    """``module`` (a TaskHead's base) if it can be a task head: a Linear, or a module ending in a Linear / Conv."""
    base = module.base_layer if isinstance(module, TaskHead) else module
    return base if output_layer(base) is not None else None


def _output_layers(model: nn.Module) -> list[str]:
    """The layers whose outputs are the model's outputs: the only ones a head of another size may replace."""
    found = []
    candidates = []
    if callable(getattr(model, "get_classifier", None)):  # timm
        candidates.append(model.get_classifier())
    for attr in ("classifier", "score"):  # transformers' classification heads
        candidates.append(getattr(model, attr, None))
    if callable(getattr(model, "get_output_embeddings", None)):  # transformers' LM heads
        try:
            candidates.append(model.get_output_embeddings())
        except (NotImplementedError, AttributeError):
            pass
    by_id = {id(m): n for n, m in model.named_modules()}
    for module in candidates:
        head = _head_of(module) if isinstance(module, nn.Module) else None
        if head is not None and id(module) in by_id:
            found.append(by_id[id(module)])
            # A container head (transformers' ResNet: Sequential(Flatten, Linear)) ends in its own output layer,
            # which is an output layer of the model too.
            last = _last_output_layer(head)
            if last is not head and id(last) in by_id:
                found.append(by_id[id(last)])
    if not found:  # any other model: its last Linear layer
        linears = [
            n for n, m in model.named_modules()
            if n and _linear_of(m) is not None and not FTNModel._inside_tuner_layer(model, n)
        ]
        found = linears[-1:]
    return list(dict.fromkeys(found))


def _last_output_layer(head: nn.Module) -> Optional[nn.Module]:
    """A head's last Linear / Conv, or the TaskHead wrapping it once an adapter has been added (never the adapter's
    own copy inside that wrapper)."""
    last, inside = None, None
    for name, module in head.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        if isinstance(module, TaskHead):
            last, inside = module, name + "."
        elif isinstance(module, OUTPUT_LAYER_TYPES):
            last = module
    return last


def _resolve_head(model: nn.Module, config: FTNConfig) -> str:
    """The one module head_module names; an nn.Linear, and the model's output layer if the head changes size."""
    matches = [
        name for name, _ in model.named_modules()
        if name and _is_head_name(name, config.head_module) and not FTNModel._inside_tuner_layer(model, name)
    ]
    if len(matches) != 1:
        found = "no module" if not matches else f"{len(matches)} modules ({matches[:5]})"
        valid = _output_layers(model)
        raise ValueError(
            f"head_module={config.head_module!r} matches {found}; it must name exactly one module, e.g. {valid}"
        )
    name = matches[0]
    head = _head_of(model.get_submodule(name))
    if head is None:
        raise TypeError(
            f"head_module={config.head_module!r} names {name!r}, a {type(model.get_submodule(name)).__name__}; it "
            f"must name an nn.Linear classifier or a decoder whose last Linear / Conv layer is its output layer, "
            f"e.g. {_output_layers(model)} (wrap other heads with modules_to_save)"
        )
    if config.head_num_outputs not in (None, head_outputs(head)):
        valid = _output_layers(model)
        if name not in valid:
            raise ValueError(
                f"head_module={config.head_module!r} names {name!r}, a middle layer with {head_outputs(head)} "
                f"outputs; head_num_outputs={config.head_num_outputs} would break the layers after it. A head of "
                f"another size must be the model's output layer: {valid}"
            )
    return name


def _shown(targets):
    return sorted(targets) if isinstance(targets, (set, frozenset)) else repr(targets)


class _Snapshot:
    """What injecting an adapter can change in a module tree, to undo a failed injection.

    Every module's attributes (the `_modules` / `_parameters` / `_buffers` dicts and the tuner layers' per-adapter
    dicts among them, one container level deep) and every parameter's requires_grad. Restored in place, so that hook
    handles and outside references to these containers stay valid. Injection only adds or swaps modules and flips
    requires_grad; it never writes into existing tensors.
    """

    def __init__(self, *roots: nn.Module) -> None:
        modules = {id(m): m for root in roots for m in root.modules()}
        self.modules = []
        for module in modules.values():
            attrs = dict(module.__dict__)
            contents = {k: _copy_container(v) for k, v in attrs.items() if isinstance(v, (dict, list, set))}
            self.modules.append((module, attrs, contents))
        params = {id(p): p for m in modules.values() for p in m.parameters(recurse=False)}
        self.requires_grad = [(p, p.requires_grad) for p in params.values()]

    def restore(self) -> None:
        for module, attrs, contents in self.modules:
            for key in set(module.__dict__) - set(attrs):
                del module.__dict__[key]
            module.__dict__.update(attrs)
            for key, saved in contents.items():
                container = attrs[key]
                if isinstance(container, list):
                    container[:] = saved
                else:
                    container.clear()
                    container.update(saved)
        for p, requires_grad in self.requires_grad:
            p.requires_grad_(requires_grad)


def _copy_container(value):
    return list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else set(value)
