"""The two LT-SFT recipes as functions: a language SFT from raw text, a task SFT from labelled data.

`compsft train-language` / `compsft train-task` are thin wrappers around these; in Python::

    from compsft.training import train_language_sft, train_task_sft
    train_language_sft("models/e5", "mlt", "sfts/mlt", phase1=(None, 200, 200), phase2=(None, 200, 200))
    train_task_sft("pos", "models/e5", "ud:en_ewt:train", "sfts/pos", source_sft="sfts/eng")

Both return the `SparseFineTuner` (its `.sft` is the result, `.summary()` the facts), run under
`torchrun` unchanged (only rank 0 writes) and continue an interrupted run with `resume=True`.
A phase is `(max_epochs, min_steps, max_steps)`, as the paper's scripts count them.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

logger = logging.getLogger(__name__)

Phase = tuple  # (max_epochs | None, min_steps | None, max_steps | None)


def _training_args(work: Path, *, lr, batch_size, grad_accum, seed, save_steps, logging_steps,
                   weight_decay, cpu, quiet=False, precision=None):
    import os

    import torch
    from transformers import TrainingArguments

    from .precision import resolve_precision, trainer_flags

    use_cpu = cpu or not torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # bf16/fp16 autocast over fp32 master weights (`compsft.training.precision`)
    mixed = trainer_flags(resolve_precision(precision), "cpu" if use_cpu else "cuda")
    return TrainingArguments(**mixed,
        output_dir=str(work), learning_rate=lr, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, seed=seed, save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500, save_total_limit=2, logging_steps=logging_steps, report_to=[],
        weight_decay=weight_decay, use_cpu=use_cpu,
        ddp_backend="gloo" if use_cpu and distributed else None, remove_unused_columns=False, dataloader_num_workers=0,
        logging_strategy="no" if quiet else "steps", disable_tqdm=True if quiet else None,
    )


def _silence(trainer):
    """No bar and no printed log lines of the Trainer's own: the caller's callbacks report progress."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def _sft_args(kind, k, density, mask_strategy, mask_seed, phases, l1):
    from .arguments import SftArguments

    (p1_epochs, p1_min, p1_max), (p2_epochs, p2_min, p2_max) = phases
    return SftArguments(
        sft_kind=kind, k=k, density=density, mask_strategy=mask_strategy, mask_seed=mask_seed,
        full_ft_max_epochs=p1_epochs, full_ft_min_steps=p1_min, full_ft_max_steps=p1_max,
        sparse_ft_max_epochs=p2_epochs, sparse_ft_min_steps=p2_min, sparse_ft_max_steps=p2_max,
        full_l1_reg=l1, sparse_l1_reg=l1,
    )


def train_language_sft(
    model: str | Path,
    lang: str,
    out: str | Path,
    *,
    text: Sequence[str | Path] = (),
    exclude: Sequence[str | Path] = (),
    k: int | None = None,
    density: float | None = None,
    mask_strategy: str = "lottery-ticket",
    phase1: Phase = (100.0, 10_000, 100_000),
    phase2: Phase = (100.0, 10_000, 100_000),
    l1: float = 0.1,
    lr: float = 5e-5,
    batch_size: int = 8,
    grad_accum: int = 1,
    max_length: int = 256,
    mlm_probability: float = 0.15,
    static_masking: bool = False,
    max_lines: int | None = None,
    dev_lines: int = 0,
    train_head_steps: int = 0,
    seed: int = 42,
    save_steps: int = 500,
    logging_steps: int = 50,
    weight_decay: float = 0.0,
    work_dir: str | Path | None = None,
    resume: bool = False,
    cpu: bool = False,
    callbacks: list | None = None,
    quiet: bool = False,
    tuner=None,
    precision: str | None = None,
    save_dtype: str | None = None,
):
    """Train a language SFT for `lang` by masked language modelling (defaults: the paper's).

    `lang` is any language code: a catalogue language (`compsft languages`) brings its shipped text
    (used when `text` is empty) and its evaluation files (always kept out of training); any other
    code needs `text`. The share of words the model's vocabulary can only spell out in single
    characters is recorded (``training["vocabulary_fallback"]``) and warned about above
    `FALLBACK_THRESHOLD`. `tuner` builds the trainer (default `SparseFineTuner`; SpIEL passes its own,
    same arguments).

    `dev_lines` > 0 holds the last `dev_lines` lines of the text out of training and records the MLM loss
    on them (fixed, seeded masking) before and after training, beside the entropy of the training text's
    unigram distribution, the loss of a model that predicts token frequencies only
    (``training["dev_mlm"]``): whether the language SFT learnt more than that.
    """
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer, set_seed

    from ..errors import CompsftError
    from ..languages import (corpus_files, eval_files, fallback_warning, language_for_training, load_mlm_corpus,
                             measure_vocabulary_fallback, tokenize_for_mlm)
    from ..sft import SftConfig
    from .trainer import HEADS_FILE, SparseFineTuner

    model, out = Path(model), Path(out)
    work_dir = Path(work_dir) if work_dir else None

    _check_model_dir(model)
    code, language = language_for_training(lang, has_text=bool(text))
    set_seed(seed)
    texts = list(text) or corpus_files(code)
    shipped_eval = eval_files(code) if language is not None else []
    # One entry per file: the catalogue and the caller often name the same evaluation file.
    excluded = list(dict.fromkeys(str(p) for p in [*shipped_eval, *exclude]))
    corpus = load_mlm_corpus(texts, exclude=excluded, max_lines=max_lines)
    if len(corpus) == 0:
        raise CompsftError(f"no MLM text left in {', '.join(map(str, texts))}")
    tokenizer = AutoTokenizer.from_pretrained(model)
    fallback = measure_vocabulary_fallback(tokenizer, corpus.lines)
    if fallback is not None and fallback.too_high:
        logger.warning("%s", fallback_warning(fallback, len(tokenizer), [str(t) for t in texts]))
    lines, held_out = _hold_out(corpus.lines, dev_lines)
    dataset = tokenize_for_mlm(lines, tokenizer, max_length=max_length)
    mlm_model = AutoModelForMaskedLM.from_pretrained(model)
    work = work_dir or out.with_name(out.name + ".work")
    head_record = None
    if train_head_steps and not (resume and (work / HEADS_FILE).exists()):
        from ..models.mlm_head import train_mlm_head

        if torch.cuda.is_available() and not cpu:
            mlm_model.to("cuda")
        head_record = train_mlm_head(mlm_model, tokenizer, corpus.lines, steps=train_head_steps,
                                     max_length=max_length, seed=seed)
    if static_masking:
        from ..languages import eval_collator, mask_for_eval

        dataset = mask_for_eval(dataset, tokenizer, mlm_probability=mlm_probability, seed=seed)
        collator = eval_collator(tokenizer)
    else:
        from .collators import ResumableMlmCollator

        collator = ResumableMlmCollator(tokenizer, mlm_probability=mlm_probability, seed=seed)
    args = _training_args(work, lr=lr, batch_size=batch_size, grad_accum=grad_accum, seed=seed,
                          save_steps=save_steps, logging_steps=logging_steps, weight_decay=weight_decay,
                          cpu=cpu, quiet=quiet, precision=precision)
    training = {"corpus": corpus.stats.as_dict(), "text": [str(t) for t in texts],
                "excluded": excluded,
                "vocabulary_fallback": fallback.as_dict() if fallback is not None else None,
                "max_length": max_length, "mlm_probability": mlm_probability, "static_masking": static_masking}
    if head_record:
        training["mlm_head_warmup"] = head_record
    if held_out:
        from ..models.mlm_head import evaluate_mlm_loss

        training["dev_mlm"] = {"lines": len(held_out), "unigram_entropy": round(unigram_entropy(tokenizer, lines), 4),
                               "loss_before": round(evaluate_mlm_loss(mlm_model, tokenizer, held_out,
                                                                      max_length=max_length, seed=seed), 4)}
    config = SftConfig(kind="language", language=code, base_model=str(model),
                       vocab=_vocab(tokenizer), training=training)
    sft_args = _sft_args("language", k, density, mask_strategy, seed, (phase1, phase2), l1)
    tuner = (tuner or SparseFineTuner)(model=mlm_model, args=args, train_dataset=dataset, data_collator=collator,
                            sft_args=sft_args, sft_config=config, mlm=True, callbacks=callbacks)
    if quiet:
        _silence(tuner)
    tuner.train(resume_from_checkpoint=resume)
    if held_out:
        from ..models.mlm_head import evaluate_mlm_loss

        # The trainer leaves θ0 + φ applied, MLM head included.
        record = tuner.sft.config.training["dev_mlm"]
        record["loss_after"] = round(evaluate_mlm_loss(tuner.model, tokenizer, held_out, max_length=max_length,
                                                       seed=seed), 4)
        logger.info("%s dev MLM loss %.3f -> %.3f (unigram entropy of the training text %.3f)", code,
                    record["loss_before"], record["loss_after"], record["unigram_entropy"])
    tuner.save_sft(out, **_save_kwargs(save_dtype))
    return tuner


def _hold_out(lines: list[str], n: int) -> tuple[list[str], list[str]]:
    """(training lines, the last `n` lines held out for the dev MLM loss)."""
    from ..errors import CompsftError

    if n < 0:
        raise CompsftError(f"dev_lines must be >= 0, got {n}")
    if not n:
        return lines, []
    if n >= len(lines):
        raise CompsftError(f"dev_lines {n} leaves nothing to train on ({len(lines)} lines of text)")
    return lines[:-n], lines[-n:]


def unigram_entropy(tokenizer, lines: Sequence[str]) -> float:
    """Entropy (nats) of the sub-word unigram distribution of `lines`: the MLM loss of a model that
    predicts every masked token by its frequency alone."""
    import math
    from collections import Counter

    counts: Counter = Counter()
    for ids in tokenizer(list(lines), add_special_tokens=False)["input_ids"]:
        counts.update(ids)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values()) if total else 0.0


def train_task_sft(
    task: str,
    model: str | Path,
    train: str | Path,
    out: str | Path,
    *,
    dev: str | Path | None = None,
    source_sft: str | Path | None = None,
    k: int | None = None,
    density: float | None = None,
    mask_strategy: str = "lottery-ticket",
    phase1: Phase = (3.0, None, None),
    phase2: Phase = (10.0, None, None),
    l1: float = 0.0,
    lr: float = 5e-5,
    batch_size: int = 8,
    grad_accum: int = 1,
    max_length: int | None = None,
    max_sentences: int | None = None,
    seed: int = 42,
    save_steps: int = 500,
    logging_steps: int = 50,
    weight_decay: float = 0.0,
    work_dir: str | Path | None = None,
    resume: bool = False,
    cpu: bool = False,
    callbacks: list | None = None,
    quiet: bool = False,
    tuner=None,
    precision: str | None = None,
    save_dtype: str | None = None,
):
    """Train a task SFT with the source language SFT applied (defaults: the paper's POS/DP/NER).

    `tuner` builds the trainer (default `SparseFineTuner`; SpIEL passes its own, same arguments)."""
    from transformers import AutoTokenizer, set_seed

    from ..errors import CompsftError
    from ..merge import apply
    from ..serialization import load_sft
    from ..sft import SftConfig
    from ..tasks import get_task, resolve_data
    from .trainer import SparseFineTuner

    model, out = Path(model), Path(out)
    source_sft = Path(source_sft) if source_sft else None
    work_dir = Path(work_dir) if work_dir else None

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
        source = load_sft(source_sft)
        # A language SFT's dense part is its MLM head, which has no place on a task model.
        apply(task_model, source, with_dense=False)
    dataset = spec.encode(sentences, tokenizer, labels, max_length=max_length)
    work = work_dir or out.with_name(out.name + ".work")
    args = _training_args(work, lr=lr, batch_size=batch_size, grad_accum=grad_accum, seed=seed,
                          save_steps=save_steps, logging_steps=logging_steps, weight_decay=weight_decay,
                          cpu=cpu, quiet=quiet, precision=precision)
    training = {"labels": list(labels), "train": str(train), "sentences": len(sentences),
                "source_sft": str(source_sft) if source_sft else None,
                "source_language": source.config.language if source else None}
    config = SftConfig(kind="task", task=task, base_model=str(model), vocab=_vocab(tokenizer), training=training)
    sft_args = _sft_args("task", k, density, mask_strategy, seed, (phase1, phase2), l1)
    tuner = (tuner or SparseFineTuner)(model=task_model, args=args, train_dataset=dataset,
                            data_collator=spec.collator(tokenizer), sft_args=sft_args, sft_config=config, mlm=False,
                            callbacks=callbacks)
    if quiet:
        _silence(tuner)
    tuner.train(resume_from_checkpoint=resume)
    if dev is not None and tuner.is_world_process_zero():
        # The model now holds θ0 + φ_source + φ_task: the in-language dev score.
        dev_sentences = spec.read(resolve_data(dev))
        gold = spec.prepare_gold(dev_sentences, labels)
        with _eval_autocast(precision, task_model):
            metrics, _ = spec.evaluate(task_model, tokenizer, gold, labels, max_length=max_length)
        tuner.sft.config.training["dev"] = {"file": str(dev), "metrics": metrics}
        logger.info("dev: %s", ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    tuner.save_sft(out, **_save_kwargs(save_dtype))
    return tuner


def _save_kwargs(save_dtype: str | None) -> dict:
    """`SparseFineTuning.save` keywords: the values' dtype when one is asked for (else fp32, as trained)."""
    from .precision import save_dtype as dtype_of

    dtype = dtype_of(save_dtype)
    return {"dtype": dtype} if dtype is not None else {}


def _eval_autocast(precision: str | None, model):
    """Evaluation after training runs in the precision the model was trained in."""
    from .precision import autocast, resolve_precision

    return autocast(resolve_precision(precision), next(model.parameters()).device)


def _check_model_dir(model: Path) -> None:
    from ..paths import local_dir

    local_dir(model, "model")  # never a hub name; the one check every command uses


def _vocab(tokenizer):
    from ..vocab import vocab_fingerprint

    return vocab_fingerprint(tokenizer)
