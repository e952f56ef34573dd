"""Does the language half pay off? The gain of `lt-sft` over `task-sft-only` against the MLM steps of the
language SFTs (issue 13's curve), with each language SFT's MLM loss on held-out lines of its text.

For every value of --lang-steps it runs `compsft compare` (POS, the given targets, methods lt-sft and
task-sft-only, the base budget with `lang_steps` set and `lang_dev_lines` held out), sharing one module
cache, and prints per point: the paired gain lt-sft − task-sft-only over targets × seeds with its 95%
t-interval, and per language the dev MLM loss before → after training beside the unigram entropy of
its training text (the loss of predicting token frequencies only). The task SFT is retrained at every
point, since it is trained with the source language SFT of that point applied (as the method does).

    python bench/language_gain.py --targets wol,mlt --lang-steps 40,200,1000 --seeds 3 --out runs/gain
    python bench/language_gain.py --budget quick --targets wol --lang-steps 2,4 --seeds 1 --out /tmp/gain

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="wol,mlt")
    ap.add_argument("--lang-steps", default="40,200,1000", help="MLM steps per phase, comma-separated")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget", default="cpu", help="the base budget (quick, cpu, paper)")
    ap.add_argument("--lang-lr", type=float, default=None, help="language learning rate (default: the budget's)")
    ap.add_argument("--dev-lines", type=int, default=200, help="held-out lines per language for the MLM loss")
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default="runs/gain")
    ap.add_argument("--resume", action="store_true", help="continue the points already in --out")
    a = ap.parse_args()

    from compsft.compare import CompareConfig, NullReporter, compare, get_budget

    base = get_budget(a.budget)
    points = []
    for steps in [int(s) for s in a.lang_steps.split(",")]:
        budget = dataclasses.replace(base, lang_steps=steps, lang_dev_lines=a.dev_lines,
                                     lang_lr=a.lang_lr if a.lang_lr is not None else base.lang_lr)
        started = time.perf_counter()
        out = os.path.join(a.out, f"steps{steps}")
        results = compare(CompareConfig(task="pos", targets=a.targets.split(","), methods=["lt-sft", "task-sft-only"],
                                        seeds=a.seeds, budget=budget, model=a.model, out=out, resume=a.resume,
                                        module_cache=os.path.join(a.out, "modules")), NullReporter())
        gain = results["paired_differences"]["fixed"]["task-sft-only"]  # task-sft-only − lt-sft
        points.append({"lang_steps": steps, "lang_lr": budget.lang_lr, "n": gain["n"],
                       "gain": -gain["mean"] if gain["mean"] is not None else None,
                       "interval": [-gain["high"], -gain["low"]] if gain["low"] is not None else None,
                       "scores": {m: results["summary"]["fixed"][m]["average"]["mean"]
                                  for m in ("lt-sft", "task-sft-only")},
                       "dev_mlm": dev_losses(results), "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(points[-1]), flush=True)

    lines = [f"# lt-sft − task-sft-only vs language MLM steps (POS, {a.targets}, budget {a.budget}, "
             f"{a.seeds} seed(s))", "",
             "| MLM steps per phase | lr | gain (accuracy) | 95% interval | pairs | lt-sft | task-sft-only | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for p in points:
        ci = f"[{p['interval'][0]:+.4f}, {p['interval'][1]:+.4f}]" if p["interval"] else "–"
        lines.append(f"| {p['lang_steps']} | {p['lang_lr']:g} | {p['gain']:+.4f} | {ci} | {p['n']} | "
                     f"{p['scores']['lt-sft']:.4f} | {p['scores']['task-sft-only']:.4f} | {p['seconds']:.0f} |")
    lines += ["", "Dev MLM loss on held-out lines (nats): before → after, and the unigram entropy of the training "
                  "text (a frequency-only predictor's loss).", "",
              "| MLM steps | language | before | after | unigram entropy |", "|---|---|---|---|---|"]
    for p in points:
        for lang, d in sorted(p["dev_mlm"].items()):
            lines.append(f"| {p['lang_steps']} | {lang} | {d['loss_before']:.3f} | {d['loss_after']:.3f} | "
                         f"{d['unigram_entropy']:.3f} |")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "gain.json"), "w", encoding="utf-8") as f:
        json.dump(points, f, indent=2)
    with open(os.path.join(a.out, "gain.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
