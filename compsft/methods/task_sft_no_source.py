"""`task-sft-no-source`: a task SFT trained on θ0 and composed with no language SFT at all (a baseline).

`task-sft-only` evaluates LT-SFT's task SFT, which was trained with the source language SFT applied; how good
that SFT is moves with the English SFT under it, so the language half's gain over `task-sft-only` mixes the
target SFT's effect with the source SFT's. This baseline uses no language module anywhere: it is the task SFT
of `lt-sft-no-source` (`task_key` "lt-sft-no-source": trained once for both) composed alone, the same model
at every language budget.

Composition for a target: θ0 + φ_T (trained on θ0, no φ_source); task head from φ_T.
"""
from __future__ import annotations

from functools import partial

from .base import MethodSpec
from .sft_method import assemble_without_language, counts, train_language_module, train_task_module

METHOD = MethodSpec(
    name="task-sft-no-source",
    description="a task SFT trained without any language SFT, composed alone (no language SFT anywhere)",
    composition="θ0 + φ_T (trained on θ0, no φ_source); task head from φ_T (no language module at all)",
    train_language=partial(train_language_module, mask_strategy="lottery-ticket"),
    train_task=partial(train_task_module, mask_strategy="lottery-ticket"),
    assemble=assemble_without_language,
    parameter_counts=partial(counts, target_language=False),
    uses_target_language=False,
    uses_source_language=False,
    language_key="lt-sft",
    task_key="lt-sft-no-source",
)
