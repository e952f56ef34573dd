"""plot.png: per-target bars of each method's mean score, with error bars of the sd over seeds."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def write_plot(path: Path, results: dict[str, Any], variant: str = "fixed") -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    from compsft.atomic import atomic_path

    s = results["settings"]
    summary = results["summary"][variant]
    methods = list(summary)
    groups = [t["code"] for t in s["targets"]] + ["average"]
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * max(len(methods), 2) * 0.5), 4))
    for i, m in enumerate(methods):
        stats = [summary[m]["targets"][g] if g != "average" else summary[m]["average"] for g in groups]
        means = [st["mean"] if st["mean"] is not None else float("nan") for st in stats]
        sds = [st["sd"] or 0.0 for st in stats]
        xs = [g + (i - (len(methods) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, means, width, yerr=sds, capsize=3, label=m)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(results["metric"])
    ax.set_ylim(0, 1.15)  # headroom for the legend
    ax.set_title(f"compsft compare: {s['task']}, {s['source']['code']} → targets, budget {s['budget']['name']}, "
                 f"{len(s['seeds'])} seed(s)", fontsize=9)
    ax.legend(loc="upper center", ncol=min(len(methods), 4), fontsize=8, frameon=False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
