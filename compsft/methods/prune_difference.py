"""`prune-difference`: magnitude pruning of the full fine-tuning difference to K, then retraining.

Task module: phase 1 fine-tunes every eligible parameter on the source task data (with the source
language SFT applied, as LT-SFT's phase 1), the top-K entries of |θ1 − θ0| are kept, and phase 2
retrains exactly those entries *starting from their pruned values θ1 − θ0* (and θ1's head), not
from θ0 as LT-SFT does (mask strategy `prune-retrain`). The pruned difference before retraining is
stored beside it, in ``no-retrain/``, for `prune-difference-noretrain`: one training, two methods.

Language modules are LT-SFT's (`language_key` "lt-sft"): the pruned task SFT is composed with the
lt-sft language SFTs, so the comparison with `lt-sft` isolates the task module.

Composition for a target: θ0 + φ_L(target) + φ_T (MLM head never, task head from φ_T).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

from .base import DEV_SELECTED, MethodSpec
from .sft_method import assemble_sfts, counts, train_language_module, train_task_module

#: sub-directory of the task module with the pruned, not retrained, SFT
NO_RETRAIN = "no-retrain"


def pruned_sft(tuner):
    """The SFT phase 2 of a `prune-retrain` run started from: θ1 − θ0 on the mask, θ1's heads."""
    import dataclasses

    from ..errors import CompsftError
    from ..sft import SparseDelta, SparseFineTuning

    if tuner.phase2_start is None or tuner.sft is None:
        raise CompsftError("no pruned start: train with the prune-retrain mask strategy first")
    values, heads = tuner.phase2_start
    diffs = {n: SparseDelta(d.shape, d.indices, values[n].detach().float().cpu()) for n, d in tuner.sft.diffs.items()}
    dense = {n: heads[n].detach().cpu() for n in tuner.sft.dense}
    phases = {k: v for k, v in tuner.sft.config.training.get("phases", {}).items() if k != "phase2"}
    training = {**tuner.sft.config.training, "mask_strategy": "prune-difference", "phases": phases}
    sft = SparseFineTuning(diffs, dense, dataclasses.replace(tuner.sft.config, training=training))
    sft.validate()
    return sft


def _write_no_retrain(tuner, directory: Path, selection) -> None:
    sft = pruned_sft(tuner)
    sft.save(directory / NO_RETRAIN)
    if (directory / DEV_SELECTED).is_dir():
        # Without phase 2 there is nothing to select between: the dev-selected module is the same one.
        sft.save(directory / DEV_SELECTED / NO_RETRAIN)


METHOD = MethodSpec(
    name="prune-difference",
    description="prune the full fine-tuning difference to K, retrain from the pruned values",
    composition="θ0 + φ_L(target, lt-sft) + φ_T(pruned, retrained); MLM head never, task head from φ_T",
    train_language=partial(train_language_module, mask_strategy="lottery-ticket"),
    train_task=partial(train_task_module, mask_strategy="prune-retrain", also=_write_no_retrain),
    assemble=assemble_sfts,
    parameter_counts=counts,
    language_key="lt-sft",
)
