"""Does the language half pay off? The gain of `lt-sft` over `task-sft-only` against the MLM steps of the
language SFTs (issue 13's curve), with each language SFT's MLM loss on held-out lines of its text.

For every value of --lang-steps it runs `compsft compare` (--task, POS by default; the given targets; lt-sft,
task-sft-only and any other --methods; the base budget for that task with `lang_steps` set and
`lang_dev_lines` held out), sharing one module cache, and prints per point: the paired gain lt-sft −
task-sft-only over targets × seeds with its 95% t-interval, and per language the dev MLM loss before → after
training beside the unigram entropy of its training text (the loss of predicting token frequencies only). The
task SFT is retrained at every point, since it is trained with the source language SFT of that point applied
(as the method does).

    python experiments/language_gain.py --targets wol,mlt --lang-steps 40,200,1000 --seeds 3 --out runs/gain
    python experiments/language_gain.py --budget quick --targets wol --lang-steps 2,4 --seeds 1 --dev-lines 20 \\
        --out /tmp/gain
    python experiments/language_gain.py --targets wol,mlt,glv,myv,uig --lang-steps 40 --lang-lr 1e-3 \\
        --seed-list 42,43 --methods lt-sft,lt-sft-upper,task-sft-only,full-ft --module-cache runs/gain5-modules \\
        --out runs/gain5-s42-43

--seed-list picks seeds, so that seeds can train side by side in two processes (other --out, one
--module-cache: their modules differ); a last run with every seed and that cache joins them, evaluating only.
Every method beside task-sft-only gets its paired difference against task-sft-only.

Writes OUT/gain.json and OUT/gain.md; each point's full comparison is in OUT/steps<N>/.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def dev_losses(results: dict) -> dict[str, dict]:
    """Each language module's `dev_mlm` record (source and targets), from the lt-sft cells."""
    out = {}
    for cell in results["cells"]:
        if cell.get("method") != "lt-sft" or cell.get("status") != "ok":
            continue
        for role in ("source_language", "target_language"):
            module = (cell.get("modules") or {}).get(role) or {}
            dev = (module.get("extra") or {}).get("dev_mlm")
            code = cell["target"] if role == "target_language" else results["settings"]["source"]["code"]
            if dev:
                out.setdefault(f"{code} seed {cell['seed']}", dev)
    return out


def _plain(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def report_lines(points: list[dict], methods: list[str], what: str) -> list[str]:
    """gain.md: the gain of lt-sft per point, the other methods against task-sft-only, the dev MLM losses.
    Scores and intervals of cells that failed or have too few pairs are shown as '–'."""
    from compsft.compare.report import fmt_difference

    lines = [f"# lt-sft − task-sft-only vs language MLM steps ({what})", "",
             "| MLM steps per phase | lr | gain | 95% interval | pairs | lt-sft | task-sft-only | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for p in points:
        gain, ci = fmt_difference(p["gains_over_task_sft_only"]["lt-sft"])
        lines.append(f"| {p['lang_steps']} | {p['lang_lr']:g} | {gain} | {ci} | {p['n']} | "
                     f"{_plain(p['scores']['lt-sft'])} | {_plain(p['scores']['task-sft-only'])} | {p['seconds']:.0f} |")
    others = [m for m in methods if m not in ("lt-sft", "task-sft-only")]
    if others:
        lines += ["", "Other methods: average and paired difference against task-sft-only (95% t-interval).", "",
                  "| MLM steps per phase | method | average | − task-sft-only | 95% interval | pairs |",
                  "|---|---|---|---|---|---|"]
        for p in points:
            for m in others:
                g = p["gains_over_task_sft_only"][m]
                lines.append(f"| {p['lang_steps']} | {m} | {_plain(p['scores'][m])} | "
                             f"{' | '.join(fmt_difference(g))} | {g['n']} |")
    lines += ["", "Dev MLM loss on held-out lines (nats): before → after, and the unigram entropy of the training "
                  "text (a frequency-only predictor's loss).", "",
              "| MLM steps | language | before | after | unigram entropy |", "|---|---|---|---|---|"]
    for p in points:
        for lang, d in sorted(p["dev_mlm"].items()):
            lines.append(f"| {p['lang_steps']} | {lang} | {d['loss_before']:.3f} | {d['loss_after']:.3f} | "
                         f"{d['unigram_entropy']:.3f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="pos", help="pos, dep or ner")
    ap.add_argument("--targets", default="wol,mlt")
    ap.add_argument("--lang-steps", default="40,200,1000", help="MLM steps per phase, comma-separated")
    ap.add_argument("--seeds", type=int, default=3, help="how many seeds (42, 43, ...)")
    ap.add_argument("--seed-list", default=None, help="these seeds instead, comma-separated (e.g. 44)")
    ap.add_argument("--methods", default="lt-sft,task-sft-only",
                    help="must include lt-sft and task-sft-only; the others get their gain over task-sft-only too")
    ap.add_argument("--budget", default="cpu", help="the base budget (quick, cpu, paper)")
    ap.add_argument("--lang-lr", type=float, default=None, help="language learning rate (default: the budget's)")
    ap.add_argument("--dev-lines", type=int, default=200, help="held-out lines per language for the MLM loss")
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default="runs/gain")
    ap.add_argument("--module-cache", default=None, help="where modules are cached (default: OUT/modules)")
    ap.add_argument("--resume", action="store_true", help="continue the points already in --out")
    a = ap.parse_args()

    from compsft.compare import CompareConfig, NullReporter, compare, get_budget
    from compsft.compare.stats import paired_differences

    seeds = [int(s) for s in a.seed_list.split(",")] if a.seed_list else a.seeds
    methods = a.methods.split(",")
    if not {"lt-sft", "task-sft-only"} <= set(methods):
        ap.error("--methods must include lt-sft and task-sft-only")

    base = get_budget(a.budget, a.task)
    points = []
    for steps in [int(s) for s in a.lang_steps.split(",")]:
        budget = dataclasses.replace(base, lang_steps=steps, lang_dev_lines=a.dev_lines,
                                     lang_lr=a.lang_lr if a.lang_lr is not None else base.lang_lr)
        started = time.perf_counter()
        out = os.path.join(a.out, f"steps{steps}")
        results = compare(CompareConfig(task=a.task, targets=a.targets.split(","), methods=methods,
                                        seeds=seeds, budget=budget, model=a.model, out=out, resume=a.resume,
                                        module_cache=a.module_cache or os.path.join(a.out, "modules")), NullReporter())
        gains = paired_differences(results["cells"], methods, "task-sft-only", results["metric"])
        gain = gains["lt-sft"]
        points.append({"lang_steps": steps, "lang_lr": budget.lang_lr, "n": gain["n"], "gain": gain["mean"],
                       "interval": [gain["low"], gain["high"]] if gain["low"] is not None else None,
                       "gains_over_task_sft_only": gains,
                       "scores": {m: results["summary"]["fixed"][m]["average"]["mean"] for m in methods},
                       "dev_mlm": dev_losses(results), "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(points[-1]), flush=True)

    seeds_said = f"seeds {a.seed_list}" if a.seed_list else f"{a.seeds} seed(s)"
    lines = report_lines(points, methods, f"{a.task}, {a.targets}, budget {a.budget}, {seeds_said}")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "gain.json"), "w", encoding="utf-8") as f:
        json.dump(points, f, indent=2)
    with open(os.path.join(a.out, "gain.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
