"""experiments/language_gain.py's report (issue 13): every method's gain over task-sft-only is shown, and a
point whose cells failed is written as '–' instead of stopping the bench after hours of training."""
from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("language_gain", REPO / "experiments" / "language_gain.py")
gain = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gain)

METHODS = ["lt-sft", "lt-sft-upper", "task-sft-only", "full-ft"]


def _point(scores: dict, gains: dict) -> dict:
    lt = gains["lt-sft"]
    return {"lang_steps": 40, "lang_lr": 1e-3, "n": lt["n"], "gain": lt["mean"],
            "interval": [lt["low"], lt["high"]] if lt["low"] is not None else None,
            "gains_over_task_sft_only": gains, "scores": scores, "seconds": 12.0,
            "dev_mlm": {"wol seed 42": {"loss_before": 7.9, "loss_after": 6.45, "unigram_entropy": 6.09}}}


def test_report_has_every_method_against_task_sft_only():
    g = {"lt-sft": {"mean": 0.01, "low": -0.02, "high": 0.04, "n": 15},
         "lt-sft-upper": {"mean": 0.025, "low": 0.005, "high": 0.045, "n": 15},
         "full-ft": {"mean": 0.03, "low": 0.01, "high": 0.05, "n": 15}}
    lines = gain.report_lines([_point({"lt-sft": 0.56, "lt-sft-upper": 0.575, "task-sft-only": 0.55,
                                       "full-ft": 0.58}, g)], METHODS, "pos, wol, budget cpu, 3 seed(s)")
    text = "\n".join(lines)
    assert "| 40 | 0.001 | +0.0100 | [-0.0200, +0.0400] | 15 | 0.5600 | 0.5500 | 12 |" in text
    assert "| 40 | lt-sft-upper | 0.5750 | +0.0250 | [+0.0050, +0.0450] | 15 |" in text
    assert "| 40 | full-ft | 0.5800 | +0.0300 | [+0.0100, +0.0500] | 15 |" in text
    assert "| 40 | wol seed 42 | 7.900 | 6.450 | 6.090 |" in text
    others = text.split("Other methods")[1].split("Dev MLM")[0]
    assert "| 40 | task-sft-only |" not in others and "| 40 | lt-sft |" not in others


def test_report_of_failed_cells_says_so_instead_of_raising():
    none = {"mean": None, "low": None, "high": None, "n": 0}
    lines = gain.report_lines([_point({m: None for m in METHODS}, {m: none for m in METHODS if m != "task-sft-only"})],
                              METHODS, "pos, wol, budget quick, seeds 42")
    text = "\n".join(lines)
    assert "| 40 | 0.001 | – | – | 0 | – | – | 12 |" in text
    assert "| 40 | full-ft | – | – | – | 0 |" in text
