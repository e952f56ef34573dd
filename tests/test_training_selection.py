"""Exact top-K selection and the mask strategies, against brute-force references."""
from __future__ import annotations

import pytest
import torch

from compsft.errors import CompsftError
from compsft.training.masks import MASK_STRATEGIES, lottery_ticket, magnitude, random_mask
from compsft.training.selection import select_top_k, top_k_of_scores


def brute_force(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Top-K by (score desc, tensor order asc, flat index asc): a full stable sort."""
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).double() for n in names])
    tensor_id = torch.cat([torch.full((scores[n].numel(),), i) for i, n in enumerate(names)])
    # A stable sort by descending score keeps the concatenation order among ties.
    order = torch.sort(-flat, stable=True).indices[:k]
    picked = torch.zeros(flat.numel(), dtype=torch.bool)
    picked[order] = True
    out, start = {}, 0
    for i, n in enumerate(names):
        size = scores[n].numel()
        out[n] = picked[start:start + size].nonzero().squeeze(1)
        start += size
    return out


def assert_same(a, b):
    assert list(a) == list(b)
    for n in a:
        assert torch.equal(a[n], b[n]), n


@pytest.mark.parametrize("k", [0, 1, 7, 500, 1999, 2500, 3999, 4000, 4100])
def test_exact_k_with_ties_matches_brute_force(k):
    gen = torch.Generator().manual_seed(k)
    # Few distinct values: many ties straddle the threshold.
    scores = {
        "a": torch.randint(0, 5, (10, 30), generator=gen).float(),
        "b": torch.randint(0, 5, (1000,), generator=gen).float(),
        "c": torch.zeros(0),
        "d": torch.randint(0, 5, (3, 1000), generator=gen).float(),
    }
    got = top_k_of_scores(scores, k)
    assert sum(v.numel() for v in got.values()) == k
    assert_same(got, brute_force(scores, k))
    for v in got.values():
        assert v.dtype == torch.long and (v.numel() < 2 or bool((v[1:] > v[:-1]).all()))


@pytest.mark.parametrize("k", [1, 300_000, 2_999_999])
def test_sampled_threshold_path_with_small_chunks(k):
    # Larger than 4 * sample_size so the sampled threshold is used; small chunks exercise the loop.
    gen = torch.Generator().manual_seed(1)
    scores = {"x": torch.rand(2_000_000, generator=gen), "y": torch.rand(1000, 1000, generator=gen)}
    scores["y"][0, :50] = 0.5  # ties
    got = top_k_of_scores(scores, k, chunk_size=1 << 16, sample_size=1 << 14)
    assert_same(got, brute_force(scores, k))


def test_bad_threshold_sample_falls_back(monkeypatch):
    """Scores high exactly where the threshold sample looks: the estimate overshoots, the first pass
    keeps fewer than K candidates, and the second pass (threshold -inf) must still give the exact top-K."""
    from compsft.training import selection

    n, k, sample = 100_000, 5_000, 1_000
    sampled = []

    def recording(i, pos):
        if isinstance(pos, torch.Tensor):
            sampled.append(pos.clone())
            return torch.zeros(pos.numel())
        return torch.zeros(pos.stop - pos.start)

    select_top_k([n], recording, 10, sample_size=sample)
    assert sampled, "the sampled threshold path was not taken"
    gen = torch.Generator().manual_seed(3)
    scores = torch.rand(n, generator=gen) * 0.5  # distinct values below 0.5 ...
    scores[torch.cat(sampled)] = 1.0 + torch.rand(torch.cat(sampled).numel(), generator=gen)  # ... above 1 where sampled
    assert int((scores >= 1.0).sum()) < k

    passes = []
    real_candidates = selection._candidates

    def counting(sizes, scorer, threshold, names, chunk_size):
        passes.append(threshold)
        return real_candidates(sizes, scorer, threshold, names, chunk_size)

    monkeypatch.setattr(selection, "_candidates", counting)
    got = select_top_k([n], lambda i, pos: scores[pos], k, sample_size=sample)
    assert len(passes) == 2 and passes[0] >= 1.0 and passes[1] == float("-inf")
    assert_same({"x": got[0]}, brute_force({"x": scores}, k))


def test_errors():
    with pytest.raises(CompsftError):
        top_k_of_scores({"a": torch.ones(3)}, 4)
    with pytest.raises(CompsftError, match="NaN"):
        top_k_of_scores({"a": torch.tensor([1.0, float("nan"), 2.0])}, 2)


def test_mask_strategies_contract():
    gen = torch.Generator().manual_seed(0)
    theta0 = {"w": torch.randn(20, 10, generator=gen), "b": torch.randn(10, generator=gen)}
    theta1 = {n: t + torch.randn(t.shape, generator=gen) for n, t in theta0.items()}
    lt = lottery_ticket(theta0, theta1, 30)
    assert_same(lt, brute_force({n: (theta1[n] - theta0[n]).abs() for n in theta0}, 30))
    assert_same(magnitude(theta0, None, 30), brute_force({n: t.abs() for n, t in theta0.items()}, 30))
    r1, r2, r3 = random_mask(theta0, None, 30, seed=1), random_mask(theta0, None, 30, seed=1), \
        random_mask(theta0, None, 30, seed=2)
    assert_same(r1, r2)
    assert any(not torch.equal(r1[n], r3[n]) for n in r1)
    for m in (lt, r1):
        assert list(m) == ["w", "b"] and sum(v.numel() for v in m.values()) == 30
    assert set(MASK_STRATEGIES) == {"lottery-ticket", "random", "magnitude", "prune-difference", "prune-retrain"}
    assert not MASK_STRATEGIES["prune-difference"].runs_phase2
    assert MASK_STRATEGIES["prune-retrain"].phase2_from_theta1 and MASK_STRATEGIES["prune-retrain"].runs_phase2
    assert not MASK_STRATEGIES["random"].needs_phase1


def test_random_mask_is_roughly_uniform():
    theta0 = {"a": torch.zeros(100_000), "b": torch.zeros(300_000)}
    m = random_mask(theta0, None, 40_000, seed=3)
    # Expect 10,000 in a (sd ~ 85).
    assert abs(m["a"].numel() - 10_000) < 500
    # Spread across the whole tensor, not only its start.
    assert m["b"].float().mean().item() == pytest.approx(150_000, rel=0.03)
