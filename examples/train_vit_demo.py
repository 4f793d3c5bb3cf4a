"""The paper's transformer comparison in miniature: a tiny CLIP vision transformer on the built-in digits domains.

The ResNet demo (train_multidomain.py) has a transformer twin here. A tiny `CLIPForImageClassification` is
pretrained on the SOURCE half of scikit-learn's digits (once per seed, cached; ftn_peft/demo/vit.py) and adapted to
the same target domains by: a linear probe (new head only), fine-tuning, LoRA on query+value at r = 4 and at the
rank whose parameter count matches FTN's, and FTN on query+value and on the attention output projection with the
paper's preset (`ftn_peft.presets.clip_vision`: r = 4, Gaussian init, alpha 10 / 100).

Every method's learning rate is chosen on the validation split of the first seed (never on test) from a grid that
widens itself while the best value sits on its edge (`--max_widen`); the table marks a rate still on an edge.
Then every seed is trained at that rate; the table reports test top-1 as mean ± std over seeds.

    python examples/train_vit_demo.py                       # table, CSV and plot in outputs/train_vit_demo/
    python examples/train_vit_demo.py --resnet_csv outputs/train_multidomain/results.csv   # plot both demos
    python examples/train_vit_demo.py --replot outputs/train_vit_demo/vit_demo_results.csv --resnet_csv ...  # plot only

Files (in --out): vit_demo_results.md, vit_demo_results.csv, vit_demo_accuracy_vs_params.png.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import multidomain_report as report_lib  # noqa: E402

import ftn_peft  # noqa: E402,F401  (registers FTN in PEFT)
from ftn_peft import baselines, optim  # noqa: E402
from ftn_peft.demo import digits, vit  # noqa: E402

# Base learning rates (Adam for everything but the head, SGD for the head: ftn_peft.optim); the grid multiplies
# both. The paper's 5e-6 was tuned for the full-size CLIP and a long run; a tiny model in 60 steps needs far more.
PREFIX = "vit_demo_"  # output file names, the same in outputs/ and docs/
BASE_LR = {
    "linear_probe": (1e-3, 5e-2),  # no Adam part: only the head trains
    "finetune": (1e-3, 5e-2),
    "lora_qv": (1e-2, 5e-2),
    "ftn_qv": (3e-2, 5e-2),
    "ftn_o": (1e-2, 5e-2),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--domains", default=",".join(digits.DOMAINS[:3]), help="comma-separated digits domains")
    p.add_argument("--methods", default=",".join(vit.METHODS), help=f"comma-separated, from {list(vit.METHODS)}")
    p.add_argument("--rank", type=int, default=4, help="FTN rank and the first LoRA rank (paper: 4)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--lr_grid", default="0.3,1,3", help="first multipliers of each method's base lrs, picked on val")
    p.add_argument("--widen_step", type=float, default=3.0, help="factor by which the grid grows past an edge")
    p.add_argument("--max_widen", type=int, default=3, help="extra grid points per (method, domain); 0: never widen")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--out", default="outputs/train_vit_demo", help="output directory, ignored by git (maintainers: docs)")
    p.add_argument("--resnet_csv", default=None,
                   help="results.csv of train_multidomain.py: plot the ResNet demo beside this one")
    p.add_argument("--replot", default=None, metavar="CSV",
                   help="no training: redraw the plot from this script's results.csv (with --resnet_csv)")
    p.add_argument("--cache_dir", default=None, help="where the source models are cached (~/.cache/ftn_peft)")
    p.add_argument("--source_epochs", type=int, default=20, help="epochs of the source ViT (cached)")
    p.add_argument("--num_threads", type=int, default=1, help="torch threads per process (tiny tensors: 1)")
    p.add_argument("--workers", type=int, default=2, help="processes training (method, domain) pairs at once")
    args = p.parse_args(argv)
    args.domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    bad = sorted(set(args.domains) - set(digits.DOMAIN_SPECS))
    if bad:
        p.error(f"--domains has unknown {bad}; choose from {sorted(digits.DOMAIN_SPECS)}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = sorted(set(args.methods) - set(vit.METHODS))
    if bad:
        p.error(f"--methods has unknown {bad}; choose from {list(vit.METHODS)}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.lr_grid = sorted(float(s) for s in args.lr_grid.split(","))
    if any(s <= 0 for s in args.lr_grid):
        p.error("--lr_grid values must be > 0")
    if args.widen_step <= 1 or args.max_widen < 0:
        p.error("--widen_step must be > 1 and --max_widen >= 0")
    if args.workers < 1 or args.num_threads < 1:
        p.error("--workers and --num_threads must be >= 1")
    for path in (args.resnet_csv, args.replot):
        if path and not Path(path).is_file():
            p.error(f"{path} does not exist; run the script that writes it first (examples/train_multidomain.py "
                    "for --resnet_csv, this script for --replot), or leave the flag out")
    return args


def method_jobs(methods: list[str], rank: int, source) -> list[tuple[str, str, int]]:
    """(label, method, rank) per trained model; LoRA twice: at `rank` and at the rank matching FTN (Q&V)."""
    jobs = []
    for method in methods:
        if method == "lora_qv":
            ranks = dict.fromkeys([rank, vit.lora_rank_matching(source, rank)])
            jobs += [(f"lora_qv_r{r}", method, r) for r in ranks]
        elif method.startswith("ftn"):
            jobs.append((f"{method}_r{rank}", method, rank))
        else:
            jobs.append((method, method, 0))
    return jobs


# ------------------------------------------------------------------------------------------------ learning rate
def select_lr(run, grid: list[float], step: float, max_widen: int) -> tuple[dict, dict, str]:
    """Pick the multiplier with the best validation accuracy; grow the grid while the pick is on its edge.

    `run(scale)` trains one model and returns a dict with "val". Ties go to the multiplier nearest the middle of
    the grid (in log), so a plateau that reaches inside the grid does not count as an edge. Returns (the best
    result, {scale: result} of every trial, "" or "low" / "high" when the pick is still on an edge after
    `max_widen` extra points).
    """
    trials = {s: run(s) for s in sorted(grid)}
    widened = 0
    while True:
        scales = sorted(trials)
        top = max(trials[s]["val"] for s in scales)
        middle = (math.log(scales[0]) + math.log(scales[-1])) / 2
        pick = min((s for s in scales if trials[s]["val"] == top), key=lambda s: abs(math.log(s) - middle))
        edge = "low" if pick == scales[0] else "high" if pick == scales[-1] else ""
        if not edge or widened >= max_widen:  # a grid of one or two values is all edge
            return trials[pick], trials, edge
        new = scales[0] / step if edge == "low" else scales[-1] * step
        trials[new] = run(new)
        widened += 1


# ------------------------------------------------------------------------------------------------ training
def train(model, domain, lrs: tuple[float, float], epochs: int, batch_size: int, seed: int) -> None:
    """Adam on the adapted weights, SGD on the head, cosine schedule (ftn_peft.optim); plain cross-entropy."""
    x, y = domain.train.tensors
    steps = epochs * math.ceil(len(y) / batch_size)
    optimizer, scheduler = optim.create_optimizer_and_scheduler(model, steps, factor_lr=lrs[0], head_lr=lrs[1])
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch_size):
            b = order[i:i + batch_size]
            loss = F.cross_entropy(vit.logits(model(x[b])), y[b])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()


def head_parameters(model) -> int:
    """Trained parameters of the classifier (the paper's Table 3 counts parameters without it)."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and f"{vit.HEAD}." in n)


def run_one(args, job, source, domain, seed: int, scale: float) -> dict:
    """Train one model; its test accuracy is left for `with_test` (only the chosen trial needs it)."""
    label, method, rank = job
    torch.manual_seed(seed)  # fixes the new head's and the factors' initialization
    model = vit.build_method(method, source, domain.num_classes, r=rank or args.rank)
    lrs = tuple(lr * scale for lr in BASE_LR[method])
    train(model, domain, lrs, args.epochs, args.batch_size, seed)
    return dict(label=label, method=method, rank=rank, domain=domain.name, seed=seed, lr_scale=scale,
                factor_lr=lrs[0], head_lr=lrs[1], val=vit.evaluate(model, domain.val),
                trainable=baselines.trainable_parameters(model), head=head_parameters(model), model=model)


def with_test(result: dict, domain) -> dict:
    out = dict(result)
    out["test"] = vit.evaluate(out.pop("model"), domain.test)
    return out


_SOURCES: dict = {}


def _source(args, seed: int):
    key = (args.cache_dir, seed, args.source_epochs)
    if key not in _SOURCES:  # one copy per process, read from the cache the main process filled
        _SOURCES[key] = vit.load_source_vit(args.cache_dir, seed=seed, epochs=args.source_epochs).requires_grad_(False)
    return _SOURCES[key]


def run_pair(args, job, name: str) -> tuple[list[dict], str]:
    """One (method, domain): the lr on the first seed's val split, then the other seeds at that lr."""
    first = args.seeds[0]
    domain = digits.make_domain(name, first)
    best, trials, edge = select_lr(lambda s: run_one(args, job, _source(args, first), domain, first, s),
                                   args.lr_grid, args.widen_step, args.max_widen)
    tried = ", ".join(f"{s:g}: {100 * r['val']:.1f}" for s, r in sorted(trials.items()))
    line = (f"{job[0]:>14} {name:>9}: val by lr multiplier {{{tried}}} -> {best['lr_scale']:g}"
            + (f"  (still on the {edge} edge)" if edge else ""))
    grid = len(trials)
    results = [dict(with_test(best, domain), lr_edge=edge, grid=grid)]
    trials.clear()  # frees the other trials' models
    for seed in args.seeds[1:]:
        domain = digits.make_domain(name, seed)
        r = run_one(args, job, _source(args, seed), domain, seed, best["lr_scale"])
        results.append(dict(with_test(r, domain), lr_edge=edge, grid=grid))
    return results, line


def _run_pair_in_worker(packed):
    args, job, name = packed
    torch.set_num_threads(args.num_threads)
    return run_pair(args, job, name)


def _log(line: str) -> None:
    print(line, flush=True)


def run_grid(args, log=_log) -> list[dict]:
    """Every (method, domain) pair, in `args.workers` processes; the results do not depend on their number."""
    pairs = [(args, job, name) for job in method_jobs(args.methods, args.rank, _source(args, args.seeds[0]))
             for name in args.domains]
    results = []
    if args.workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for rs, line in pool.map(_run_pair_in_worker, pairs):  # in order, as they finish
                log(line)
                results += rs
    else:
        for p in pairs:
            rs, line = run_pair(*p)
            log(line)
            results += rs
    return results


# ------------------------------------------------------------------------------------------------ report
def summarize(results: list[dict], backbone_params: int) -> list[dict]:
    """multidomain_report's rows, plus the chosen lrs, the edge flag and the parameters without the head."""
    rows = report_lib.summarize(results, backbone_params)
    for row in rows:
        rs = [r for r in results if r["label"] == row["method"] and row["domain"] in ("mean", r["domain"])]
        first = rs[0]
        row["params_without_head"] = int(sum(r["trainable"] - r["head"] for r in rs) / len(rs))
        row["factor_lr"] = first["factor_lr"] if row["domain"] != "mean" else ""
        row["head_lr"] = first["head_lr"] if row["domain"] != "mean" else ""
        row["lr_edge"] = ",".join(sorted({r["lr_edge"] for r in rs if r["lr_edge"]}))
    return rows


def markdown(rows: list[dict], backbone_params: int) -> str:
    domains = list(dict.fromkeys(r["domain"] for r in rows if r["domain"] != "mean"))
    head = ["method", *domains, "mean", "params / domain", "without head", "params (× backbone)"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for (method,), rs in report_lib.group_by(rows, ("method",)).items():
        cell = {r["domain"]: f"{r['top1']:.1f} ± {r['top1_std']:.1f}" + (" †" if r["lr_edge"] else "") for r in rs}
        mean = next(r for r in rs if r["domain"] == "mean")
        lines.append("| " + " | ".join([method, *(cell.get(d, "") for d in domains), cell["mean"].rstrip(" †"),
                                        f"{mean['trainable_params']:,}", f"{mean['params_without_head']:,}",
                                        f"{mean['total_params_multiple']:.3f}×"]) + " |")
    seeds = max(r["seeds"] for r in rows)
    lines.append(f"\nTest top-1 (%), mean ± std over {seeds} seeds; backbone {backbone_params:,} params; "
                 "params / domain: what the method trains per domain (head included); without head: the same "
                 "without the classifier; params (× backbone) = (backbone + all domains' trained params) / backbone.")
    if any(r["lr_edge"] for r in rows):
        lines.append("† the learning rate chosen on validation is still on an edge of the widened grid.")
    lrs = [f"{r['method']}/{r['domain']} {r['factor_lr']:.2g}" for r in rows if r["domain"] != "mean"
           and r["method"] != "linear_probe"]
    lines.append("Adam learning rates chosen on validation: " + ", ".join(lrs) + ".")
    return "\n".join(lines)


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("top1", "top1_std", "trainable_params"):
            r[k] = float(r[k])
    return rows


def plot(panels: list[tuple[str, list[dict]]], path: Path) -> None:
    """Mean top-1 over domains against trained parameters per domain, one panel per demo."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels):
        for r in (r for r in rows if r["domain"] == "mean"):
            ax.errorbar(r["trainable_params"], r["top1"], yerr=r["top1_std"], fmt="o", capsize=3, label=r["method"])
        ax.set_xscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("trained parameters per domain (log)")
        ax.set_ylabel("mean test top-1 over domains (%)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(args, results: list[dict], backbone_params: int) -> str:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(results, backbone_params)
    with open(out / f"{PREFIX}results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows, backbone_params)
    (out / f"{PREFIX}results.md").write_text(table + "\n")
    write_plot(args, rows)
    return table


def write_plot(args, rows: list[dict]) -> None:
    panels = [("tiny CLIP ViT (train_vit_demo.py), digits domains", rows)]
    if args.resnet_csv:
        panels.insert(0, ("tiny ResNet (train_multidomain.py), digits domains", read_csv(args.resnet_csv)))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    plot(panels, Path(args.out) / f"{PREFIX}accuracy_vs_params.png")


def main(argv=None) -> str:
    args = parse_args(argv)
    if args.replot:
        write_plot(args, read_csv(args.replot))
        return ""
    torch.set_num_threads(args.num_threads)
    start = time.time()
    for seed in args.seeds:  # trained and cached once, before any worker reads them
        _source(args, seed)
    backbone = vit.backbone_parameters(_source(args, args.seeds[0]))
    _log(f"source ViTs ready ({time.time() - start:.0f} s); backbone {backbone:,} params; domains {args.domains}")
    results = run_grid(args)
    table = write_outputs(args, results, backbone)
    print(table)
    print(f"\nwall time {time.time() - start:.0f} s; outputs in {args.out}/")
    return table


if __name__ == "__main__":
    main()
