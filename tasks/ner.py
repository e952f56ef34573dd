"""Named entity recognition on IOB2 column files (MasakhaNER, UNER): entity-level F1 (seqeval).

The label set is the source's (e.g. English PER/ORG/LOC). Gold target tags outside it (MasakhaNER's
DATE) are scored as O, as in the LT-SFT paper; the count is logged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .base import Sentence
from .metrics import entity_scores
from .readers import map_unknown_to_o, read_ner, repair_iob2
from .tagging import TaggingTask, labels_of_model
from .writers import write_ner_columns


class NerTask(TaggingTask):
    name = "ner"
    description = "named entity recognition (IOB2 columns), entity F1 with seqeval's default mode"
    prediction_suffix = ".txt"

    def read(self, path: str | Path, format: str | None = None, drop_types: Sequence[str] = ("OTH",),
             **_: object) -> list[Sentence]:
        return read_ner(path, format=format, drop_types=drop_types)

    def label_list(self, sentences: Sequence[Sentence]) -> list[str]:
        """O, then B- and I- of each entity type seen, types sorted."""
        types = sorted({t[2:] for s in sentences for t in (s.tags or []) if t != "O"})
        return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]

    def label_ids(self, sentence: Sentence, label2id: dict[str, int]) -> list[int]:
        # Training data may hold types the chosen label set leaves out: they are not entities here.
        return [label2id.get(t, label2id["O"]) for t in sentence.tags or []]

    def prepare_gold(self, sentences: Sequence[Sentence], labels: Sequence[str]) -> list[Sentence]:
        """Gold as scored: tags outside `labels` become O (counted in the log)."""
        where = sentences[0].source.rsplit(":", 1)[0] if sentences and sentences[0].source else ""
        return map_unknown_to_o(sentences, labels, where)[0]

    def make_prediction(self, sentence: Sentence, tags: list[str]) -> Sentence:
        # Written predictions are valid IOB2; seqeval's default mode reads the raw ones identically.
        return sentence.replace(tags=repair_iob2(tags)[0])

    def evaluate(self, model, tokenizer, sentences, labels=None, batch_size: int = 32, max_length: int | None = None):
        labels = list(labels) if labels is not None else labels_of_model(model)
        predictions = self.predict(model, tokenizer, sentences, labels, batch_size=batch_size, max_length=max_length)
        return self.score(self.prepare_gold(sentences, labels), predictions), predictions

    def score(self, gold: Sequence[Sentence], predicted: Sequence[Sentence]) -> dict[str, float]:
        out = entity_scores([g.tags for g in gold], [p.tags for p in predicted])
        out["sentences"] = float(len(gold))
        return out

    def write_predictions(self, path, sentences, predictions) -> None:
        write_ner_columns(path, sentences, predictions)


TASK = NerTask()
