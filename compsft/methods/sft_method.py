"""The pieces of every SFT method: train a language SFT, train a task SFT, compose them for a target.

The methods differ only in their mask strategy (`compsft.training.masks`) and in what they compose,
so each method module is a `MethodSpec` built from these functions with `functools.partial`.
Strategies without a phase 1 (`random`, `magnitude`) train once, for both phases' steps together,
so they see as many examples as LT-SFT.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ..errors import CompsftError
from .base import DEV_SELECTED, LanguageData, MethodContext, ModuleInfo, TaskData
from .common import (dev_selection, language_phases, module_bytes, one_phase, seconds_since, sft_counts, sft_labels,
                     task_model, task_phases, training_kwargs, work_dir)


def _phases(phases, strategy: str):
    from ..training.masks import get_mask_strategy

    p1, p2 = phases
    if not get_mask_strategy(strategy).needs_phase1:
        return p1, one_phase(p1, p2)  # phase 1 is skipped: phase 2 takes its steps too
    return p1, p2


def _facts(tuner) -> dict:
    s = tuner.summary()
    # "output" would name the temporary directory the module was written to before it was renamed.
    phases = {k: v for k, v in s["phases"].items() if k != "output"}
    facts = {"k": s["k"], "num_eligible": s["num_eligible"], "density": s["density"],
             "mask_strategy": s["mask_strategy"], "phases": phases}
    dev_mlm = tuner.sft.config.training.get("dev_mlm")  # language modules trained with held-out lines
    return {**facts, "dev_mlm": dev_mlm} if dev_mlm else facts


def _trainable(tuner) -> int:
    return int(tuner.sft.k + sum(t.numel() for t in tuner.sft.dense.values()))


def train_language_module(ctx: MethodContext, data: LanguageData, seed: int, out: Path, *,
                          mask_strategy: str) -> ModuleInfo:
    """A language SFT of `data.code` from its text (MLM), with `mask_strategy`; written to `out`."""
    from ..atomic import atomic_path
    from ..training.recipes import train_language_sft

    b = ctx.budget
    p1, p2 = _phases(language_phases(b), mask_strategy)
    t0 = time.perf_counter()
    with atomic_path(out) as tmp:
        tuner = train_language_sft(
            ctx.model_dir, data.code, tmp, text=list(data.texts), exclude=list(data.exclude), density=b.lang_density,
            mask_strategy=mask_strategy, phase1=p1, phase2=p2, lr=b.lang_lr, batch_size=b.lang_batch,
            max_length=b.lang_max_length, max_lines=b.lang_lines, dev_lines=b.lang_dev_lines,
            work_dir=work_dir(ctx, out), **training_kwargs(ctx, seed, "language"))
    return ModuleInfo(trainable=_trainable(tuner), stored_bytes=module_bytes(out), seconds=seconds_since(t0),
                      extra=_facts(tuner))


def train_task_module(ctx: MethodContext, data: TaskData, source_module: Path | None, seed: int, out: Path, *,
                      mask_strategy: str, also: Callable | None = None) -> ModuleInfo:
    """A task SFT on the source data with the source language module applied, with `mask_strategy`.

    With `budget.dev_checks`, the values and heads at the best source-dev score of the last phase are
    written as a second SFT into ``out/dev-selected``. `also(tuner, directory, selection)` may write
    more into the module before it appears (prune-difference adds its no-retrain SFT).
    """
    from ..atomic import atomic_path
    from ..training.dev_selection import selected_sft
    from ..training.masks import get_mask_strategy
    from ..training.recipes import train_task_sft

    b = ctx.budget
    p1, p2 = _phases(task_phases(b), mask_strategy)
    work = work_dir(ctx, out)
    kwargs = training_kwargs(ctx, seed, "task")
    # No phase 2 (prune-difference without retraining): nothing to select between.
    selection = dev_selection(ctx, data, work, sparse=True) if get_mask_strategy(mask_strategy).runs_phase2 else None
    if selection is not None:
        kwargs["callbacks"].append(selection)
    t0 = time.perf_counter()
    with atomic_path(out) as tmp:
        tuner = train_task_sft(
            data.task, ctx.model_dir, data.train, tmp, source_sft=source_module, density=b.task_density,
            mask_strategy=mask_strategy, phase1=p1, phase2=p2, lr=b.task_lr, batch_size=b.task_batch,
            max_length=b.task_max_length, max_sentences=b.train_sentences, work_dir=work, **kwargs)
        facts = _facts(tuner)
        if selection is not None and selection.best is not None:
            selected_sft(tuner.sft, selection.best, selection.summary()).save(tmp / DEV_SELECTED)
            facts["dev_selected"] = selection.summary()
        if also is not None:
            also(tuner, tmp, selection)
    return ModuleInfo(trainable=_trainable(tuner), stored_bytes=module_bytes(out), seconds=seconds_since(t0),
                      extra=facts)


def assemble_sfts(ctx: MethodContext, task_module: Path, language_module: Path | None, *,
                  subdir: str | None = None, language_part: Callable | None = None) -> tuple:
    """θ0 + φ_L + φ_T on a task model: the target language SFT without its MLM head, the task SFT
    with its head. The model is reused from the previous call with every SFT reverted first.
    `language_part(sft, model)`: the part of φ_L to compose (`upper_layers`); all of it by default."""
    from ..merge import apply
    from ..serialization import load_sft

    path = Path(task_module) / subdir if subdir else Path(task_module)
    if not (path / "sft_config.json").is_file():
        raise CompsftError(f"{path}: no task SFT there")
    task_sft = load_sft(path)
    labels = sft_labels(task_sft, path)
    model = task_model(ctx, task_sft.config.task, labels)
    sfts, heads = [task_sft], [True]
    if language_module is not None:
        language = load_sft(language_module)
        sfts.insert(0, language_part(language, model) if language_part else language)
        heads.insert(0, False)  # the MLM head has no place on a task model
    apply(model, *sfts, with_dense=heads)
    return model, labels


def upper_layers(sft, model):
    """The entries of `sft` on the upper half of the model's encoder layers (layers ≥ L // 2)."""
    from ..training.params import encoder_layer

    layers = model.config.num_hidden_layers
    if not any(encoder_layer(name) is not None for name in sft.diffs):
        raise CompsftError(f"{sft.source or 'the language SFT'}: no entry on a numbered encoder layer "
                           f"(parameter names like 'encoder.layer.3.…'), so there is no upper half to keep")
    return sft.restricted(lambda name: (layer := encoder_layer(name)) is not None and layer >= layers // 2)


def assemble_without_language(ctx: MethodContext, task_module: Path, language_module: Path | None = None,
                              **kwargs) -> tuple:
    """θ0 + φ_T: the task SFT alone (any language module passed is ignored)."""
    return assemble_sfts(ctx, task_module, None, **kwargs)


def counts(ctx: MethodContext, task: str, *, target_language: bool = True) -> dict[str, int]:
    """Trainable entries and stored bytes of an SFT method with language modules, before training."""
    return sft_counts(ctx, task, language=True, target_language=target_language)
