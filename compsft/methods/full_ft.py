"""`full-ft`: full fine-tuning of the whole model on the source task data (no language module).

Task module: a model directory from `compsft.training.full_ft.train_full_ft` (every parameter of the
task model trained, for LT-SFT's phase 1 + phase 2 steps: the same examples); with dev checks, the
best model by source dev score in ``dev-selected/``. No language module, trained or composed.

Composition for a target: the fine-tuned model as it is (θ_FT).
"""
from __future__ import annotations

import time
from pathlib import Path

from ..errors import CompsftError
from .base import MethodContext, MethodSpec, ModuleInfo, TaskData
from .common import (check_dev_data, checkpoint_steps, model_facts, module_bytes, one_phase, seconds_since, steps_or_epochs,
                     task_phases, training_kwargs, work_dir)


def train_task(ctx: MethodContext, data: TaskData, source_module: Path | None, seed: int, out: Path) -> ModuleInfo:
    from ..training.full_ft import train_full_ft

    b = ctx.budget
    length = steps_or_epochs(one_phase(*task_phases(b)))
    checks = b.dev_checks
    check_dev_data(ctx, data)
    kwargs = training_kwargs(ctx, seed, "task")
    if ctx.work_dir:  # one phase as long as two: checkpoint twice in it, as an SFT does per phase
        kwargs["save_steps"] = checkpoint_steps(2 * b.task_steps)
    t0 = time.perf_counter()
    result = train_full_ft(
        data.task, ctx.model_dir, data.train, out, dev=data.dev if checks else None, lr=b.task_lr,
        batch_size=b.task_batch, max_length=b.task_max_length, max_sentences=b.train_sentences, dev_checks=checks,
        dev_max_sentences=b.dev_sentences or None, work_dir=work_dir(ctx, out), **length, **kwargs)
    extra = {k: result.info[k] for k in ("steps", "train_loss", "seconds", "resumed_from") if k in result.info}
    if "dev_selected" in result.info:
        extra["dev_selected"] = result.info["dev_selected"]
    return ModuleInfo(trainable=result.trainable, stored_bytes=module_bytes(out), seconds=seconds_since(t0),
                      extra=extra)


def assemble(ctx: MethodContext, task_module: Path, language_module: Path | None = None) -> tuple:
    from ..training.full_ft import load_full_ft

    if not Path(task_module).is_dir():
        raise CompsftError(f"{task_module}: no fine-tuned model there")
    model, labels, _ = load_full_ft(task_module)
    model.to(ctx.device).eval()
    return model, labels


def parameter_counts(ctx: MethodContext, task: str) -> dict[str, int]:
    """Every parameter of the task model is trained and stored (fp32)."""
    facts = model_facts(str(ctx.model_dir), task)
    n = facts["task_all"]
    return {"task_trainable": n, "task_stored_bytes": 4 * n, "trainable": n, "stored_bytes": 4 * n}


METHOD = MethodSpec(
    name="full-ft",
    description="full fine-tuning of the whole model on the source task",
    composition="θ_FT: the fine-tuned model as it is (no language module)",
    train_task=train_task,
    assemble=assemble,
    parameter_counts=parameter_counts,
    uses_target_language=False,
    uses_source_language=False,
)
