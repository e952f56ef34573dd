"""Keep evaluation sentences out of MLM text.

MLM text scraped from the same news sources as an evaluation set contains its sentences (about a
third of the Igbo MasakhaNER test sentences occur verbatim in MAFAND). Training a language SFT on
them leaks the test set into the model, so every MLM line that matches an evaluation sentence is
dropped.

Matching is on a *leak key*: the text under Unicode NFKC, case-folded, keeping only letters and
digits (`str.isalnum`). Evaluation files come tokenised (`al - Barnawi ,`) while raw text is not
(`al-Barnawi,`), and quote marks differ between the two; the key ignores all of that. A line is a
leak when

- its key equals the key of an evaluation sentence (any length), or
- the key of an evaluation sentence at least `min_contained_chars` long occurs inside it (a raw
  line holding two sentences, one of them a test sentence), or
- its key, at least `min_contained_chars` long, occurs inside the key of an evaluation sentence
  (a test sentence split over two raw lines).

Containment uses an index of fixed-width key windows, so the cost is linear in the text size.
"""
from __future__ import annotations

import logging
import os
import unicodedata
from typing import Iterable, Sequence

from .readers import FileFormat, list_text_files, read_sentences

logger = logging.getLogger(__name__)

_WINDOW = 16


def leak_key(text: str) -> str:
    """NFKC, case-folded, letters and digits only: the form in which lines are compared."""
    return "".join(c for c in unicodedata.normalize("NFKC", text).casefold() if c.isalnum())


class LeakageFilter:
    """Decides whether a line of MLM text repeats an evaluation sentence (see the module doc)."""

    def __init__(self, eval_sentences: Iterable[str], min_contained_chars: int = 30):
        if min_contained_chars < _WINDOW:
            raise ValueError(f"min_contained_chars must be at least {_WINDOW}")
        self.min_contained_chars = min_contained_chars
        self._exact: set[str] = set()
        for sentence in eval_sentences:
            key = leak_key(sentence)
            if key:
                self._exact.add(key)
        self._long = [k for k in self._exact if len(k) >= min_contained_chars]
        # Prefix index: finds a long evaluation key inside a line.
        self._by_prefix: dict[str, list[str]] = {}
        for key in self._long:
            self._by_prefix.setdefault(key[:_WINDOW], []).append(key)
        # Window index over every long evaluation key: finds a line inside an evaluation key.
        self._windows: dict[str, list[tuple[int, int]]] = {}
        for idx, key in enumerate(self._long):
            for pos in range(len(key) - _WINDOW + 1):
                self._windows.setdefault(key[pos:pos + _WINDOW], []).append((idx, pos))

    @classmethod
    def from_files(
        cls, paths: Sequence[str | os.PathLike], fmt: FileFormat = "auto", min_contained_chars: int = 30
    ) -> "LeakageFilter":
        """Build from evaluation files or directories (CoNLL-U, NER columns or plain text)."""
        sentences: list[str] = []
        for path in paths:
            for file in list_text_files(path):
                before = len(sentences)
                sentences.extend(read_sentences(file, fmt))
                logger.debug("%s: %d evaluation sentences", file, len(sentences) - before)
        return cls(sentences, min_contained_chars=min_contained_chars)

    def __len__(self) -> int:
        return len(self._exact)

    def is_leak(self, line: str) -> bool:
        """True when `line` equals, contains or lies inside an evaluation sentence."""
        key = leak_key(line)
        if not key:
            return False
        if key in self._exact:
            return True
        for pos in range(len(key) - _WINDOW + 1):
            for candidate in self._by_prefix.get(key[pos:pos + _WINDOW], ()):
                if key.startswith(candidate, pos):
                    return True
        if len(key) >= self.min_contained_chars:
            for idx, pos in self._windows.get(key[:_WINDOW], ()):
                if self._long[idx].startswith(key, pos):
                    return True
        return False

    def filter(self, lines: Iterable[str]) -> tuple[list[str], int]:
        """The lines that are not leaks, in order, and how many were dropped."""
        kept, dropped = [], 0
        for line in lines:
            if self.is_leak(line):
                dropped += 1
            else:
                kept.append(line)
        return kept, dropped
