"""`magnitude-mask`: SFTs on the K entries of largest |θ0| (a magnitude-pruning mask, chosen before training).

Language and task modules are SFTs with the `magnitude` mask strategy: no phase 1, so the one sparse
phase gets both phases' steps (the same examples as LT-SFT). The task SFT trains with the source
language SFT of this method applied (θ0 of the task SFT is then the base plus that SFT).

Composition for a target: θ0 + φ_L(target) + φ_T, as `lt-sft` (MLM head never, task head from φ_T).
"""
from __future__ import annotations

from functools import partial

from .base import MethodSpec
from .sft_method import assemble_sfts, counts, train_language_module, train_task_module

METHOD = MethodSpec(
    name="magnitude-mask",
    description="SFTs on the top-K of |θ0| (language + task), composed",
    composition="θ0 + φ_L(target) + φ_T with magnitude masks; MLM head never, task head from φ_T",
    train_language=partial(train_language_module, mask_strategy="magnitude"),
    train_task=partial(train_task_module, mask_strategy="magnitude"),
    assemble=assemble_sfts,
    parameter_counts=counts,
)
