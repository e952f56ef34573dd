"""Named budgets of `compsft compare`: how much every method trains and evaluates.

Every method of a grid gets the same budget (`compsft.methods.base.Budget`): two-phase methods the
step counts per phase, one-phase methods (full fine-tuning) their sum, so all see the same examples.

``quick``
    A smoke run of about a minute on 2 CPU cores for the default grid's shape: a few steps, tiny
    lengths, 30 target sentences. It proves the plumbing, not the method; the tests use it.
``cpu``
    The CPU budget (the demo's default since its first version): language modules 40 + 40 MLM steps of
    batch 8 × 128 sub-words, task modules 80 + 80 steps of batch 16 (full fine-tuning 160), lr 1e-4,
    4,000 English training sentences, 400 target test sentences, model selection on 200 English dev
    sentences checked 4 times. Measured on the project's 2-core CPU in a real grid (POS, five targets,
    seeds 42–44, uncontended modules): a language module 130–190 s, a task module 215–290 s (LT-SFT's task
    SFT, full fine-tuning, prune-difference, random-mask), an evaluation of 400 sentences ≈ 10–12 s. **This
    is the budget that keeps the default grid of `compare` under an hour on 2 cores**: the default grid
    (POS; lt-sft, task-sft-only, full-ft; wol and mlt; 3 seeds) trains per seed 3 language modules (eng,
    wol, mlt), one task SFT shared by lt-sft and task-sft-only and one full fine-tuning of as many steps,
    plus 6 cells of one evaluation each (a dev selection that kept the last step is not scored again):
    1,000 s and 1,085 s of modules for seeds 43 and 44 (partly contended). One seed of the default grid,
    timed on the idle machine (`compsft compare --seeds 1`): 907 s, so ≈ 45 min for its three seeds.

    Those steps and that learning rate train POS. They train neither a parser nor an NER tagger, so two
    tasks change task fields (`TASK_CHANGES`), the same for every method; language modules stay shared.
    Both were chosen on English dev with full fine-tuning, seed 42, on the project's 2-core CPU:

    - ``dep``: lr 5e-4. After 160 steps at lr 1e-4 dev LAS was 0.121 and still rising (LT-SFT's task SFT
      0.097); at lr 5e-4 the checks went 0.112, 0.246, 0.338, 0.381 (the first 200 dev sentences).
      The biaffine scorers start at zero, and 160 steps at the encoder's lr barely move them.
    - ``ner``: 320 + 320 steps (full fine-tuning 640), 2.56 epochs of the 4,000 sentences. A 640-step run
      scored dev F1 0.230, 0.547, 0.664, 0.746 at steps 160, 320, 480, 640 (200 sentences spread over
      the dev set; 921 s). After 160 steps the model types every entity PER, at lr 1e-4 and 5e-4 alike.
``paper``
    The paper's budgets (Ansell et al. 2022, as the reference code runs them): language phases of 100
    epochs with at least 10k and at most 100k steps, task phases of 3 and 10 epochs, batch 8, length 256,
    lr 5e-5, all data, the paper's K; model selection on the full English dev set after each of the 10
    epochs of the last task phase. Meant for a GPU: days on a CPU.
"""
from __future__ import annotations

import dataclasses

from compsft.errors import CompsftError
from compsft.methods.base import Budget

BUDGETS: dict[str, Budget] = {
    "quick": Budget(lang_steps=2, lang_epochs=None, lang_max_steps=None, lang_batch=4, lang_max_length=32,
                    lang_lines=200, lang_lr=1e-4, task_steps=3, task_epochs=None, task_batch=8,
                    task_max_length=48, task_lr=1e-4, train_sentences=100, dev_sentences=10, dev_checks=2,
                    eval_sentences=30),
    "cpu": Budget(lang_steps=40, lang_epochs=None, lang_max_steps=None, lang_batch=8, lang_max_length=128,
                  lang_lines=None, lang_lr=1e-4, task_steps=80, task_epochs=None, task_batch=16,
                  task_max_length=128, task_lr=1e-4, train_sentences=4000, dev_sentences=200, dev_checks=4,
                  eval_sentences=400),
    "paper": Budget(lang_steps=0, lang_epochs=100.0, lang_max_steps=100_000, lang_min_steps=10_000,
                    lang_batch=8, lang_max_length=256, lang_lines=None, lang_lr=5e-5, task_steps=0,
                    task_epochs=(3.0, 10.0), task_batch=8, task_max_length=256, task_lr=5e-5,
                    train_sentences=None, dev_sentences=None, dev_checks=10, eval_sentences=None),
}


#: Task fields a named budget sets per task (the same for every method): what the task needs to be trained
#: at all at that budget, chosen on English dev (see the module docstring). Language fields never change
#: here, so the language modules of one budget are shared by all its tasks.
TASK_CHANGES: dict[str, dict[str, dict]] = {
    "cpu": {"dep": {"task_lr": 5e-4}, "ner": {"task_steps": 320}},
}


def get_budget(name: str, task: str | None = None) -> Budget:
    """A copy of the named budget for `task` (callers may change fields without touching the preset)."""
    if name not in BUDGETS:
        raise CompsftError(f"unknown budget {name!r}; choose one of {', '.join(BUDGETS)}")
    return dataclasses.replace(BUDGETS[name], **TASK_CHANGES.get(name, {}).get(task, {}))


def language_budget(budget: Budget) -> dict:
    """The fields of `budget` a language module is trained by (`lang_*`): its cache key."""
    return {k: v for k, v in budget_dict(budget).items() if k.startswith("lang_")}


def task_budget(budget: Budget) -> dict:
    """The fields of `budget` a task module is trained by (all but `lang_*`): its cache key. A task module
    trained on a source language module is keyed by that module too, so a language field reaches its key
    that way; one trained on θ0 (full fine-tuning, `lt-sft-no-source`) is then shared by every language
    budget of a curve (`experiments/language_gain.py --lang-steps 40,150`) instead of trained again per point."""
    return {k: v for k, v in budget_dict(budget).items() if not k.startswith("lang_")}


def budget_dict(budget: Budget) -> dict:
    """The budget as JSON-ready data (tuples become lists). Fields added later are left out while at their
    default, so the records (and module cache keys) of grids from before them do not change."""
    defaults = {f.name: f.default for f in dataclasses.fields(Budget)}
    return json_ready({k: v for k, v in dataclasses.asdict(budget).items()
                       if not (k in Budget.ADDED_LATER and v == defaults[k])})


def json_ready(value):
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value
