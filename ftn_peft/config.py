"""FTNConfig: the configuration of one FTN adapter (one task or domain)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import TaskType

from .peft_type import FTN_PEFT_TYPE

INIT_CHOICES = (True, False, "xavier", "gaussian")
COMPUTE_CHOICES = ("auto", "factorized", "materialized", "two_op", "three_op")
TASK_NORM_CHOICES = ("batchnorm", "all")
DEFAULT_OUTPUT_PROJECTIONS = ["out_proj", "o_proj", "c_proj", "attn.proj", "attention.output.dense"]
# Upper bounds that keep the first forward pass finite: ΔW is scaled by alpha / r and each of its entries is a product
# of three factors, so in a deep network without normalisation (a ResNet in eval mode) an oversized start multiplies
# the activations layer after layer. The paper uses alpha <= 100 and init_std = 0.05.
MAX_ALPHA = 1000.0
MAX_INIT_STD = 1.0


@dataclass
class FTNConfig(PeftConfig):
    """
    Configuration of a Factorized Tensor Network (FTN) adapter.

    Each targeted weight gets ``ΔW = (alpha / r) · Σ_{i=1..r} a_i ⊗ b_i ⊗ c_i``: conv kernels as a
    k² × (Cin/groups) × Cout tensor, attention projections as d_model × head_dim × num_heads, any other
    Linear as a rank-r in × out matrix. Besides the factors, an adapter owns a copy of every BatchNorm
    (affine parameters and running statistics) and, optionally, its own task head.

    Args:
        r (`int`):
            CP rank of every adapted weight (>= 1).
        alpha (`float`, *optional*):
            ``ΔW`` is scaled by ``alpha / r``. ``None`` (default) means no scaling, as in the paper's conv runs.
            At most 1000: a larger scale overflows deep networks at the first forward pass.
        target_modules (`Union[list[str], str]`):
            Modules to adapt, with LoRA's semantics: a list of exact names or name suffixes, or one regex that must
            match the full module name. See `ftn_peft.presets` for the paper's backbones.
        exclude_modules (`Union[list[str], str]`, *optional*):
            Modules never to adapt, same semantics as `target_modules`.
        rank_pattern (`dict`):
            Per-layer ranks: ``{name suffix or regex: rank}``. A key that matches no adapted module is an error
            (PEFT's LoRA only warns).
        alpha_pattern (`dict`):
            Per-layer alphas, same matching as `rank_pattern`.
        init_weights (`bool` or `str`):
            ``True`` (default): ``a`` and ``b`` Xavier-uniform and ``c = 0``, so the adapted model equals the base
            model exactly at step 0. ``"xavier"``: all factors Xavier-uniform (the paper's conv initialization).
            ``"gaussian"``: all factors N(0, init_std²) (the paper's transformer initialization). ``False``: like
            ``"xavier"``; kept for PEFT compatibility.
        init_std (`float`):
            Standard deviation of the ``"gaussian"`` initialization (paper: 0.05; at most 1).
        attention_heads (`int`, `"auto"` or `None`):
            Head tensorization of Linear / Conv1D targets. ``"auto"`` (default): a target inside a module whose class
            name contains "Attention" is tensorized with the head size of that module or of the model config; other
            Linear targets stay plain rank-r matrices. An `int`: every Linear target is split into that many heads.
            ``None``: no head tensorization.
        output_projections (`list[str]`):
            Name suffixes of attention *output* projections (ΔW laid out as d_model × (n·d)); every other
            head-tensorized target is treated as a query/key/value projection ((n·d) × d_model). A list: a bare
            string is refused rather than read as its characters.
        compute (`str`):
            How the adapted forward is computed. ``"materialized"`` builds ΔW and runs the base op once with W + ΔW;
            ``"factorized"`` runs the factors as small ops beside the frozen base op; ``"auto"`` (default) uses the
            factorized path when gradients flow into the factors and it is cheaper than the dense weight gradient,
            the materialized path otherwise (see docs/design.md). ``"two_op"`` / ``"three_op"``: factorized, with
            k×k convs forced onto one small-op path (built k×k kernel + 1×1, or 1×1 + depthwise + 1×1) instead of the
            measured rule.
        task_batchnorm (`bool`):
            Give this adapter its own copy of every BatchNorm layer, statistics included (default ``True``).
        task_norms (`str`):
            Which normalization layers get per-adapter copies when `task_batchnorm` is on: ``"batchnorm"`` (default,
            as in the paper) or ``"all"``, which adds LayerNorm and GroupNorm (ViTs, ConvNeXt; timm's LayerNorm2d too).
        head_module (`str`, *optional*):
            Name (or name suffix) of the classifier to replace by a per-adapter task head, e.g. ``"fc"``. It must
            name exactly one ``nn.Linear``; when `head_num_outputs` changes its size it must be the model's output
            layer (timm's ``get_classifier()``, a transformers ``classifier`` / ``score`` / output embedding, or
            else the model's last ``nn.Linear``).
        head_num_outputs (`int`, *optional*):
            Number of outputs of this adapter's task head. ``None`` keeps the base head's size and starts from its
            weights; another size starts from a fresh ``nn.Linear``.
        modules_to_save (`list[str]`, *optional*):
            Other modules to train and save with the adapter (PEFT's usual semantics).
    """

    r: int = field(default=1, metadata={"help": "CP rank of every adapted weight (>= 1)."})
    alpha: Optional[float] = field(
        default=None, metadata={"help": "Scale ΔW by alpha / r. None means no scaling (alpha = r)."}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "List of module names / suffixes, or a regex, of the modules to adapt."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "List of module names / suffixes, or a regex, of modules not to adapt."}
    )
    rank_pattern: dict = field(default_factory=dict, metadata={"help": "Per-layer ranks {pattern: rank}."})
    alpha_pattern: dict = field(default_factory=dict, metadata={"help": "Per-layer alphas {pattern: alpha}."})
    init_weights: Union[bool, Literal["xavier", "gaussian"]] = field(
        default=True,
        metadata={"help": "True: exact no-op at step 0 (c = 0). 'xavier' or 'gaussian': the paper's choices."},
    )
    init_std: float = field(default=0.05, metadata={"help": "Standard deviation of the 'gaussian' init."})
    attention_heads: Optional[Union[int, str]] = field(
        default="auto",
        metadata={"help": "'auto' (from the attention module / model config), an explicit head count, or None."},
    )
    output_projections: list[str] = field(
        default_factory=lambda: list(DEFAULT_OUTPUT_PROJECTIONS),
        metadata={"help": "Name suffixes of attention output projections."},
    )
    compute: str = field(
        default="auto", metadata={"help": "'auto', 'factorized', 'materialized', 'two_op' or 'three_op' computation of ΔW."}
    )
    task_batchnorm: bool = field(
        default=True, metadata={"help": "Give the adapter its own BatchNorm parameters and statistics."}
    )
    task_norms: str = field(
        default="batchnorm",
        metadata={"help": "'batchnorm' (default) or 'all': also give the adapter its own LayerNorm / GroupNorm."},
    )
    head_module: Optional[str] = field(
        default=None, metadata={"help": "Name or suffix of the classifier replaced by a per-adapter task head."}
    )
    head_num_outputs: Optional[int] = field(
        default=None, metadata={"help": "Outputs of this adapter's task head (None: same as the base head)."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Other modules to train and save with the adapter."}
    )

    def __post_init__(self):
        if self.task_type is not None and self.task_type not in list(TaskType):
            raise ValueError(
                f"Invalid task type: {self.task_type!r}; task_type must be one of {[t.value for t in TaskType]} or None"
            )
        super().__post_init__()
        self.peft_type = FTN_PEFT_TYPE
        # Every field is checked here, before any model is touched: a bad value is a ValueError / TypeError that
        # names the field, never an AttributeError or a silently different adapter later on.
        self.target_modules = _check_targets("target_modules", self.target_modules)
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("target_modules is empty: name at least one layer to adapt (a suffix or a regex)")
        self.exclude_modules = _check_targets("exclude_modules", self.exclude_modules)
        _check_rank("r", self.r)
        if self.alpha is not None:
            _check_alpha("alpha", self.alpha)
        for key, value in _check_patterns("rank_pattern", self.rank_pattern).items():
            _check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in _check_patterns("alpha_pattern", self.alpha_pattern).items():
            _check_alpha(f"alpha_pattern[{key!r}]", value)
        init = self.init_weights
        if not (isinstance(init, bool) or (isinstance(init, str) and init in INIT_CHOICES)):
            raise ValueError(f"init_weights={init!r} is not one of {INIT_CHOICES}")
        if (
            isinstance(self.init_std, bool)
            or not isinstance(self.init_std, (int, float))
            or not 0 < self.init_std <= MAX_INIT_STD
        ):
            raise ValueError(
                f"init_std must be a positive number <= {MAX_INIT_STD}, got {self.init_std!r}: each entry of ΔW is a "
                "product of three factors, so a larger spread makes the first forward pass overflow (paper: 0.05)"
            )
        heads = self.attention_heads
        if not (heads is None or heads == "auto" or (isinstance(heads, int) and not isinstance(heads, bool) and heads >= 1)):
            raise ValueError(f"attention_heads must be 'auto', None or a positive int, got {heads!r}")
        self.output_projections = _check_names("output_projections", self.output_projections, "['out_proj']")
        if not isinstance(self.compute, str) or self.compute not in COMPUTE_CHOICES:
            raise ValueError(f"compute={self.compute!r} is not one of {COMPUTE_CHOICES}")
        if not isinstance(self.task_batchnorm, bool):
            raise TypeError(f"task_batchnorm must be True or False, got {self.task_batchnorm!r}")
        if not isinstance(self.task_norms, str) or self.task_norms not in TASK_NORM_CHOICES:
            raise ValueError(
                f"task_norms={self.task_norms!r} is not one of {TASK_NORM_CHOICES}: 'batchnorm' copies BatchNorm "
                "only, 'all' also LayerNorm and GroupNorm"
            )
        if self.head_module is not None and (not isinstance(self.head_module, str) or not self.head_module):
            raise TypeError(
                f"head_module must be the name (or name suffix) of the classifier, e.g. 'fc', or None; got "
                f"{self.head_module!r}"
            )
        if self.head_num_outputs is not None:
            n = self.head_num_outputs
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"head_num_outputs must be a positive int, got {n!r}")
            if self.head_module is None:
                raise ValueError(
                    f"head_num_outputs={n} needs head_module: name the classifier to replace, e.g. head_module='fc'"
                )
        if self.modules_to_save is not None:
            self.modules_to_save = _check_names("modules_to_save", self.modules_to_save, "['classifier']")
            for name in self.modules_to_save:
                _compile("modules_to_save", name, rf"(^|.*\.){name}($|\..*)")
        if not isinstance(self.inference_mode, bool):
            raise TypeError(f"inference_mode must be True or False, got {self.inference_mode!r}")
        for name in ("base_model_name_or_path", "revision"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string or None, got {getattr(self, name)!r}")

    def scaling(self, r: int, alpha: Optional[float]) -> float:
        return 1.0 if alpha is None else alpha / r


def _check_rank(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}; use a smaller rank, not 0, to shrink an adapter")


def _check_alpha(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_ALPHA:
        raise ValueError(
            f"{name} must be a positive number <= {MAX_ALPHA:g}, got {value!r}; ΔW is scaled by alpha / r, and a "
            "larger scale makes the adapted model overflow (the paper uses 10 to 100); None means no scaling"
        )


def _compile(field_name: str, shown: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as err:
        raise ValueError(f"{field_name}: {shown!r} is not a valid regular expression ({err})") from None


def _check_names(field_name: str, value, example: str) -> list[str]:
    """A list of module-name strings; a bare string would be iterated character by character, so it is refused."""
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
        raise TypeError(f"{field_name} must be a list of module names, e.g. {example}; got {value!r}")
    for name in value:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{field_name} must hold non-empty strings (module names), got {name!r} in {value!r}")
    return list(value)


def _check_targets(field_name: str, value):
    """target_modules / exclude_modules: None, one regex (full match), or names / suffixes (normalised to a set)."""
    if value is None:
        return None
    if isinstance(value, str):
        _compile(field_name, value, value)
        return value
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise TypeError(
            f"{field_name} must be a list of module names / suffixes or one regex string, got {value!r} "
            f"({type(value).__name__})"
        )
    for name in value:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{field_name} must hold non-empty strings (module names), got {name!r} in {value!r}")
    return set(value)


def _check_patterns(field_name: str, value) -> dict:
    if not isinstance(value, dict):
        raise TypeError(
            f"{field_name} must be a dict {{module name or regex: value}}, e.g. {{'layer4.0.conv2': 2}}, or {{}}; "
            f"got {value!r}"
        )
    for key in value:
        if not isinstance(key, str) or not key:
            raise TypeError(f"{field_name} keys must be non-empty strings (module names or regexes), got {key!r}")
        _compile(field_name, key, rf"(.*\.)?({key})$")
    return value
