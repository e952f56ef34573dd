"""`compsft train-language` and `compsft train-task`: LT-SFT training from the command line.

Both run under `torchrun` too (one process per device; gloo on CPU): every rank selects the same
mask, only rank 0 writes the SFT. `--resume` continues an interrupted run from its work directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def _training_args(work: Path, *, lr, batch_size, grad_accum, seed, save_steps, logging_steps,
                   weight_decay, cpu):
    import os

    import torch
    from transformers import TrainingArguments

    use_cpu = cpu or not torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return TrainingArguments(
        output_dir=str(work), learning_rate=lr, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, seed=seed, save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500, save_total_limit=2, logging_steps=logging_steps, report_to=[],
        weight_decay=weight_decay, use_cpu=use_cpu,
        ddp_backend="gloo" if use_cpu and distributed else None, remove_unused_columns=False, dataloader_num_workers=0,
        logging_strategy="steps",
    )


def _sft_args(kind, k, density, mask_strategy, mask_seed, phases, l1):
    from compsft.training import SftArguments

    (p1_epochs, p1_min, p1_max), (p2_epochs, p2_min, p2_max) = phases
    return SftArguments(
        sft_kind=kind, k=k, density=density, mask_strategy=mask_strategy, mask_seed=mask_seed,
        full_ft_max_epochs=p1_epochs, full_ft_min_steps=p1_min, full_ft_max_steps=p1_max,
        sparse_ft_max_epochs=p2_epochs, sparse_ft_min_steps=p2_min, sparse_ft_max_steps=p2_max,
        full_l1_reg=l1, sparse_l1_reg=l1,
    )


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


def register(app: typer.Typer) -> None:
    common_phase = dict(min=0)

    @app.command("train-language")
    def train_language(
        model: Path = typer.Option(..., "--model", help="Model directory (a transformers encoder, MLM head optional)."),
        lang: str = typer.Option(..., "--lang", help="Language code (ISO 639-3) from `compsft languages`."),
        out: Path = typer.Option(..., "--out", help="Directory to write the language SFT to."),
        text: List[Path] = typer.Option([], "--text", help="MLM text: plain-text or CoNLL-U files or directories, "
                                                           "repeatable (default: the text shipped for --lang)."),
        exclude: List[Path] = typer.Option([], "--exclude", help="Evaluation files whose sentences must not be "
                                                                 "trained on (the shipped dev/test sets of --lang are always excluded)."),
        k: Optional[int] = typer.Option(None, "--k", min=1, help="Entries the SFT may change (default: the paper's "
                                                                 "7,667,712 for mBERT, scaled to this model)."),
        density: Optional[float] = typer.Option(None, "--density", help="K as a fraction of the eligible parameters."),
        mask_strategy: str = typer.Option("lottery-ticket", "--mask-strategy",
                                          help="lottery-ticket, random, magnitude or prune-difference."),
        full_ft_max_epochs: Optional[float] = typer.Option(100.0, "--phase1-epochs", help="Phase 1 epochs (before min/max)."),
        full_ft_min_steps: Optional[int] = typer.Option(10_000, "--phase1-min-steps", **common_phase),
        full_ft_max_steps: Optional[int] = typer.Option(100_000, "--phase1-max-steps", **common_phase),
        sparse_ft_max_epochs: Optional[float] = typer.Option(100.0, "--phase2-epochs", help="Phase 2 epochs (before min/max)."),
        sparse_ft_min_steps: Optional[int] = typer.Option(10_000, "--phase2-min-steps", **common_phase),
        sparse_ft_max_steps: Optional[int] = typer.Option(100_000, "--phase2-max-steps", **common_phase),
        l1: float = typer.Option(0.1, "--l1", help="L1 pull toward θ0 in both phases (the paper's 0.1)."),
        lr: float = typer.Option(5e-5, "--lr", help="Learning rate (both phases)."),
        batch_size: int = typer.Option(8, "--batch-size", min=1, help="Sequences per device per step."),
        grad_accum: int = typer.Option(1, "--grad-accum", min=1, help="Gradient accumulation steps."),
        max_length: int = typer.Option(256, "--max-length", min=8, help="Tokens per sequence."),
        mlm_probability: float = typer.Option(0.15, "--mlm-probability", help="Share of tokens masked."),
        static_masking: bool = typer.Option(False, "--static-masking",
                                            help="Mask every example once, seeded by its index (as the original "
                                                 "BERT data), instead of anew each epoch: the run then does not "
                                                 "depend on the number of processes."),
        max_lines: Optional[int] = typer.Option(None, "--max-lines", min=1, help="Use at most this many lines."),
        train_head_steps: int = typer.Option(0, "--train-head-steps", min=0,
                                             help="First train the MLM head alone for this many steps "
                                                  "(for models without a pretrained MLM head)."),
        seed: int = typer.Option(42, "--seed"),
        save_steps: int = typer.Option(500, "--save-steps", min=0, help="Checkpoint every N steps (0: never)."),
        logging_steps: int = typer.Option(50, "--logging-steps", min=1),
        weight_decay: float = typer.Option(0.0, "--weight-decay"),
        work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="Checkpoints (default: OUT.work)."),
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its work directory."),
        cpu: bool = typer.Option(False, "--cpu", help="Train on the CPU even if a GPU is there."),
    ) -> None:
        """Train a language SFT by masked language modelling (LT-SFT)."""
        import torch
        from transformers import AutoModelForMaskedLM, AutoTokenizer, set_seed

        from compsft.errors import CompsftError
        from compsft.languages import corpus_files, eval_files, get_language, load_mlm_corpus, tokenize_for_mlm
        from compsft.sft import SftConfig
        from compsft.training import SparseFineTuner
        from compsft.training.trainer import HEADS_FILE

        _check_model_dir(model)
        language = get_language(lang)
        set_seed(seed)
        texts = list(text) or corpus_files(language.code)
        corpus = load_mlm_corpus(texts, exclude=[*eval_files(language.code), *exclude], max_lines=max_lines)
        if len(corpus) == 0:
            raise CompsftError(f"no MLM text left in {', '.join(map(str, texts))}")
        tokenizer = AutoTokenizer.from_pretrained(model)
        dataset = tokenize_for_mlm(corpus.lines, tokenizer, max_length=max_length)
        mlm_model = AutoModelForMaskedLM.from_pretrained(model)
        work = work_dir or out.with_name(out.name + ".work")
        head_record = None
        if train_head_steps and not (resume and (work / HEADS_FILE).exists()):
            from compsft.models.mlm_head import train_mlm_head

            if torch.cuda.is_available() and not cpu:
                mlm_model.to("cuda")
            head_record = train_mlm_head(mlm_model, tokenizer, corpus.lines, steps=train_head_steps,
                                         max_length=max_length, seed=seed)
        if static_masking:
            from compsft.languages import eval_collator, mask_for_eval

            dataset = mask_for_eval(dataset, tokenizer, mlm_probability=mlm_probability, seed=seed)
            collator = eval_collator(tokenizer)
        else:
            from compsft.training.collators import ResumableMlmCollator

            collator = ResumableMlmCollator(tokenizer, mlm_probability=mlm_probability, seed=seed)
        args = _training_args(work, lr=lr, batch_size=batch_size, grad_accum=grad_accum, seed=seed,
                              save_steps=save_steps, logging_steps=logging_steps, weight_decay=weight_decay,
                              cpu=cpu)
        training = {"corpus": corpus.stats.as_dict(), "text": [str(t) for t in texts],
                    "max_length": max_length, "mlm_probability": mlm_probability, "static_masking": static_masking}
        if head_record:
            training["mlm_head_warmup"] = head_record
        config = SftConfig(kind="language", language=language.code, base_model=str(model),
                           vocab=_vocab(tokenizer), training=training)
        sft_args = _sft_args("language", k, density, mask_strategy, seed,
                             ((full_ft_max_epochs, full_ft_min_steps, full_ft_max_steps),
                              (sparse_ft_max_epochs, sparse_ft_min_steps, sparse_ft_max_steps)), l1)
        tuner = SparseFineTuner(model=mlm_model, args=args, train_dataset=dataset, data_collator=collator,
                                sft_args=sft_args, sft_config=config, mlm=True)
        tuner.train(resume_from_checkpoint=resume)
        tuner.save_sft(out)
        _report(tuner, out)

    @app.command("train-task")
    def train_task(
        task: str = typer.Option(..., "--task", help="Task: pos, dep or ner."),
        model: Path = typer.Option(..., "--model", help="Model directory (the pretrained encoder)."),
        train: str = typer.Option(..., "--train", help="Training file (CoNLL-U, NER columns; .gz ok) or a shipped "
                                                       "data name such as ud:en_ewt:train."),
        out: Path = typer.Option(..., "--out", help="Directory to write the task SFT to."),
        dev: Optional[str] = typer.Option(None, "--dev", help="Development file, evaluated after training."),
        source_sft: Optional[Path] = typer.Option(None, "--source-sft", help="Source-language SFT, applied "
                                                                            "(without its MLM head) before training."),
        k: Optional[int] = typer.Option(None, "--k", min=1, help="Entries the SFT may change (default: the paper's "
                                                                 "14,155,776 for mBERT, scaled to this model)."),
        density: Optional[float] = typer.Option(None, "--density", help="K as a fraction of the eligible parameters."),
        mask_strategy: str = typer.Option("lottery-ticket", "--mask-strategy",
                                          help="lottery-ticket, random, magnitude or prune-difference."),
        full_ft_max_epochs: Optional[float] = typer.Option(3.0, "--phase1-epochs", help="Phase 1 epochs (before min/max)."),
        full_ft_min_steps: Optional[int] = typer.Option(None, "--phase1-min-steps", **common_phase),
        full_ft_max_steps: Optional[int] = typer.Option(None, "--phase1-max-steps", **common_phase),
        sparse_ft_max_epochs: Optional[float] = typer.Option(10.0, "--phase2-epochs", help="Phase 2 epochs (before min/max)."),
        sparse_ft_min_steps: Optional[int] = typer.Option(None, "--phase2-min-steps", **common_phase),
        sparse_ft_max_steps: Optional[int] = typer.Option(None, "--phase2-max-steps", **common_phase),
        l1: float = typer.Option(0.0, "--l1", help="L1 pull toward θ0 in both phases."),
        lr: float = typer.Option(5e-5, "--lr", help="Learning rate (both phases)."),
        batch_size: int = typer.Option(8, "--batch-size", min=1, help="Sentences per device per step."),
        grad_accum: int = typer.Option(1, "--grad-accum", min=1, help="Gradient accumulation steps."),
        max_length: Optional[int] = typer.Option(None, "--max-length", min=8, help="Sub-words per window."),
        max_sentences: Optional[int] = typer.Option(None, "--max-sentences", min=1,
                                                    help="Use only the first N training sentences."),
        seed: int = typer.Option(42, "--seed"),
        save_steps: int = typer.Option(500, "--save-steps", min=0, help="Checkpoint every N steps (0: never)."),
        logging_steps: int = typer.Option(50, "--logging-steps", min=1),
        weight_decay: float = typer.Option(0.0, "--weight-decay"),
        work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="Checkpoints (default: OUT.work)."),
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its work directory."),
        cpu: bool = typer.Option(False, "--cpu", help="Train on the CPU even if a GPU is there."),
    ) -> None:
        """Train a task SFT with the source language SFT applied (LT-SFT)."""
        from transformers import AutoTokenizer, set_seed

        import compsft
        from compsft.errors import CompsftError
        from compsft.sft import SftConfig
        from compsft.tasks import get_task, resolve_data
        from compsft.training import SparseFineTuner

        _check_model_dir(model)
        spec = get_task(task)
        set_seed(seed)
        sentences = spec.read(resolve_data(train))
        if max_sentences:
            sentences = sentences[:max_sentences]
        if not sentences:
            raise CompsftError(f"{train}: no sentences")
        labels = spec.label_list(sentences)
        tokenizer = AutoTokenizer.from_pretrained(model)
        task_model = spec.build_model(model, labels)
        source = None
        if source_sft is not None:
            source = compsft.load(source_sft)
            source.source = str(source_sft)
            # A language SFT's dense part is its MLM head, which has no place on a task model.
            compsft.apply(task_model, source, with_dense=False)
        dataset = spec.encode(sentences, tokenizer, labels, max_length=max_length)
        work = work_dir or out.with_name(out.name + ".work")
        args = _training_args(work, lr=lr, batch_size=batch_size, grad_accum=grad_accum, seed=seed,
                              save_steps=save_steps, logging_steps=logging_steps, weight_decay=weight_decay,
                              cpu=cpu)
        training = {"labels": list(labels), "train": str(train), "sentences": len(sentences),
                    "source_sft": str(source_sft) if source_sft else None,
                    "source_language": source.config.language if source else None}
        config = SftConfig(kind="task", task=task, base_model=str(model), vocab=_vocab(tokenizer), training=training)
        sft_args = _sft_args("task", k, density, mask_strategy, seed,
                             ((full_ft_max_epochs, full_ft_min_steps, full_ft_max_steps),
                              (sparse_ft_max_epochs, sparse_ft_min_steps, sparse_ft_max_steps)), l1)
        tuner = SparseFineTuner(model=task_model, args=args, train_dataset=dataset,
                                data_collator=spec.collator(tokenizer), sft_args=sft_args, sft_config=config, mlm=False)
        tuner.train(resume_from_checkpoint=resume)
        if dev is not None and tuner.is_world_process_zero():
            # The model now holds θ0 + φ_source + φ_task: the in-language dev score.
            dev_sentences = spec.read(resolve_data(dev))
            gold = spec.prepare_gold(dev_sentences, labels)
            metrics, _ = spec.evaluate(task_model, tokenizer, gold, labels, max_length=max_length)
            tuner.sft.config.training["dev"] = {"file": str(dev), "metrics": metrics}
            typer.echo(f"dev: {', '.join(f'{k}={v:.4f}' for k, v in metrics.items() if isinstance(v, float))}", err=True)
        tuner.save_sft(out)
        _report(tuner, out)


def _check_model_dir(model: Path) -> None:
    from compsft.errors import CompsftError

    if not model.is_dir() or not (model / "config.json").is_file():
        raise CompsftError(f"{model}: not a model directory (no config.json)")


def _vocab(tokenizer):
    try:
        from compsft.vocab import vocab_fingerprint
    except ImportError:
        return None
    return vocab_fingerprint(tokenizer)
