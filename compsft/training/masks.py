"""Mask strategies: which K entries of the eligible parameters an SFT may change.

One contract for all of them::

    mask_fn(theta0, theta1, k, *, seed=0) -> dict[name, LongTensor]

* ``theta0``: the eligible parameters before training (name -> tensor), in a fixed order; that
  order is the tie-break order.
* ``theta1``: the same parameters after phase 1 (full fine-tuning), or ``None`` for strategies that
  do not look at it (``MaskStrategy.needs_phase1`` is False for them).
* ``k``: exactly how many entries to keep, across all tensors together.
* result: for every name of ``theta0`` (same order), the sorted unique row-major flat indices of the
  kept entries, int64 on the CPU. Exactly ``k`` in total; deterministic for given inputs and seed,
  on every device and every rank.

Strategies (``MASK_STRATEGIES``):

* ``lottery-ticket`` (default, the paper): top-K of |θ1 − θ0|; phase 2 retrains those entries.
* ``random``: K entries uniformly at random, from a counter-based hash of (seed, tensor, index), so
  every rank draws the same mask without communication; no phase 1.
* ``magnitude``: top-K of |θ0| (a pruning baseline); no phase 1.
* ``prune-difference``: the lottery-ticket mask, but the SFT is θ1 − θ0 on it (no phase 2): the
  "prune the phase-1 difference to K" baseline.
* ``prune-retrain``: the lottery-ticket mask, and phase 2 retrains it starting from θ1 − θ0 (and
  θ1's heads) rather than from θ0: magnitude pruning of the fine-tuning difference, then retraining.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor

from ..errors import CompsftError
from .selection import select_top_k

MaskFn = Callable[..., dict[str, Tensor]]


def _flat(tensors: Mapping[str, Tensor]) -> tuple[list[str], list[Tensor]]:
    names = list(tensors)
    return names, [tensors[n].detach().reshape(-1) for n in names]


def _device(flats: list[Tensor]):
    return flats[0].device if flats else None


def lottery_ticket(theta0: Mapping[str, Tensor], theta1: Mapping[str, Tensor] | None, k: int,
                   *, seed: int = 0) -> dict[str, Tensor]:
    """Top-K of |θ1 − θ0| (the paper's mask)."""
    if theta1 is None:
        raise CompsftError("the lottery-ticket mask needs the phase-1 parameters")
    names, a = _flat(theta0)
    missing = [n for n in names if n not in theta1]
    if missing:
        raise CompsftError(f"phase-1 parameters lack {missing[0]}")
    b = [theta1[n].detach().reshape(-1) for n in names]
    for n, x, y in zip(names, a, b):
        if x.shape != y.shape:
            raise CompsftError(f"parameter {n} changed shape from {tuple(x.shape)} to {tuple(y.shape)}")

    def scorer(i, pos):
        return (b[i][pos].float() - a[i][pos].float()).abs_()

    picked = select_top_k([x.numel() for x in a], scorer, k, names=names, device=_device(a))
    return dict(zip(names, picked))


def magnitude(theta0: Mapping[str, Tensor], theta1: Mapping[str, Tensor] | None, k: int,
              *, seed: int = 0) -> dict[str, Tensor]:
    """Top-K of |θ0| (magnitude pruning baseline)."""
    names, a = _flat(theta0)
    picked = select_top_k([x.numel() for x in a], lambda i, pos: a[i][pos].float().abs(), k,
                          names=names, device=_device(a))
    return dict(zip(names, picked))


_M1 = 0x7FB5D329728EA185 - (1 << 63)  # splitmix-style odd multipliers, as signed int64
_M2 = 0x81DADEF4BC2DD44D - (1 << 63)
_MASK53 = (1 << 53) - 1


def _hash_uniform(seed: int, tensor_index: int, pos: Tensor) -> Tensor:
    """Deterministic pseudo-random scores in [0, 1) for flat positions (counter-based, device-agnostic)."""
    x = pos.to(torch.long) * 2654435761 + ((seed * 1_000_003 + tensor_index) * 0x9E3779B97F4A7C15 % (1 << 62))
    # int64 arithmetic wraps; logical shifts are emulated by masking after the arithmetic shift.
    x = x ^ ((x >> 31) & ((1 << 33) - 1))
    x = x * _M1
    x = x ^ ((x >> 29) & ((1 << 35) - 1))
    x = x * _M2
    x = x ^ ((x >> 32) & ((1 << 32) - 1))
    return ((x >> 11) & _MASK53).to(torch.float64) * (1.0 / (1 << 53))


def random_mask(theta0: Mapping[str, Tensor], theta1: Mapping[str, Tensor] | None, k: int,
                *, seed: int = 0) -> dict[str, Tensor]:
    """K entries uniformly at random, identical on every rank for the same seed."""
    names, a = _flat(theta0)

    def scorer(i, pos):
        if isinstance(pos, slice):
            pos = torch.arange(pos.start, pos.stop, device=a[i].device)
        return _hash_uniform(seed, i, pos)

    picked = select_top_k([x.numel() for x in a], scorer, k, names=names, device=_device(a))
    return dict(zip(names, picked))


@dataclass(frozen=True)
class MaskStrategy:
    """A mask function and which training phases it implies."""
    name: str
    fn: MaskFn
    needs_phase1: bool
    runs_phase2: bool
    help: str
    #: phase 2 starts from θ1 on the mask (and θ1's heads) instead of θ0: prune, then retrain
    phase2_from_theta1: bool = False


MASK_STRATEGIES: dict[str, MaskStrategy] = {
    s.name: s for s in (
        MaskStrategy("lottery-ticket", lottery_ticket, True, True,
                     "top-K of |θ1 − θ0| after full fine-tuning, then retrain those entries (LT-SFT)"),
        MaskStrategy("random", random_mask, False, True, "K random entries (seeded), trained"),
        MaskStrategy("magnitude", magnitude, False, True, "top-K of |θ0|, trained"),
        MaskStrategy("prune-difference", lottery_ticket, True, False,
                     "top-K of |θ1 − θ0|, keep θ1 − θ0 there (no phase 2)"),
        MaskStrategy("prune-retrain", lottery_ticket, True, True,
                     "top-K of |θ1 − θ0|, then retrain those entries starting from θ1 (not θ0)",
                     phase2_from_theta1=True),
    )
}


def get_mask_strategy(name: str) -> MaskStrategy:
    try:
        return MASK_STRATEGIES[name]
    except KeyError:
        raise CompsftError(f"unknown mask strategy {name!r}; choose one of {', '.join(MASK_STRATEGIES)}") from None
