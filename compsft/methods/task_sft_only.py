"""`task-sft-only`: LT-SFT's task SFT alone, without a target language SFT (the paper's ablation).

The same modules as `lt-sft` (`language_key` and `task_key` "lt-sft": nothing is trained twice): the
source language SFT is trained and applied while the task SFT trains, but no language SFT is
composed for the target.

Composition for a target: θ0 + φ_T (task head from φ_T).

`task-sft-no-source` (`NO_SOURCE`): a baseline with no language SFT anywhere. How good `task-sft-only`'s task
SFT is moves with the English SFT it was trained on, so a gain over `task-sft-only` mixes the target SFT's
effect with the source SFT's; this one composes the task SFT of `lt-sft-no-source` (trained on θ0, `task_key`
"lt-sft-no-source": trained once for both) alone, the same model at every language budget.
Composition: θ0 + φ_T (trained on θ0, no φ_source); task head from φ_T.
"""
from __future__ import annotations

import dataclasses
from functools import partial

from .base import MethodSpec
from .sft_method import assemble_without_language, counts, train_language_module, train_task_module

METHOD = MethodSpec(
    name="task-sft-only",
    description="LT-SFT's task SFT alone (no target language SFT)",
    composition="θ0 + φ_T; task head from φ_T (the target language is not adapted)",
    train_language=partial(train_language_module, mask_strategy="lottery-ticket"),
    train_task=partial(train_task_module, mask_strategy="lottery-ticket"),
    assemble=assemble_without_language,
    parameter_counts=partial(counts, target_language=False),
    uses_target_language=False,
    language_key="lt-sft",
    task_key="lt-sft",
)

NO_SOURCE = dataclasses.replace(
    METHOD,
    name="task-sft-no-source",
    description="a task SFT trained without any language SFT, composed alone (no language SFT anywhere)",
    composition="θ0 + φ_T (trained on θ0, no φ_source); task head from φ_T (no language module at all)",
    uses_source_language=False,
    task_key="lt-sft-no-source",
)
