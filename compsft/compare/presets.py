"""Presets of `compare`: the demo is one (three methods, one target, one seed, the CPU budget)."""
from __future__ import annotations

from .config import TASK_SOURCES, CompareConfig

DEMO_METHODS = ("lt-sft", "task-sft-only", "full-ft")
DEMO_SEED = 42


def demo_config(task: str = "pos", target: str | None = None, budget: str = "cpu", device: str | None = None,
                model: str | None = None, out: str = "compsft-demo", seed: int = DEMO_SEED,
                resume: bool = False) -> CompareConfig:
    """`compsft demo`: LT-SFT against the task SFT alone and full fine-tuning, on one target (Wolof for
    pos/dep, Hausa for ner by default), one seed, the `cpu` budget (`quick` and `paper` for --quick/--paper)."""
    default_target = TASK_SOURCES[task][2][0] if task in TASK_SOURCES else "wol"
    return CompareConfig(task=task, targets=[target or default_target], methods=list(DEMO_METHODS), seeds=[seed],
                         budget=budget, device=device, model=model, out=out, resume=resume)
