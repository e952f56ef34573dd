"""Which encoder layers of a target language SFT help the task transfer? (issue 13)

For every `lt-sft` cell of a finished `compsft compare` grid, composes θ0 + the entries of the target
language SFT that lie on the given encoder layers + the cell's task SFT, and scores it as the harness
does: the same task, the same first N test sentences. With `--dev CODE=FILE` a target is scored on that
file instead (its first N sentences): the split to choose layers on, so that the test set only reports.
`none` (no language SFT: task-sft-only) and `all` (the whole SFT: lt-sft) are always scored beside the
ranges, and `random-P` keeps a random share P of every tensor's entries (a control of the same size as a
layer range: is it the layers, or only less of the SFT?); `scale-S` composes every entry times S (is the
whole SFT only too strong?); `embeddings` keeps the entries of the embedding matrices alone, which no layer
range contains, and `A-B+embeddings` a layer range with them (is it the layers or the word embeddings?).

    python experiments/language_sft_layers.py --grid runs/pos5 --layers 6-11 --out runs/pos5-layers.json
    python experiments/language_sft_layers.py --grid runs/gain150-3seeds/steps150 --layers scale-0.75 \
        --baseline task-sft-no-source --out runs/scale150-test.json
    python experiments/language_sft_layers.py --grid runs/gain/steps40 --layers 6-11,3-11,random-0.57 \\
        --dev wol=UD_Wolof-WTB/wo_wtb-ud-dev.conllu --dev mlt=UD_Maltese-MUDT/mt_mudt-ud-dev.conllu \\
        --out runs/layers-dev.json

Writes OUT (JSON: every score) and OUT with .md (per variant: the mean over cells and the paired
differences against `none` and `all`, each with a 95% t-interval over targets × seeds).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _number_after(text: str, prefix: str, high: float, what: str) -> float:
    """The number in `prefix`N, strictly between 0 and `high`."""
    try:
        value = float(text[len(prefix):])
    except ValueError:
        value = -1.0
    if not 0 < value < high:
        raise ValueError(f"{text!r}: the {what} must be between 0 and {high:g}")
    return value


def parse_variant(text: str) -> tuple[str, object]:
    """'A-B' (encoder layers A..B), 'A-B+embeddings' (those and the embeddings), 'embeddings', 'random-P' (a
    random share P of the entries), 'scale-S' (every entry times S), 'all' or 'none'."""
    if text in ("all", "none", "embeddings"):
        return text, text
    if text.endswith("+embeddings"):
        m = re.fullmatch(r"(\d+-\d+)\+embeddings", text)
        if not m:
            raise ValueError(f"{text!r}: only a layer range A-B takes +embeddings")
        name, (low, high) = parse_variant(m.group(1))
        return f"{name}+embeddings", (low, high, "embeddings")
    if text.startswith("scale-"):
        return text, ("scale", _number_after(text, "scale-", 10, "scale"))
    if text.startswith("random-"):
        return text, _number_after(text, "random-", 1, "share")
    m = re.fullmatch(r"(\d+)-(\d+)", text)
    if not m or int(m.group(1)) > int(m.group(2)):
        raise ValueError(f"{text!r}: expected A-B (encoder layers, inclusive), random-P, scale-S, all or none")
    return f"layers{text}", (int(m.group(1)), int(m.group(2)))


def part_of(sft, rule, generator):
    """The SFT restricted by `rule` (sparse entries only: the MLM head never reaches a task model)."""
    import torch

    from compsft.sft import SparseDelta, SparseFineTuning
    from compsft.training.params import encoder_layer

    if rule == "all":
        return sft.restricted(lambda n: True)
    if isinstance(rule, tuple) and rule[0] == "scale":
        return sft.restricted(lambda n: True).scaled(rule[1])
    if rule == "embeddings":
        return sft.restricted(_in_embeddings)
    if isinstance(rule, float):
        diffs = {}
        for name, d in sft.diffs.items():
            keep = torch.rand(d.nnz, generator=generator) < rule
            diffs[name] = SparseDelta(d.shape, d.indices[keep].clone(), d.values[keep].clone())
        return SparseFineTuning(diffs, {}, dataclasses.replace(sft.config))
    low, high, *embeddings = rule
    return sft.restricted(lambda n: (layer := encoder_layer(n)) is not None and low <= layer <= high
                          or bool(embeddings) and _in_embeddings(n))


def _in_embeddings(name: str) -> bool:
    return ".embeddings." in name


def other_cell(grid_dir: Path, method: str, cell: dict) -> dict | None:
    path = grid_dir / "cells" / method / cell["target"] / f"seed{cell['seed']}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def recorded_score(grid_dir: Path, cell: dict, variant: str, metric: str, baseline: str | None = None) -> float | None:
    """The grid's own score of `none` (its task-sft-only cell), `all` (the lt-sft cell) or the baseline."""
    if variant == "all":
        return float(cell["metrics"]["fixed"][metric])
    other = other_cell(grid_dir, "task-sft-only", cell) if variant == "none" else \
        other_cell(grid_dir, variant, cell) if variant == baseline else None
    return float(other["metrics"]["fixed"][metric]) if other else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=Path, required=True, help="a compare output directory with lt-sft cells")
    ap.add_argument("--layers", default="6-11",
                    help="comma-separated: A-B, A-B+embeddings, embeddings, random-P, scale-S (default 6-11)")
    ap.add_argument("--dev", action="append", default=[], metavar="CODE=FILE",
                    help="score this target on FILE instead of its test set (repeatable)")
    ap.add_argument("--targets", default=None, help="only these targets (comma-separated)")
    ap.add_argument("--baseline", default=None, metavar="METHOD",
                    help="also score the task module of METHOD's cell alone (e.g. task-sft-no-source: the task "
                         "SFT trained on θ0), and give every variant's difference from it")
    ap.add_argument("--random-seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from compsft.compare.budgets import Budget
    from compsft.compare.config import PRIMARY_METRIC
    from compsft.compare.grid import recorded_path
    from compsft.compare.stats import paired_interval
    from compsft.merge import apply
    from compsft.methods.base import MethodContext
    from compsft.methods.common import sft_labels, task_model
    from compsft.serialization import load_sft
    from compsft.tasks import get_task, resolve_data

    try:
        variants = [("none", "none"), ("all", "all")] + [parse_variant(v) for v in a.layers.split(",") if v]
        if a.baseline:
            variants.append((a.baseline, "baseline"))
    except ValueError as err:
        ap.error(f"--layers: {err}")
    dev = {}
    for item in a.dev:
        code, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            ap.error(f"--dev {item!r}: expected CODE=FILE with an existing file")
        dev[code] = path
    grid = json.loads((a.grid / "grid.json").read_text())
    task = get_task(grid["task"])
    metric = PRIMARY_METRIC[grid["task"]]
    n_sentences = grid["budget"].get("eval_sentences")
    model_dir = Path(grid["model"])
    ctx = MethodContext(model_dir=model_dir, budget=Budget(**{k: v for k, v in grid["budget"].items() if k != "name"}))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tests = {t["code"]: t["test"] for t in grid["targets"]}
    wanted = set(a.targets.split(",")) if a.targets else set(tests)
    generator = torch.Generator().manual_seed(a.random_seed)

    records = []
    for cell_file in sorted((a.grid / "cells" / "lt-sft").glob("*/seed*.json")):
        cell = json.loads(cell_file.read_text())
        code = cell["target"]
        if cell.get("status") != "ok" or code not in wanted:
            continue
        modules = cell["modules"]
        task_dir = recorded_path(modules["task"]["dir"], a.grid) / "module"
        task_sft = load_sft(task_dir)
        lang_sft = load_sft(recorded_path(modules["target_language"]["dir"], a.grid) / "module")
        labels = sft_labels(task_sft, task_dir)
        baseline_sft = None
        if a.baseline:
            other = other_cell(a.grid, a.baseline, cell)
            if other is None or other.get("status") != "ok":
                sys.exit(f"{a.grid}: no finished {a.baseline} cell for {code}, seed {cell['seed']}")
            baseline_sft = load_sft(recorded_path(other["modules"]["task"]["dir"], a.grid) / "module")
        sentences = task.read(dev[code] if code in dev else resolve_data(tests[code]))
        gold = task.prepare_gold(sentences[:n_sentences] if n_sentences else sentences, labels)
        for name, rule in variants:
            started = time.perf_counter()
            model = task_model(ctx, grid["task"], labels)
            if rule in ("none", "baseline"):
                apply(model, task_sft if rule == "none" else baseline_sft, with_dense=[True])
                kept = 0
            else:
                part = part_of(lang_sft, rule, generator)
                apply(model, part, task_sft, with_dense=[False, True])
                kept = part.k
            metrics = task.evaluate(model, tokenizer, gold, labels, batch_size=32)[0]
            record = {"target": code, "seed": cell["seed"], "variant": name, "split": "dev" if code in dev else "test",
                      "entries": kept, "metric": metric, "score": float(metrics[metric]),
                      "seconds": round(time.perf_counter() - started, 1)}
            recorded = recorded_score(a.grid, cell, name, metric, a.baseline) if record["split"] == "test" else None
            if recorded is not None:
                # The harness scored this very composition: the two must agree, or this script measures
                # something else than the grid did.
                record["recorded"] = recorded
            print(json.dumps(record), flush=True)
            records.append(record)

    mismatched = [r for r in records if "recorded" in r and abs(r["recorded"] - r["score"]) > 1e-9]
    score = {(r["target"], r["seed"], r["variant"]): r["score"] for r in records}
    pairs = sorted({(r["target"], r["seed"]) for r in records})
    lines = [f"# Parts of the target language SFTs: {a.grid} ({grid['task']}, "
             f"{'dev files for ' + ', '.join(sorted(dev)) + '; ' if dev else ''}test otherwise)", "",
             "| variant | mean score | − none (task-sft-only) | 95% interval | − all (lt-sft) | 95% interval | "
             + (f"− {a.baseline} | 95% interval | " if a.baseline else "") + "pairs |",
             "|---|---|---|---|---|---|" + ("---|---|" if a.baseline else "") + "---|"]
    summary = {}
    for name, _ in variants:
        mine = [score[p + (name,)] for p in pairs]
        vs_none = paired_interval(score[p + (name,)] - score[p + ("none",)] for p in pairs)
        vs_all = paired_interval(score[p + (name,)] - score[p + ("all",)] for p in pairs)
        summary[name] = {"mean": sum(mine) / len(mine), "vs_none": vs_none, "vs_all": vs_all}
        if a.baseline:
            summary[name]["vs_baseline"] = paired_interval(score[p + (name,)] - score[p + (a.baseline,)] for p in pairs)

        def fmt(iv):
            if iv["low"] is None:
                return f"{iv['mean']:+.4f}", "—"
            return f"{iv['mean']:+.4f}", f"[{iv['low']:+.4f}, {iv['high']:+.4f}]"
        vs_base = f"{' | '.join(fmt(summary[name]['vs_baseline']))} | " if a.baseline else ""
        lines.append(f"| {name} | {summary[name]['mean']:.4f} | {' | '.join(fmt(vs_none))} | "
                     f"{' | '.join(fmt(vs_all))} | {vs_base}{len(pairs)} |")
    checked = sum("recorded" in r for r in records)
    if checked:
        lines += ["", f"Reproduced the grid's own scores of these compositions: {checked - len(mismatched)} of {checked}."]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"grid": str(a.grid), "dev": dev, "records": records, "summary": summary}, indent=1))
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
