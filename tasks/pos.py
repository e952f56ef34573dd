"""Universal POS tagging on UD treebanks: accuracy over all words."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .base import Sentence
from .metrics import accuracy
from .readers import read_conllu
from .tagging import TaggingTask
from .writers import write_conllu

#: The 17 universal POS tags in the order of the UD guidelines; the label ids follow it.
UPOS = ("ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN",
        "PUNCT", "SCONJ", "SYM", "VERB", "X")


class PosTask(TaggingTask):
    name = "pos"
    description = "universal POS tagging (UD CoNLL-U), accuracy"
    prediction_suffix = ".conllu"

    def read(self, path: str | Path, keep_subtypes: bool = False, **_: object) -> list[Sentence]:
        return read_conllu(path, keep_subtypes=keep_subtypes)

    def label_list(self, sentences: Sequence[Sentence]) -> list[str]:
        """All 17 UPOS tags (a target may use one the source lacks), then any others seen, sorted."""
        extra = sorted({t for s in sentences for t in (s.tags or [])} - set(UPOS))
        return list(UPOS) + extra

    def score(self, gold: Sequence[Sentence], predicted: Sequence[Sentence]) -> dict[str, float]:
        return {"accuracy": accuracy([g.tags for g in gold], [p.tags for p in predicted]),
                "sentences": float(len(gold)), "words": float(sum(len(g) for g in gold))}

    def write_predictions(self, path, sentences, predictions) -> None:
        write_conllu(path, sentences, predictions, columns=("upos",))


TASK = PosTask()
