"""Summaries of a grid's scores: mean ± sd over seeds, and paired differences with a 95% interval.

Paired differences: for a method M and the reference R (`lt-sft`), every (target, seed) where both
cells finished gives d = score(M) − score(R): the same target, the same seed, so the same data and the
same random start where the methods share modules. The interval is Student's t over those n
differences, mean(d) ± t(0.975, n − 1) · sd(d) / √n. It treats the n pairs as independent; pairs of
the same target share its test set, so read it as an interval over this grid's seeds and targets, not
over languages in general.
"""
from __future__ import annotations

import math
from statistics import fmean, stdev
from typing import Iterable, Sequence


def mean_sd(values: Sequence[float]) -> dict[str, float | int | None]:
    """{'mean', 'sd', 'n'}; sd is the sample standard deviation (None for one value)."""
    values = [float(v) for v in values]
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": fmean(values), "sd": stdev(values) if len(values) > 1 else None, "n": len(values)}


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(p, df))


def paired_interval(differences: Iterable[float], level: float = 0.95) -> dict[str, float | int | None]:
    """Mean of paired differences with a two-sided t-interval; bounds are None for fewer than 2 pairs."""
    d = [float(x) for x in differences]
    n = len(d)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0, "sd": None}
    mean = fmean(d)
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": 1, "sd": None}
    sd = stdev(d)
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "sd": sd}


def summarise(cells: Sequence[dict], methods: Sequence[str], targets: Sequence[str], seeds: Sequence[int],
              metric: str, variant: str = "fixed") -> dict[str, dict]:
    """Per method: per target mean ± sd over seeds, and the average over targets (mean ± sd over seeds of
    the per-seed average; a seed counts only when every target finished)."""
    score = _scores(cells, metric, variant)
    out: dict[str, dict] = {}
    for m in methods:
        per_target = {t: mean_sd([score[m, t, s] for s in seeds if (m, t, s) in score]) for t in targets}
        averages = [fmean(score[m, t, s] for t in targets) for s in seeds
                    if all((m, t, s) in score for t in targets)]
        out[m] = {"targets": per_target, "average": mean_sd(averages)}
    return out


def paired_differences(cells: Sequence[dict], methods: Sequence[str], reference: str, metric: str,
                       variant: str = "fixed") -> dict[str, dict]:
    """Per method other than `reference`: the paired-difference interval over (target, seed)."""
    score = _scores(cells, metric, variant)
    out = {}
    for m in methods:
        if m == reference:
            continue
        pairs = sorted(k[1:] for k in score if k[0] == m and (reference, *k[1:]) in score)
        out[m] = paired_interval(score[(m, *p)] - score[(reference, *p)] for p in pairs)
    return out


def _scores(cells: Sequence[dict], metric: str, variant: str) -> dict[tuple[str, str, int], float]:
    out = {}
    for c in cells:
        value = ((c.get("metrics") or {}).get(variant) or {}).get(metric) if c.get("status") == "ok" else None
        if value is not None:
            out[c["method"], c["target"], c["seed"]] = float(value)
    return out
