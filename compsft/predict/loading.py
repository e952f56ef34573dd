"""A task model with SFTs applied, loaded the one way `compsft evaluate`, `compsft predict` and
`compsft.Predictor` all load it.

The rule for dense parameters is compsft.merge's: heads of task SFTs (and of compositions that kept
one) are applied, the MLM head of a language SFT never. A model directory without a trained head (the
bare pretrained model) gets its label list from the task SFT, whose dense head then fills it::

    sfts = load_sfts(["sfts/mlt", "sfts/pos"], task="pos")
    loaded = load_task_model(get_task("pos"), "models/e5", sfts, device="cpu")
    loaded.model, loaded.labels, loaded.tokenizer, loaded.dense_flags
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from compsft.errors import CompsftError


@dataclass
class LoadedModel:
    """What `load_task_model` returns: the composed model on its device, its labels and tokenizer."""

    model: Any
    labels: list[str]
    tokenizer: Any
    dense_flags: list[bool]
    device: Any


def load_sfts(items: Sequence, task: str):
    """The SFTs at `items` (directories, each remembered as `.source`, or SFTs already loaded); a task SFT
    of another task is an error."""
    import compsft

    sfts = []
    for p in items:
        if isinstance(p, (str, os.PathLike)):
            s = compsft.load(p)
            s.source = str(p)
        else:
            s = p
        if s.config.task and s.config.task != task:
            raise CompsftError(f"{getattr(s, 'source', None) or p}: a task SFT for {s.config.task!r}, not {task!r}")
        sfts.append(s)
    return sfts


def default_device(device: str | None = None):
    import torch

    return torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def quiet_transformers():
    """transformers' load report lists the MLM head as unexpected and the task head as missing when a
    bare pretrained model gets a fresh head: expected here (the task SFT fills the head), so not shown."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _model_and_labels(spec, model_dir: Path, labels_hint, has_sfts: bool):
    """The task model from `model_dir`; a fresh head sized by `labels_hint` when the directory has none."""
    try:
        with quiet_transformers():
            return spec.load_model(model_dir)
    except CompsftError as err:
        if not labels_hint:
            if has_sfts:
                raise
            raise CompsftError(f"--model: {model_dir} is not a {spec.name} model ({err}); give the task SFT with "
                               "--sft, or a directory written by `compsft compose` with a task SFT") from None
    except (OSError, ValueError, KeyError) as err:  # transformers on a directory of another model class
        raise CompsftError(f"--model: {model_dir} cannot be loaded as a {spec.name} model "
                           f"({type(err).__name__}: {str(err)[:200]})") from None
    with quiet_transformers():
        return spec.build_model(model_dir, labels_hint), list(labels_hint)


def _check_labels(task: str, labels: Sequence[str], model_dir: Path) -> None:
    """A tagger's labels say which task it was trained for: IOB2 entity tags or not."""
    iob = all(label == "O" or label[:2] in ("B-", "I-") for label in labels)
    if task == "ner" and not iob:
        raise CompsftError(f"--model: {model_dir} predicts {list(labels)[:4]}..., not IOB2 entity tags: not a ner model")
    if task == "pos" and iob and "O" in labels:
        raise CompsftError(f"--model: {model_dir} predicts IOB2 entity tags ({list(labels)[:4]}...): a ner model, not pos")


def load_task_model(spec, model_dir: str | os.PathLike, sfts: Sequence = (), *, device=None,
                    tokenizer_dir: str | os.PathLike | None = None, check_base: bool = True) -> LoadedModel:
    """The task model in `model_dir` with `sfts` applied once (on `device`), its labels and tokenizer.

    `model_dir` is a trained task model, a directory written by `compsft compose`, or the bare
    pretrained model when a task SFT (which carries the head and its labels) is among `sfts`.
    """
    import compsft
    from compsft.merge import resolve_with_dense, task_labels
    from compsft.paths import load_tokenizer, local_dir

    model_dir = local_dir(model_dir, "--model")
    if tokenizer_dir is not None:
        local_dir(tokenizer_dir, "--tokenizer", need=None)
    # The one rule (compsft.merge.dense_by_kind): heads of task SFTs (and of compositions that
    # kept one), never the MLM head of a language SFT.
    dense_flags = resolve_with_dense(list(sfts), None)
    hint = task_labels(list(sfts))[1]
    model, labels = _model_and_labels(spec, model_dir, hint, bool(sfts))
    _check_labels(spec.name, labels, model_dir)
    dev = default_device(device) if not hasattr(device, "type") else device
    model.to(dev)
    tokenizer = load_tokenizer(tokenizer_dir or model_dir, "--tokenizer" if tokenizer_dir else "--model")
    if sfts:
        from compsft.vocab import vocab_fingerprint

        compsft.apply(model, *sfts, with_dense=dense_flags, check_base=check_base, vocab=vocab_fingerprint(tokenizer))
    model.eval()
    return LoadedModel(model, list(labels), tokenizer, dense_flags, dev)
