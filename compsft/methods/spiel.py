"""`spiel` and `lt-sft-lang+spiel-task`: SpIEL (Ansell et al. 2024) modules in the comparison.

`spiel`: the language SFT (MLM on the language's text) and the task SFT (source task data, with the
*source* SpIEL language SFT applied while training) are both trained by SpIEL
(`compsft.training.spiel`): K entries active from the start, dropped and regrown every 20 steps.
SpIEL has one phase, so it trains for both LT-SFT phases' steps together (the same examples).

`lt-sft-lang+spiel-task`: LT-SFT's language SFTs (cache key "lt-sft", trained once for both
methods) with a SpIEL task SFT trained on top of the source LT-SFT language SFT.

Composition, as LT-SFT's: both are ordinary SFTs, θ0 + φ_L(target) + φ_T by `compsft.apply`, the
MLM head never, the task head from φ_T.

Checkpoints and resume as LT-SFT's: in the harness's work directory, at the same interval in steps;
an interrupted module continues from its last checkpoint (`SpielTuner` checkpoints the moving support).

Model selection on source dev data (`budget.dev_checks`): task modules score the dev set that many times
over their one phase and write the state at the best check into ``dev-selected`` — each tensor's active
positions *and* values (`spiel_snapshot`), since the support moves between checks.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..errors import CompsftError
from .base import LanguageData, MethodContext, MethodSpec, ModuleInfo, TaskData


def _add(a, b):
    return None if a is None or b is None else a + b


def language_steps(ctx: MethodContext) -> tuple:
    """(max_epochs, min_steps, max_steps) of a language module: both LT-SFT phases together."""
    b = ctx.budget
    if b.lang_steps:
        return (None, 2 * b.lang_steps, 2 * b.lang_steps)
    if b.lang_epochs is None and b.lang_max_steps is None:
        raise CompsftError("budget: language modules need lang_steps, lang_epochs or lang_max_steps")
    return (_add(b.lang_epochs, b.lang_epochs), None, _add(b.lang_max_steps, b.lang_max_steps))


def task_steps(ctx: MethodContext) -> tuple:
    """(max_epochs, min_steps, max_steps) of a task module: both LT-SFT phases together."""
    b = ctx.budget
    if b.task_steps:
        return (None, 2 * b.task_steps, 2 * b.task_steps)
    if not b.task_epochs or len(b.task_epochs) != 2:
        raise CompsftError("budget: task modules need task_steps or task_epochs (phase 1, phase 2)")
    return (b.task_epochs[0] + b.task_epochs[1], None, None)


def module_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file())


def _common(ctx: MethodContext, seed: int, out: Path, kind: str) -> dict:
    # LT-SFT's: checkpoints in the harness's work directory at its interval, resumed when it says so.
    from .common import training_kwargs, work_dir

    return {**training_kwargs(ctx, seed, kind), "work_dir": work_dir(ctx, out)}


def _info(tuner, out: Path, t0: float) -> ModuleInfo:
    sft = tuner.sft
    return ModuleInfo(trainable=int(sft.k + sum(t.numel() for t in sft.dense.values())),
                      stored_bytes=module_bytes(out), seconds=round(time.perf_counter() - t0, 2),
                      extra={"k": tuner.k, "num_eligible": tuner.num_eligible, "density": tuner.k / tuner.num_eligible,
                             "reselections": len(tuner.reselections),
                             "moved": sum(r["moved"] for r in tuner.reselections)})


def train_language(ctx: MethodContext, data: LanguageData, seed: int, out: Path) -> ModuleInfo:
    """A SpIEL language SFT of `data.code` (MLM on its text), written to `out`."""
    from ..atomic import atomic_path
    from ..training.spiel import train_spiel_sft

    b = ctx.budget
    t0 = time.perf_counter()
    with atomic_path(out) as tmp:
        tuner = train_spiel_sft("language", ctx.model_dir, data.code, tmp, text=list(data.texts),
                                exclude=list(data.exclude), density=b.lang_density, steps=language_steps(ctx),
                                lr=b.lang_lr, batch_size=b.lang_batch, max_length=b.lang_max_length,
                                max_lines=b.lang_lines, **_common(ctx, seed, out, "language"))
    return _info(tuner, out, t0)


def train_task(ctx: MethodContext, data: TaskData, source_module: Path | None, seed: int, out: Path) -> ModuleInfo:
    """A SpIEL task SFT on the source data with the source language module applied, written to `out`."""
    from ..atomic import atomic_path
    from ..training.spiel import spiel_snapshot, train_spiel_sft
    from .base import DEV_SELECTED
    from .common import dev_selection

    b = ctx.budget
    common = _common(ctx, seed, out, "task")
    # One phase, so selection is active throughout (not only when phase-2 values are attached).
    selection = dev_selection(ctx, data, common["work_dir"], sparse=False, snapshot=spiel_snapshot)
    if selection is not None:
        common["callbacks"].append(selection)
    t0 = time.perf_counter()
    with atomic_path(out) as tmp:
        tuner = train_spiel_sft("task", data.task, ctx.model_dir, data.train, tmp, source_sft=source_module,
                                density=b.task_density, steps=task_steps(ctx), lr=b.task_lr,
                                batch_size=b.task_batch, max_length=b.task_max_length,
                                max_sentences=b.train_sentences, **common)
        selected = selection.summary() if selection is not None and selection.best is not None else None
        if selected:
            tuner.sft_from_snapshot(selection.best, selected).save(tmp / DEV_SELECTED)
    info = _info(tuner, out, t0)
    if selected:
        info.extra["dev_selected"] = selected
    return info


def assemble(ctx: MethodContext, task_module: Path, language_module: Path | None) -> tuple:
    """θ0 + φ_L(target) + φ_T on a fresh task model on `ctx.device`: no MLM head, the task head."""
    from ..merge import apply
    from ..serialization import load_sft
    from ..tasks import get_task

    task_sft = load_sft(task_module)
    labels = task_sft.config.training.get("labels")
    if not labels or not task_sft.config.task:
        raise CompsftError(f"{task_module}: not a task SFT written by compsft (no task or labels)")
    model = get_task(task_sft.config.task).build_model(ctx.model_dir, list(labels)).to(ctx.device)
    model.eval()
    sfts, heads = [task_sft], [True]
    if language_module is not None:
        sfts, heads = [load_sft(language_module), task_sft], [False, True]
    apply(model, *sfts, with_dense=heads)
    return model, list(labels)


def parameter_counts(ctx: MethodContext, task: str) -> dict[str, int]:
    """K, trainable entries and stored bytes per target before training: SpIEL's K is LT-SFT's (same budget)."""
    from .sft_method import counts

    return counts(ctx, task)


def lt_sft_language(ctx: MethodContext, data: LanguageData, seed: int, out: Path) -> ModuleInfo:
    """LT-SFT's language module (looked up in the registry when called, so it is LT-SFT's own code)."""
    from . import get_method

    return get_method("lt-sft").train_language(ctx, data, seed, out)


METHOD = MethodSpec(
    name="spiel",
    description="SpIEL: language SFT + task SFT, both by SpIEL (drop and grow every 20 steps), composed",
    composition="θ0 + φ_L(target) + φ_T, both SpIEL SFTs; MLM head never, task head from φ_T",
    train_language=train_language,
    train_task=train_task,
    assemble=assemble,
    parameter_counts=parameter_counts,
)

MIXED = MethodSpec(
    name="lt-sft-lang+spiel-task",
    description="LT-SFT language SFTs + a SpIEL task SFT, composed",
    composition="θ0 + φ_L(target, LT-SFT) + φ_T (SpIEL); MLM head never, task head from φ_T",
    train_language=lt_sft_language,
    train_task=train_task,
    assemble=assemble,
    parameter_counts=parameter_counts,
    language_key="lt-sft",
)

#: every method this module defines, by name (the registry names MIXED as `.spiel:MIXED`)
METHODS = {METHOD.name: METHOD, MIXED.name: MIXED}
