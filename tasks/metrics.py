"""Evaluation metrics: pure functions over lists of per-sentence label lists.

* POS: accuracy over all words.
* Parsing: UAS and LAS over **all words, punctuation included** (as in the CoNLL 2018 shared task
  evaluation, and unlike the older CoNLL-X convention of skipping punctuation). LAS compares the
  relation as read: without subtypes unless the reader was told to keep them.
* NER: entity-level micro precision, recall and F1 with `seqeval` in its **default mode**, which
  reads tags the way the CoNLL-2000 `conlleval` script does (an `I-X` that does not continue an X
  entity starts one). The readers repair gold files that way, so strict IOB2 mode would give the
  same numbers on the gold side; for predictions the lenient reading is the one conlleval reports.
"""
from __future__ import annotations

from typing import Sequence

from compsft.errors import CompsftError


def _check_lengths(gold: Sequence[Sequence], predicted: Sequence[Sequence], what: str) -> None:
    if len(gold) != len(predicted):
        raise CompsftError(f"{what}: {len(gold)} gold sentences but {len(predicted)} predicted")
    for i, (g, p) in enumerate(zip(gold, predicted)):
        if len(g) != len(p):
            raise CompsftError(f"{what}: sentence {i} has {len(g)} gold words but {len(p)} predicted")


def accuracy(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> float:
    """Fraction of words whose predicted label equals the gold one (POS accuracy)."""
    _check_lengths(gold, predicted, "accuracy")
    total = sum(len(g) for g in gold)
    if total == 0:
        return 0.0
    correct = sum(a == b for g, p in zip(gold, predicted) for a, b in zip(g, p))
    return correct / total


def attachment_scores(
    gold_heads: Sequence[Sequence[int]],
    gold_rels: Sequence[Sequence[str]],
    pred_heads: Sequence[Sequence[int]],
    pred_rels: Sequence[Sequence[str]],
) -> dict[str, float]:
    """UAS (head correct) and LAS (head and relation correct) over all words, punctuation included."""
    _check_lengths(gold_heads, pred_heads, "attachment scores")
    _check_lengths(gold_rels, pred_rels, "attachment scores")
    total = sum(len(h) for h in gold_heads)
    if total == 0:
        return {"uas": 0.0, "las": 0.0}
    unlabelled = labelled = 0
    for gh, gr, ph, pr in zip(gold_heads, gold_rels, pred_heads, pred_rels):
        for a, b, c, d in zip(gh, gr, ph, pr):
            if a == c:
                unlabelled += 1
                if b == d:
                    labelled += 1
    return {"uas": unlabelled / total, "las": labelled / total}


def entity_scores(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level micro precision, recall and F1 (seqeval default, conlleval-compatible mode)."""
    from seqeval.metrics import f1_score, precision_score, recall_score
    from seqeval.metrics.sequence_labeling import get_entities

    _check_lengths(gold, predicted, "entity scores")
    gold = [list(s) for s in gold]
    predicted = [list(s) for s in predicted]
    return {
        "precision": float(precision_score(gold, predicted, zero_division=0)),
        "recall": float(recall_score(gold, predicted, zero_division=0)),
        "f1": float(f1_score(gold, predicted, zero_division=0)),
        "gold_entities": float(len(get_entities(gold))),
        "predicted_entities": float(len(get_entities(predicted))),
    }
