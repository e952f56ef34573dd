"""Maximum spanning tree decoding (Chu-Liu/Edmonds) with exactly one word attached to the root.

Scores are a square matrix `scores[d, h]`: the score of word h being the head of word d, with
node 0 the artificial root (row 0 is ignored). Non-projective trees are allowed, as in UD.

The single-root constraint uses the classic trick (Gabow & Tarjan 1984; Zmigrod et al. 2020):
subtract from every root arc a constant larger than any difference between two trees' scores.
Every tree needs at least one root arc, each extra one costs the constant, so the maximum tree of
the shifted scores is the best tree with a single root arc.
"""
from __future__ import annotations

import numpy as np


def decode_tree(scores: np.ndarray, single_root: bool = True) -> np.ndarray:
    """Heads (0 = root) of the highest-scoring tree: an int array of length n (heads[0] = 0 for the root).

    Entries that are -inf are forbidden arcs; every word must keep at least one finite arc.
    """
    scores = np.array(scores, dtype=np.float64)
    n = scores.shape[0]
    if scores.shape != (n, n):
        raise ValueError(f"scores must be square, got {scores.shape}")
    if n <= 1:
        return np.zeros(n, dtype=np.int64)
    scores[0, :] = -np.inf
    np.fill_diagonal(scores, -np.inf)
    if single_root and n > 2:
        finite = scores[np.isfinite(scores)]
        spread = float(finite.max() - finite.min()) if finite.size else 0.0
        scores[1:, 0] -= (spread + 1.0) * n
    if not np.isfinite(scores[1:]).any(axis=1).all():
        raise ValueError("some word has no allowed head")
    heads = _chu_liu_edmonds(scores)
    heads[0] = 0
    return heads


def _find_cycle(heads: np.ndarray) -> list[int] | None:
    n = len(heads)
    state = np.zeros(n, dtype=np.int8)  # 0 unvisited, 1 on current path, 2 done
    state[0] = 2
    for start in range(1, n):
        path = []
        v = start
        while state[v] == 0:
            state[v] = 1
            path.append(v)
            v = heads[v]
        if state[v] == 1:  # came back to the current path: a cycle from v
            cycle = path[path.index(v):]
            return cycle
        for u in path:
            state[u] = 2
    return None


def _chu_liu_edmonds(scores: np.ndarray) -> np.ndarray:
    n = scores.shape[0]
    heads = scores.argmax(axis=1)
    heads[0] = 0
    cycle = _find_cycle(heads)
    if cycle is None:
        return heads
    in_cycle = np.zeros(n, dtype=bool)
    in_cycle[cycle] = True
    rest = np.flatnonzero(~in_cycle)  # rest[0] == 0, the root
    cyc = np.array(cycle)
    m = len(rest)
    contracted = np.full((m + 1, m + 1), -np.inf)
    contracted[:m, :m] = scores[np.ix_(rest, rest)]
    # Entering the cycle at v from u replaces v's cycle arc.
    with np.errstate(invalid="ignore"):
        entering = scores[np.ix_(cyc, rest)] - scores[cyc, heads[cyc]][:, None]
    entering[np.isnan(entering)] = -np.inf
    best_entry = entering.argmax(axis=0)
    contracted[m, :m] = entering.max(axis=0)
    leaving = scores[np.ix_(rest, cyc)]
    best_exit = leaving.argmax(axis=1)
    contracted[:m, m] = leaving.max(axis=1)
    contracted[0, :] = -np.inf
    sub = _chu_liu_edmonds(contracted)
    result = heads.copy()
    for k in range(1, m):
        h = sub[k]
        result[rest[k]] = rest[h] if h < m else cyc[best_exit[k]]
    h = sub[m]
    result[cyc[best_entry[h]]] = rest[h]
    return result


def tree_score(scores: np.ndarray, heads: np.ndarray) -> float:
    """Sum of the arc scores of a tree (heads[0] ignored)."""
    return float(sum(scores[d, heads[d]] for d in range(1, len(heads))))


def is_tree(heads: np.ndarray, single_root: bool = True) -> bool:
    """True when `heads` (heads[0] ignored) forms a tree rooted at 0, with one root child if asked."""
    heads = np.asarray(heads)
    n = len(heads)
    if n <= 1:
        return True
    if single_root and int((heads[1:] == 0).sum()) != 1:
        return False
    for start in range(1, n):
        seen = set()
        v = start
        while v != 0:
            if v in seen or not 0 <= heads[v] < n:
                return False
            seen.add(v)
            v = int(heads[v])
    return True
