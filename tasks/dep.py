"""Dependency parsing on UD treebanks with a biaffine parser: UAS and LAS over all words.

Long sentences are encoded in windows; the windows' word representations are concatenated back into
the whole sentence before arc scoring, so the tree decoder (Chu-Liu/Edmonds, one root) always sees
the full sentence and may attach words across windows.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from compsft.errors import CompsftError

from .base import Sentence, TaskSpec
from .biaffine import CONFIG_FILE, BiaffineParser
from .decode import decode_tree
from .metrics import attachment_scores
from .readers import read_conllu
from .tagging import model_device, pad_batch
from .windows import IGNORE_INDEX, default_max_length, length_batches, make_windows
from .writers import write_conllu

#: The 37 universal dependency relations (UD v2), the order of the label ids.
DEPRELS = ("acl", "advcl", "advmod", "amod", "appos", "aux", "case", "cc", "ccomp", "clf", "compound",
           "conj", "cop", "csubj", "dep", "det", "discourse", "dislocated", "expl", "fixed", "flat",
           "goeswith", "iobj", "list", "mark", "nmod", "nsubj", "nummod", "obj", "obl", "orphan",
           "parataxis", "punct", "reparandum", "root", "vocative", "xcomp")


class DependencyCollator:
    """Pads sub-word inputs with the pad token and word-level fields with -1 / -100."""

    def __init__(self, tokenizer) -> None:
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __call__(self, rows):
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        words = max(len(r["word_starts"]) for r in rows)

        def pad(key, length, value):
            return torch.tensor([list(r[key]) + [value] * (length - len(r[key])) for r in rows], dtype=torch.long)

        batch = {
            "input_ids": pad("input_ids", width, self.pad_id),
            "attention_mask": pad("attention_mask", width, 0),
            "word_starts": pad("word_starts", words, -1),
        }
        if "arc_labels" in rows[0]:
            batch["arc_labels"] = pad("arc_labels", words, IGNORE_INDEX)
            batch["rel_labels"] = pad("rel_labels", words, IGNORE_INDEX)
        return batch


class DepTask(TaskSpec):
    name = "dep"
    description = "dependency parsing (UD CoNLL-U), biaffine parser, UAS/LAS incl. punctuation"
    prediction_suffix = ".conllu"

    def read(self, path: str | Path, keep_subtypes: bool = False, **_: object) -> list[Sentence]:
        return read_conllu(path, keep_subtypes=keep_subtypes)

    def label_list(self, sentences: Sequence[Sentence]) -> list[str]:
        """The 37 universal relations, then any others seen (subtypes, if kept), sorted."""
        extra = sorted({r for s in sentences for r in (s.deprels or [])} - set(DEPRELS))
        return list(DEPRELS) + extra

    def build_model(self, model_dir: str | Path, labels: Sequence[str], **kwargs) -> BiaffineParser:
        return BiaffineParser.from_encoder(model_dir, labels, **kwargs)

    def load_model(self, model_dir: str | Path, labels: Sequence[str] | None = None, **kwargs):
        """A saved parser; or, given `labels`, a bare encoder with a fresh head (to be set by an SFT)."""
        if not (Path(model_dir) / CONFIG_FILE).is_file() and labels is not None:
            model = BiaffineParser.from_encoder(model_dir, labels, **kwargs)
        else:
            model = BiaffineParser.from_pretrained(model_dir)
        return model, model.labels

    def encode(self, sentences: Sequence[Sentence], tokenizer, labels: Sequence[str], max_length: int | None = None):
        from datasets import Dataset

        rel2id = {r: i for i, r in enumerate(labels)}
        max_length = max_length or default_max_length(None, tokenizer)
        windows = make_windows(tokenizer, [s.words for s in sentences], max_length)
        rows = {"input_ids": [], "attention_mask": [], "word_starts": [], "arc_labels": [], "rel_labels": []}
        for w in windows:
            s = sentences[w.sentence]
            arcs, rels = [], []
            for i in range(w.start, w.end):
                head = s.heads[i]
                if s.deprels[i] not in rel2id:
                    raise CompsftError(f"{s.source}: relation {s.deprels[i]!r} is not in the label set")
                if head == 0:
                    arcs.append(0)
                elif w.start < head <= w.end:
                    arcs.append(head - w.start)
                else:  # the head lies in another window: nothing to learn from this arc here
                    arcs.append(IGNORE_INDEX)
                rels.append(rel2id[s.deprels[i]] if arcs[-1] != IGNORE_INDEX else IGNORE_INDEX)
            rows["input_ids"].append(w.input_ids)
            rows["attention_mask"].append([1] * len(w.input_ids))
            rows["word_starts"].append(w.word_starts)
            rows["arc_labels"].append(arcs)
            rows["rel_labels"].append(rels)
        return Dataset.from_dict(rows)

    def collator(self, tokenizer) -> DependencyCollator:
        return DependencyCollator(tokenizer)

    def predict(self, model, tokenizer, sentences, labels=None, batch_size: int = 32, max_length: int | None = None):
        import torch

        labels = list(labels) if labels is not None else model.labels
        max_length = max_length or default_max_length(model, tokenizer)
        windows = make_windows(tokenizer, [s.words for s in sentences], max_length)
        device = model_device(model)
        was_training = model.training
        model.eval()
        # Phase 1: word representations per window; phase 2: whole sentences, scored and decoded.
        parts: list[list] = [[] for _ in sentences]
        try:
            with torch.inference_mode():
                for batch in length_batches(windows, batch_size):
                    ids, mask = pad_batch(tokenizer, [windows[i].input_ids for i in batch], device)
                    width = max(len(windows[i].word_starts) for i in batch)
                    starts = torch.tensor([windows[i].word_starts + [-1] * (width - len(windows[i].word_starts))
                                           for i in batch], dtype=torch.long, device=device)
                    reps = model.word_representations(ids, mask, starts)
                    for row, i in enumerate(batch):
                        parts[windows[i].sentence].append((windows[i].start, reps[row, :len(windows[i].word_starts) + 1]))
                sentence_reps = []
                for pieces in parts:
                    pieces.sort(key=lambda p: p[0])
                    sentence_reps.append(torch.cat([pieces[0][1][:1]] + [p[1][1:] for p in pieces], 0))
                del parts
                heads_out: list = [None] * len(sentences)
                rels_out: list = [None] * len(sentences)
                order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
                for begin in range(0, len(order), batch_size):
                    batch = order[begin:begin + batch_size]
                    n = max(len(sentences[i]) for i in batch)
                    reps = sentence_reps[batch[0]].new_zeros(len(batch), n + 1, sentence_reps[batch[0]].size(-1))
                    word_mask = torch.zeros(len(batch), n, dtype=torch.bool, device=device)
                    for row, i in enumerate(batch):
                        reps[row, :len(sentences[i]) + 1] = sentence_reps[i]
                        word_mask[row, :len(sentences[i])] = True
                    scores = model.arc_scores(reps, word_mask).float().cpu().numpy()
                    heads = torch.zeros(len(batch), n, dtype=torch.long)
                    for row, i in enumerate(batch):
                        m = len(sentences[i]) + 1
                        heads[row, :m - 1] = torch.from_numpy(decode_tree(scores[row, :m, :m])[1:])
                    rel = model.rel_scores(reps, heads.to(device)).argmax(-1).cpu()
                    for row, i in enumerate(batch):
                        m = len(sentences[i])
                        heads_out[i] = heads[row, :m].tolist()
                        rels_out[i] = [labels[int(r)] for r in rel[row, :m]]
        finally:
            model.train(was_training)
        return [s.replace(heads=h, deprels=r) for s, h, r in zip(sentences, heads_out, rels_out)]

    def score(self, gold: Sequence[Sentence], predicted: Sequence[Sentence]) -> dict[str, float]:
        out = attachment_scores([g.heads for g in gold], [g.deprels for g in gold],
                                [p.heads for p in predicted], [p.deprels for p in predicted])
        out["sentences"] = float(len(gold))
        out["words"] = float(sum(len(g) for g in gold))
        return out

    def write_predictions(self, path, sentences, predictions) -> None:
        write_conllu(path, sentences, predictions, columns=("head", "deprel"))


TASK = DepTask()
