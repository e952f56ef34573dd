"""Training and assembling MAD-X modules with a plain `transformers.Trainer`, and the pieces every
adapter-family method shares (budgets → steps, `TrainingArguments`, MLM and task data, dev selection).

* `train_language_adapter`: a `seq_bn` adapter (+ NICE) on the `*ForMaskedLM` model, trained by MLM on the
  language's text (compsft's MLM pipeline: `load_mlm_corpus` with evaluation sentences excluded,
  `tokenize_for_mlm`, `ResumableMlmCollator`, logits at masked positions only); everything else frozen.
* `train_task_adapter`: a task adapter stacked on the frozen source language adapter,
  `Stack(lang, task)`, on the task model; the task adapter and the task head train.
* `assemble_task_model`: the task model with the *target* language adapter swapped in.

Budgets: adapters train in one phase, so they get the sum of a two-phase method's steps
(`base.Budget`), so every method sees the same number of examples.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compsft.errors import CompsftError

from ..base import DEV_SELECTED, Budget, LanguageData, MethodContext, ModuleInfo, TaskData
from ..common import module_bytes
from .attach import Stack, add_adapter, adapter_bank, set_active, train_only
from .files import AdapterConfig, load_adapter_files, save_adapter_files

logger = logging.getLogger(__name__)

LANG, TASK = "lang", "task"
#: the score dev selection maximises, per task


@dataclass
class MadxSettings:
    """What distinguishes the MAD-X variants (Pfeiffer et al. 2020; MAD-X 2.0: Pfeiffer et al. 2021)."""

    lang_reduction_factor: float = 2.0
    task_reduction_factor: float = 1.0
    non_linearity: str = "relu"
    inv_adapter: str | None = "nice"
    inv_adapter_reduction_factor: float = 2.0
    #: MAD-X 2.0: the language adapter of the last layer is left out when it is stacked under a task adapter
    drop_last_language_layer: bool = False
    #: the learning rate of MAD-X (1e-4 for language and task adapters); None: the budget's
    lang_lr: float | None = 1e-4
    task_lr: float | None = 1e-4
    #: MoSA: split each trained adapter's weight matrices into this many disjoint random sparse sub-modules,
    #: train one (drawn at random) per step, merge afterwards (`split.py`); 0: ordinary dense training
    mosa_splits: int = 0
    #: MoSA's hierarchical sparse strategy: this projection of every bottleneck ("down" or "up") is not split but
    #: trained densely at every step, shared by all the sub-modules (`split.py`); None: the flat strategy
    mosa_shared: str | None = None


def _mosa_training_facts(settings: MadxSettings) -> dict:
    """What MoSA's settings add to `config.training`: `mosa_shared` only when set, so flat MoSA's files stay as
    they were."""
    shared = {"mosa_shared": settings.mosa_shared} if settings.mosa_shared else {}
    return {"mosa_splits": settings.mosa_splits, **shared}


def _split_for_training(model, name: str, settings: MadxSettings, seed: int, callbacks: list):
    """With MoSA settings: split adapter `name` and draw a sub-module per step; returns what `_merge_split` needs."""
    if settings.mosa_shared is not None and settings.mosa_splits < 2:
        raise CompsftError(f"mosa_shared={settings.mosa_shared!r} needs mosa_splits >= 2 (something to split)")
    if settings.mosa_splits < 2:
        return None
    from . import split

    adapter = adapter_bank(model).adapters[name]
    controller = split.SplitController(settings.mosa_splits, seed)
    split.split(adapter, controller, seed, shared=settings.mosa_shared)
    callbacks.append(split.DrawSubModule(controller))
    return adapter, controller


def _merge_split(handle) -> None:
    if handle is not None:
        from . import split

        split.merge(*handle)


# -- budgets -------------------------------------------------------------------------------------

def language_steps(budget: Budget, examples: int) -> int:
    """Steps of a one-phase language module: both phases of the budget."""
    if budget.lang_steps:
        return 2 * budget.lang_steps
    epochs = 2 * float(budget.lang_epochs or 1.0)
    steps = math.ceil(epochs * examples / budget.lang_batch)
    if budget.lang_max_steps:
        steps = min(steps, 2 * budget.lang_max_steps)
    return max(steps, 1)


def task_steps(budget: Budget, examples: int) -> int:
    """Steps of a one-phase task module: both phases of the budget."""
    if budget.task_steps:
        return 2 * budget.task_steps
    epochs = sum(budget.task_epochs or (3.0, 10.0))
    return max(math.ceil(epochs * examples / budget.task_batch), 1)


def training_args(ctx: MethodContext, work: Path, *, lr: float, batch: int, seed: int, steps: int):
    from transformers import TrainingArguments

    from ...training.precision import current_precision, trainer_flags

    return TrainingArguments(
        **trainer_flags(current_precision(), ctx.device),  # `use_precision` (bf16/fp16 autocast) if in force
        output_dir=str(work), learning_rate=lr, per_device_train_batch_size=batch, max_steps=steps, seed=seed,
        save_strategy="steps", save_steps=500, save_total_limit=1, logging_steps=max(1, min(50, steps // 10)),
        report_to=[], use_cpu=ctx.device == "cpu", remove_unused_columns=False, dataloader_num_workers=0,
        disable_tqdm=True, weight_decay=0.0,
    )


def run_trainer(trainer, ctx: MethodContext, work: Path) -> None:
    """Run the Trainer, from the last checkpoint in `work` when resuming and there is one."""
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_utils import get_last_checkpoint

    trainer.remove_callback(PrinterCallback)  # losses go to the log history and the harness's callbacks, not stdout
    checkpoint = get_last_checkpoint(str(work)) if ctx.resume and work.is_dir() else None
    trainer.train(resume_from_checkpoint=checkpoint)


def work_dir_for(ctx: MethodContext, out: Path) -> Path:
    return Path(ctx.work_dir) if ctx.work_dir else out.with_name(out.name + ".work")


def load_vocab(model_dir: Path) -> tuple[Any, dict]:
    from transformers import AutoTokenizer

    from compsft.vocab import vocab_fingerprint

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer, vocab_fingerprint(tokenizer)


def final_loss(trainer) -> float | None:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return float(losses[-1]) if losses else None


# -- data (shared by the adapter-family methods) -------------------------------------------------

@dataclass
class MlmData:
    dataset: Any
    tokenizer: Any
    vocab: dict
    texts: list
    corpus_stats: dict


def mlm_data(ctx: MethodContext, data: LanguageData) -> MlmData:
    """The language's MLM examples through compsft's pipeline: shipped or given text, evaluation sentences
    excluded, `tokenize_for_mlm` at the budget's length and line count."""
    from compsft.languages import corpus_files, eval_files, load_mlm_corpus, tokenize_for_mlm

    texts = list(data.texts) or corpus_files(data.code)
    try:
        exclude = [*eval_files(data.code), *data.exclude]
    except CompsftError:  # a language outside the catalogue: only what the caller excludes
        exclude = list(data.exclude)
    corpus = load_mlm_corpus(texts, exclude=exclude, max_lines=ctx.budget.lang_lines)
    tokenizer, vocab = load_vocab(ctx.model_dir)
    dataset = tokenize_for_mlm(corpus.lines, tokenizer, max_length=ctx.budget.lang_max_length)
    return MlmData(dataset, tokenizer, vocab, [str(t) for t in texts], corpus.stats.as_dict())


@dataclass
class SupervisedData:
    spec: Any
    sentences: list
    labels: list
    tokenizer: Any
    vocab: dict


def task_data(ctx: MethodContext, data: TaskData) -> SupervisedData:
    """The source training sentences (the budget's first N), their label set and the tokenizer."""
    from compsft.tasks import get_task, resolve_data

    spec = get_task(data.task)
    sentences = spec.read(resolve_data(data.train))
    if ctx.budget.train_sentences:
        sentences = sentences[:ctx.budget.train_sentences]
    if not sentences:
        raise CompsftError(f"{data.train}: no sentences")
    tokenizer, vocab = load_vocab(ctx.model_dir)
    return SupervisedData(spec, sentences, list(spec.label_list(sentences)), tokenizer, vocab)


# -- language adapters ---------------------------------------------------------------------------

def train_language_adapter(ctx: MethodContext, data: LanguageData, seed: int, out: Path,
                           settings: MadxSettings) -> ModuleInfo:
    """A MAD-X language adapter for `data.code`, trained by MLM; written to `out`."""
    from transformers import AutoModelForMaskedLM, Trainer, set_seed

    from compsft.training.collators import ResumableMlmCollator
    from compsft.training.mlm import MaskedPositionsOnly

    started = time.perf_counter()
    out, budget = Path(out), ctx.budget
    set_seed(seed)
    mlm = mlm_data(ctx, data)
    dataset, tokenizer, vocab = mlm.dataset, mlm.tokenizer, mlm.vocab
    model = AutoModelForMaskedLM.from_pretrained(ctx.model_dir)
    # Before the adapter bank is added: the hook finds the MLM head as the model's one non-encoder child.
    masked_only = MaskedPositionsOnly(model)
    config = AdapterConfig(
        kind="language", language=data.code, hidden_size=model.config.hidden_size,
        num_layers=model.config.num_hidden_layers, reduction_factor=settings.lang_reduction_factor,
        non_linearity=settings.non_linearity, inv_adapter=settings.inv_adapter,
        inv_adapter_reduction_factor=settings.inv_adapter_reduction_factor, base_model=str(ctx.model_dir),
        vocab=vocab,
    )
    add_adapter(model, LANG, config)
    set_active(model, LANG)
    trainable = train_only(model, [LANG])
    steps = language_steps(budget, len(dataset))
    work = work_dir_for(ctx, out)
    args = training_args(ctx, work, lr=settings.lang_lr or budget.lang_lr, batch=budget.lang_batch, seed=seed,
                         steps=steps)
    collator = ResumableMlmCollator(tokenizer, mlm_probability=0.15, seed=seed)
    callbacks = list(ctx.callbacks)
    split_handle = _split_for_training(model, LANG, settings, seed, callbacks)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=callbacks)
    run_trainer(trainer, ctx, work)
    _merge_split(split_handle)
    masked_only.remove()
    config.training = {"steps": steps, "examples": len(dataset), "corpus": mlm.corpus_stats, "text": mlm.texts,
                       **_mosa_training_facts(settings),
                       "max_length": budget.lang_max_length, "lr": args.learning_rate, "batch": budget.lang_batch,
                       "seed": seed,
                       "final_loss": final_loss(trainer)}
    save_adapter_files(out, config, adapter_bank(model).adapters[LANG].tensors())
    return ModuleInfo(trainable=trainable, stored_bytes=module_bytes(out), seconds=time.perf_counter() - started,
                      extra={"steps": steps, "final_loss": config.training["final_loss"]})


# -- task adapters -------------------------------------------------------------------------------

def _language_adapter_for_stack(model, directory: Path, settings: MadxSettings, vocab: dict) -> None:
    """Load the language adapter in `directory` into `model` as LANG (MAD-X 2.0: without its last layer)."""
    from compsft.vocab import require_same_vocab

    config, tensors, _ = load_adapter_files(directory)
    if config.kind != "language":
        raise CompsftError(f"{directory}: a {config.kind} adapter where a language adapter was expected")
    require_same_vocab(config.vocab, vocab, f"language adapter {directory}")
    if settings.drop_last_language_layer:
        last = config.num_layers - 1
        tensors = {k: v for k, v in tensors.items() if not k.startswith(f"layers.{last}.")}
        config.leave_out = sorted(set(config.leave_out) | {last})
    add_adapter(model, LANG, config, tensors)


def _task_setup(model, language_dir: Path | None) -> Stack | str:
    return Stack(LANG, TASK) if language_dir is not None else TASK


class DevSelection:
    """Model selection on source dev data (base.py) for modules that are not SFTs: compsft's own
    `compsft.training.dev_selection.DevSelection` (checks evenly spaced, the last at the final step; ties
    keep the earlier step; scoring in eval mode, drawing no random numbers) over the module's `trainable`
    tensors, and `save(out, write)` to write the selected module into `out / DEV_SELECTED`."""

    def __init__(self, core, trainable: dict) -> None:
        self.core, self.trainable = core, trainable

    @classmethod
    def create(cls, ctx: MethodContext, data: TaskData, sup: "SupervisedData", steps: int, model, trainable: dict,
               callbacks: list, at=None) -> "DevSelection | None":
        """A selection for this run (appended to `callbacks`), or None when the budget asks for none.
        `at(max_steps)`: the steps to check at (default: `budget.dev_checks` evenly spaced)."""
        from compsft.tasks import resolve_data
        from compsft.training.dev_selection import DevSelection as Core, dev_scorer, dev_subset, primary_metric

        budget = ctx.budget
        if not budget.dev_checks or data.dev is None or budget.dev_sentences == 0:
            return None
        dev = dev_subset(sup.spec.read(resolve_data(data.dev)), budget.dev_sentences)
        metric = primary_metric(sup.spec.name)
        score = dev_scorer(sup.spec, sup.tokenizer, dev, sup.labels, metric=metric)
        snapshot = lambda _model: {k: v.detach().to("cpu", copy=True) for k, v in trainable.items()}  # noqa: E731
        core = Core(score, budget.dev_checks, metric=metric, snapshot=snapshot, at=at)
        callbacks.append(core)
        return cls(core, trainable)

    def save(self, out: Path, write) -> dict | None:
        """Write the best module with `write(directory)` (the best tensors swapped in for the call)."""
        if self.core.best is None:
            return None
        final = {k: v.detach().clone() for k, v in self.trainable.items()}
        with torch.no_grad():
            for k, v in self.core.best.items():
                self.trainable[k].copy_(v.to(self.trainable[k].device, self.trainable[k].dtype))
            try:
                write(Path(out) / DEV_SELECTED)
            finally:
                for k, v in final.items():
                    self.trainable[k].copy_(v)
        return self.core.summary()


def train_task_adapter(ctx: MethodContext, data: TaskData, source_language: Path | None, seed: int, out: Path,
                       settings: MadxSettings) -> ModuleInfo:
    """A task adapter (and head) trained on `Stack(source language adapter, task adapter)`; written to `out`."""
    from transformers import Trainer, set_seed

    started = time.perf_counter()
    out, budget = Path(out), ctx.budget
    set_seed(seed)
    sup = task_data(ctx, data)
    spec, sentences, labels, tokenizer, vocab = sup.spec, sup.sentences, sup.labels, sup.tokenizer, sup.vocab
    model = spec.build_model(ctx.model_dir, labels)
    head_names = spec.head_param_names(model)  # before the adapter bank joins the model's children
    if source_language is not None:
        _language_adapter_for_stack(model, Path(source_language), settings, vocab)
    config = AdapterConfig(
        kind="task", task=spec.name, labels=list(labels), hidden_size=model.config.hidden_size,
        num_layers=model.config.num_hidden_layers, reduction_factor=settings.task_reduction_factor,
        non_linearity=settings.non_linearity, base_model=str(ctx.model_dir), vocab=vocab,
    )
    add_adapter(model, TASK, config)
    set_active(model, _task_setup(model, source_language))
    trainable = train_only(model, [TASK], head_names)
    dataset = spec.encode(sentences, tokenizer, labels, max_length=budget.task_max_length)
    steps = task_steps(budget, len(dataset))
    work = work_dir_for(ctx, out)
    args = training_args(ctx, work, lr=settings.task_lr or budget.task_lr, batch=budget.task_batch, seed=seed,
                         steps=steps)
    params = dict(model.named_parameters())
    bank = adapter_bank(model)
    state = {**{f"adapter.{k}": v for k, v in bank.adapters[TASK].named_parameters()},
             **{f"head.{k}": params[k] for k in head_names}}
    callbacks = list(ctx.callbacks)
    selection = DevSelection.create(ctx, data, sup, steps, model, state, callbacks)
    split_handle = _split_for_training(model, TASK, settings, seed, callbacks)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=spec.collator(tokenizer),
                      callbacks=callbacks)
    run_trainer(trainer, ctx, work)
    _merge_split(split_handle)
    config.training = {"steps": steps, "examples": len(dataset), "sentences": len(sentences), "train": str(data.train),
                       "source_language": str(source_language) if source_language else None,
                       "drop_last_language_layer": settings.drop_last_language_layer,
                       **_mosa_training_facts(settings),
                       "lr": args.learning_rate, "batch": budget.task_batch, "seed": seed,
                       "final_loss": final_loss(trainer)}
    _save_task(out, config, state)
    extra: dict[str, Any] = {"steps": steps, "final_loss": config.training["final_loss"]}
    if selection is not None and (chosen := selection.save(out, lambda d: _save_task(d, config, state))):
        extra["dev_selected"] = chosen
    return ModuleInfo(trainable=trainable, stored_bytes=module_bytes(out), seconds=time.perf_counter() - started,
                      extra=extra)


def _save_task(out: Path, config: AdapterConfig, state: dict) -> None:
    adapter = {k[len("adapter."):]: v for k, v in state.items() if k.startswith("adapter.")}
    head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    save_adapter_files(out, config, adapter, head)


# -- assembly ------------------------------------------------------------------------------------

def assemble_task_model(ctx: MethodContext, task_dir: Path, language_dir: Path | None,
                        settings: MadxSettings) -> tuple[Any, list[str]]:
    """The task model with the task adapter, its head and (if given) the target language adapter stacked under it."""
    from compsft.tasks import get_task
    from compsft.vocab import require_same_vocab

    task_dir = Path(task_dir)
    config, tensors, head = load_adapter_files(task_dir)
    if config.kind != "task":
        raise CompsftError(f"{task_dir}: a {config.kind} adapter where a task adapter was expected")
    if not config.labels:
        raise CompsftError(f"{task_dir / 'adapter_config.json'}: field 'labels' is empty")
    _, vocab = load_vocab(ctx.model_dir)
    require_same_vocab(config.vocab, vocab, f"task adapter {task_dir}")
    spec = get_task(config.task)
    model = spec.build_model(ctx.model_dir, config.labels)
    load_head(model, head, task_dir)
    if language_dir is not None:
        _language_adapter_for_stack(model, Path(language_dir), settings, vocab)
    add_adapter(model, TASK, config, tensors)
    set_active(model, _task_setup(model, language_dir))
    model.to(ctx.device).eval()
    return model, list(config.labels)


def load_head(model, head: dict, task_dir: Path) -> None:
    params = dict(model.named_parameters())
    for name, value in head.items():
        if name not in params:
            raise CompsftError(f"{task_dir}: head tensor {name!r} is not a parameter of the task model")
        if tuple(params[name].shape) != tuple(value.shape):
            raise CompsftError(f"{task_dir}: head tensor {name!r} has shape {tuple(value.shape)}, "
                               f"the task model expects {tuple(params[name].shape)}")
    with torch.no_grad():
        for name, value in head.items():
            params[name].copy_(value.to(params[name].dtype))


# -- sizes ---------------------------------------------------------------------------------------

def adapter_sizes(hidden: int, layers: int, reduction_factor: float, inv_reduction_factor: float | None,
                  leave_out: int = 0) -> int:
    """Parameters of one adapter: a bottleneck per layer (+ a NICE block when `inv_reduction_factor`)."""
    b = max(int(hidden // reduction_factor), 1)
    n = (layers - leave_out) * (2 * hidden * b + b + hidden)
    if inv_reduction_factor:
        s1 = hidden // 2
        s2 = hidden - s1
        f, g = int(s2 // inv_reduction_factor), int(s1 // inv_reduction_factor)
        n += (s2 * f + f + f * s1 + s1) + (s1 * g + g + g * s2 + s2)
    return n
