"""`compsft train-full`: full fine-tuning of the whole model on a task (the baseline of the comparison)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .train import Bf16, Cpu, Fp16, GradAccum, LoggingSteps, Resume, SaveSteps, Seed, WeightDecay, WorkDir, _precision


def register(app: typer.Typer) -> None:
    @app.command("train-full")
    def train_full(
        task: str = typer.Option(..., "--task", help="Task: pos, dep or ner."),
        model: Path = typer.Option(..., "--model", help="Model directory (the pretrained encoder)."),
        train: str = typer.Option(..., "--train", help="Training file (CoNLL-U, NER columns; .gz ok) or a shipped "
                                                       "data name such as ud:en_ewt:train."),
        out: Path = typer.Option(..., "--out", help="Directory to write the fine-tuned model to."),
        dev: Optional[str] = typer.Option(None, "--dev", help="Development file: scored after training, or "
                                                              "--dev-checks times during it."),
        steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Optimizer steps (default: by --epochs)."),
        epochs: Optional[float] = typer.Option(None, "--epochs", min=0.0,
                                               help="Epochs (default 13: the task SFT's 3 + 10, same examples)."),
        lr: float = typer.Option(5e-5, "--lr", help="Learning rate."),
        batch_size: int = typer.Option(8, "--batch-size", min=1, help="Sentences per device per step."),
        grad_accum: GradAccum = 1,
        max_length: Optional[int] = typer.Option(None, "--max-length", min=8, help="Sub-words per window."),
        max_sentences: Optional[int] = typer.Option(None, "--max-sentences", min=1,
                                                    help="Use only the first N training sentences."),
        dev_checks: int = typer.Option(0, "--dev-checks", min=0,
                                       help="Score --dev this many times during training and also save the best "
                                            "model by dev score into OUT/dev-selected."),
        dev_max_sentences: Optional[int] = typer.Option(None, "--dev-max-sentences", min=1,
                                                        help="Score only N dev sentences, spread evenly over --dev."),
        seed: Seed = 42,
        save_steps: SaveSteps = 500,
        logging_steps: LoggingSteps = 50,
        weight_decay: WeightDecay = 0.0,
        work_dir: WorkDir = None,
        resume: Resume = False,
        cpu: Cpu = False,
        bf16: Bf16 = False,
        fp16: Fp16 = False,
    ) -> None:
        """Fine-tune every parameter of a task model (the full fine-tuning baseline).

        Example: compsft train-full --task pos --model M --train ud:en_ewt:train --dev ud:en_ewt:dev --steps 320 --out models/pos-full
        """
        from compsft.errors import CompsftError
        from compsft.training.full_ft import train_full_ft

        if epochs is not None and epochs <= 0:
            raise CompsftError(f"--epochs must be > 0, got {epochs}")
        result = train_full_ft(
            task, model, train, out, dev=dev, steps=steps, epochs=epochs, lr=lr, batch_size=batch_size,
            grad_accum=grad_accum, max_length=max_length, max_sentences=max_sentences, dev_checks=dev_checks,
            dev_max_sentences=dev_max_sentences, seed=seed, save_steps=save_steps, logging_steps=logging_steps,
            weight_decay=weight_decay, work_dir=work_dir, resume=resume, cpu=cpu,
            precision=_precision(bf16, fp16, cpu),
        )
        info = result.info
        line = (f"{out}: {info['steps']} steps, {info['trainable']:,} trainable parameters, "
                f"loss {info['train_loss']}, {info['seconds']} s")
        if "dev" in info:
            line += "; dev " + ", ".join(f"{k}={v:.4f}" for k, v in info["dev"]["metrics"].items()
                                         if isinstance(v, float))
        if "dev_selected" in info:
            sel = info["dev_selected"]
            line += f"; best by dev: step {sel['step']} ({sel['metric']} {sel['score']:.4f}) in {out / 'dev-selected'}"
        typer.echo(line, err=True)
