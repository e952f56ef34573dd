"""Exact global top-K selection over a list of tensors, in chunks.

LT-SFT keeps the K entries with the largest score (|θ1 − θ0| for the lottery ticket) across *all*
eligible tensors. The reference implementation builds a Python list of every score; here nothing
larger than a chunk or the candidate set is ever materialised:

1. A seeded sample of scores estimates the K-th largest score from below (``t_lo``), with a safety
   margin so that, with overwhelming probability, at least K scores are ``>= t_lo``.
2. One chunked pass keeps the candidates ``score >= t_lo`` (flat index as int32/int64 + score).
   If fewer than K survive (an unlucky sample), the pass is repeated with a lower threshold, so the
   result never depends on the sample, only the speed does.
3. ``kthvalue`` over the candidates gives the exact K-th largest score ``v``; every candidate above
   ``v`` is kept and ties at ``v`` are broken by tensor order, then by flat index (lower first).

Extra memory is about 13 bytes per candidate (≈ K · (1 + margin)) plus one chunk; when K is more
than half of N the complement (the N − K smallest) is selected instead, which keeps the candidate
set below N / 2. Scores are computed on the tensors' device; the returned indices are on the CPU.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import CompsftError

logger = logging.getLogger(__name__)

# A scorer returns the scores of tensor `i` at the given flat positions (a slice or an index tensor).
Scorer = Callable[[int, "slice | Tensor"], Tensor]

DEFAULT_CHUNK = 1 << 22
DEFAULT_SAMPLE = 1 << 20


def select_top_k(
    sizes: Sequence[int],
    scorer: Scorer,
    k: int,
    *,
    names: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    sample_size: int = DEFAULT_SAMPLE,
) -> list[Tensor]:
    """Sorted int64 flat indices (CPU) of the exact global top-`k` scores, one tensor per entry of `sizes`.

    Ties are broken by tensor order, then by flat index (lower first), so the result is deterministic
    on every device and rank. `scorer(i, positions)` must return float scores of tensor `i` at
    `positions` (a `slice` of flat positions or a 1-D index tensor) and be a pure function.
    `names` only serve error messages. NaN scores are an error.
    """
    sizes = [int(s) for s in sizes]
    total = sum(sizes)
    names = list(names) if names is not None else [f"tensor {i}" for i in range(len(sizes))]
    if k < 0 or k > total:
        raise CompsftError(f"cannot select K={k} entries out of {total}")
    if k == 0:
        return [torch.zeros(0, dtype=torch.long) for _ in sizes]
    if k == total:
        return [torch.arange(n, dtype=torch.long) for n in sizes]
    if 2 * k > total:
        # Select the entries to drop (the smallest scores) and keep the rest: the candidate set
        # stays below N / 2. Tie order reverses with negation, so break ties the same way by
        # dropping the *last* of the tied entries: handled by `_top_k` with reverse_ties=True.
        drop = _top_k(sizes, lambda i, pos: -scorer(i, pos), total - k, names, device,
                      chunk_size, sample_size, reverse_ties=True)
        out = []
        for n, d in zip(sizes, drop):
            keep = torch.ones(n, dtype=torch.bool)
            keep[d] = False
            out.append(keep.nonzero().squeeze(1))
        return out
    return _top_k(sizes, scorer, k, names, device, chunk_size, sample_size, reverse_ties=False)


def top_k_of_scores(scores: Mapping[str, Tensor], k: int, **kwargs) -> dict[str, Tensor]:
    """`select_top_k` over precomputed score tensors, keyed like `scores` (in its order)."""
    names = list(scores)
    flats = [scores[n].reshape(-1) for n in names]
    device = flats[0].device if flats else None
    picked = select_top_k([f.numel() for f in flats], lambda i, pos: flats[i][pos], k,
                          names=names, device=device, **kwargs)
    return dict(zip(names, picked))


def _top_k(sizes, scorer, k, names, device, chunk_size, sample_size, reverse_ties):
    total = sum(sizes)
    threshold = _estimate_threshold(sizes, scorer, k, device, sample_size)
    while True:
        cand_idx, cand_scores, counts = _candidates(sizes, scorer, threshold, names, chunk_size)
        n_cand = int(sum(counts))
        if threshold == -math.inf and n_cand < total:
            raise CompsftError(f"{total - n_cand} of {total} selection scores are NaN: the training diverged")
        if n_cand >= k:
            break
        # The sample overestimated the threshold (probability ~1e-9 with the margin used) or the
        # scores are degenerate: fall back to everything, which is always enough.
        logger.debug("selection threshold %g kept %d < %d candidates; retrying", threshold, n_cand, k)
        threshold = -math.inf
    scores = torch.cat(cand_scores) if cand_scores else torch.zeros(0)
    # The exact K-th largest: kthvalue counts from the smallest.
    kth = scores.kthvalue(n_cand - k + 1).values
    keep = scores > kth
    need = k - int(keep.sum())
    if need > 0:
        tied = (scores == kth).nonzero().squeeze(1)
        # Candidates are in (tensor order, flat index) order, so the first ties win; when selecting
        # the complement, the *last* ties are dropped so that the kept set uses the same rule.
        keep[tied[-need:] if reverse_ties else tied[:need]] = True
    del scores
    out = []
    for idx, m in zip(cand_idx, keep.split(counts)):
        out.append(idx[m].to(device="cpu", dtype=torch.long))
    del keep, cand_idx
    logger.debug("selected %d of %d entries (threshold %g, %d candidates)", k, total, float(kth), n_cand)
    return out


def _estimate_threshold(sizes, scorer, k, device, sample_size) -> float:
    """A score that at least `k` entries reach, with high probability, estimated from a sample."""
    total = sum(sizes)
    if total <= 4 * sample_size:
        return -math.inf  # small problem: one exact pass over everything is cheapest
    gen = torch.Generator().manual_seed(0x5F7)
    pos = torch.randint(0, total, (sample_size,), generator=gen)
    bounds = torch.tensor([0] + list(sizes)).cumsum(0)
    which = torch.searchsorted(bounds, pos, right=True) - 1
    parts = []
    for i in range(len(sizes)):
        local = (pos[which == i] - bounds[i])
        if local.numel():
            if device is not None:
                local = local.to(device)
            parts.append(scorer(i, local).float().reshape(-1))
    sample = torch.cat(parts)
    if bool(torch.isnan(sample).any()):
        raise CompsftError("NaN among the selection scores: the training diverged")
    p = k / total
    # Aim for k · 1.01 plus 6 standard deviations of the sample quantile.
    q = p * 1.01 + 6.0 * math.sqrt(p * (1 - p) / sample_size) + 1.0 / sample_size
    if q >= 1.0:
        return -math.inf
    rank = min(sample.numel(), max(1, math.ceil(q * sample.numel())))
    # rank-th largest = (n - rank + 1)-th smallest
    value = float(sample.kthvalue(sample.numel() - rank + 1).values)
    return value if math.isfinite(value) else -math.inf


def _candidates(sizes, scorer, threshold, names, chunk_size):
    cand_idx: list[Tensor] = []
    cand_scores: list[Tensor] = []
    counts: list[int] = []
    for i, n in enumerate(sizes):
        idx_dtype = torch.int32 if n < 2**31 else torch.long
        t_idx, t_scores = [], []
        for start in range(0, n, chunk_size):
            stop = min(n, start + chunk_size)
            s = scorer(i, slice(start, stop)).reshape(-1)
            if s.dtype != torch.float32:
                s = s.float()
            if s.device.type == "cpu":
                # numpy's compaction is 2-4x faster than torch.nonzero on CPU (and single-threaded,
                # so it does not pay torch's thread-pool wake-ups per chunk).
                arr = s.numpy()
                sel_np = np.flatnonzero(arr >= threshold)
                vals = torch.from_numpy(arr[sel_np])
                sel = torch.from_numpy(sel_np)
            else:
                sel = (s >= threshold).nonzero().squeeze(1)
                vals = s[sel]
            t_idx.append((sel + start).to(idx_dtype))
            t_scores.append(vals)
        if t_idx:
            idx = torch.cat(t_idx) if len(t_idx) > 1 else t_idx[0]
            sc = torch.cat(t_scores) if len(t_scores) > 1 else t_scores[0]
        else:
            idx, sc = torch.zeros(0, dtype=idx_dtype), torch.zeros(0)
        cand_idx.append(idx)
        cand_scores.append(sc)
        counts.append(idx.numel())
    return cand_idx, cand_scores, counts
