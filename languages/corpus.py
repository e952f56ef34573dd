"""MLM training text: read, normalise, deduplicate and clean of evaluation sentences.

`load_mlm_corpus(paths, exclude=eval_files)` is the one call the language trainer needs. Inputs are
plain-text files or directories (a sentence or paragraph per line, `.gz` accepted) and CoNLL-U
files (their `# text =` lines). Each line is normalised (Unicode NFC, runs of whitespace made one
space, ends stripped); empty lines are dropped; exact duplicates are dropped keeping the first
occurrence; lines that repeat a sentence of an evaluation file are dropped (see `leakage`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

from compsft.errors import CompsftError

from .leakage import LeakageFilter
from .readers import FileFormat, list_text_files, read_sentences

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)


def normalise_text(text: str) -> str:
    """NFC, every run of whitespace (tabs, no-break spaces, ...) made one space, ends stripped."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def iter_corpus_lines(paths: Sequence[str | os.PathLike], fmt: FileFormat = "auto") -> Iterator[str]:
    """Raw lines of every file under `paths`, in the order given (directories sorted by path).

    With `fmt="auto"` CoNLL-U files give their `# text =` lines and everything else is plain text:
    NER column files are evaluation data, never MLM text, so they are not sniffed for here.
    """
    for path in paths:
        for file in list_text_files(path):
            kind = fmt
            if fmt == "auto":
                kind = "conllu" if file.name.endswith((".conllu", ".conllu.gz")) else "text"
            yield from read_sentences(file, kind)


def deduplicate(lines: Iterable[str]) -> tuple[list[str], int]:
    """Exact duplicates removed, first occurrence kept, order preserved; and how many were removed."""
    seen: set[str] = set()
    kept, removed = [], 0
    for line in lines:
        if line in seen:
            removed += 1
        else:
            seen.add(line)
            kept.append(line)
    return kept, removed


@dataclass
class CorpusStats:
    """How many lines each cleaning step saw and dropped."""

    read: int = field(default=0, metadata={"help": "lines read from the files"})
    empty: int = field(default=0, metadata={"help": "empty or too short after normalisation"})
    duplicates: int = field(default=0, metadata={"help": "exact duplicates of an earlier line"})
    leaked: int = field(default=0, metadata={"help": "lines matching an evaluation sentence"})
    kept: int = field(default=0, metadata={"help": "lines left for training"})

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass
class MlmCorpus:
    """Cleaned MLM text: one string per line, plus where it came from and what was dropped."""

    lines: list[str]
    stats: CorpusStats
    sources: list[Path]

    def __len__(self) -> int:
        return len(self.lines)

    def __iter__(self) -> Iterator[str]:
        return iter(self.lines)

    def to_dataset(self) -> "datasets.Dataset":
        """A `datasets.Dataset` with one column, `text`."""
        import datasets

        return datasets.Dataset.from_dict({"text": list(self.lines)})

    def split(self, eval_fraction: float, seed: int = 0) -> tuple["MlmCorpus", "MlmCorpus"]:
        """A seeded random split into (train, eval) corpora; eval gets at least one line if any."""
        import random

        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError("eval_fraction must be in [0, 1)")
        order = list(range(len(self.lines)))
        random.Random(seed).shuffle(order)
        n_eval = round(len(order) * eval_fraction) if eval_fraction else 0
        if eval_fraction and n_eval == 0 and len(order) > 1:
            n_eval = 1
        eval_idx = sorted(order[:n_eval])
        train_idx = sorted(order[n_eval:])
        mk = lambda idx: MlmCorpus(  # noqa: E731
            [self.lines[i] for i in idx], dataclasses.replace(self.stats, kept=len(idx)), self.sources
        )
        return mk(train_idx), mk(eval_idx)


def load_mlm_corpus(
    paths: Sequence[str | os.PathLike],
    exclude: Sequence[str | os.PathLike] = (),
    *,
    dedup: bool = True,
    min_chars: int = 1,
    max_lines: int | None = None,
    fmt: FileFormat = "auto",
    min_contained_chars: int = 30,
) -> MlmCorpus:
    """Read, normalise, deduplicate and leakage-filter MLM text.

    Args:
        paths: text files, CoNLL-U files or directories of them.
        exclude: evaluation files or directories (CoNLL-U, NER column files or plain text) whose
            sentences must not occur in the training text.
        dedup: drop exact duplicate lines (after normalisation), keeping the first.
        min_chars: drop lines shorter than this after normalisation.
        max_lines: keep at most this many lines (the first ones, after cleaning).
        fmt: force the format of `paths` ("text" or "conllu"); "auto" goes by suffix.
        min_contained_chars: see `LeakageFilter`.
    """
    if not paths:
        raise CompsftError("no MLM text given")
    sources = [f for p in paths for f in list_text_files(p)]
    stats = CorpusStats()
    leak = LeakageFilter.from_files(exclude, min_contained_chars=min_contained_chars) if exclude else None
    seen: set[str] = set()
    lines: list[str] = []
    for raw in iter_corpus_lines(paths, fmt):
        stats.read += 1
        line = normalise_text(raw)
        if len(line) < max(min_chars, 1):
            stats.empty += 1
            continue
        if dedup:
            if line in seen:
                stats.duplicates += 1
                continue
            seen.add(line)
        if leak is not None and leak.is_leak(line):
            stats.leaked += 1
            continue
        lines.append(line)
        if max_lines is not None and len(lines) >= max_lines:
            break
    stats.kept = len(lines)
    logger.info(
        "MLM text from %d file(s): %d lines read, %d empty, %d duplicates, %d matching evaluation "
        "sentences (%d in %d evaluation file(s)) dropped; %d kept",
        len(sources), stats.read, stats.empty, stats.duplicates, stats.leaked,
        len(leak) if leak else 0, len(exclude), stats.kept,
    )
    if not lines:
        raise CompsftError(f"no MLM text left in {', '.join(str(p) for p in paths)} after cleaning")
    return MlmCorpus(lines, stats, sources)
