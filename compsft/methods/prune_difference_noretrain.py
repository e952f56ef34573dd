"""`prune-difference-noretrain`: the full fine-tuning difference pruned to its K largest entries, not retrained.

Task module: `prune-difference`'s (`task_key` "prune-difference": trained once for both). Phase 1
fine-tunes every eligible parameter, the SFT is θ1 − θ0 on the top-K of |θ1 − θ0| plus θ1's head
(what the `prune-difference` mask strategy computes), read from the module's ``no-retrain/``. There is
no phase 2, so its dev-selected module is the same as the fixed-budget one.

Language modules are LT-SFT's (`language_key` "lt-sft").

Composition for a target: θ0 + φ_L(target, lt-sft) + (θ1 − θ0)|top-K (MLM head never, task head θ1's).
"""
from __future__ import annotations

from functools import partial

from .base import MethodSpec
from .prune_difference import METHOD as RETRAINED, NO_RETRAIN
from .sft_method import assemble_sfts, counts

METHOD = MethodSpec(
    name="prune-difference-noretrain",
    description="the full fine-tuning difference pruned to K (no retraining)",
    composition="θ0 + φ_L(target, lt-sft) + (θ1 − θ0) on its top-K; MLM head never, task head from θ1",
    train_language=RETRAINED.train_language,
    train_task=RETRAINED.train_task,
    assemble=partial(assemble_sfts, subdir=NO_RETRAIN),
    parameter_counts=counts,
    language_key="lt-sft",
    task_key="prune-difference",
)
