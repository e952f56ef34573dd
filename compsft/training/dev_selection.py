"""Model selection on source-language dev data, as the paper does it: keep the best checkpoint by dev score.

`DevSelection` is a `TrainerCallback`. In the phase it is active in (the last one: sparse phase 2 of an
SFT, the only phase of full fine-tuning) it scores the model on the dev set `checks` times, evenly
spaced, the last at the final step, and keeps a copy of the *trainable* tensors at the best score:
in sparse phase 2 the values vectors and the heads (K + head entries, not the model), in full
fine-tuning every parameter. Ties keep the earlier step. Only the main process scores and copies.

Scoring runs the model in eval mode under `inference_mode` and draws no random numbers, so training
with dev checks gives the same fixed-budget module as training without them.

With `state_file`, every improvement is also written there (safetensors, atomically) and read back
when a run resumes from a checkpoint: a resumed run selects what an uninterrupted one does (a run
that starts at step 0 ignores it). Example::

    sel = DevSelection(dev_scorer(spec, tok, dev_sentences), checks=4, active=has_sparse_values)
    train_task_sft(..., callbacks=[sel])
    sel.best            # {name: tensor} at sel.best_step, score sel.best_score
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import TrainerCallback

from ..errors import CompsftError

logger = logging.getLogger(__name__)

#: the score model selection maximises, per task (the tasks' headline metric)
PRIMARY_METRIC = {"pos": "accuracy", "dep": "las", "ner": "f1"}


def primary_metric(task: str) -> str:
    """The metric a task's models are compared and selected by."""
    if task not in PRIMARY_METRIC:
        raise CompsftError(f"no primary metric for task {task!r}; known: {', '.join(PRIMARY_METRIC)}")
    return PRIMARY_METRIC[task]


def check_steps(max_steps: int, checks: int) -> list[int]:
    """`checks` steps evenly spaced over 1..max_steps, the last one max_steps (fewer if steps are few)."""
    if checks <= 0 or max_steps <= 0:
        return []
    return sorted({max(1, round(max_steps * (i + 1) / checks)) for i in range(checks)})


def dev_subset(sentences: Sequence, n: int | None) -> list:
    """`n` sentences spread evenly over the dev set, in order (all of them when `n` is None, 0 or larger).

    Not the first `n`: dev files follow their documents, and a prefix can miss whole labels (the first 200
    sentences of English EWT's NER dev set hold 96 LOC, 8 ORG and no PER entity; an even spread of 200
    holds 39, 25 and 38)."""
    sentences = list(sentences)
    if not n or n >= len(sentences):
        return sentences
    return [sentences[i * len(sentences) // n] for i in range(n)]


def has_sparse_values(model: torch.nn.Module) -> bool:
    """True in sparse phase 2 (values vectors attached): the phase an SFT's dev selection acts in."""
    from .sparse import sparse_parameter_names

    return bool(sparse_parameter_names(model))


def values_name(param_name: str) -> str:
    """The values vector of a masked parameter in phase 2: `a.weight` -> `a.parametrizations.weight.0.values`."""
    module, _, attr = param_name.rpartition(".")
    return f"{module}.parametrizations.{attr}.0.values" if module else f"parametrizations.{attr}.0.values"


def model_labels(model) -> list[str]:
    """The label list a task model was built with (a parser keeps it, a tagger's config has id2label)."""
    labels = getattr(model, "labels", None)
    if isinstance(labels, (list, tuple)) and labels:
        return list(labels)
    from ..tasks.tagging import labels_of_model

    return labels_of_model(model)


def dev_scorer(spec, tokenizer, sentences: Sequence, labels: Sequence[str] | None = None, *,
               metric: str | None = None, max_length: int | None = None, batch_size: int = 32
               ) -> Callable[[torch.nn.Module], float]:
    """`score(model) -> float`: the task's primary metric on `sentences` (labels from the model if not given)."""
    metric = metric or primary_metric(spec.name)
    golds: dict[tuple, list] = {}

    def score(model) -> float:
        use = list(labels) if labels is not None else model_labels(model)
        key = tuple(use)
        if key not in golds:
            golds[key] = spec.prepare_gold(sentences, use)
        metrics, _ = spec.evaluate(model, tokenizer, golds[key], use, batch_size=batch_size, max_length=max_length)
        if metric not in metrics:
            raise CompsftError(f"task {spec.name} reports no {metric!r} (has {', '.join(metrics)})")
        return float(metrics[metric])

    return score


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the tensors being trained (phase 2: the values vectors and the heads)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


class DevSelection(TrainerCallback):
    """Score the model on dev data `checks` times in the active phase and keep the best trainable state."""

    def __init__(self, score: Callable[[torch.nn.Module], float], checks: int, *,
                 active: Callable[[torch.nn.Module], bool] | None = None, state_file: str | Path | None = None,
                 metric: str = "score",
                 snapshot: Callable[[torch.nn.Module], dict[str, torch.Tensor]] | None = None,
                 at: Callable[[int], Sequence[int]] | None = None) -> None:
        if checks < 0:
            raise CompsftError(f"dev checks must be >= 0, got {checks}")
        self.score = score
        self.checks = checks
        self.active = active or (lambda model: True)
        self.state_file = Path(state_file) if state_file else None
        self.metric = metric
        # What is kept at the best check: by default the trainable tensors; SpIEL also needs the positions.
        self.snapshot = snapshot or trainable_state
        # Which steps to check, given the run's length (default: `checks` evenly spaced, the last at the end).
        self.at = at or (lambda max_steps: check_steps(max_steps, self.checks))
        self.best: dict[str, torch.Tensor] | None = None
        self.best_step: int | None = None
        self.best_score: float | None = None
        self.history: list[tuple[int, float]] = []
        self._steps: set[int] = set()
        self._max_steps = 0
        self._resume_pending = False

    # -- the callback -------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._steps = set()
        if not self.checks or model is None or not self.active(model):
            return
        self._max_steps = state.max_steps
        self._steps = set(self.at(state.max_steps))
        self.best, self.best_step, self.best_score, self.history = None, None, None, []
        self._resume_pending = True

    def _maybe_resume(self, state) -> None:
        # The Trainer reads a checkpoint's step count only after on_train_begin: whether this run
        # resumes is known at its first step (or at its end, when the checkpoint was the last step).
        if not self._resume_pending:
            return
        self._resume_pending = False
        if state.global_step > 0 and self.state_file is not None and self.state_file.is_file():
            self._load()

    def on_step_begin(self, args, state, control, **kwargs):
        if self._steps:
            self._maybe_resume(state)

    def on_train_end(self, args, state, control, **kwargs):
        if self._steps:
            self._maybe_resume(state)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step not in self._steps or not state.is_world_process_zero:
            return
        if any(step == state.global_step for step, _ in self.history):
            return  # already scored before an interruption (read back from the state file)
        value = float(self.score(model))
        self.history.append((state.global_step, value))
        logger.info("dev %s at step %d: %.4f", self.metric, state.global_step, value)
        if self.best_score is None or value > self.best_score:
            self.best_step, self.best_score = state.global_step, value
            self.best = self.snapshot(model)
            self._save_best()
        self._save_history()

    # -- the result ---------------------------------------------------------------------------------
    def summary(self) -> dict:
        """Step and score of the selected state, and every check (for results files)."""
        return {"metric": self.metric, "step": self.best_step, "score": self.best_score,
                "of_steps": self._max_steps, "checks": [[s, round(v, 6)] for s, v in self.history]}

    def restore_into(self, model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None
                     ) -> dict[str, torch.Tensor]:
        """Copy the best state (or `state`, e.g. what an earlier call returned) into `model`'s parameters
        of the same names; returns the replaced values."""
        state = self.best if state is None else state
        if state is None:
            raise CompsftError("no dev-selected state: no check ran")
        params = dict(model.named_parameters())
        previous = {}
        with torch.no_grad():
            for name, value in state.items():
                if name not in params:
                    raise CompsftError(f"dev-selected state names {name!r}, which the model lacks")
                previous[name] = params[name].detach().clone()
                params[name].copy_(value.to(params[name].device, params[name].dtype))
        return previous

    # -- resume -------------------------------------------------------------------------------------
    # The best state (tensors) is written at each improvement, the list of checks (a small JSON
    # file beside it) at every check: a full model is not rewritten when only the history grew.
    def _history_file(self) -> Path:
        return self.state_file.with_name(self.state_file.name + ".json")

    def _save_best(self) -> None:
        if self.state_file is None or self.best is None:
            return
        from safetensors.torch import save_file

        from ..atomic import atomic_path

        meta = {"max_steps": str(self._max_steps), "best_step": str(self.best_step), "best_score": repr(self.best_score)}
        with atomic_path(self.state_file) as tmp:
            save_file({n: t.contiguous() for n, t in self.best.items()}, str(tmp), metadata=meta)

    def _save_history(self) -> None:
        if self.state_file is None:
            return
        from ..atomic import write_text

        write_text(self._history_file(), json.dumps({"max_steps": self._max_steps, "history": self.history}) + "\n")

    def _load(self) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(self.state_file), framework="pt") as f:
                meta = f.metadata() or {}
                if int(meta.get("max_steps", -1)) != self._max_steps:
                    logger.warning("%s: from a run of %s steps, this one has %d; starting selection afresh",
                                   self.state_file, meta.get("max_steps"), self._max_steps)
                    return
                self.best = {n: f.get_tensor(n) for n in f.keys()}
            self.best_step = int(meta["best_step"])
            self.best_score = float(meta["best_score"])
            history = json.loads(self._history_file().read_text(encoding="utf-8")) \
                if self._history_file().is_file() else {"history": [[self.best_step, self.best_score]]}
            self.history = [(int(s), float(v)) for s, v in history["history"]]
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as err:
            raise CompsftError(f"{self.state_file}: unreadable dev-selection state ({err}); delete it to "
                               "restart selection") from err
        logger.info("dev selection resumed: best %s %.4f at step %s", self.metric, self.best_score, self.best_step)


def selected_sft(sft, best: dict[str, torch.Tensor], summary: dict | None = None):
    """The SFT `sft` with its values and heads taken from a phase-2 snapshot (`DevSelection.best`)."""
    import dataclasses

    from ..sft import SparseDelta, SparseFineTuning

    diffs = {}
    for name, d in sft.diffs.items():
        key = values_name(name)
        if key not in best:
            raise CompsftError(f"dev-selected state lacks the values of {name!r}")
        diffs[name] = SparseDelta(d.shape, d.indices, best[key].detach().float().cpu())
    dense = {n: best[n].detach().cpu() if n in best else t for n, t in sft.dense.items()}
    training = {**sft.config.training, "dev_selected": summary or {}}
    config = dataclasses.replace(sft.config, training=training)
    out = SparseFineTuning(diffs, dense, config)
    out.validate()
    return out
