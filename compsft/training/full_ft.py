"""Full fine-tuning of the whole model on a task: the baseline every sparse method is measured against.

`compsft train-full` is a thin wrapper around `train_full_ft`; in Python::

    from compsft.training.full_ft import train_full_ft
    result = train_full_ft("pos", "models/e5", "ud:en_ewt:train", "models/pos-full", dev="ud:en_ewt:dev",
                           steps=320, dev_checks=4)
    model, labels = get_task("pos").load_model("models/pos-full")

It is a plain `transformers.Trainer` on the task spec (`build_model`, `encode`, `collator`): every
parameter of the task model is trained (the encoder, its embeddings and LayerNorms, the head).
The result is a model directory (weights, config with the label map, tokenizer and
`full_ft.json` with how it was trained), written atomically by the main process only. With
`dev_checks`, the source dev set is scored that many times and the best model by dev score is written
too, into ``out/dev-selected`` (`compsft.methods.base.DEV_SELECTED`). `resume=True` continues an
interrupted run from the last complete checkpoint in `work_dir` (default ``OUT.work``).

The length defaults to 13 epochs, the paper's task SFT phases (3 + 10) added up: full fine-tuning
then sees as many examples as LT-SFT's task SFT.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

INFO_FILE = "full_ft.json"
#: sub-directory holding the model selected by source dev score (same as compsft.methods.base.DEV_SELECTED)
DEV_SELECTED = "dev-selected"
DEV_STATE_FILE = "dev-selection.safetensors"


@dataclass
class FullFineTuning:
    """What `train_full_ft` returns: the trained model (final step, in memory) and the facts."""

    model: Any
    labels: list[str]
    out: Path
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def trainable(self) -> int:
        return int(self.info["trainable"])


def train_full_ft(
    task: str,
    model: str | Path,
    train: str | Path,
    out: str | Path,
    *,
    dev: str | Path | None = None,
    steps: int | None = None,
    epochs: float | None = None,
    lr: float = 5e-5,
    batch_size: int = 8,
    grad_accum: int = 1,
    max_length: int | None = None,
    max_sentences: int | None = None,
    dev_checks: int = 0,
    dev_max_sentences: int | None = None,
    seed: int = 42,
    save_steps: int = 500,
    logging_steps: int = 50,
    weight_decay: float = 0.0,
    work_dir: str | Path | None = None,
    resume: bool = False,
    cpu: bool = False,
    callbacks: list | None = None,
    quiet: bool = False,
    precision: str | None = None,
) -> FullFineTuning:
    """Fine-tune every parameter of a `task` model built on `model`; save it to `out` (a model directory).

    Length: `steps` optimizer steps, or `epochs` over the training data (default 13, the paper's
    3 + 10 task SFT epochs). `dev` is scored after training, or `dev_checks` times during it with the best
    model saved into ``out/dev-selected`` too.
    """
    from transformers import AutoTokenizer, Trainer, set_seed

    from ..atomic import atomic_path, write_text
    from ..errors import CompsftError
    from ..tasks import get_task, resolve_data
    from .dev_selection import DevSelection, dev_scorer, dev_subset, primary_metric
    from .recipes import _check_model_dir, _eval_autocast, _silence, _training_args, _vocab
    from .trainer import last_complete_checkpoint

    model_dir, out = Path(model), Path(out)
    work = Path(work_dir) if work_dir else out.with_name(out.name + ".work")
    if steps is not None and epochs is not None:
        raise CompsftError("give the length of full fine-tuning as steps or as epochs, not both")
    if steps is not None and steps < 1:
        raise CompsftError(f"steps must be >= 1, got {steps}")
    if epochs is not None and not epochs > 0:
        raise CompsftError(f"epochs must be > 0, got {epochs}")
    if dev_checks and dev is None:
        raise CompsftError("dev_checks needs a dev set (dev=...)")
    _check_model_dir(model_dir)
    spec = get_task(task)
    set_seed(seed)
    sentences = spec.read(resolve_data(train))
    if max_sentences:
        sentences = sentences[:max_sentences]
    if not sentences:
        raise CompsftError(f"{train}: no sentences")
    labels = spec.label_list(sentences)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    task_model = spec.build_model(model_dir, labels)
    for p in task_model.parameters():
        p.requires_grad_(True)
    if type(task_model).__module__.startswith("transformers.") and not hasattr(task_model, "accepts_loss_kwargs"):
        # transformers' classifiers return a per-batch mean and ignore num_items_in_batch: told so,
        # the Trainer divides by the accumulation steps itself (as SparseFineTuner does).
        task_model.accepts_loss_kwargs = False
    dataset = spec.encode(sentences, tokenizer, labels, max_length=max_length)
    args = _training_args(work, lr=lr, batch_size=batch_size, grad_accum=grad_accum, seed=seed,
                          save_steps=save_steps, logging_steps=logging_steps, weight_decay=weight_decay,
                          cpu=cpu, quiet=quiet, precision=precision)
    if steps is None:
        per_epoch = max(1, math.ceil(len(dataset) / (batch_size * args.world_size)) // grad_accum)
        steps = max(1, math.ceil((13.0 if epochs is None else epochs) * per_epoch))
    args.max_steps = steps

    callbacks = list(callbacks or [])
    selection = None
    dev_sentences = []
    if dev is not None:
        dev_sentences = dev_subset(spec.read(resolve_data(dev)), dev_max_sentences)
    metric = primary_metric(task)
    if dev_checks:
        selection = DevSelection(dev_scorer(spec, tokenizer, dev_sentences, labels, metric=metric,
                                            max_length=max_length),
                                 dev_checks, state_file=work / DEV_STATE_FILE, metric=metric)
        callbacks.append(selection)
    trainer = Trainer(model=task_model, args=args, train_dataset=dataset, data_collator=spec.collator(tokenizer),
                      callbacks=callbacks)
    if quiet:
        _silence(trainer)
    checkpoint = last_complete_checkpoint(work) if resume and work.is_dir() else None
    trainable = sum(p.numel() for p in task_model.parameters() if p.requires_grad)
    logger.info("full fine-tuning %s: %d steps, %s trainable parameters%s", task, steps, f"{trainable:,}",
                f", resuming from {checkpoint}" if checkpoint else "")
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    info: dict[str, Any] = {
        "method": "full-ft", "task": task, "base_model": str(model_dir), "vocab": _vocab(tokenizer),
        "labels": list(labels), "train": str(train), "sentences": len(sentences), "steps": steps,
        "seconds": round(time.perf_counter() - t0, 2), "train_loss": round(float(result.training_loss), 5),
        "trainable": trainable, "learning_rate": lr, "batch_size": batch_size, "gradient_accumulation_steps":
        grad_accum, "world_size": args.world_size, "seed": seed, "resumed_from": checkpoint,
    }
    if args.bf16 or args.fp16:  # recorded only when mixed, so fp32 records stay as they were
        info["precision"] = "bf16" if args.bf16 else "fp16"
    if trainer.is_world_process_zero():
        if selection is not None and selection.best_step is not None:
            info["dev"] = {"file": str(dev), "metrics": {metric: selection.history[-1][1]}}
            info["dev_selected"] = selection.summary()
        elif dev is not None:
            gold = spec.prepare_gold(dev_sentences, labels)
            with _eval_autocast(precision, task_model):
                metrics, _ = spec.evaluate(task_model, tokenizer, gold, labels, max_length=max_length)
            info["dev"] = {"file": str(dev), "metrics": metrics}
        with atomic_path(out) as tmp:
            _save_model(task_model, tokenizer, tmp, info, write_text)
            if selection is not None and selection.best is not None:
                final = selection.restore_into(task_model)
                try:
                    _save_model(task_model, tokenizer, tmp / DEV_SELECTED, {**info, "selected": "dev"}, write_text)
                finally:
                    _put_back(task_model, final)
    return FullFineTuning(task_model, list(labels), out, info)


def _save_model(model, tokenizer, directory: Path, info: dict, write_text) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    write_text(directory / INFO_FILE, json.dumps(info, indent=2, ensure_ascii=False) + "\n")


def _put_back(model, values: dict) -> None:
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)


def load_full_ft(directory: str | Path):
    """(model, labels, info) of a directory written by `train_full_ft` (or its dev-selected sub-directory)."""
    from ..errors import CompsftError
    from ..tasks import get_task

    directory = Path(directory)
    info_file = directory / INFO_FILE
    if not info_file.is_file():
        raise CompsftError(f"{directory}: no {INFO_FILE}; not a model written by train_full_ft")
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
        task = info["task"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CompsftError(f"{info_file}: unreadable ({err})") from err
    model, labels = get_task(task).load_model(directory)
    return model, list(labels), info
