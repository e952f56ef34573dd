"""What the methods share: budgets as phases, dev selection wiring, sizes, and a reusable task model.

* `language_phases` / `task_phases` map a :class:`Budget` onto the recipes' phase tuples
  ``(max_epochs, min_steps, max_steps)``; `one_phase` adds both up for methods that train once.
* `dev_selection(ctx, data, work)` builds the source-dev `DevSelection` callback (or None).
* `module_bytes(dir)` is what a module costs on disk; `estimate_sft_bytes` the same before training.
* `task_model(ctx, task, labels)` keeps one fresh task model per (model, task, labels, device) and hands
  it back with every SFT reverted: assembling a target never starts from anything but θ0, and the
  encoder is not reloaded for every cell.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from ..errors import CompsftError
from .base import Budget, MethodContext, TaskData, per_target_totals

Phase = tuple  # (max_epochs | None, min_steps | None, max_steps | None)

#: checkpoint interval of runs whose length is given in epochs (with a work directory to resume from)
CHECKPOINT_STEPS = 500
# Files a model directory shares with the base model: not counted as the module's stored bytes.
_TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                    "sentencepiece.bpe.model", "spiece.model", "added_tokens.json"}


# -- budgets -----------------------------------------------------------------------------------------
def language_phases(b: Budget) -> tuple[Phase, Phase]:
    """Phases 1 and 2 of a language module: `lang_steps` each, or `lang_epochs` raised to `lang_min_steps`
    and capped at `lang_max_steps` (the paper's 100 epochs, 10k to 100k steps)."""
    if b.lang_steps:
        phase = (None, b.lang_steps, b.lang_steps)
    elif b.lang_epochs is not None or b.lang_max_steps is not None:
        phase = (b.lang_epochs, getattr(b, "lang_min_steps", 0) or None, b.lang_max_steps)
    else:
        raise CompsftError("budget: language modules need lang_steps, lang_epochs or lang_max_steps")
    return phase, phase


def task_phases(b: Budget) -> tuple[Phase, Phase]:
    """Phases 1 and 2 of a task module: `task_steps` each, or `task_epochs` = (phase 1, phase 2)."""
    if b.task_steps:
        return (None, b.task_steps, b.task_steps), (None, b.task_steps, b.task_steps)
    if not b.task_epochs or len(b.task_epochs) != 2:
        raise CompsftError("budget: task modules need task_steps or task_epochs (phase 1, phase 2)")
    return (b.task_epochs[0], None, None), (b.task_epochs[1], None, None)


def one_phase(p1: Phase, p2: Phase) -> Phase:
    """One phase as long as both together (the same examples for methods that train once)."""
    def add(a, b):
        return None if a is None or b is None else a + b

    return tuple(add(a, b) for a, b in zip(p1, p2))


def steps_or_epochs(phase: Phase) -> dict[str, Any]:
    """A one-phase length as `train_full_ft` takes it: steps when fixed, else epochs (capped steps ignored
    only when there is no cap)."""
    epochs, lo, hi = phase
    if epochs is None:
        return {"steps": hi if hi is not None else lo}
    return {"epochs": epochs}


def checkpoint_steps(phase_steps: int) -> int:
    """Checkpoint twice per phase when phases are given in steps (an interrupted module loses at most
    half a phase; a checkpoint of a full model with its optimizer state is not free), else every 500."""
    return max(20, phase_steps // 2) if phase_steps else CHECKPOINT_STEPS


def training_kwargs(ctx: MethodContext, seed: int, kind: str) -> dict[str, Any]:
    """Keyword arguments every training call of a method gets from the context (`kind`: language or task).

    Without a work directory nothing can be resumed, so nothing is checkpointed.
    """
    steps = ctx.budget.lang_steps if kind == "language" else ctx.budget.task_steps
    return {"seed": seed, "resume": ctx.resume, "cpu": ctx.device == "cpu", "callbacks": list(ctx.callbacks),
            "save_steps": checkpoint_steps(steps) if ctx.work_dir else 0, "quiet": True}


def work_dir(ctx: MethodContext, out: Path) -> Path:
    """Where a module's checkpoints go: the harness's scratch space, else next to the module."""
    return Path(ctx.work_dir) if ctx.work_dir else out.with_name(out.name + ".work")


# -- dev selection -----------------------------------------------------------------------------------
def check_dev_data(ctx: MethodContext, data: TaskData) -> bool:
    """True when the budget asks for dev checks (an error if there is no dev data to check on)."""
    b = ctx.budget
    if not b.dev_checks:
        return False
    if data.dev is None or b.dev_sentences == 0:
        raise CompsftError(f"budget asks for {b.dev_checks} dev checks but the {data.task} source data has no "
                           "dev set (give one, or set dev_checks to 0)")
    return True


def dev_selection(ctx: MethodContext, data: TaskData, work: Path, *, sparse: bool, snapshot=None):
    """The source-dev `DevSelection` callback for a task module, or None when the budget has no checks.
    `sparse`: active only in phase 2 (values attached); `snapshot`: what to keep (default: trainable tensors)."""
    b = ctx.budget
    if not check_dev_data(ctx, data):
        return None
    from transformers import AutoTokenizer

    from ..tasks import get_task, resolve_data
    from ..training.dev_selection import DevSelection, dev_scorer, dev_subset, has_sparse_values, primary_metric

    spec = get_task(data.task)
    sentences = dev_subset(spec.read(resolve_data(data.dev)), b.dev_sentences)
    if not sentences:
        raise CompsftError(f"{data.dev}: no dev sentences")
    metric = primary_metric(data.task)
    tokenizer = AutoTokenizer.from_pretrained(ctx.model_dir)
    score = dev_scorer(spec, tokenizer, sentences, metric=metric, max_length=b.task_max_length)
    return DevSelection(score, b.dev_checks, active=has_sparse_values if sparse else None,
                        state_file=work / "dev-selection.safetensors", metric=metric, snapshot=snapshot)


# -- sizes -------------------------------------------------------------------------------------------
def module_bytes(directory: str | os.PathLike) -> int:
    """Bytes of a module's own files (its top level: no sub-directories such as dev-selected, no tokenizer)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CompsftError(f"{directory}: no module there")
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file() and p.name not in _TOKENIZER_FILES)


# Per-tensor bytes of the safetensors header (three parts and an index entry) and of the base
# fingerprint in sft_config.json, and the rest of the config: measured on SFTs written by compsft.
_HEADER_PER_SPARSE_TENSOR = 600
_HEADER_PER_DENSE_TENSOR = 100
_CONFIG_BYTES = 3000


def estimate_sft_bytes(k: int, sizes: list[int], dense: int, dense_tensors: int = 0) -> int:
    """Bytes of an SFT directory with `k` entries spread evenly over tensors of `sizes` entries (fp32 values,
    Elias-Fano indices as compsft.encoding writes them) and `dense` fp32 head entries in `dense_tensors`
    tensors, plus an estimate of the headers and the config."""
    from ..encoding import high_bitmap_length, low_bits_for

    total_size = sum(sizes)
    out = 4 * (k + dense) + _CONFIG_BYTES + _HEADER_PER_SPARSE_TENSOR * len(sizes) \
        + _HEADER_PER_DENSE_TENSOR * dense_tensors
    for n in sizes:
        nnz = round(k * n / total_size)
        if nnz:
            low = low_bits_for(nnz, n)
            out += low * ((nnz + 7) // 8) + (high_bitmap_length(nnz, n, low) + 7) // 8
    return out


@functools.lru_cache(maxsize=8)
def model_facts(model_dir: str, task: str) -> dict[str, Any]:
    """Parameter counts of the chosen model as LT-SFT sees it, without loading weights where it can:
    eligible tensor sizes and MLM head size (language modules), eligible sizes and head size of the
    task model built with the task's default labels (task modules), and all its parameters."""
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM

    from ..tasks import get_task
    from ..training.params import freeze_for_lt_sft, untie_output_embeddings

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        mlm = AutoModelForMaskedLM.from_config(config)
    untie_output_embeddings(mlm)
    eligible, heads = freeze_for_lt_sft(mlm)
    facts: dict[str, Any] = {
        "config": config,
        "language_sizes": [p.numel() for p in eligible.values()],
        "language_head": sum(p.numel() for p in heads.values()), "language_head_tensors": len(heads),
    }
    spec = get_task(task)
    model = spec.build_model(model_dir, spec.label_list([]))
    eligible, heads = freeze_for_lt_sft(model)
    facts.update(task_sizes=[p.numel() for p in eligible.values()], task_head=sum(p.numel() for p in heads.values()),
                 task_head_tensors=len(heads), task_all=sum(p.numel() for p in model.parameters()))
    del model
    return facts


def adapter_totals(ctx: MethodContext, task: str, counts: dict[str, int], extra_bytes: int = 0) -> dict[str, int]:
    """`per_target_totals` of a method whose task module trains and stores the model's dense task head beside
    its own parameters (the adapter family), so its counts compare with the SFT methods'."""
    return per_target_totals(counts, task_head=model_facts(str(ctx.model_dir), task)["task_head"],
                             extra_bytes=extra_bytes)


def sft_counts(ctx: MethodContext, task: str, *, language: bool, target_language: bool) -> dict[str, int]:
    """Trainable entries and stored bytes of an SFT method before training (K from `resolve_k`).

    `trainable` and `stored_bytes` are per target, as the harness sums its modules' `ModuleInfo`: the
    task module plus the target language module when the method composes one. A language module's
    trainable entries include its MLM head (trained and stored in the module, though never composed
    onto a task model); `language_k` is what the target's model actually receives from it.
    """
    from ..training.params import resolve_k

    facts = model_facts(str(ctx.model_dir), task)
    b = ctx.budget
    out: dict[str, int] = {}
    task_k = resolve_k(sum(facts["task_sizes"]), None, b.task_density, "task", config=facts["config"])
    out["task_k"] = task_k
    out["task_trainable"] = task_k + facts["task_head"]
    out["task_stored_bytes"] = estimate_sft_bytes(task_k, facts["task_sizes"], facts["task_head"],
                                                  facts["task_head_tensors"])
    trainable, stored = out["task_trainable"], out["task_stored_bytes"]
    if language:
        lang_k = resolve_k(sum(facts["language_sizes"]), None, b.lang_density, "language",
                           config=facts["config"])
        out["language_k"] = lang_k
        out["language_trainable"] = lang_k + facts["language_head"]
        out["language_stored_bytes"] = estimate_sft_bytes(lang_k, facts["language_sizes"], facts["language_head"],
                                                          facts["language_head_tensors"])
        if target_language:
            trainable += out["language_trainable"]
            stored += out["language_stored_bytes"]
    out["trainable"] = trainable
    out["stored_bytes"] = stored
    return out


# -- the task model ----------------------------------------------------------------------------------
_TASK_MODEL: dict[str, Any] = {}


def task_model(ctx: MethodContext, task: str, labels: list[str]):
    """A task model at θ0 (fresh head, no SFT applied) on `ctx.device`, reused between calls.

    The same object is handed out again with every SFT taken off (`revert`), so a caller must be done
    with the previous model before asking for the next one.
    """
    from ..merge import applied, revert
    from ..tasks import get_task

    key = (str(Path(ctx.model_dir).resolve()), task, tuple(labels), str(ctx.device))
    if _TASK_MODEL.get("key") == key:
        model = _TASK_MODEL["model"]
        while applied(model):
            revert(model)
        return model
    _TASK_MODEL.clear()
    model = get_task(task).build_model(ctx.model_dir, labels).to(ctx.device)
    model.eval()
    _TASK_MODEL.update(key=key, model=model)
    return model


def clear_task_model() -> None:
    """Drop the reused task model (frees its memory)."""
    _TASK_MODEL.clear()


def sft_labels(sft, where: Path) -> list[str]:
    labels = sft.config.training.get("labels")
    if not labels or not sft.config.task:
        raise CompsftError(f"{where}: not a task SFT written by compsft (no task or labels in sft_config.json)")
    return list(labels)


def seconds_since(t0: float) -> float:
    import time

    return round(time.perf_counter() - t0, 2)
