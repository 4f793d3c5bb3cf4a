"""FTNConfig: the configuration of one FTN adapter (one task or domain)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from .peft_type import FTN_PEFT_TYPE

INIT_CHOICES = (True, False, "xavier", "gaussian")
COMPUTE_CHOICES = ("auto", "factorized", "materialized")
DEFAULT_OUTPUT_PROJECTIONS = ["out_proj", "o_proj", "c_proj", "attn.proj", "attention.output.dense"]


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
        target_modules (`Union[list[str], str]`):
            Modules to adapt, with LoRA's semantics: a list of exact names or name suffixes, or one regex that must
            match the full module name. See `ftn_peft.presets` for the paper's backbones.
        exclude_modules (`Union[list[str], str]`, *optional*):
            Modules never to adapt, same semantics as `target_modules`.
        rank_pattern (`dict`):
            Per-layer ranks: ``{name suffix or regex: rank}``. A key that matches no adapted module is an error.
        alpha_pattern (`dict`):
            Per-layer alphas, same matching as `rank_pattern`.
        init_weights (`bool` or `str`):
            ``True`` (default): ``a`` and ``b`` Xavier-uniform and ``c = 0``, so the adapted model equals the base
            model exactly at step 0. ``"xavier"``: all factors Xavier-uniform (the paper's conv initialization).
            ``"gaussian"``: all factors N(0, init_std²) (the paper's transformer initialization). ``False``: like
            ``"xavier"``; kept for PEFT compatibility.
        init_std (`float`):
            Standard deviation of the ``"gaussian"`` initialization (paper: 0.05).
        attention_heads (`int`, `"auto"` or `None`):
            Head tensorization of Linear / Conv1D targets. ``"auto"`` (default): a target inside a module whose class
            name contains "Attention" is tensorized with the head size of that module or of the model config; other
            Linear targets stay plain rank-r matrices. An `int`: every Linear target is split into that many heads.
            ``None``: no head tensorization.
        output_projections (`list[str]`):
            Name suffixes of attention *output* projections (ΔW laid out as d_model × (n·d)); every other
            head-tensorized target is treated as a query/key/value projection ((n·d) × d_model).
        compute (`str`):
            How the adapted forward is computed. ``"materialized"`` builds ΔW and runs the base op once with W + ΔW;
            ``"factorized"`` runs the factors as small ops beside the frozen base op; ``"auto"`` (default) uses the
            factorized path when gradients flow into the factors and it is cheaper than the dense weight gradient,
            the materialized path otherwise (see docs/design.md).
        task_batchnorm (`bool`):
            Give this adapter its own copy of every BatchNorm layer, statistics included (default ``True``).
        head_module (`str`, *optional*):
            Name (or name suffix) of the classifier to replace by a per-adapter task head, e.g. ``"fc"``.
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
        default="auto", metadata={"help": "'auto', 'factorized' or 'materialized' computation of ΔW."}
    )
    task_batchnorm: bool = field(
        default=True, metadata={"help": "Give the adapter its own BatchNorm parameters and statistics."}
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
        super().__post_init__()
        self.peft_type = FTN_PEFT_TYPE
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple, set)):
            self.exclude_modules = set(self.exclude_modules)
        _check_rank("r", self.r)
        if self.alpha is not None:
            _check_alpha("alpha", self.alpha)
        for key, value in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{key!r}]", value)
        if self.init_weights not in INIT_CHOICES or isinstance(self.init_weights, (int, float)) and not isinstance(
            self.init_weights, bool
        ):
            raise ValueError(f"init_weights={self.init_weights!r} is not one of {INIT_CHOICES}")
        if not (isinstance(self.init_std, (int, float)) and self.init_std > 0):
            raise ValueError(f"init_std must be a positive number, got {self.init_std!r}")
        heads = self.attention_heads
        if not (heads is None or heads == "auto" or (isinstance(heads, int) and not isinstance(heads, bool) and heads >= 1)):
            raise ValueError(f"attention_heads must be 'auto', None or a positive int, got {heads!r}")
        if self.compute not in COMPUTE_CHOICES:
            raise ValueError(f"compute={self.compute!r} is not one of {COMPUTE_CHOICES}")
        if self.head_num_outputs is not None:
            if not isinstance(self.head_num_outputs, int) or self.head_num_outputs < 1:
                raise ValueError(f"head_num_outputs must be a positive int, got {self.head_num_outputs!r}")
            if self.head_module is None:
                raise ValueError(
                    f"head_num_outputs={self.head_num_outputs} needs head_module: name the classifier to replace, "
                    "e.g. head_module='fc'"
                )
        self.output_projections = list(self.output_projections)

    def scaling(self, r: int, alpha: Optional[float]) -> float:
        return 1.0 if alpha is None else alpha / r


def _check_rank(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}; use a smaller rank, not 0, to shrink an adapter")


def _check_alpha(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
