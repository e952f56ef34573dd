"""`compsft demo`: `compsft compare` with a preset (lt-sft, task-sft-only, full-ft; one target; one seed;
the CPU budget). It has no training code of its own: the methods train (`compsft.methods`)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .compare import Device, ModelDir, ResumeOpt, Task


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        task: Task = "pos",
        target: Annotated[Optional[str], typer.Option(
            "--target", help="Target language (default: wol for pos/dep, hau for ner), or your own: "
                             "CODE=TEST_FILE:TEXT_FILE.")] = None,
        quick: Annotated[bool, typer.Option("--quick", help="A smoke run of about a minute (the quick budget).")]
        = False,
        paper: Annotated[bool, typer.Option("--paper", help="The paper's budgets: for a GPU.")] = False,
        device: Device = None,
        model: ModelDir = None,
        out: Annotated[Path, typer.Option("--out", help="Output directory (results, plot, modules).")]
        = Path("compsft-demo"),
        resume: ResumeOpt = False,
        seed: Annotated[int, typer.Option("--seed", help="Seed of every module.")] = 42,
    ) -> None:
        """Run LT-SFT end to end on the shipped data next to the task SFT alone and full fine-tuning:
        language SFTs, task SFT, composition, zero-shot evaluation (`compsft compare` with a preset)."""
        from compsft.compare import compare
        from compsft.compare.presets import demo_config
        from compsft.errors import CompsftError

        from .compare import print_results, rich_progress

        if quick and paper:
            raise CompsftError("--quick and --paper exclude each other")
        budget = "quick" if quick else "paper" if paper else "cpu"
        config = demo_config(task=task, target=target, budget=budget, device=device.value if device else None,
                             model=str(model) if model else None, out=str(out), seed=seed, resume=resume)
        with rich_progress() as reporter:
            results = compare(config, reporter)
        print_results(results, out, f"compsft demo: {task}")
