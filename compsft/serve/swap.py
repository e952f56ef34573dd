"""Swapping a (language, task) pair in and out of a resident model at the cost of plain scatters.

`compsft.apply` gathers the old value of every entry it touches, so that `revert` can write it back
bit-identically. A server applies and reverts the same SFTs over and over onto the same θ0, so the
gather can be done once per SFT instead of once per swap: `prepare` runs `compsft.apply` once (which
checks everything: shapes, base fingerprint, vocabulary), keeps θ0 at the SFT's positions and the
values `apply` wrote there, and reverts. A swap is then

* apply: the language SFT's applied values copied in (`index_copy_`, exactly what `apply` wrote), the task
  SFT's differences added (`index_add_`: in fp32 one rounding of current + δ, exactly `apply`'s arithmetic,
  also where the two SFTs overlap) and its head copied in;
* revert: θ0 copied back at every position either SFT touched (`index_copy_`).

Exact for fp32 (and fp64) weights; `prepare` returns None for others and the caller uses
`compsft.apply` / `compsft.revert`. The tests compare every swap with `compsft.apply` on a copy.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from compsft import merge
from compsft.sft import SparseFineTuning

EXACT_DTYPES = (torch.float32, torch.float64)


@dataclass
class Prepared:
    """One SFT made ready for swaps on `model` (θ0 at its positions kept)."""

    model: torch.nn.Module
    # (flat view of the parameter, int64 positions, θ0 there, what to write or add there on apply)
    sparse: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # (parameter, θ0 copy, trained value): the task head
    dense: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    touched: set[int] = field(default_factory=set)  # id() of every parameter it writes


def prepare(model: torch.nn.Module, sft: SparseFineTuning, *, additive: bool, with_dense: bool,
            vocab: dict | None) -> Prepared | None:
    """Check `sft` against `model` (at θ0) with `compsft.apply` and keep what a swap needs.

    `additive=False` (the SFT applied first, onto θ0) keeps the values `apply` wrote; `additive=True`
    (applied after another SFT) keeps the differences in fp32. Raises what `apply` raises (the model is
    then untouched); None when the weights' dtype would make the fast path inexact.
    """
    handle = merge.apply(model, sft, with_dense=with_dense, check_base=True, vocab=vocab)
    try:
        if any(t.param.dtype not in EXACT_DTYPES for t in handle.touched):
            return None
        deltas = _deltas_by_param(model, sft) if additive else {}
        out = Prepared(model)
        for t in handle.touched:
            out.touched.add(id(t.param))
            if t.indices is None:
                out.dense.append((t.param, t.original, t.param.detach().clone()))
                continue
            flat = t.param.data.view(-1)
            if additive:
                # apply added values.to(fp32) to the old value in fp32: index_add_ does the same sum
                change = deltas[id(t.param)].to(t.param.device, t.param.dtype)
            else:
                change = flat.index_select(0, t.indices)
            out.sparse.append((flat, t.indices, t.original, change))
        return out
    finally:
        merge.revert(model, handle)


def _deltas_by_param(model: torch.nn.Module, sft: SparseFineTuning) -> dict[int, torch.Tensor]:
    table = dict(model.named_parameters(remove_duplicate=False))
    out: dict[int, torch.Tensor] = {}
    for name, delta in sft.diffs.items():
        target = merge._resolve(model, table, name)  # the same name resolution as apply's
        out.setdefault(id(table[target]), delta.values)  # a tied duplicate is applied once, as apply does
    return out


def apply_pair(first: Prepared, second: Prepared) -> None:
    """θ0 → θ0 + φ_first + φ_second (and second's head). On an error, θ0 is restored before it propagates."""
    try:
        with torch.no_grad():
            for flat, idx, _, value in first.sparse:
                flat.index_copy_(0, idx, value)
            for flat, idx, _, delta in second.sparse:
                flat.index_add_(0, idx, delta)
            for param, _, value in first.dense + second.dense:
                param.data.copy_(value)
    except BaseException:
        revert_pair(first, second)
        raise


def revert_pair(first: Prepared, second: Prepared) -> None:
    """Back to θ0 at every position either SFT touches (θ0 was kept, so the order does not matter)."""
    with torch.no_grad():
        for prepared in (second, first):
            for flat, idx, theta0, _ in prepared.sparse:
                flat.index_copy_(0, idx, theta0)
            for param, theta0, _ in prepared.dense:
                param.data.copy_(theta0)
