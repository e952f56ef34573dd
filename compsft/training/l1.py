"""The L1 pull toward θ0, as the reference implementation applies it.

The term added to the training objective of each optimizer step is::

    l1 · Σ |θ − θ0| / N

summed over the trainable parameters (the eligible ones and the heads; in phase 2 only the K
trainable values can differ from θ0), and divided by N, the number of parameters of the model
as it was given (tied tensors counted once), as `composable-sft`'s `SparseFineTuner` does (its
``_num_params``). It is part of the loss, so its gradient ``l1 · sign(θ − θ0) / N`` goes through
gradient accumulation (added once per optimizer step, whatever the number of micro-batches) and
through gradient clipping like the loss's own gradient.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor


class _L1Distance(torch.autograd.Function):
    """Σ |θ − θ0| with gradient sign(θ − θ0); recomputes θ − θ0 in backward instead of keeping it."""

    @staticmethod
    def forward(ctx, theta: Tensor, theta0: Tensor) -> Tensor:
        ctx.save_for_backward(theta, theta0)
        return (theta.detach() - theta0).abs().sum(dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad: Tensor):
        theta, theta0 = ctx.saved_tensors
        return (torch.sign(theta.detach() - theta0) * grad).to(theta.dtype), None


def l1_distance(pairs: Iterable[tuple[Tensor, Tensor | None]]) -> Tensor:
    """Σ |θ − θ0| over `(θ, θ0)` pairs (θ0 None: θ is itself a difference), differentiable in θ."""
    total = None
    for theta, theta0 in pairs:
        if theta0 is None:
            part = theta.abs().sum(dtype=torch.float32)
        else:
            part = _L1Distance.apply(theta, theta0)
        total = part if total is None else total + part.to(total.device)
    return total if total is not None else torch.zeros(())
