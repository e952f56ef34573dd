"""`SftArguments`: the LT-SFT settings, readable by `HfArgumentParser` next to `TrainingArguments`.

`TrainingArguments.max_steps` and `num_train_epochs` are ignored: each phase's length comes from
the fields below, as the reference implementation does it: ``steps = max_epochs · steps_per_epoch``,
then raised to ``min_steps`` and capped at ``max_steps`` (each optional).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import CompsftError
from .masks import MASK_STRATEGIES


@dataclass
class SftArguments:
    """Settings of sparse fine-tuning (LT-SFT, Ansell et al. 2022)."""

    sft_kind: str = field(default="task", metadata={
        "help": "language or task: picks the default K, the MAD-X adapter size for the model's width h and "
                "depth L: (L + 1)·h² or 2·L·h² (7,667,712 or 14,155,776 for mBERT and XLM-R base)"})
    k: int | None = field(default=None, metadata={"help": "number of entries the SFT may change (exactly)"})
    density: float | None = field(default=None, metadata={"help": "K as a fraction of the eligible parameters"})
    mask_strategy: str = field(default="lottery-ticket", metadata={
        "help": "lottery-ticket (default), random, magnitude or prune-difference"})
    mask_seed: int = field(default=0, metadata={"help": "seed of the random mask strategy"})
    full_ft_max_epochs: float | None = field(default=3.0, metadata={"help": "phase 1 (full fine-tuning) epochs"})
    full_ft_min_steps: int | None = field(default=None, metadata={"help": "phase 1 takes at least this many steps"})
    full_ft_max_steps: int | None = field(default=None, metadata={"help": "phase 1 takes at most this many steps"})
    sparse_ft_max_epochs: float | None = field(default=10.0, metadata={"help": "phase 2 (sparse) epochs"})
    sparse_ft_min_steps: int | None = field(default=None, metadata={"help": "phase 2 takes at least this many steps"})
    sparse_ft_max_steps: int | None = field(default=None, metadata={"help": "phase 2 takes at most this many steps"})
    full_l1_reg: float = field(default=0.0, metadata={
        "help": "phase 1 L1 pull toward θ0: adds l1 · Σ|θ − θ0| / N to the loss (Σ over the trainable "
                "tensors, N = all parameters of the model; the reference implementation's rule)"})
    sparse_l1_reg: float = field(default=0.0, metadata={"help": "phase 2 L1 pull toward θ0 (same form)"})
    freeze_layer_norm: bool = field(default=True, metadata={"help": "keep the encoder's LayerNorms at θ0"})

    def __post_init__(self) -> None:
        if self.mask_strategy not in MASK_STRATEGIES:
            raise CompsftError(f"unknown mask strategy {self.mask_strategy!r}; "
                               f"choose one of {', '.join(MASK_STRATEGIES)}")
        for name in ("full_l1_reg", "sparse_l1_reg"):
            if getattr(self, name) < 0:
                raise CompsftError(f"{name} must be >= 0")

    def phase_steps(self, phase: int, steps_per_epoch: int) -> int:
        """Optimizer steps of phase 1 or 2 for a data set of `steps_per_epoch` steps."""
        prefix = "full_ft" if phase == 1 else "sparse_ft"
        epochs = getattr(self, f"{prefix}_max_epochs")
        lo = getattr(self, f"{prefix}_min_steps")
        hi = getattr(self, f"{prefix}_max_steps")
        if epochs is None and lo is None and hi is None:
            raise CompsftError(f"phase {phase} has no length: give {prefix}_max_epochs or _min/_max_steps")
        steps = math.ceil(epochs * steps_per_epoch) if epochs is not None else (hi if hi is not None else lo)
        if lo is not None:
            steps = max(steps, lo)
        if hi is not None:
            steps = min(steps, hi)
        if steps < 1:
            raise CompsftError(f"phase {phase} would take {steps} steps (empty training set?)")
        return int(steps)
