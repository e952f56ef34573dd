"""Shared machinery of word-level tagging tasks (POS, NER) on `AutoModelForTokenClassification`.

Labels sit on each word's first sub-word; the other sub-words and special tokens get -100.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from compsft.errors import CompsftError

from .base import Sentence, TaskSpec
from .windows import IGNORE_INDEX, default_max_length, length_batches, make_windows, stitch

logger = logging.getLogger(__name__)


def model_device(model):
    import torch

    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def pad_batch(tokenizer, rows: Sequence[Sequence[int]], device):
    """(input_ids, attention_mask) tensors for lists of token ids, right-padded."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


def labels_of_model(model) -> list[str]:
    """The label list stored in a token-classification model's config (id order)."""
    id2label = getattr(model.config, "id2label", None) or {}
    labels = [id2label[i] for i in sorted(id2label, key=int)]
    if not labels or all(str(label).startswith("LABEL_") for label in labels):
        raise CompsftError(f"model {getattr(model.config, '_name_or_path', '')!r} has no label names in its config "
                           "(id2label); pass the label list")
    return labels


class TaggingTask(TaskSpec):
    """One label per word, predicted by a token-classification head."""

    prediction_suffix = ".txt"

    def build_model(self, model_dir: str | Path, labels: Sequence[str], **kwargs):
        from transformers import AutoModelForTokenClassification

        labels = list(labels)
        return AutoModelForTokenClassification.from_pretrained(
            model_dir,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            **kwargs,
        )

    def load_model(self, model_dir: str | Path, **kwargs):
        from transformers import AutoModelForTokenClassification

        model = AutoModelForTokenClassification.from_pretrained(model_dir, **kwargs)
        return model, labels_of_model(model)

    def label_ids(self, sentence: Sentence, label2id: dict[str, int]) -> list[int]:
        """Gold label ids of one sentence (labels outside the set are an error here; see NER)."""
        out = []
        for tag in sentence.tags or []:
            if tag not in label2id:
                raise CompsftError(f"{sentence.source or 'a sentence'}: label {tag!r} is not in the label set")
            out.append(label2id[tag])
        return out

    def encode(self, sentences: Sequence[Sentence], tokenizer, labels: Sequence[str], max_length: int | None = None):
        from datasets import Dataset

        label2id = {label: i for i, label in enumerate(labels)}
        max_length = max_length or default_max_length(None, tokenizer)
        windows = make_windows(tokenizer, [s.words for s in sentences], max_length)
        gold = [self.label_ids(s, label2id) for s in sentences]
        rows = {"input_ids": [], "attention_mask": [], "labels": []}
        for w in windows:
            target = [IGNORE_INDEX] * len(w.input_ids)
            for k, position in enumerate(w.word_starts):
                target[position] = gold[w.sentence][w.start + k]
            rows["input_ids"].append(w.input_ids)
            rows["attention_mask"].append([1] * len(w.input_ids))
            rows["labels"].append(target)
        return Dataset.from_dict(rows)

    def collator(self, tokenizer):
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE_INDEX)

    def predict(self, model, tokenizer, sentences, labels=None, batch_size: int = 32, max_length: int | None = None):
        import torch

        labels = list(labels) if labels is not None else labels_of_model(model)
        max_length = max_length or default_max_length(model, tokenizer)
        windows = make_windows(tokenizer, [s.words for s in sentences], max_length)
        device = model_device(model)
        per_window: list[list[str] | None] = [None] * len(windows)
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for batch in length_batches(windows, batch_size):
                    ids, mask = pad_batch(tokenizer, [windows[i].input_ids for i in batch], device)
                    logits = model(input_ids=ids, attention_mask=mask).logits
                    if logits.size(-1) != len(labels):
                        raise CompsftError(f"the model predicts {logits.size(-1)} labels but {len(labels)} were given")
                    best = logits.argmax(-1).cpu()
                    for row, i in enumerate(batch):
                        per_window[i] = [labels[int(best[row, p])] for p in windows[i].word_starts]
        finally:
            model.train(was_training)
        tags = stitch(windows, per_window, len(sentences))
        return [self.make_prediction(s, t) for s, t in zip(sentences, tags)]

    def make_prediction(self, sentence: Sentence, tags: list[str]) -> Sentence:
        return sentence.replace(tags=tags)
