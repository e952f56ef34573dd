"""What `compsft predict` writes: CoNLL-U (every task), IOB2 columns (ner) and JSON lines (every task).

CoNLL-U output follows the rules of the CoNLL 2018 evaluator (`conll18_ud_eval.py`): ten columns,
word IDs in sequence, HEAD an integer forming a tree with one root. pos and ner do not predict a tree,
so they keep the input's HEAD and DEPREL where a CoNLL-U input has them and otherwise write a
placeholder tree (word 1 the root, every other word attached to it, DEPREL `_`): the evaluator then
reads the file and scores UPOS, and nobody mistakes the placeholder for a parse. ner writes its tag
into MISC as `NER=B-PER`.

The output file appears atomically (`Output`): written under a temporary name in the same directory
and renamed at the end, so a killed run leaves nothing under the final name.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Iterator, TextIO

from compsft.errors import CompsftError
from compsft.tasks.base import Sentence
from compsft.tasks.writers import fill_conllu

from .inputs import InputSentence

#: Output formats by task (the first is the default).
FORMATS = {"pos": ("conllu", "jsonl"), "dep": ("conllu", "jsonl"), "ner": ("conllu", "iob2", "jsonl")}


def entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, start, end) word spans of valid IOB2 `tags`, end exclusive."""
    out: list[tuple[str, int, int]] = []
    for i, tag in enumerate(tags):
        if tag.startswith("B-") or (tag.startswith("I-") and (not out or out[-1][2] != i or out[-1][0] != tag[2:])):
            out.append((tag[2:], i, i + 1))
        elif tag.startswith("I-"):
            out[-1] = (out[-1][0], out[-1][1], i + 1)
    return out


def _has_tree(tokenlist) -> bool:
    heads = [t["head"] for t in tokenlist if isinstance(t["id"], int)]
    return all(isinstance(h, int) for h in heads) and sum(h == 0 for h in heads) == 1


def format_conllu(record: InputSentence, pred: Sentence, task: str) -> str:
    """One sentence in CoNLL-U with the predicted columns filled."""
    if task == "dep":
        return fill_conllu(record.tokenlist, pred, ("head", "deprel")).serialize()
    if task == "pos":
        tokens = fill_conllu(record.tokenlist, pred, ("upos",))
    else:
        tokens = fill_conllu(record.tokenlist, pred, ())
        words = [t for t in tokens if isinstance(t["id"], int)]
        for token, tag in zip(words, pred.tags):
            token["misc"] = {**(token["misc"] or {}), "NER": tag}
    if not _has_tree(tokens):
        n = len(pred.words)
        placeholder = pred.replace(heads=[0] + [1] * (n - 1), deprels=["_"] * n)
        tokens = fill_conllu(tokens, placeholder, ("head", "deprel"))
    return tokens.serialize()


def format_iob2(record: InputSentence, pred: Sentence) -> str:
    """UNER's IOB2 columns (ID, word, tag, two spare columns) after `# sent_id` and `# text`;
    `compsft evaluate --ner-format iob2` and `compsft.tasks.readers.read_ner` read it back."""
    meta = record.tokenlist.metadata
    lines = [f"# sent_id = {meta.get('sent_id')}", f"# text = {record.text}"]
    lines += [f"{i}\t{w}\t{t}\t_\t_" for i, (w, t) in enumerate(zip(pred.words, pred.tags), 1)]
    return "\n".join(lines) + "\n\n"


def sentence_record(record: InputSentence, pred: Sentence, task: str) -> dict:
    """A sentence as a JSON-able dict: `sent_id`, `text`, `words` (`id`, `form`, and `upos`; `head` and
    `deprel`; or `ner`; `start_char` / `end_char` where known) and, for ner, `entities` (`type`,
    `start` / `end` word indices, end exclusive, `text`, and character offsets where known)."""
    offsets = record.offsets
    words = []
    for i, form in enumerate(pred.words):
        word: dict = {"id": i + 1, "form": form}
        if task == "pos":
            word["upos"] = pred.tags[i]
        elif task == "dep":
            word["head"], word["deprel"] = int(pred.heads[i]), pred.deprels[i]
        else:
            word["ner"] = pred.tags[i]
        if offsets:
            word["start_char"], word["end_char"] = offsets[i]
        words.append(word)
    out = {"sent_id": record.tokenlist.metadata.get("sent_id"), "text": record.text, "words": words}
    if task == "ner":
        spans = []
        for kind, start, end in entities(pred.tags):
            span: dict = {"type": kind, "start": start, "end": end}
            if offsets:
                span["start_char"], span["end_char"] = offsets[start][0], offsets[end - 1][1]
                span["text"] = record.text[span["start_char"]:span["end_char"]]
            else:
                span["text"] = " ".join(pred.words[start:end])
            spans.append(span)
        out["entities"] = spans
    return out


def format_sentence(record: InputSentence, pred: Sentence, task: str, fmt: str) -> str:
    """`record` with its predictions `pred` in output format `fmt` (see FORMATS)."""
    if fmt == "conllu":
        return format_conllu(record, pred, task)
    if fmt == "iob2":
        return format_iob2(record, pred)
    return json.dumps(sentence_record(record, pred, task), ensure_ascii=False) + "\n"


def check_format(task: str, fmt: str | None) -> str:
    fmt = fmt or FORMATS[task][0]
    if fmt not in FORMATS[task]:
        raise CompsftError(f"--format {fmt}: {task} writes {' or '.join(FORMATS[task])}")
    return fmt


@contextlib.contextmanager
def open_output(out: str | Path, force: bool = False) -> Iterator[TextIO]:
    """A text stream for `out` (`-`: stdout). A file is written under a temporary name next to `out` and
    renamed onto it only when the block ends without an error; an existing `out` is kept unless `force`."""
    if str(out) == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    from compsft.atomic import atomic_path

    out = Path(out)
    if out.is_dir():
        raise CompsftError(f"--out: {out} is a directory; give a file name")
    if out.exists() and not force:
        raise CompsftError(f"--out: {out} exists; pass --force to overwrite it")
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
