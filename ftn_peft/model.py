"""FTNModel: finds the targets of an FTNConfig in a model and wraps them in FTN layers."""

from __future__ import annotations

import re
from contextlib import contextmanager
from functools import partial
from typing import Optional

import torch
from torch import nn
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from peft.utils import AuxiliaryTrainingWrapper
from peft.utils.other import get_pattern_key

from .config import FTNConfig
from .layer import LAYER_CLASSES, FTNLayer
from .loading import check_adapter_state_dict
from .peft_type import PREFIX
from .routing import BASE_ADAPTER, MERGED_MESSAGE, FTNTunerLayer
from .task_layers import TaskHead, TaskNorm, _SwappedModuleLayer

_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
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
        adapter_name = self._adapter_being_injected(peft_config)
        first_injection = not any(isinstance(m, BaseTunerLayer) for m in model.modules())
        if first_injection:
            # PEFT snapshots trainability after this hook; freezing here keeps the base model frozen.
            for p in model.parameters():
                p.requires_grad_(False)
        if peft_config.head_module is not None:
            self._wrap_head(model, peft_config, adapter_name)
        if peft_config.task_batchnorm:
            for name, module in list(model.named_modules()):
                if isinstance(module, TaskNorm):
                    module.update_layer(adapter_name, inference_mode=peft_config.inference_mode)
                elif isinstance(module, _NORM_TYPES) and not self._inside_tuner_layer(model, name):
                    self._swap(model, name, TaskNorm(module, adapter_name, inference_mode=peft_config.inference_mode))

    def _adapter_being_injected(self, peft_config: FTNConfig) -> str:
        return next(name for name, conf in self.peft_config.items() if conf is peft_config)

    def _wrap_head(self, model: nn.Module, config: FTNConfig, adapter_name: str) -> None:
        matches = [
            name for name, m in model.named_modules()
            if (name == config.head_module or name.endswith("." + config.head_module))
            and not self._inside_tuner_layer(model, name)
        ]
        if len(matches) != 1:
            found = "no module" if not matches else f"{len(matches)} modules ({matches})"
            raise ValueError(f"head_module={config.head_module!r} matches {found}; it must name exactly one module")
        head = model.get_submodule(matches[0])
        if isinstance(head, TaskHead):
            head.update_layer(adapter_name, inference_mode=config.inference_mode, num_outputs=config.head_num_outputs)
        else:
            kwargs = dict(inference_mode=config.inference_mode, num_outputs=config.head_num_outputs)
            self._swap(model, matches[0], TaskHead(head, adapter_name, **kwargs))
        self._head_name = matches[0]

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
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)

    def _resolve_heads(self, config: FTNConfig, key: str, base: nn.Module) -> tuple[Optional[int], Optional[str]]:
        """How many heads a Linear / Conv1D target splits into, and whether it is an output projection."""
        if isinstance(base, (nn.Conv1d, nn.Conv2d)) or config.attention_heads is None:
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
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict)
        self._check_patterns_matched(self.peft_config[adapter_name], adapter_name)

    def _check_patterns_matched(self, config: FTNConfig, adapter_name: str) -> None:
        adapted = [n for n, m in self.model.named_modules() if isinstance(m, FTNLayer) and adapter_name in m.r]
        for attr in ("rank_pattern", "alpha_pattern"):
            unmatched = [k for k in getattr(config, attr) if not any(re.match(rf"(.*\.)?({k})$", n) for n in adapted)]
            if unmatched:
                raise ValueError(
                    f"{attr} keys {unmatched} match no adapted module of adapter {adapter_name!r}; adapted modules "
                    f"are e.g. {adapted[:3]}"
                )

    # --- loading ---------------------------------------------------------------------------------------
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
