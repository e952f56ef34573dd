"""What a method of the comparison is: how it trains a language module and a task module, and how it
puts them together for a target language.

A method is one module under `compsft/methods/` that defines `METHOD`, a :class:`MethodSpec`, and is
listed in `compsft.methods.REGISTRY` (as `compsft.tasks` does for tasks). The harness
(`compsft.compare`) drives every method through the same four calls::

    spec = get_method("lt-sft")
    info = spec.train_language(ctx, LanguageData("wol", texts), seed, out_dir)   # if spec.has_language_module
    info = spec.train_task(ctx, TaskData("pos", train, dev), source_language_module, seed, out_dir)
    model, labels = spec.assemble(ctx, task_module_dir, target_language_module_dir)  # a task model, on ctx.device
    sizes = spec.parameter_counts(ctx, "pos")                                      # before any training

Modules are directories the method writes (an SFT directory, a model directory, adapter files); the harness
caches them by (`module_key`, kind, language or task, seed, budget) and never looks inside: a language module
by the budget's `lang_*` fields, a task module by the others and by the source language module it was given,
so `train_task` must read no `lang_*` field of `ctx.budget` (tests/test_methods.py checks every method). Two
methods that train the *same* module (`task-sft-only` evaluates `lt-sft`'s task SFT without a target language
SFT) say so with `language_key` / `task_key`, so it is trained once.

Model selection (the paper's, on source-language dev data only): when `budget.dev_checks > 0`, `train_task`
evaluates the source dev set that many times during its last phase and writes, besides the fixed-budget
module in `out`, the best one by source dev score into `out / DEV_SELECTED` (same format), reporting the
step and dev score in `ModuleInfo.extra["dev_selected"]`. The harness evaluates both on the targets.

Nothing here imports the harness or a command: the arrows point commands → compare → methods → training/core.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence


#: sub-directory of a task module holding the module selected by source-dev score
DEV_SELECTED = "dev-selected"


@dataclass
class Budget:
    """How much one run trains and evaluates; named presets live in `compsft.compare.budgets`.

    Step counts are per phase for two-phase methods (LT-SFT); one-phase methods (full fine-tuning,
    adapters) get the sum of both phases, so every method sees the same number of examples.
    """

    lang_steps: int = field(metadata={"help": "MLM steps per phase of a language module (0: by epochs)"})
    lang_epochs: float | None = field(metadata={"help": "epochs per language phase when lang_steps is 0"})
    lang_max_steps: int | None = field(metadata={"help": "cap on language steps per phase"})
    lang_batch: int = field(metadata={"help": "MLM batch size"})
    lang_max_length: int = field(metadata={"help": "sub-words per MLM example"})
    lang_lines: int | None = field(metadata={"help": "MLM text lines per language (None: all)"})
    lang_lr: float = field(metadata={"help": "learning rate of language modules"})
    task_steps: int = field(metadata={"help": "task steps per phase (0: by epochs)"})
    task_epochs: tuple[float, float] | None = field(metadata={"help": "epochs of task phases 1 and 2"})
    task_batch: int = field(metadata={"help": "task batch size"})
    task_max_length: int = field(metadata={"help": "sub-words per task training window"})
    task_lr: float = field(metadata={"help": "learning rate of task modules and full fine-tuning"})
    train_sentences: int | None = field(metadata={"help": "source training sentences (None: all)"})
    dev_sentences: int | None = field(metadata={"help": "source dev sentences for model selection (0: none)"})
    dev_checks: int = field(default=0, metadata={"help": "source-dev evaluations in the last task phase "
                                                         "(0: fixed budget only)"})
    eval_sentences: int | None = field(default=None, metadata={"help": "target test sentences (None: all)"})
    lang_density: float | None = field(default=None, metadata={"help": "language K / eligible (None: paper's K)"})
    task_density: float | None = field(default=None, metadata={"help": "task K / eligible (None: paper's K)"})
    lang_min_steps: int = field(default=0, metadata={"help": "minimum steps per language phase when training "
                                                             "by epochs (the paper's 10k)"})
    lang_dev_lines: int = field(default=0, metadata={"help": "text lines held out of each language module's "
                                                             "training to measure its MLM loss before and after "
                                                             "(SFT methods; 0: none)"})

    #: fields added after grids were first recorded: left out of records while at their default, so
    #: grids and modules recorded before them are still recognised (--resume, the module cache)
    ADDED_LATER = ("lang_dev_lines",)


@dataclass
class LanguageData:
    """Raw text of one language; `exclude` are evaluation files whose sentences must not reach MLM text."""

    code: str
    texts: Sequence[Path] = ()
    exclude: Sequence[Path] = ()


@dataclass
class TaskData:
    """Labelled source-language data of one task (shipped data names or file paths)."""

    task: str
    train: str | Path
    dev: str | Path | None = None


@dataclass
class MethodContext:
    """What every call of a method gets from the harness."""

    model_dir: Path
    budget: Budget
    device: str = "cpu"
    #: `transformers.TrainerCallback`s for progress (the harness's bars); pass them to every Trainer
    callbacks: list = field(default_factory=list)
    #: scratch space for resumable work (checkpoints); the harness keeps it until the module is done
    work_dir: Path | None = None
    resume: bool = False


@dataclass
class ModuleInfo:
    """What training a module reports; stored in results.json next to the cell."""

    trainable: int
    stored_bytes: int
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodSpec:
    """One method of the comparison. See the module docstring for how the harness calls it."""

    name: str
    description: str
    #: how the language and task modules are put together for a target (shown by --list-methods)
    composition: str
    train_task: Callable[[MethodContext, TaskData, Path | None, int, Path], ModuleInfo]
    assemble: Callable[[MethodContext, Path, Path | None], tuple[Any, list[str]]]
    #: before training: at least `trainable` and `stored_bytes` per target (task module + target language
    #: module; see `per_target_totals`), plus whatever per-module counts the method wants to show
    parameter_counts: Callable[[MethodContext, str], dict[str, int]]
    train_language: Callable[[MethodContext, LanguageData, int, Path], ModuleInfo] | None = None
    #: False: the target language module is not used at assembly (task-sft-only, full-ft)
    uses_target_language: bool = True
    #: False: the task module is trained without a source language module
    uses_source_language: bool = True
    #: cache keys: methods with the same key share the module (trained once)
    language_key: str = ""
    task_key: str = ""

    def __post_init__(self) -> None:
        self.language_key = self.language_key or self.name
        self.task_key = self.task_key or self.name

    @property
    def has_language_module(self) -> bool:
        return self.train_language is not None


def per_target_totals(counts: dict[str, int], bytes_per_value: int = 4, *, task_head: int = 0,
                      extra_bytes: int = 0) -> dict[str, int]:
    """Add the per-target totals the harness shows (`trainable`, `stored_bytes`: the task module plus the
    target language module) to counts given per module as `language_trainable`/`language_stored` and
    `task_trainable`/`task_stored` (parameters, stored as `bytes_per_value`-byte values). `task_head`: the
    dense task head's parameters, trained and stored with the task module (as every method's modules count
    it, so the columns compare); `extra_bytes`: stored bytes that are not parameters (masks)."""
    out = dict(counts)
    if task_head:
        out["task_head"] = task_head
        out["task_trainable"] = counts.get("task_trainable", 0) + task_head
        out["task_stored"] = counts.get("task_stored", 0) + task_head
    out.setdefault("trainable", out.get("task_trainable", 0) + out.get("language_trainable", 0))
    stored = out.get("task_stored", 0) + out.get("language_stored", 0)
    out.setdefault("stored_bytes", stored * bytes_per_value + extra_bytes)
    return out
