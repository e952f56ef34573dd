"""`nas-pet-structured` and `nas-pet-unstructured`: PET architectures found by pruning (Lawton et al. 2023).

Task module: `compsft.training.nas_pet.train_nas_pet_sft` on the source task data with the *source*
LT-SFT language SFT applied while training (as LT-SFT's task SFT): LoRA of rank r on every linear
layer of the encoder plus every bias vector (r: the smallest power of two >= 8 whose space holds 4·K,
at most full rank), trained for LT-SFT's phase-1 steps while it is pruned in
three rounds to K trainable entries (LT-SFT's task K: the same budget), then the surviving
architecture retrained from scratch for LT-SFT's phase-2 steps. The trained PET is merged into the
weights as a difference and stored as an ordinary SFT (ΔW = s·BA on each matrix with a surviving
component, Δb on each surviving bias; plus the task head); which components survived is in its
`sft_config.json` (`training.survivors`, per tensor).

Language module: LT-SFT's (cache key "lt-sft"). A NAS-PET language module would compose the same way
(its merged difference is an SFT, applied like LT-SFT's), but it is not offered here: it would need
an MLM variant of the search, and the comparison's language side is shared with LT-SFT.

Composition for a target: θ0 + φ_L(target, LT-SFT) + ΔPET_T by `compsft.apply`; the MLM head never,
the task head from the task module.

PET parameters train at `PET_LR_SCALE` times the budget's task learning rate (LoRA and BitFit are
trained with learning rates around 1e-4 to 1e-3, full fine-tuning and SFTs around 5e-5).
Model selection on source dev data (`budget.dev_checks`): checks during the retraining (the architecture
is fixed then), the best state merged into ``dev-selected`` like the final one.

Resume: the search's architecture is kept in the harness's work directory; a module interrupted in the
retraining skips the search when the grid resumes, and retrains from the start.
"""
from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from .base import MethodContext, MethodSpec, ModuleInfo, TaskData
from .spiel import assemble, lt_sft_language, module_bytes

PET_LR_SCALE = 10.0
ROUNDS = 3


def task_phases(ctx: MethodContext) -> tuple[tuple, tuple]:
    """(search, retrain) lengths: LT-SFT's phase 1 and phase 2 of the budget."""
    from ..errors import CompsftError

    b = ctx.budget
    if b.task_steps:
        return (None, b.task_steps, b.task_steps), (None, b.task_steps, b.task_steps)
    if not b.task_epochs or len(b.task_epochs) != 2:
        raise CompsftError("budget: task modules need task_steps or task_epochs (phase 1, phase 2)")
    return (b.task_epochs[0], None, None), (b.task_epochs[1], None, None)


def train_task(ctx: MethodContext, data: TaskData, source_module: Path | None, seed: int, out: Path, *,
               structured: bool) -> ModuleInfo:
    """Search, prune to K, retrain; the merged PET written to `out` as a task SFT."""
    from ..atomic import atomic_path
    from ..training.nas_pet import NasPetArguments, train_nas_pet_sft
    from .base import DEV_SELECTED
    from .common import dev_selection, work_dir

    b = ctx.budget
    search, retrain = task_phases(ctx)
    work = work_dir(ctx, out)
    selection = dev_selection(ctx, data, work, sparse=False)
    t0 = time.perf_counter()
    with atomic_path(out) as tmp:
        res = train_nas_pet_sft(data.task, ctx.model_dir, data.train, tmp, source_sft=source_module,
                                density=b.task_density, search=search, retrain=retrain,
                                nas_args=NasPetArguments(structured=structured, rounds=ROUNDS),
                                lr=b.task_lr * PET_LR_SCALE, batch_size=b.task_batch,
                                max_length=b.task_max_length, max_sentences=b.train_sentences, seed=seed,
                                cpu=ctx.device == "cpu", callbacks=list(ctx.callbacks), work_dir=work,
                                selection=selection, resume=ctx.resume)
        if res.selected is not None:
            res.selected.save(tmp / DEV_SELECTED)
    head = sum(t.numel() for t in res.sft.dense.values())
    return ModuleInfo(trainable=res.trainable + head, stored_bytes=module_bytes(out),
                      seconds=round(time.perf_counter() - t0, 2),
                      extra={"k": res.budget, "budget": res.budget, "space": res.space, "merged_k": res.sft.k,
                             "rank": res.sft.config.training["nas_pet"]["rank"],
                             "prune_history": res.history, "survivors": res.survivors,
                             **({"dev_selected": selection.summary()} if res.selected is not None else {})})


def parameter_counts(ctx: MethodContext, task: str) -> dict[str, int]:
    """Trainable entries before training: at most K PET entries plus the head; the language side is LT-SFT's.
    The stored bytes given here are those of K entries; the merged difference (ΔW = s·BA, dense in each matrix
    with a surviving component) is usually larger, and is measured after training (`ModuleInfo.stored_bytes`)."""
    from .spiel import parameter_counts as sft_counts

    return sft_counts(ctx, task)


def _spec(structured: bool) -> MethodSpec:
    kind = "structured" if structured else "unstructured"
    unit = "rank-1 LoRA components and bias vectors" if structured else "single LoRA and bias entries"
    return MethodSpec(
        name=f"nas-pet-{kind}",
        description=f"NAS-PET ({kind}): LoRA + biases pruned by |θ·g| ({unit}) to K, retrained; LT-SFT languages",
        composition="θ0 + φ_L(target, LT-SFT) + merged PET difference (an SFT); task head from the task module",
        train_language=lt_sft_language,
        train_task=partial(train_task, structured=structured),
        assemble=assemble,
        parameter_counts=parameter_counts,
        language_key="lt-sft",
    )


STRUCTURED = _spec(True)
UNSTRUCTURED = _spec(False)
#: the registry names UNSTRUCTURED as `.nas_pet:UNSTRUCTURED`
METHOD = STRUCTURED
METHODS = {STRUCTURED.name: STRUCTURED, UNSTRUCTURED.name: UNSTRUCTURED}
