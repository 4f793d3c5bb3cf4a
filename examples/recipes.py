"""Named training recipes for train_multidomain.py: the built-in demo and the paper's three classification settings.

A recipe is a set of command-line values. `--recipe paper-resnet` is the same as typing each of its values as a
flag, and any flag typed explicitly wins over the recipe's value. Every value says where it comes from: a section
of the paper ("Factorized Tensor Networks for Multi-Task and Multi-Domain Learning"), paraphrased, or "not in the
paper" with the reason for the choice. `python examples/train_multidomain.py --recipe paper-clip --print_config`
prints the resolved values with these sources.

Images are the data layer's part (multidomain_data.py); the paper crops them randomly to 224 × 224 with
horizontal flips (A.1), the input size of all three backbones.

Optimizers are per method and per parameter group: "factors" are the trained weights other than normalization and
head (FTN's low-rank factors, LoRA's matrices, a fine-tuned backbone), "head" is the task BatchNorm and classifier
(`ftn_peft.optim.split_parameters`). `--factor_optimizer`, `--factor_lr`, `--head_optimizer`, `--head_lr`,
`--weight_decay` and `--momentum` override a value for every method of the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

NOT_IN_PAPER = "not in the paper: "


@dataclass(frozen=True)
class Value:
    """One recipe value and where it comes from."""

    value: Any
    source: str


@dataclass(frozen=True)
class Optimizers:
    """Both parameter groups' optimizers of one method (lr before the --lr_grid multiplier)."""

    factor_optimizer: str
    factor_lr: float
    head_optimizer: str
    head_lr: float
    weight_decay: float = 0.0
    momentum: float = 0.9  # SGD only


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    flags: dict = field(default_factory=dict)  # flag dest -> Value, in command-line form ("1,5,10")
    optimizers: dict = field(default_factory=dict)  # method -> Value(Optimizers)
    real_data: bool = True  # False: runs on the built-in digits


# The paper's conv runs (A.1, A.2) give these per method; fields shared by both ResNet recipes.
_MOMENTUM = NOT_IN_PAPER + "A.1 and A.2 give no SGD momentum; 0.9 is what A.3 uses for its SGD runs"
_FTN_INIT = Value("xavier", "§3 Initialization: every factor from Xavier uniform, so ΔW starts close to 0")
_COSINE = Value("cosine", "A.1 and A.2: cosine annealing learning-rate schedule")
_EPOCHS_30 = Value(30, "A.1 and A.2: 30 epochs, for the baselines and for FTN")
_BATCH_32 = Value(32, "A.1 and A.2: batch size 32")
_ONE_SEED = Value("0", NOT_IN_PAPER + "Tables 1-3 report one number per cell (no spread over seeds)")
_NO_GRID = Value("1", "A.1 and A.2 give one learning rate per parameter group, so no grid (a multiplier of 1)")
_LORA_LIKE_FTN = (NOT_IN_PAPER + "LoRA is not in the conv tables; it gets FTN's optimizers, so the two differ only "
                                 "in the form of ΔW")

DEMO = Recipe(
    name="demo",
    description="The built-in demo (the default): a tiny ResNet pretrained on half of scikit-learn's digits and three "
                "domains made from the other half; minutes on one CPU core.",
    real_data=False,
    flags={
        "backbone": Value("demo", NOT_IN_PAPER + "the demo's own source model, trained once and cached"),
        "methods": Value("ftn,finetune,feature_extractor,bn_head,lora",
                         "Table 1's baselines (Fine-Tuning, Feature-Extractor, FC and BN only) and Table 3's LoRA"),
        "ranks": Value("1,8", NOT_IN_PAPER + "two ranks that fit the demo's minutes; A.1 uses 1 to 50"),
        "ftn_targets": Value("", "§4.1.1: rank 1 costs 49,204 (ResNet-50) and 16,291 (ResNet-34) parameters per task, "
                                 "the count of every conv of the residual stages: the preset's targets (empty value)"),
        "ftn_init": _FTN_INIT,
        "ftn_alpha": Value("none", "§3: conv factors are not scaled (alpha appears only in §4.1.2, for CLIP)"),
        "ftn_init_std": Value(0.05, "§3 Initialization (transformers): Gaussian factors with σ = 0.05"),
        "seeds": Value("0,1,2", NOT_IN_PAPER + "three seeds, to see the spread the demo's small test sets give"),
        "lr_grid": Value("0.5,2", NOT_IN_PAPER + "a small grid picked on validation, like the per-dataset "
                                               "grid search of §4.1.2"),
        "epochs": Value(8, NOT_IN_PAPER + "about 40 steps a domain: fewer undertrain the small methods"),
        "batch_size": Value(64, NOT_IN_PAPER + "the demo's choice (the paper: 32 for ResNets in A.1, 64 for CLIP "
                                               "in §4.1.2)"),
        "lr_scheduler": _COSINE,
    },
    optimizers={
        "ftn": Value(Optimizers("adam", 5e-3, "sgd", 5e-2),
                     "A.1: Adam at 0.005 for the factors, SGD for BatchNorm and head; " + NOT_IN_PAPER
                     + "the SGD lr is raised from 0.008 to 0.05 for runs of tens of steps"),
        "lora": Value(Optimizers("adam", 5e-3, "sgd", 5e-2), _LORA_LIKE_FTN),
        "finetune": Value(Optimizers("adam", 1e-3, "sgd", 5e-2),
                          NOT_IN_PAPER + "A.1 uses SGD 0.005; Adam 0.001 is steadier over the demo's few steps"),
        "feature_extractor": Value(Optimizers("adam", 5e-3, "sgd", 5e-2), NOT_IN_PAPER + "head only, as FTN's head"),
        "bn_head": Value(Optimizers("adam", 5e-3, "sgd", 5e-2), NOT_IN_PAPER + "BatchNorm and head, as FTN's"),
    },
)


def _conv_recipe(name, description, backbone, ranks, ftn, baseline) -> Recipe:
    return Recipe(
        name=name,
        description=description,
        flags={
            "backbone": backbone,
            "methods": Value("ftn,finetune,feature_extractor,bn_head",
                             "A.1 and A.2 train FTN and the baselines Fine-Tuning, Feature-Extractor, "
                             "'FC and BN only'"),
            "ranks": ranks,
            "ftn_targets": DEMO.flags["ftn_targets"],
            "ftn_init": _FTN_INIT,
            "ftn_alpha": DEMO.flags["ftn_alpha"],
            "ftn_init_std": DEMO.flags["ftn_init_std"],
            "seeds": _ONE_SEED,
            "lr_grid": _NO_GRID,
            "epochs": _EPOCHS_30,
            "batch_size": _BATCH_32,
            "lr_scheduler": _COSINE,
        },
        optimizers={
            "ftn": ftn,
            "lora": Value(ftn.value, _LORA_LIKE_FTN),
            **{m: baseline for m in ("finetune", "feature_extractor", "bn_head")},
        },
    )


PAPER_RESNET = _conv_recipe(
    "paper-resnet",
    "ImageNet-to-Sketch (Table 1): ResNet-50 pretrained on ImageNet, five domains, one after another.",
    backbone=Value("resnet50", "§4.1.1 Training details: ImageNet-pretrained ResNet-50 for ImageNet-to-Sketch"),
    ranks=Value("1,5,10,15,20,25,50", "A.1 and §4.1.1: ranks R ∈ {1, 5, 10, 15, 20, 25, 50}"),
    ftn=Value(Optimizers("adam", 0.005, "sgd", 0.008, weight_decay=0.0),
              "A.1: Adam, lr 0.005, for the low-rank layers; SGD, lr 0.008, for task BatchNorm and classifier. "
              "Momentum: " + _MOMENTUM),
    baseline=Value(Optimizers("sgd", 0.005, "sgd", 0.005, weight_decay=0.0),
                   "A.1: the baselines with SGD, lr 0.005, no weight decay. Momentum: " + _MOMENTUM),
)

PAPER_DOMAINNET = _conv_recipe(
    "paper-domainnet",
    "DomainNet (Table 2): ResNet-34 pretrained on ImageNet, six domains of 345 classes.",
    backbone=Value("resnet34", "§4.1.1 Training details: ResNet-34 on DomainNet, the setting of TAPS"),
    ranks=Value("1,5,10,20,30,40", "A.2 and §4.1.1: ranks R ∈ {1, 5, 10, 20, 30, 40}"),
    ftn=Value(Optimizers("adam", 0.005, "sgd", 0.005, weight_decay=0.0),
              "A.2: Adam, lr 0.005, for the low-rank tensors; SGD with the same lr 0.005 and no weight decay for the "
              "remaining layers. Momentum: " + _MOMENTUM),
    baseline=Value(Optimizers("sgd", 0.005, "sgd", 0.005, weight_decay=1e-4),
                   "A.2: the baselines with SGD, lr 0.005, weight decay 0.0001. Momentum: " + _MOMENTUM),
)

_CLIP_OPTIMIZER = (
    "§4.1.2: lr 5e-6, the best of a per-dataset grid search. " + NOT_IN_PAPER
    + "the optimizer is not named for the CLIP runs; Adam, the paper's optimizer for low-rank factors "
      "everywhere else (A.1-A.3), for factors and head alike"
)
PAPER_CLIP = Recipe(
    name="paper-clip",
    description="CLIP ViT-B/32 (Table 3): five data sets, FTN on query+value and on the output projection, r = 4.",
    flags={
        "backbone": Value("openai/clip-vit-base-patch32",
                          "§4.1.2: a 12-layer ViT-B-224/32 from CLIP (this is its Hub id)"),
        "methods": Value("ftn", "§4.1.2: Table 3's baselines are quoted from another paper; only FTN is trained"),
        "ftn_targets": Value("qv,o", "§3 and Table 3: FTN (Query and Value) and FTN (Output projection)"),
        "ranks": Value("4", "§4.1.2 Training details: R = 4 for all experiments"),
        "ftn_init": Value("gaussian", "§3 Initialization (transformers): factors from N(0, σ²), near-zero ΔW"),
        "ftn_init_std": Value(0.05, "§3 Initialization (transformers): σ = 0.05"),
        "ftn_alpha": Value("qv=10,o=100", "§4.1.2: factors scaled by alpha/R, alpha = 10 for FTN (Query and Value) "
                                          "and 100 for FTN (Output projection)"),
        "seeds": _ONE_SEED,
        "lr_grid": Value("1", "§4.1.2: the grid search found 5e-6 best, so it is used directly"),
        "epochs": Value(100, "§4.1.2: trained for 100 epochs"),
        "batch_size": Value(64, "§4.1.2: batch size 64"),
        "lr_scheduler": Value("cosine", NOT_IN_PAPER + "the CLIP schedule is not stated; cosine, as in A.1 and A.2"),
    },
    optimizers={m: Value(Optimizers("adam", 5e-6, "adam", 5e-6), _CLIP_OPTIMIZER)
                for m in ("ftn", "lora", "finetune", "feature_extractor", "bn_head")},
)

RECIPES = {r.name: r for r in (DEMO, PAPER_RESNET, PAPER_DOMAINNET, PAPER_CLIP)}
OPTIMIZER_FLAGS = ("factor_optimizer", "factor_lr", "head_optimizer", "head_lr", "weight_decay", "momentum")


def get(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"--recipe {name!r} is not a recipe; choose one of {sorted(RECIPES)}")
    return RECIPES[name]


def resolve(recipe: Recipe, given: dict) -> tuple[dict, dict]:
    """(values, sources): every recipe flag's value, taken from `given` (flags typed on the command line, None for
    those not typed) where present, else from the recipe; sources say which, for --print_config."""
    values, sources = {}, {}
    for dest, entry in recipe.flags.items():
        if given.get(dest) is not None:
            values[dest], sources[dest] = given[dest], "given"
        else:
            values[dest], sources[dest] = entry.value, f"recipe {recipe.name}: {entry.source}"
    return values, sources


def optimizers_for(recipe: Recipe, method: str, given: dict) -> Optimizers:
    """The recipe's optimizers for `method`, with each optimizer flag typed on the command line replacing its field."""
    base = recipe.optimizers[method].value
    overrides = {k: given[k] for k in OPTIMIZER_FLAGS if given.get(k) is not None}
    return Optimizers(**{**base.__dict__, **overrides})


def describe(recipe: Recipe) -> str:
    """The recipe as a list of flags with their sources (the docs and --print_config show this)."""
    lines = [f"{recipe.name}: {recipe.description}"]
    lines += [f"  --{dest} {v.value}    # {v.source}" for dest, v in recipe.flags.items()]
    for method, v in recipe.optimizers.items():
        o = v.value
        lines.append(f"  {method}: factors {o.factor_optimizer} lr {o.factor_lr:g}, head {o.head_optimizer} lr "
                     f"{o.head_lr:g}, weight decay {o.weight_decay:g}    # {v.source}")
    return "\n".join(lines)
