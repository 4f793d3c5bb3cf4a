"""What each layer of an FTN adapter learned, on the built-in digits demo: heatmaps, pruning curves, ranks chosen
by a group penalty, and conversion of a fine-tuned model (the paper's appendices B, C and E).

    python examples/analysis_demo.py                       # all experiments (about 10 minutes on 1 CPU core)
    python examples/analysis_demo.py --only heatmap prune

It writes the PNGs and a JSON of the results to --out (default outputs/analysis_demo/, ignored by git). Every
number in docs/analysis.md comes from this script, run with `--out docs` (see docs/make_all.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import get_peft_model

import ftn_peft
from ftn_peft import analysis
from ftn_peft.demo import digits

EPOCHS = 6
BATCH = 32
FACTOR_LR = 3e-3  # Adam, factors (and the whole backbone for full fine-tuning)
HEAD_LR = 1e-2  # Adam, task BatchNorm and head
_CACHE: dict = {}


def train(model, domain, seed: int, penalty: float = 0.0, adapter: str = "default", epochs=None) -> None:
    """Adam on every trainable parameter, cosine schedule; `penalty` adds the group-sparsity term (FTN only)."""
    epochs = EPOCHS if epochs is None else epochs  # read at call time: --epochs changes it
    heads = {id(p) for m in model.modules() if isinstance(m, (ftn_peft.TaskNorm, ftn_peft.TaskHead,
                                                             torch.nn.BatchNorm2d, torch.nn.Linear))
             for p in m.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in heads], "lr": FACTOR_LR},
              {"params": [p for p in params if id(p) in heads], "lr": HEAD_LR}]
    opt = torch.optim.Adam([g for g in groups if g["params"]])
    x, y = domain.train.tensors
    steps = epochs * ((len(y) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), BATCH):
            b = order[i:i + BATCH]
            loss = F.cross_entropy(model(x[b]), y[b])
            if penalty:
                loss = loss + analysis.group_sparsity_penalty(model, adapter, penalty)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def ftn_model(domain_name: str, seed: int, r: int, penalty: float = 0.0):
    """An FTN adapter of rank r trained on one domain (memoized: several experiments share runs)."""
    key = ("ftn", domain_name, seed, r, penalty)
    if key not in _CACHE:
        domain = digits.make_domain(domain_name, seed)
        torch.manual_seed(seed)  # the seed also controls the factors' initialization
        model = get_peft_model(digits.load_source_model(),
                               ftn_peft.presets.resnet(r=r, num_classes=domain.num_classes))
        train(model, domain, seed, penalty)
        _CACHE[key] = (model, domain)
        print(f"trained {key}: test {digits.evaluate(model, domain.test):.3f}", flush=True)
    return _CACHE[key]


def finetuned_model(domain_name: str, seed: int):
    """The whole source model fine-tuned on one domain, with a fresh head of the domain's size."""
    domain = digits.make_domain(domain_name, seed)
    torch.manual_seed(seed)
    model = digits.load_source_model()
    model.fc = torch.nn.Linear(model.fc.in_features, domain.num_classes)
    for p in model.parameters():
        p.requires_grad_(True)
    train(model, domain, seed)
    return model, domain


def acc(model, data, adapter: str = "default") -> float:
    model.set_adapter(adapter)
    return digits.evaluate(model, data)


# --- experiments ------------------------------------------------------------------------------------------------
def heatmap(out: Path, domains, rank_domain: str, ranks) -> dict:
    """Figures 4 to 6: normalized ‖ΔW‖ per layer, layers × domains at the top rank, and layers × ranks."""
    top = max(ranks)
    by_domain = {d: {n: v.delta_norm for n, v in analysis.layer_norms(ftn_model(d, 0, top)[0], "default").items()}
                 for d in domains}
    analysis.plot_norm_heatmap(by_domain, out / "analysis_heatmap_domains.png",
                               title=f"‖ΔW‖ per layer, r={top}, normalized per domain", xlabel="domain")
    by_rank = {f"r={r}": {n: v.delta_norm for n, v in
                          analysis.layer_norms(ftn_model(rank_domain, 0, r)[0], "default").items()} for r in ranks}
    analysis.plot_norm_heatmap(by_rank, out / "analysis_heatmap_ranks.png",
                               title=f"‖ΔW‖ per layer, domain {rank_domain}, normalized per rank", xlabel="rank")
    return {"domains": by_domain, "ranks": by_rank}


def prune_curve(out: Path, domains, r: int, steps: int = 6) -> dict:
    """Figure 3: accuracy against factor parameters as the layer-norm threshold moves from min to max."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    fig, ax = plt.subplots(figsize=(6, 4))
    for d in domains:
        model, domain = ftn_model(d, 0, r)
        norms = analysis.layer_norms(model, "default")
        lo, hi = min(v.delta_norm for v in norms.values()), max(v.delta_norm for v in norms.values())
        points = []
        for k in range(steps):
            t = lo + (hi - lo) * k / (steps - 1)
            name = f"t{k}"
            plan = analysis.prune_adapter(model, "default", name, threshold=t)
            points.append({"threshold": t, "layers": sum(bool(v) for v in plan.values()),
                           "factor_params": analysis.factor_parameters(plan, norms),
                           "test_acc": acc(model, domain.test, name)})
            model.set_adapter("default")
            model.delete_adapter(name)
        points.append({"threshold": None, "layers": 0, "factor_params": 0, "test_acc": bn_head_only(model, domain)})
        curves[d] = points
        ax.plot([p["factor_params"] for p in points], [p["test_acc"] for p in points], "o-", label=d)
        for p in points:
            ax.annotate(f"({p['layers']})", (p["factor_params"], p["test_acc"]), fontsize=6)
    ax.set_xlabel("factor parameters kept")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Pruning layers of a rank-{r} FTN by ‖ΔW‖ threshold (kept layers)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "analysis_prune_curve.png", dpi=120)
    plt.close(fig)
    return curves


def bn_head_only(model, domain) -> float:
    """The trained adapter with every factor dropped: its own BN and head only (the threshold above every layer)."""
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for m in clone.modules():
            if isinstance(m, ftn_peft.FTNLayer):
                for f in m.factors("default"):
                    f.zero_()
    return acc(clone, domain.test)


def data_ranks(domain_name: str, seeds, ranks, max_rank: int, penalties) -> dict:
    """Group-sparsity FTN at max_rank pruned to the budget of fixed rank r, against fixed rank r and against the
    same max_rank run without the penalty (pruning alone). λ is chosen on seed 0's validation split."""
    val_scores = {}
    for lam in penalties:
        model, domain = ftn_model(domain_name, seeds[0], max_rank, lam)
        norms = analysis.layer_norms(model, "default")
        per_rank = sum(v.params_per_component for v in norms.values())
        scores = []
        for r in ranks:
            analysis.prune_adapter(model, "default", "p", budget=r * per_rank)
            scores.append(acc(model, domain.val, "p"))
            model.set_adapter("default")
            model.delete_adapter("p")
        val_scores[lam] = statistics.mean(scores)
    lam = max(val_scores, key=val_scores.get)
    rows = {f"fixed r={r}": [] for r in ranks}
    for penalty in (lam, 0.0):
        rows.update({f"R={max_rank} λ={penalty} → budget r={r}": [] for r in ranks})
    for seed in seeds:
        for r in ranks:
            model, domain = ftn_model(domain_name, seed, r)
            rows[f"fixed r={r}"].append((acc(model, domain.test), analysis.adapter_factor_count(model, "default")))
        for penalty in (lam, 0.0):
            model, domain = ftn_model(domain_name, seed, max_rank, penalty)
            norms = analysis.layer_norms(model, "default")
            per_rank = sum(v.params_per_component for v in norms.values())
            for r in ranks:
                plan = analysis.prune_adapter(model, "default", "p", budget=r * per_rank)
                rows[f"R={max_rank} λ={penalty} → budget r={r}"].append(
                    (acc(model, domain.test, "p"), analysis.factor_parameters(plan, norms)))
                model.set_adapter("default")
                model.delete_adapter("p")
        print(f"ranks seed {seed}: {({k: v[-1] for k, v in rows.items()})}", flush=True)
    return {"lambda_val": val_scores, "lambda": lam, "rows": rows}


def conversion(domain_name: str, seeds, ranks) -> dict:
    """Appendix E: CP of (W_finetuned − W) at rank r against FTN trained at rank r."""
    rows = {"fine-tuned": []}
    for r in ranks:
        rows[f"converted r={r}"] = []
        rows[f"trained FTN r={r}"] = []
    errors = {r: [] for r in ranks}
    for seed in seeds:
        tuned, domain = finetuned_model(domain_name, seed)
        rows["fine-tuned"].append(digits.evaluate(tuned, domain.test))
        model = get_peft_model(digits.load_source_model(), ftn_peft.presets.resnet(r=1, num_classes=domain.num_classes))
        for r in ranks:
            err = analysis.convert_finetuned(model, tuned, f"c{r}", ftn_peft.presets.resnet(r=r, num_classes=domain.num_classes))
            errors[r].append(statistics.mean(err.values()))
            rows[f"converted r={r}"].append(acc(model, domain.test, f"c{r}"))
            rows[f"trained FTN r={r}"].append(acc(ftn_model(domain_name, seed, r)[0], domain.test))
        print(f"conversion seed {seed}: {({k: v[-1] for k, v in rows.items()})}", flush=True)
    return {"rows": rows, "mean_layer_error": errors}


def main(argv=None) -> None:
    global EPOCHS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/analysis_demo"),
                        help="output directory (default outputs/analysis_demo/); maintainers pass --out docs")
    parser.add_argument("--only", nargs="*", default=["heatmap", "prune", "ranks", "convert"])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help=f"epochs per model (the recipe: {EPOCHS})")
    args = parser.parse_args(argv)
    EPOCHS = args.epochs
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    if "heatmap" in args.only:
        results["heatmap"] = heatmap(args.out, ["inverted", "rotated", "edges"], "rotated", [1, 2, 4, 8])
    if "prune" in args.only:
        results["prune"] = prune_curve(args.out, ["inverted", "rotated", "edges"], r=8)
    if "ranks" in args.only:
        results["ranks"] = data_ranks("rotated", args.seeds, [1, 2, 4], 8, [3e-3, 1e-2])
    if "convert" in args.only:
        results["convert"] = conversion("rotated", args.seeds, [1, 2, 4])
    path = args.out / f"analysis_results_{'_'.join(args.only)}.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
