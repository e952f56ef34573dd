"""Tasks: UD POS tagging (`pos`), UD dependency parsing (`dep`) and NER (`ner`).

`get_task(name)` returns a :class:`~compsft.tasks.base.TaskSpec` (see `base.py` for the contract);
`data_path(name)` finds a data file shipped with the package. A task is one module defining `TASK`;
register it by adding its name and module to `REGISTRY`.
"""
from __future__ import annotations

import importlib

from compsft.errors import CompsftError

from .base import Sentence, TaskSpec
from .catalogue import DATASETS, data_path, resolve_data

#: task name -> module (relative to this package) that defines `TASK`
REGISTRY: dict[str, str] = {"pos": ".pos", "dep": ".dep", "ner": ".ner"}
TASKS: tuple[str, ...] = tuple(REGISTRY)


def get_task(name: str) -> TaskSpec:
    """The registered task called `name`."""
    if name not in REGISTRY:
        raise CompsftError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return importlib.import_module(REGISTRY[name], __name__).TASK


__all__ = ["DATASETS", "REGISTRY", "TASKS", "Sentence", "TaskSpec", "data_path", "get_task", "resolve_data"]
