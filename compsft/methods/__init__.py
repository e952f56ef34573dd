"""Methods of the comparison: how a method trains its modules and puts them together for a target.

`get_method(name)` returns a :class:`~compsft.methods.base.MethodSpec` (the contract is in
`base.py`). A method is one module defining `METHOD`; register it by adding its name and module to
`REGISTRY`, or, from your own code or a test, with `register_method(spec)`::

    from compsft.methods import get_method, list_methods
    spec = get_method("lt-sft")
    print(list_methods())          # ['lt-sft', 'task-sft-only', 'full-ft', ...]

Adding a method is one module. An SFT variant is a few lines (see `random_mask.py`): the pieces
in `sft_method.py` with another mask strategy; anything else implements the four calls of
`base.py` (see `full_ft.py`)::

    # my_method.py
    from functools import partial
    from compsft.methods import MethodSpec, register_method
    from compsft.methods.sft_method import assemble_sfts, counts, train_language_module, train_task_module

    METHOD = register_method(MethodSpec(
        name="my-sft", description="...", composition="θ0 + φ_L(target) + φ_T",
        train_language=partial(train_language_module, mask_strategy="magnitude"),
        train_task=partial(train_task_module, mask_strategy="lottery-ticket"),
        assemble=assemble_sfts, parameter_counts=counts))

The methods here: `lt-sft`, `task-sft-only`, `full-ft`, `random-mask`, `magnitude-mask`,
`prune-difference`, `prune-difference-noretrain`, `lt-sft-no-source`, `lt-sft-upper` and `task-sft-no-source`;
the adapter family `mad-x` (also `mad-x-rf16`, `mad-x-2.0`), `lora`, `shira`, `hydra`, `mosa` (also `mosa-hier`),
`spa` (also `spa-d75`, `spa-d25`); each module's docstring states its composition rule.
"""
from __future__ import annotations

import importlib

from compsft.errors import CompsftError

from .base import (DEV_SELECTED, Budget, LanguageData, MethodContext, MethodSpec, ModuleInfo,
                   TaskData)

#: method name -> module (relative to this package) that defines `METHOD` (or `module:NAME`), in table order
REGISTRY: dict[str, str] = {
    "lt-sft": ".lt_sft",
    "task-sft-only": ".task_sft_only",
    "full-ft": ".full_ft",
    "random-mask": ".random_mask",
    "magnitude-mask": ".magnitude_mask",
    "prune-difference": ".prune_difference",
    "prune-difference-noretrain": ".prune_difference_noretrain",
    "lt-sft-no-source": ".lt_sft_no_source",  # ablation: the task SFT without the source language SFT
    "lt-sft-upper": ".lt_sft_upper",  # φ_L composed on the upper half of the encoder layers (issue 13)
    "task-sft-no-source": ".task_sft_only:NO_SOURCE",  # the no-source task SFT alone: no language SFT anywhere
    # adapter family (issue 11); `module:NAME` when one module defines several variants
    "mad-x": ".madx",
    "mad-x-rf16": ".madx:METHOD_RF16",
    "mad-x-2.0": ".madx:METHOD_2",
    "lora": ".lora",
    "shira": ".lora:METHOD_SHIRA",
    "hydra": ".hydra",
    "mosa": ".mosa",
    "mosa-hier": ".mosa:METHOD_HIER",
    # structured pruning adapters at three densities of heads / FFN channels (accuracy vs density)
    "spa": ".spa",
    "spa-d75": ".spa:METHOD_D75",
    "spa-d25": ".spa:METHOD_D25",
    # sparse training and pruning (issue 12)
    "spiel": ".spiel",
    "lt-sft-lang+spiel-task": ".spiel:MIXED",
    "nas-pet-structured": ".nas_pet",
    "nas-pet-unstructured": ".nas_pet:UNSTRUCTURED",
}

# Methods registered at run time (users, tests): name -> spec.
_EXTRA: dict[str, MethodSpec] = {}


def list_methods() -> list[str]:
    """Names of every method, the built-in ones first, in registry order."""
    return [*REGISTRY, *(n for n in _EXTRA if n not in REGISTRY)]


def get_method(name: str) -> MethodSpec:
    """The method called `name` (a clear error listing the known ones otherwise)."""
    if name in _EXTRA:
        return _EXTRA[name]
    if name not in REGISTRY:
        raise CompsftError(f"unknown method {name!r}; known methods: {', '.join(list_methods())}")
    module, _, attr = REGISTRY[name].partition(":")
    spec = getattr(importlib.import_module(module, __name__), attr or "METHOD")
    if spec.name != name:  # a module registered under the wrong name would cache under two keys
        raise CompsftError(f"method module {REGISTRY[name]} defines {spec.name!r}, registered as {name!r}")
    return spec


def register_method(spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
    """Add `spec` to the registry (for your own methods and for tests); returns it.

    A name that is already taken is an error unless `replace` is True.
    """
    if not isinstance(spec, MethodSpec):
        raise CompsftError(f"register_method expects a MethodSpec, got {type(spec).__name__}")
    if not replace and (spec.name in REGISTRY or spec.name in _EXTRA):
        raise CompsftError(f"a method called {spec.name!r} is already registered (pass replace=True)")
    _EXTRA[spec.name] = spec
    return spec


def unregister_method(name: str) -> None:
    """Remove a method added with `register_method` (built-in methods stay)."""
    _EXTRA.pop(name, None)


__all__ = [
    "DEV_SELECTED", "REGISTRY", "Budget", "LanguageData", "MethodContext", "MethodSpec", "ModuleInfo", "TaskData",
    "get_method", "list_methods", "register_method", "unregister_method",
]
