"""The outputs of a comparison: results.json (everything), results.csv (one row per cell), results.md (the
tables), all written atomically. `plot.py` draws plot.png from the same results."""
from __future__ import annotations

import csv
import io
import json
import os
import platform
from pathlib import Path
from typing import Any, Sequence

from .config import REFERENCE_METHOD, Grid
from .grid import relative_path
from .stats import paired_differences, summarise

VARIANTS = {"fixed": "fixed budget", "dev_selected": "selected on source dev"}


def machine_info(device: str) -> dict[str, Any]:
    """The machine a run used (load average at start: the CPU figures depend on it)."""
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": device}
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict[str, str]:
    import torch
    import transformers

    from compsft import __version__

    return {"compsft": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def build_results(grid: Grid, cells: Sequence[dict], methods: dict[str, dict], device: str,
                  run_seconds: float, setup_seconds: float = 0.0) -> dict[str, Any]:
    targets = [t.code for t in grid.targets]
    metric = grid.metric
    summary = {v: summarise(cells, grid.methods, targets, grid.seeds, metric, v) for v in VARIANTS}
    has_selected = any((c.get("metrics") or {}).get("dev_selected") for c in cells)
    if not has_selected:
        summary.pop("dev_selected")
    results: dict[str, Any] = {
        "compsft_compare": 1,
        "settings": {**grid.record(), "device": device, "module_cache": relative_path(grid.module_cache, grid.out),
                     "exclude": list(grid.exclude)},
        "metric": metric,
        "versions": versions(),
        "machine": machine_info(device),
        "methods": {m: {**methods[m], **_per_method(cells, m, methods[m])} for m in grid.methods},
        "cells": list(cells),
        "failed": [f"{c['method']} → {c['target']}, seed {c['seed']}: {c.get('error')}" for c in cells
                   if c.get("status") != "ok"],
        "summary": summary,
        "test_sentences": {c["target"]: c["test_sentences"] for c in cells if "test_sentences" in c},
        "times": {"run_seconds": round(run_seconds, 3), "setup_seconds": round(setup_seconds, 3),
                  "overhead_seconds_per_cell": _overhead(cells)},
    }
    if REFERENCE_METHOD in grid.methods and len(grid.methods) > 1:
        results["paired_differences"] = {
            "reference": REFERENCE_METHOD, "level": 0.95,
            "how": "d = score(method) - score(lt-sft) for each (target, seed) where both finished; "
                   "mean(d) ± t(0.975, n-1)·sd(d)/√n",
            **{v: paired_differences(cells, grid.methods, REFERENCE_METHOD, metric, v) for v in summary},
        }
    return results


def _per_method(cells: Sequence[dict], method: str, info: dict) -> dict[str, Any]:
    """The method's actual sizes (from its trained modules) and its mean training time per cell."""
    ok = [c for c in cells if c["method"] == method and c.get("status") == "ok"]
    counts = info.get("parameter_counts") or {}
    out: dict[str, Any] = {"trainable": counts.get("trainable"), "stored_bytes": counts.get("stored_bytes"),
                           "train_seconds": None}
    if ok:
        out["trainable"], out["stored_bytes"] = ok[0]["trainable"], ok[0]["stored_bytes"]
        out["train_seconds"] = round(sum(c["module_seconds"] for c in ok) / len(ok), 3)
    return out


def _overhead(cells: Sequence[dict]) -> dict[str, Any]:
    values = [c["times"]["overhead_seconds"] for c in cells if "times" in c]
    if not values:
        return {"mean": None, "max": None, "cells": 0}
    return {"mean": round(sum(values) / len(values), 4), "max": round(max(values), 4), "cells": len(values)}


# -- files -------------------------------------------------------------------------------------------
def write_outputs(out: Path, results: dict[str, Any]) -> None:
    from compsft.atomic import write_text

    from .plot import survivor_shares, write_plot, write_survivor_plot

    write_text(out / "results.json", json.dumps(results, indent=2, ensure_ascii=False, default=str) + "\n")
    write_text(out / "results.csv", results_csv(results))
    write_text(out / "results.md", results_markdown(results))
    write_plot(out / "plot.png", results)
    for method in results["methods"]:
        shares = survivor_shares(results["cells"], method)
        if shares:
            write_survivor_plot(out / f"survivors-{method}.png", shares,
                                f"{method}: surviving entries by tensor and layer (mean over seeds)")


CSV_COLUMNS = ["method", "target", "seed", "status", "metric", "score", "score_dev_selected", "trainable",
               "stored_bytes", "module_seconds", "train_seconds", "assemble_seconds", "evaluate_seconds",
               "overhead_seconds", "error"]


def results_csv(results: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    metric = results["metric"]
    for c in results["cells"]:
        metrics = c.get("metrics") or {}
        times = c.get("times") or {}
        writer.writerow({
            "method": c["method"], "target": c["target"], "seed": c["seed"], "status": c["status"], "metric": metric,
            "score": (metrics.get("fixed") or {}).get(metric, ""),
            "score_dev_selected": (metrics.get("dev_selected") or {}).get(metric, ""),
            "trainable": c.get("trainable", ""), "stored_bytes": c.get("stored_bytes", ""),
            "module_seconds": c.get("module_seconds", ""),
            **{k: times.get(k, "") for k in ("train_seconds", "assemble_seconds", "evaluate_seconds",
                                             "overhead_seconds")},
            "error": c.get("error", ""),
        })
    return buf.getvalue()


def fmt_score(s: dict | None) -> str:
    if not s or s.get("mean") is None:
        return "–"
    return f"{s['mean']:.4f}" + (f" ± {s['sd']:.4f}" if s.get("sd") is not None else "")


def fmt_int(n: int | None) -> str:
    return "–" if n is None else f"{n:,}"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def fmt_seconds(s: float | None) -> str:
    return "–" if s is None else f"{s:,.0f} s" if s >= 10 else f"{s:.1f} s"


def table_rows(results: dict[str, Any], variant: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table (shared by results.md and the CLI's rich table)."""
    targets = [t["code"] for t in results["settings"]["targets"]]
    header = ["method", "trainable params", "stored", "train time", *targets, "average"]
    rows = []
    for m, info in results["methods"].items():
        s = results["summary"][variant][m]
        rows.append([m, fmt_int(info.get("trainable")), fmt_bytes(info.get("stored_bytes")),
                     fmt_seconds(info.get("train_seconds")), *(fmt_score(s["targets"][t]) for t in targets),
                     fmt_score(s["average"])])
    return header, rows


def fmt_difference(d: dict) -> tuple[str, str]:
    """A paired difference (`stats.paired_interval`) as its mean and its interval, '–' where too few pairs."""
    mean = "–" if d["mean"] is None else f"{d['mean']:+.4f}"
    interval = "–" if d["low"] is None else f"[{d['low']:+.4f}, {d['high']:+.4f}]"
    return mean, interval


def difference_rows(results: dict[str, Any], variant: str) -> list[list[str]]:
    return [[m, *fmt_difference(d), str(d["n"])]
            for m, d in (results.get("paired_differences") or {}).get(variant, {}).items()]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def results_markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    metric = results["metric"]
    seeds = s["seeds"]
    parts = [f"# compsft compare: {s['task']}, {s['source']['code']} → "
             f"{', '.join(t['code'] for t in s['targets'])} zero-shot",
             "",
             f"Budget `{s['budget']['name']}`, {len(seeds)} seed(s) ({', '.join(map(str, seeds))}), model "
             f"`{s['model']}`, device {s['device']}. Scores: {metric} on each target's test set "
             f"({', '.join(f'{k}: {v} sentences' for k, v in results['test_sentences'].items()) or '–'}), "
             "mean ± sd over seeds; *average* is the mean over targets (± sd over seeds). *trainable params* and "
             "*stored* are what the target's model holds from the method's modules (task module + target "
             "language module); *train time* is the training time of every module a cell uses (shared modules "
             "count in each method that uses them)."]
    done, total = len(results["cells"]), results.get("cells_total", len(results["cells"]))
    if done < total:
        parts += ["", f"**Unfinished grid: {done} of {total} cells.** Means and intervals are over the cells "
                      "finished so far (results.csv has one row per finished cell); `--resume` continues it."]
    for variant in results["summary"]:
        parts += ["", f"## {VARIANTS[variant]}", "", _md_table(*table_rows(results, variant))]
        diffs = difference_rows(results, variant)
        if diffs:
            parts += ["", f"Paired differences against `{REFERENCE_METHOD}` ({VARIANTS[variant]}):", "",
                      _md_table(["method", f"mean Δ{metric}", "95% interval", "pairs"], diffs)]
    if "paired_differences" in results:
        parts += ["", "How the intervals are computed: for each (target, seed) where both cells finished, "
                      f"d = score(method) − score({REFERENCE_METHOD}); the interval is Student's t over those n "
                      "differences, mean(d) ± t(0.975, n − 1)·sd(d)/√n. Pairs of one target share its test set, "
                      "so it is an interval over this grid's seeds and targets, not over languages in general."]
    if "dev_selected" in results["summary"]:
        parts += ["", "Model selection uses source-language dev data only: the task module checked "
                      f"{s['budget']['dev_checks']} times in its last phase on "
                      + (f"{s['budget']['dev_sentences']} sentences spread over" if s['budget']['dev_sentences']
                         else "all sentences of") + f" `{s['source']['dev']}`; never target data."]
    o = results["times"]["overhead_seconds_per_cell"]
    if o["cells"]:
        parts += ["", f"Harness overhead per cell (time outside training, assembly and evaluation): mean "
                      f"{o['mean']:.3f} s, max {o['max']:.3f} s over {o['cells']} cells; reading the test sets and "
                      f"the tokenizer once per run: {results['times']['setup_seconds']:.1f} s."]
    if results["failed"]:
        parts += ["", "## Failed cells", "", *(f"- {f}" for f in results["failed"]),
                  "", "(tracebacks in results.json; `--resume` retries them)"]
    m = results["machine"]
    parts += ["", f"Machine: {m['platform']}, {m['cpu_count']} CPUs, torch {results['versions']['torch']}, "
                  f"transformers {results['versions']['transformers']}; this run {results['times']['run_seconds']:.0f} s."]
    return "\n".join(parts) + "\n"
