"""The figures of a comparison: plot.png (per-target bars of each method's mean score, with error bars of
the sd over seeds) and, for methods whose task modules record which pruned units survived (NAS-PET),
survivors-METHOD.png (the share of each layer's entries that survived, by tensor type)."""
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


def survivor_shares(cells: list[dict[str, Any]], method: str) -> dict[str, dict[str, float]]:
    """Share of entries surviving by tensor type and layer, averaged over the method's task modules (one per
    seed) recorded in the cells' `modules.task.extra.survivors`."""
    from compsft.training.nas_pet import survivors_by_layer

    seen: dict[str, dict] = {}
    for cell in cells:
        task = (cell.get("modules") or {}).get("task") or {}
        if cell.get("method") == method and (task.get("extra") or {}).get("survivors"):
            seen.setdefault(task.get("dir", ""), task["extra"]["survivors"])  # a module shared by targets once
    sums: dict[str, dict[str, list[float]]] = {}
    for survivors in seen.values():
        for kind, layers in survivors_by_layer(survivors).items():
            for layer, share in layers.items():
                acc = sums.setdefault(kind, {}).setdefault(layer, [0.0, 0])
                acc[0] += share
                acc[1] += 1
    return {kind: {layer: round(a / n, 4) for layer, (a, n) in layers.items()} for kind, layers in sums.items()}


def write_survivor_plot(path: Path, shares: dict[str, dict[str, float]], title: str) -> None:
    """A heat map: rows are tensor types (query.weight, output.dense.bias, ...), columns layer numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from compsft.atomic import atomic_path

    kinds = sorted(shares)
    layers = sorted({layer for rows in shares.values() for layer in rows}, key=lambda x: (not x.isdigit(), x.zfill(4)))
    grid = [[shares[k].get(layer, float("nan")) for layer in layers] for k in kinds]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(layers) + 3), max(2.5, 0.3 * len(kinds) + 1.2)))
    image = ax.imshow(grid, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(layers)), layers, fontsize=7)
    ax.set_yticks(range(len(kinds)), [k.replace(".*.", " ").split("encoder.layer ")[-1] for k in kinds], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="share of entries surviving")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
