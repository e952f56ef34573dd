"""What a task is: sentences in, a model, an encoded training set, metrics and predictions out.

A task is a :class:`TaskSpec`; `compsft.tasks.get_task(name)` returns the registered one. The whole
contract, as the trainer and `compsft evaluate` use it::

    spec = get_task("pos")
    train = spec.read(train_path)                     # list[Sentence]
    labels = spec.label_list(train)                   # stable order; for NER the source label set
    model = spec.build_model(model_dir, labels)       # nn.Module; forward(**batch).loss
    train_ds = spec.encode(train, tokenizer, labels, max_length=256)   # datasets.Dataset
    collator = spec.collator(tokenizer)               # pads a list of encoded rows into a batch
    trainer = transformers.Trainer(model=model, train_dataset=train_ds, data_collator=collator, ...)
    metrics, predictions = spec.evaluate(model, tokenizer, sentences, labels, batch_size=32)
    spec.write_predictions(path, sentences, predictions)
    model.save_pretrained(out_dir); model, labels = spec.load_model(out_dir)

`spec.head_param_names(model)` names the task head (the parameters outside the encoder), which an
SFT stores dense. Every piece works with a plain `transformers.Trainer`; nothing here subclasses it.

To add a task, write one module that defines a `TaskSpec` subclass instance named `TASK` and add
its name to `compsft.tasks.REGISTRY`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


@dataclass
class Sentence:
    """One sentence: its words and whatever gold (or predicted) annotation the task has.

    `tags` holds UPOS for UD files and IOB2 tags for NER files; `heads` (1-based, 0 = root) and
    `deprels` are filled for UD files. `tokenlist` keeps the parsed CoNLL-U sentence (multi-word
    tokens, empty nodes, comments) so that predictions can be written back around it.
    """

    words: list[str]
    tags: list[str] | None = None
    heads: list[int] | None = None
    deprels: list[str] | None = None
    sent_id: str | None = None
    source: str | None = field(default=None, metadata={"help": "'file:line' where the sentence starts"})
    tokenlist: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.words)

    def replace(self, **changes: Any) -> "Sentence":
        return dataclasses.replace(self, **changes)


class TaskSpec:
    """Base class of a task. Subclasses fill in the methods; see the module docstring for the flow."""

    name: str = ""
    description: str = ""
    #: extension of the predictions file `compsft evaluate` writes
    prediction_suffix: str = ".txt"

    def read(self, path: str | Path, **options: Any) -> list[Sentence]:
        raise NotImplementedError

    def label_list(self, sentences: Sequence[Sentence]) -> list[str]:
        raise NotImplementedError

    def build_model(self, model_dir: str | Path, labels: Sequence[str], **kwargs: Any):
        """A fresh task model: the encoder from `model_dir` plus a newly initialised head."""
        raise NotImplementedError

    def load_model(self, model_dir: str | Path, **kwargs: Any):
        """A trained task model saved with `save_pretrained`; returns (model, labels)."""
        raise NotImplementedError

    def encode(self, sentences: Sequence[Sentence], tokenizer, labels: Sequence[str], max_length: int | None = None):
        """A `datasets.Dataset` whose rows the collator pads into model inputs."""
        raise NotImplementedError

    def collator(self, tokenizer):
        raise NotImplementedError

    def predict(self, model, tokenizer, sentences: Sequence[Sentence], labels: Sequence[str] | None = None,
                batch_size: int = 32, max_length: int | None = None) -> list[Sentence]:
        """Predicted copies of `sentences` (same words, predicted annotation)."""
        raise NotImplementedError

    def score(self, gold: Sequence[Sentence], predicted: Sequence[Sentence]) -> dict[str, float]:
        raise NotImplementedError

    def prepare_gold(self, sentences: Sequence[Sentence], labels: Sequence[str]) -> list[Sentence]:
        """The gold sentences as they are scored against a model with `labels` (NER maps unknown types to O)."""
        return list(sentences)

    def evaluate(self, model, tokenizer, sentences: Sequence[Sentence], labels: Sequence[str] | None = None,
                 batch_size: int = 32, max_length: int | None = None) -> tuple[dict[str, float], list[Sentence]]:
        """Predict and score: (metrics, predictions)."""
        predictions = self.predict(model, tokenizer, sentences, labels, batch_size=batch_size, max_length=max_length)
        return self.score(sentences, predictions), predictions

    def write_predictions(self, path: str | Path, sentences: Sequence[Sentence], predictions: Sequence[Sentence]) -> None:
        raise NotImplementedError

    def head_param_names(self, model) -> list[str]:
        """Parameters outside the encoder (the task head): an SFT stores them dense."""
        prefix = getattr(model, "base_model_prefix", "")
        return [n for n, _ in model.named_parameters() if not (prefix and n.startswith(prefix + "."))]

    def __repr__(self) -> str:
        return f"<task {self.name}: {self.description}>"
