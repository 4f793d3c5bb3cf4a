"""`auto_config`: an FTNConfig built by looking at a timm or transformers vision model.

The targets are found from the module tree, not from name regexes written per architecture:

- convolutions: every stock `nn.Conv1d` / `nn.Conv2d` except the stem (timm's `pretrained_cfg["first_conv"]`, else
  the first convolution registered), depthwise, grouped and squeeze-excitation convs included;
- transposed convolutions (generators, decoders): every stock `nn.ConvTranspose1d` / `nn.ConvTranspose2d`, none
  left out as a stem (a generator's first one maps the latent code, the layer that most shapes what it can draw);
  ``targets="convs"`` adapts them with the convolutions, ``targets="conv_transpose"`` alone;
- attention projections: `nn.Linear` layers inside a module whose class name contains "Attention", sorted into
  query / key / value (`q_proj`, `query`, ...), fused query-key-value (`qkv`, split by FTN into 3n heads) and output
  projections (`out_proj`, `proj`, `o_proj`, `c_proj`, `output.dense`); their head count is resolved by FTN from the
  attention module or the model config; other Linear layers inside attention modules (Swin V2's position MLP) and
  the projections of `nn.MultiheadAttention` (which reads their weights without calling them) are never adapted;
- MLP layers: every other `nn.Linear` but the classifier (only with `targets="mlp"` or `"all"`);
- the classifier, as the task head: timm's `pretrained_cfg["classifier"]`, or transformers' `classifier`.

Layers with their own forward (timm's `Conv2dSame`, `StdConv2d`, ...) are not adapted, since FTN runs the stock
convolution with W + ΔW; `auto_config` warns with their names.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

from peft import PeftModel
from torch import nn

from .compat import BaseTunerLayer
from .config import DEFAULT_OUTPUT_PROJECTIONS, FTNConfig

TARGET_CHOICES = ("convs", "conv_transpose", "qv", "qkv", "o", "attention", "mlp", "all")
_KINDS_OF = {
    "convs": {"conv", "conv_transpose"},
    "conv_transpose": {"conv_transpose"},
    "qv": {"q", "v"},
    "qkv": {"q", "k", "v", "qkv"},
    "o": {"o"},
    "attention": {"q", "k", "v", "qkv", "o"},
    "mlp": {"mlp"},
    "all": {"conv", "conv_transpose", "q", "k", "v", "qkv", "o", "mlp"},
}
_PROJECTION_NAMES = {
    "q": {"q_proj", "query", "q", "to_q"},
    "k": {"k_proj", "key", "k", "to_k"},
    "v": {"v_proj", "value", "v", "to_v"},
    "qkv": {"qkv", "qkv_proj", "in_proj", "c_attn", "Wqkv", "to_qkv"},
    "o": {"out_proj", "o_proj", "proj", "c_proj", "to_out"},
}
_STOCK_FORWARD = {
    nn.Conv1d: nn.Conv1d.forward,
    nn.Conv2d: nn.Conv2d.forward,
    nn.ConvTranspose1d: nn.ConvTranspose1d.forward,
    nn.ConvTranspose2d: nn.ConvTranspose2d.forward,
    nn.Linear: nn.Linear.forward,
}


@dataclass
class FoundLayers:
    """What `find_layers` sees in a model: adaptable layers by kind, and what it leaves alone."""

    by_kind: dict[str, list[str]] = field(default_factory=dict)  # conv, conv_transpose, q, k, v, qkv, o, mlp
    stem: list[str] = field(default_factory=list)
    head: Optional[str] = None
    batchnorms: list[str] = field(default_factory=list)
    custom: list[str] = field(default_factory=list)  # "name (Type)" of Conv/Linear subclasses with their own forward

    def describe(self) -> str:
        parts = [f"{kind}: {len(names)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                 for kind, names in self.by_kind.items() if names]
        parts.append(f"stem: {self.stem or 'none'}")
        parts.append(f"head: {self.head or 'none'}")
        parts.append(f"BatchNorm: {len(self.batchnorms)}")
        if self.custom:
            parts.append(f"not adaptable (own forward): {self.custom[:5]}")
        return "; ".join(parts)


def _is_attention(module: nn.Module) -> bool:
    return "attention" in type(module).__name__.lower()


def _stock(module: nn.Module) -> Optional[bool]:
    """True for a Conv/Linear whose forward is torch's own, False for one with its own forward, None otherwise."""
    base = next((t for t in _STOCK_FORWARD if isinstance(module, t)), None)
    if base is None:
        return None
    return type(module).forward is _STOCK_FORWARD[base]


def _find_head(model: nn.Module, names: dict[str, nn.Module]) -> Optional[str]:
    """Name of the nn.Linear classifier, or None (a bare backbone)."""
    candidates = []
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and isinstance(cfg.get("classifier"), str):
        candidates.append(cfg["classifier"])
    candidates += ["classifier", "fc", "head"]
    for name in candidates:
        module = names.get(name)
        if isinstance(module, nn.Linear):
            return name
        if isinstance(module, nn.Sequential):  # transformers' ResNet: Sequential(Flatten, Linear)
            linears = [n for n, m in names.items() if n.startswith(name + ".") and isinstance(m, nn.Linear)]
            if len(linears) == 1:
                return linears[0]
    return None


def _find_stem(model: nn.Module, convs: list[str]) -> list[str]:
    cfg = getattr(model, "pretrained_cfg", None)
    first = cfg.get("first_conv") if isinstance(cfg, dict) else None
    if isinstance(first, str):
        first = [first]
    if first and all(name in convs for name in first):
        return list(first)
    return convs[:1]


def _unwrapped_modules(model: nn.Module) -> dict[str, nn.Module]:
    """named_modules() with PEFT / FTN wrappers seen as the layers they wrap, so that a second adapter finds the same
    layers as the first."""
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    modules = {}
    wrapped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(module, BaseTunerLayer):
            wrapped.append(name)
            module = module.get_base_layer()
        modules[name] = module
    return modules


def find_layers(model: nn.Module) -> FoundLayers:
    """Sort the model's Conv / Linear layers into FTN's kinds (see the module docstring)."""
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    found = FoundLayers(by_kind={k: [] for k in ("conv", "conv_transpose", "q", "k", "v", "qkv", "o", "mlp")})
    modules = _unwrapped_modules(model)
    found.head = _find_head(model, modules)
    convs = []
    for name, module in modules.items():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            found.batchnorms.append(name)
        stock = _stock(module)
        if stock is None or name == found.head:
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = modules[parent_name]
        if isinstance(parent, nn.MultiheadAttention):
            continue  # its out_proj weight is read directly by F.multi_head_attention_forward, never called
        if not stock:
            found.custom.append(f"{name} ({type(module).__name__})")
            continue
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            convs.append(name)
            continue
        if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d)):
            found.by_kind["conv_transpose"].append(name)
            continue
        ancestors = [modules[".".join(name.split(".")[:i])] for i in range(1, name.count(".") + 1)]
        kind = "mlp"
        if any(_is_attention(a) for a in ancestors):
            kind = next((k for k, leaves in _PROJECTION_NAMES.items() if leaf in leaves), None)
            if kind is None and leaf == "dense" and parent_name.endswith("output"):  # BERT-style attention.output.dense
                kind = "o"
        if kind is not None:
            found.by_kind[kind].append(name)
    found.stem = _find_stem(model, convs)
    found.by_kind["conv"] = [n for n in convs if n not in found.stem]
    return found


def _wanted_kinds(targets: Union[str, Iterable[str]]) -> set[str]:
    chosen = [targets] if isinstance(targets, str) else list(targets)
    unknown = [t for t in chosen if t not in TARGET_CHOICES]
    if unknown or not chosen:
        raise ValueError(f"targets={targets!r}: each target must be one of {TARGET_CHOICES}")
    return set().union(*(_KINDS_OF[t] for t in chosen))


def auto_config(
    model: nn.Module,
    r: int = 1,
    targets: Union[str, Iterable[str]] = "convs",
    num_classes: Optional[int] = None,
    alpha: Optional[float] = None,
    init_weights=True,
    head: Union[bool, str] = True,
    norms: str = "batchnorm",
    **overrides,
) -> FTNConfig:
    """FTN for any timm / transformers vision model, by looking at its layers.

    Args:
        model: the base model (random or pretrained weights; it is only inspected).
        r: CP rank of every adapted weight.
        targets: which layers to adapt, one of or a list of: ``"convs"`` (every convolution but the stem: the paper's
            conv networks; and every transposed convolution), ``"conv_transpose"`` (transposed convolutions only:
            a generator's or decoder's upsampling layers), ``"qv"`` (query and value projections), ``"qkv"`` (query, key and value, including fused
            ``qkv`` layers), ``"o"`` (attention output projections), ``"attention"`` (``"qkv"`` and ``"o"``),
            ``"mlp"`` (every other Linear but the classifier), ``"all"`` (all of the above).
        num_classes: outputs of this adapter's task head; ``None`` keeps the model's own classifier size.
        alpha: ΔW is scaled by alpha / r (``None``: no scaling).
        init_weights: as `FTNConfig.init_weights` (``True``: exact no-op at step 0; ``"xavier"`` / ``"gaussian"``:
            the paper's conv / transformer choices).
        head: ``True`` finds the classifier and gives each adapter its own; a name picks it by hand; ``False``
            leaves the classifier shared and frozen.
        norms: ``"batchnorm"`` (default) gives each adapter its own BatchNorm copies; ``"all"`` also LayerNorm and
            GroupNorm (`FTNConfig.task_norms`).
        overrides: any other `FTNConfig` field (``compute``, ``task_batchnorm``, ``exclude_modules``, ...).
    """
    kinds = _wanted_kinds(targets)
    found = find_layers(model)
    if kinds >= {"q", "v"} and "k" not in kinds and found.by_kind["qkv"]:
        raise ValueError(
            f"targets={targets!r}: this model fuses query, key and value in one Linear ({found.by_kind['qkv'][:2]} "
            "...), which FTN adapts whole; use targets='qkv' or 'attention'"
        )
    chosen = sorted(n for k in kinds for n in found.by_kind[k])
    if not chosen:
        raise ValueError(
            f"auto_config found no layer for targets={targets!r} in {type(model).__name__}. It found: "
            f"{found.describe()}. Pick other targets, or name the layers by hand: "
            "FTNConfig(target_modules=['blocks.0.attn.qkv', ...]) (exact names or suffixes) or a regex"
        )
    if found.custom:
        warnings.warn(
            f"auto_config leaves {len(found.custom)} layers with their own forward unadapted (FTN runs the stock "
            f"op with W + ΔW, which would skip their extra work): {found.custom[:5]}",
            stacklevel=2,
        )
    head_module = found.head if head is True else (head or None)
    if num_classes is not None and head_module is None:
        raise ValueError(
            f"num_classes={num_classes} needs a classifier, but {type(model).__name__} has no nn.Linear classifier "
            "(looked for timm's pretrained_cfg['classifier'], 'classifier', 'fc', 'head'); pass head='<name>'"
        )
    output_projections = overrides.pop("output_projections", list(DEFAULT_OUTPUT_PROJECTIONS))
    output_projections = sorted(set(output_projections) | set(found.by_kind["o"]))
    return FTNConfig(
        r=r,
        alpha=alpha,
        target_modules=chosen,
        init_weights=init_weights,
        output_projections=output_projections,
        head_module=head_module,
        head_num_outputs=num_classes,
        task_norms=norms,
        **overrides,
    )
