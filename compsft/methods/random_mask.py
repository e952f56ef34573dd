"""`random-mask`: SFTs on K random entries (seeded) instead of the lottery ticket (the paper's ablation).

Language and task modules are SFTs with the `random` mask strategy: no phase 1, so the one sparse
phase gets both phases' steps (the same examples as LT-SFT). The task SFT trains with the source
language SFT of this method applied.

Composition for a target: θ0 + φ_L(target) + φ_T, as `lt-sft` (MLM head never, task head from φ_T).
"""
from __future__ import annotations

from functools import partial

from .base import MethodSpec
from .sft_method import assemble_sfts, counts, train_language_module, train_task_module

METHOD = MethodSpec(
    name="random-mask",
    description="SFTs on K random entries (language + task), composed",
    composition="θ0 + φ_L(target) + φ_T with random masks; MLM head never, task head from φ_T",
    train_language=partial(train_language_module, mask_strategy="random"),
    train_task=partial(train_task_module, mask_strategy="random"),
    assemble=assemble_sfts,
    parameter_counts=counts,
)
