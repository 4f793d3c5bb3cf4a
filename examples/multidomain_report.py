"""The comparison table (markdown + CSV) and the accuracy-vs-parameters plot of train_multidomain.py."""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from pathlib import Path


def group_by(rows: list[dict], keys: tuple) -> dict:
    groups: dict = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in keys)].append(row)
    return dict(groups)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results: list[dict], backbone_params: int) -> list[dict]:
    """One row per (method, domain) and one per method over all domains ("mean"), test top-1 in percent.

    The "mean" row's spread is the std over seeds of each seed's mean over domains.
    """
    rows = []
    for (label,), method_rows in group_by(results, ("label",)).items():
        by_domain = group_by(method_rows, ("domain",))
        per_domain = {d: statistics.fmean(r["trainable"] for r in rs) for (d,), rs in by_domain.items()}
        multiple = 1.0 + sum(per_domain.values()) / backbone_params
        for (domain,), rs in by_domain.items():
            mean, std = _mean_std([100 * r["test"] for r in rs])
            rows.append(dict(method=label, domain=domain, top1=mean, top1_std=std, seeds=len(rs),
                             lr_scale=rs[0]["lr_scale"], trainable_params=int(per_domain[domain]),
                             total_params_multiple=multiple))
        seed_means = [statistics.fmean(100 * r["test"] for r in rs) for _, rs in group_by(method_rows, ("seed",)).items()]
        mean, std = _mean_std(seed_means)
        rows.append(dict(method=label, domain="mean", top1=mean, top1_std=std, seeds=len(seed_means),
                         lr_scale="", trainable_params=int(statistics.fmean(per_domain.values())),
                         total_params_multiple=multiple))
    return rows


def markdown(rows: list[dict], backbone_params: int) -> str:
    domains = list(dict.fromkeys(r["domain"] for r in rows if r["domain"] != "mean"))
    head = ["method", *domains, "mean", "params / domain", "params (× backbone)"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for (method,), rs in group_by(rows, ("method",)).items():
        cell = {r["domain"]: f"{r['top1']:.1f} ± {r['top1_std']:.1f}" for r in rs}
        mean_row = next(r for r in rs if r["domain"] == "mean")
        lines.append("| " + " | ".join([method, *(cell.get(d, "") for d in domains), cell["mean"],
                                        f"{mean_row['trainable_params']:,}",
                                        f"{mean_row['total_params_multiple']:.3f}×"]) + " |")
    seeds = max(r["seeds"] for r in rows)
    lines.append(f"\nTest top-1 (%), mean ± std over {seeds} seeds; backbone {backbone_params:,} params; "
                 f"params (× backbone) = (backbone + all domains' trained params) / backbone.")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in (r for r in rows if r["domain"] == "mean"):
        ax.errorbar(r["trainable_params"], r["top1"], yerr=r["top1_std"], fmt="o", capsize=3, label=r["method"])
    ax.set_xscale("log")
    ax.set_xlabel("trained parameters per domain (log)")
    ax.set_ylabel("mean test top-1 over domains (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: list[dict], backbone_params: int, output_dir) -> str:
    out = Path(output_dir)
    rows = summarize(results, backbone_params)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows, backbone_params)
    (out / "results.md").write_text(table + "\n")
    plot(rows, out / "accuracy_vs_params.png")
    return table
