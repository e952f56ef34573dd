"""`compsft train-language` and `compsft train-task`: LT-SFT training from the command line.

Both run under `torchrun` too (one process per device; gloo on CPU): every rank selects the same
mask, only rank 0 writes the SFT. `--resume` continues an interrupted run from its work directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer


def _report(tuner, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    if not tuner.is_world_process_zero():
        return
    s = tuner.summary()
    console = Console(stderr=True)
    table = Table(title=f"SFT written to {out}", show_lines=False)
    table.add_column("layer type")
    table.add_column("selected", justify="right")
    table.add_column("of", justify="right")
    table.add_column("density", justify="right")
    for name, row in s["by_layer_type"].items():
        table.add_row(name, f"{row['selected']:,}", f"{row['total']:,}", f"{100 * row['density']:.3f}%")
    phases = s["phases"]
    parts = [f"{p}: {phases[p]['seconds']} s" + (f" ({phases[p]['steps']} steps, loss {phases[p]['train_loss']})"
                                                  if "steps" in phases[p] else "")
             for p in ("phase1", "selection", "phase2") if p in phases]
    table.caption = (f"K = {s['k']:,} of {s['num_eligible']:,} ({100 * s['density']:.3f}%), "
                     f"mask {s['mask_strategy']}; " + "; ".join(parts))
    console.print(table)
    fallback = (tuner.sft.config.training or {}).get("vocabulary_fallback") if tuner.sft else None
    if fallback and fallback["rate"] > fallback["threshold"]:
        console.print(f"[bold yellow]warning[/]: {100 * fallback['rate']:.0f}% of the words of the MLM text fell back "
                      f"to single characters in this model's vocabulary (see the warning above): use "
                      f"`compsft prepare-model --full`, or `compsft trim-vocab` with this text.")
    dev = (tuner.sft.config.training or {}).get("dev_mlm") if tuner.sft else None
    if dev and "loss_after" in dev:
        console.print(f"dev MLM loss on {dev['lines']} held-out lines: {dev['loss_before']:.3f} before, "
                      f"{dev['loss_after']:.3f} after (unigram entropy of the training text: "
                      f"{dev['unigram_entropy']:.3f} nats)")


# Options both commands take, defined once.
Density = Annotated[Optional[float], typer.Option("--density", help="K as a fraction of the eligible parameters.")]
MaskStrategy = Annotated[str, typer.Option("--mask-strategy",
                                           help="lottery-ticket, random, magnitude or prune-difference.")]
GradAccum = Annotated[int, typer.Option("--grad-accum", min=1, help="Gradient accumulation steps.")]
Seed = Annotated[int, typer.Option("--seed")]
SaveSteps = Annotated[int, typer.Option("--save-steps", min=0, help="Checkpoint every N steps (0: never).")]
LoggingSteps = Annotated[int, typer.Option("--logging-steps", min=1)]
WeightDecay = Annotated[float, typer.Option("--weight-decay")]
WorkDir = Annotated[Optional[Path], typer.Option("--work-dir", help="Checkpoints (default: OUT.work).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its work directory.")]
Cpu = Annotated[bool, typer.Option("--cpu", help="Train on the CPU even if a GPU is there.")]
Bf16 = Annotated[bool, typer.Option("--bf16", help="bf16 autocast over fp32 master weights (CPU, or an Ampere+ GPU).")]
Fp16 = Annotated[bool, typer.Option("--fp16", help="fp16 autocast with a gradient scaler (CUDA only).")]
SaveDtype = Annotated[Optional[str], typer.Option("--save-dtype", help="dtype of the saved SFT values: fp32 "
                                                                       "(default), bf16 or fp16.")]


def _precision(bf16: bool, fp16: bool, cpu: bool, save_dtype: Optional[str] = None) -> str:
    """The run's precision from the flags, checked (for the device it will run on) before any data or
    model is loaded."""
    import torch

    from compsft.training.precision import check_precision, resolve_precision, save_dtype as check_save_dtype

    check_save_dtype(save_dtype)
    device = "cpu" if cpu or not torch.cuda.is_available() else "cuda"
    return check_precision(resolve_precision(bf16=bf16, fp16=fp16), device)


def register(app: typer.Typer) -> None:
    common_phase = dict(min=0)

    @app.command("train-language")
    def train_language(
        model: Path = typer.Option(..., "--model", help="Model directory (a transformers encoder, MLM head optional)."),
        lang: str = typer.Option(..., "--lang", help="Language code (ISO 639-3, e.g. fao). Catalogue languages "
                                                     "(`compsft languages`) have shipped text; any other needs --text."),
        out: Path = typer.Option(..., "--out", help="Directory to write the language SFT to."),
        text: List[Path] = typer.Option([], "--text", help="MLM text: plain-text or CoNLL-U files or directories, "
                                                           "repeatable (default: the text shipped for --lang; "
                                                           "required for a language outside the catalogue)."),
        exclude: List[Path] = typer.Option([], "--exclude", help="Evaluation files whose sentences must not be "
                                                                 "trained on (the shipped dev/test sets of --lang are always excluded)."),
        k: Optional[int] = typer.Option(None, "--k", min=1, help="Entries the SFT may change (default: the paper's "
                                                                 "(L + 1)·h² for L layers of width h; 7,667,712 for mBERT)."),
        density: Density = None,
        mask_strategy: MaskStrategy = "lottery-ticket",
        full_ft_max_epochs: Optional[float] = typer.Option(100.0, "--phase1-epochs", help="Phase 1 epochs (before min/max)."),
        full_ft_min_steps: Optional[int] = typer.Option(10_000, "--phase1-min-steps", **common_phase),
        full_ft_max_steps: Optional[int] = typer.Option(100_000, "--phase1-max-steps", **common_phase),
        sparse_ft_max_epochs: Optional[float] = typer.Option(100.0, "--phase2-epochs", help="Phase 2 epochs (before min/max)."),
        sparse_ft_min_steps: Optional[int] = typer.Option(10_000, "--phase2-min-steps", **common_phase),
        sparse_ft_max_steps: Optional[int] = typer.Option(100_000, "--phase2-max-steps", **common_phase),
        l1: float = typer.Option(0.1, "--l1", help="L1 pull toward θ0 in both phases (the paper's 0.1)."),
        lr: float = typer.Option(5e-5, "--lr", help="Learning rate (both phases)."),
        batch_size: int = typer.Option(8, "--batch-size", min=1, help="Sequences per device per step."),
        grad_accum: GradAccum = 1,
        max_length: int = typer.Option(256, "--max-length", min=8, help="Tokens per sequence."),
        mlm_probability: float = typer.Option(0.15, "--mlm-probability", help="Share of tokens masked."),
        static_masking: bool = typer.Option(False, "--static-masking",
                                            help="Mask every example once, seeded by its index (as the original "
                                                 "BERT data), instead of anew each epoch: the run then does not "
                                                 "depend on the number of processes."),
        max_lines: Optional[int] = typer.Option(None, "--max-lines", min=1, help="Use at most this many lines."),
        dev_lines: int = typer.Option(0, "--dev-lines", min=0,
                                      help="Hold out the last N lines and report the MLM loss on them before and "
                                           "after training, beside the text's unigram entropy."),
        train_head_steps: int = typer.Option(0, "--train-head-steps", min=0,
                                             help="First train the MLM head alone for this many steps "
                                                  "(for models without a pretrained MLM head)."),
        seed: Seed = 42,
        save_steps: SaveSteps = 500,
        logging_steps: LoggingSteps = 50,
        weight_decay: WeightDecay = 0.0,
        work_dir: WorkDir = None,
        resume: Resume = False,
        cpu: Cpu = False,
        bf16: Bf16 = False,
        fp16: Fp16 = False,
        save_dtype: SaveDtype = None,
    ) -> None:
        """Train a language SFT by masked language modelling (LT-SFT).

        Example: compsft train-language --model M --lang mlt --out sfts/mlt

        Any language with raw text: compsft train-language --model M --lang fao --text faroese.txt --out sfts/fao
        """
        from compsft.training.recipes import train_language_sft

        precision = _precision(bf16, fp16, cpu, save_dtype)
        tuner = train_language_sft(
            model, lang, out, text=text, exclude=exclude, k=k, density=density, mask_strategy=mask_strategy,
            phase1=(full_ft_max_epochs, full_ft_min_steps, full_ft_max_steps),
            phase2=(sparse_ft_max_epochs, sparse_ft_min_steps, sparse_ft_max_steps),
            l1=l1, lr=lr, batch_size=batch_size, grad_accum=grad_accum, max_length=max_length,
            mlm_probability=mlm_probability, static_masking=static_masking, max_lines=max_lines,
            dev_lines=dev_lines, train_head_steps=train_head_steps, seed=seed, save_steps=save_steps, logging_steps=logging_steps,
            weight_decay=weight_decay, work_dir=work_dir, resume=resume, cpu=cpu,
            precision=precision, save_dtype=save_dtype,
        )
        _report(tuner, out)

    @app.command("train-task")
    def train_task(
        task: str = typer.Option(..., "--task", help="Task: pos, dep or ner."),
        model: Path = typer.Option(..., "--model", help="Model directory (the pretrained encoder)."),
        train: List[str] = typer.Option(..., "--train", help="Training file (CoNLL-U, NER columns; .gz ok) or a "
                                                             "shipped data name such as ud:en_ewt:train. Repeat it "
                                                             "for multi-source training, one per source: "
                                                             "[LANG=]DATA (a shipped UD name knows its language)."),
        out: Path = typer.Option(..., "--out", help="Directory to write the task SFT to."),
        dev: List[str] = typer.Option([], "--dev", help="Development file, evaluated after training "
                                                         "(multi-source: [LANG=]DATA per source; the mean is reported)."),
        source_sft: List[str] = typer.Option([], "--source-sft", help="Source-language SFT, applied (without its MLM "
                                                                      "head) while training; multi-source: "
                                                                      "[LANG=]DIR per source, for its batches only "
                                                                      "(a source without one trains on θ0)."),
        upsample: List[str] = typer.Option([], "--upsample", help="Multi-source: LANG=N repeats that source's "
                                                                  "examples N times per epoch."),
        source_order: str = typer.Option("random", "--source-order", help="Multi-source: random (seeded) or "
                                                                          "sequential order of the sources' batches."),
        dev_checks: int = typer.Option(0, "--dev-checks", min=0, help="Multi-source: score the mean over the "
                                                                      "sources' dev sets N times in phase 2 and "
                                                                      "write the best state to OUT/dev-selected."),
        dev_sentences: Optional[int] = typer.Option(None, "--dev-sentences", min=1, help="Multi-source: score "
                                                    "N dev sentences per source, spread over its dev set."),
        k: Optional[int] = typer.Option(None, "--k", min=1, help="Entries the SFT may change (default: the paper's "
                                                                 "2·L·h² for L layers of width h; 14,155,776 for mBERT)."),
        density: Density = None,
        mask_strategy: MaskStrategy = "lottery-ticket",
        full_ft_max_epochs: Optional[float] = typer.Option(3.0, "--phase1-epochs", help="Phase 1 epochs (before min/max)."),
        full_ft_min_steps: Optional[int] = typer.Option(None, "--phase1-min-steps", **common_phase),
        full_ft_max_steps: Optional[int] = typer.Option(None, "--phase1-max-steps", **common_phase),
        sparse_ft_max_epochs: Optional[float] = typer.Option(10.0, "--phase2-epochs", help="Phase 2 epochs (before min/max)."),
        sparse_ft_min_steps: Optional[int] = typer.Option(None, "--phase2-min-steps", **common_phase),
        sparse_ft_max_steps: Optional[int] = typer.Option(None, "--phase2-max-steps", **common_phase),
        l1: float = typer.Option(0.0, "--l1", help="L1 pull toward θ0 in both phases."),
        lr: float = typer.Option(5e-5, "--lr", help="Learning rate (both phases)."),
        batch_size: int = typer.Option(8, "--batch-size", min=1, help="Sentences per device per step."),
        grad_accum: GradAccum = 1,
        max_length: Optional[int] = typer.Option(None, "--max-length", min=8, help="Sub-words per window."),
        max_sentences: Optional[int] = typer.Option(None, "--max-sentences", min=1,
                                                    help="Use only the first N training sentences."),
        seed: Seed = 42,
        save_steps: SaveSteps = 500,
        logging_steps: LoggingSteps = 50,
        weight_decay: WeightDecay = 0.0,
        work_dir: WorkDir = None,
        resume: Resume = False,
        cpu: Cpu = False,
        bf16: Bf16 = False,
        fp16: Fp16 = False,
        save_dtype: SaveDtype = None,
    ) -> None:
        """Train a task SFT with the source language SFT applied (LT-SFT).

        Example: compsft train-task --task pos --model M --train ud:en_ewt:train --source-sft sfts/eng --out sfts/pos

        Multi-source (each batch under its own source's SFT): compsft train-task --task pos --model M
        --train ud:ga_idt:train --train ud:fi_tdt:train --source-sft gle=sfts/gle --source-sft fin=sfts/fin --out sfts/pos
        """
        from compsft.errors import CompsftError
        from compsft.training.multisource_recipe import is_multi_source

        precision = _precision(bf16, fp16, cpu, save_dtype)
        common = dict(
            k=k, density=density, mask_strategy=mask_strategy,
            phase1=(full_ft_max_epochs, full_ft_min_steps, full_ft_max_steps),
            phase2=(sparse_ft_max_epochs, sparse_ft_min_steps, sparse_ft_max_steps),
            l1=l1, lr=lr, batch_size=batch_size, grad_accum=grad_accum, max_length=max_length,
            max_sentences=max_sentences, seed=seed, save_steps=save_steps, logging_steps=logging_steps,
            weight_decay=weight_decay, work_dir=work_dir, resume=resume, cpu=cpu,
            precision=precision, save_dtype=save_dtype,
        )
        if is_multi_source(train, source_sft):
            _train_multisource(task, model, out, train, dev, source_sft, upsample, dict(
                order=source_order, dev_checks=dev_checks, dev_sentences=dev_sentences, **common))
            return
        if len(dev) > 1 or len(source_sft) > 1 or upsample or dev_checks or dev_sentences:
            raise CompsftError("several --dev or --source-sft, --upsample, --dev-checks and --dev-sentences are for "
                               "multi-source training: give one --train per source")
        from compsft.training.recipes import train_task_sft

        tuner = train_task_sft(task, model, train[0], out, dev=dev[0] if dev else None,
                               source_sft=Path(source_sft[0]) if source_sft else None, **common)
        dev_metrics = tuner.sft.config.training.get("dev")
        if dev_metrics and tuner.is_world_process_zero():
            metrics = dev_metrics["metrics"]
            typer.echo(f"dev: {', '.join(f'{k}={v:.4f}' for k, v in metrics.items() if isinstance(v, float))}", err=True)
        _report(tuner, out)


def _train_multisource(task, model, out, train, dev, source_sft, upsample, kwargs) -> None:
    """`train-task` with one --train per source (`compsft.training.multisource_recipe`)."""
    from compsft.training.multisource_recipe import sources_from_cli, train_multisource_task_sft

    sources = sources_from_cli(train, dev, source_sft, upsample)
    tuner = train_multisource_task_sft(task, model, sources, out, **kwargs)
    if not tuner.is_world_process_zero():
        return
    multi = tuner.sft.config.training["multi_source"]
    for record in multi["sources"]:
        fallback = record["vocabulary_fallback"] or {}
        rate = fallback.get("rate")
        high = rate is not None and rate > fallback["threshold"]
        typer.echo(f"source {record['name']}: {record['sentences']} sentences x{record['upsample']}, "
                   f"{sum(b.get(record['name'], 0) for b in multi['batches'].values())} batches, "
                   + (f"its language SFT {record['source_sft']}" if record["language_sft"] else "on θ0 (no language SFT)")
                   + (f", vocabulary fallback {100 * rate:.1f}%" if rate is not None else "")
                   + (" (over the threshold: `compsft prepare-model --full`, or `compsft trim-vocab` with its text)"
                      if high else ""), err=True)
    dev_metrics = tuner.sft.config.training.get("dev")
    if dev_metrics:
        per = ", ".join(f"{n} {next(v for v in m.values() if isinstance(v, float)):.4f}"
                        for n, m in dev_metrics["per_source"].items())
        typer.echo(f"dev (mean over sources): {', '.join(f'{k}={v:.4f}' for k, v in dev_metrics['metrics'].items())} "
                   f"({per})", err=True)
    _report(tuner, out)
