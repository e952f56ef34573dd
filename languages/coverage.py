"""How well a model's vocabulary covers some MLM text: the share of words that fall back to single
characters.

A trimmed vocabulary (the default model keeps the pieces of the shipped languages' text, every
single character and the special tokens) still tokenises any text, but text it was not trimmed
for falls back to one piece per character, and a language SFT then learns little. The measure:
among the words of at least two characters (the tokenizer's own pre-tokenised words), the share
whose pieces each cover at most one character of the text (or are the unknown token).

Measured with the trimmed default model (2,000 lines of each shipped text file): 0.090 at most
(Igbo UDHR, whose tone marks split words), Igbo MAFAND 0.056, Wolof 0.019, every other shipped
file ≤ 0.003; Chinese without spaces 0.013. Text in a script the trimmed vocabulary lacks (one
UDHR sentence each): Georgian 1.00, Hindi 1.00, Greek 0.82 — 0.00 each with the full vocabulary.
Hence the warning threshold, `FALLBACK_THRESHOLD` = 0.25.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

FALLBACK_THRESHOLD = 0.25
SAMPLE_LINES = 2000


@dataclass
class VocabularyFallback:
    """Single-character fallback of a tokenizer on a sample of text."""

    lines: int = field(metadata={"help": "lines measured (an evenly spaced sample)"})
    words: int = field(metadata={"help": "words of two or more characters in them"})
    fallback_words: int = field(metadata={"help": "of those, words tokenised into single characters only"})
    pieces: int = field(metadata={"help": "pieces in the sample"})
    single_character_pieces: int = field(metadata={"help": "pieces that cover at most one character"})
    threshold: float = field(default=FALLBACK_THRESHOLD, metadata={"help": "rate above which compsft warns"})

    @property
    def rate(self) -> float:
        """Share of words that fall back to single characters."""
        return self.fallback_words / self.words if self.words else 0.0

    @property
    def too_high(self) -> bool:
        return self.rate > self.threshold

    def as_dict(self) -> dict:
        return {"rate": round(self.rate, 4), **asdict(self),
                "single_character_piece_share": round(self.single_character_pieces / max(self.pieces, 1), 4)}


def measure_vocabulary_fallback(tokenizer, lines: Sequence[str], sample: int = SAMPLE_LINES,
                                threshold: float = FALLBACK_THRESHOLD) -> VocabularyFallback | None:
    """The fallback of `tokenizer` (a fast `transformers` tokenizer) on up to `sample` lines of `lines`,
    evenly spaced; None for a slow tokenizer (no offsets to measure with)."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    step = max(1, len(lines) // sample)
    chosen = list(lines[::step][:sample])
    stats = VocabularyFallback(lines=len(chosen), words=0, fallback_words=0, pieces=0, single_character_pieces=0,
                               threshold=threshold)
    if not chosen:
        return stats
    unk = tokenizer.unk_token_id
    enc = tokenizer(chosen, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    for row, (ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
        words: dict[int, list[bool]] = {}
        spans: dict[int, int] = {}
        for word, (start, end), piece in zip(enc.word_ids(row), offsets, ids):
            if word is None:
                continue
            short = end - start <= 1 or piece == unk
            stats.pieces += 1
            stats.single_character_pieces += short
            words.setdefault(word, []).append(short)
            spans[word] = spans.get(word, 0) + (end - start)
        for word, shorts in words.items():
            if spans[word] >= 2:
                stats.words += 1
                stats.fallback_words += all(shorts)
    return stats


def fallback_warning(stats: VocabularyFallback, vocab_size: int, text: Sequence[str]) -> str:
    """What to tell the user when `stats.too_high`, with the two ways out."""
    files = " ".join(f"--text {t}" for t in text) or "--text YOUR_TEXT"
    return (f"{100 * stats.rate:.0f}% of the words of this MLM text ({stats.words:,} words in {stats.lines:,} lines "
            f"measured) tokenise into single characters only with this model's {vocab_size:,}-piece vocabulary "
            f"(above {100 * stats.threshold:.0f}%; the shipped languages measure at most 9% with the default "
            f"model): the vocabulary does not cover this text and a language SFT learns little from it. "
            f"Use a model whose vocabulary covers it: `compsft prepare-model --full` (the default model with its "
            f"whole 250,002-piece vocabulary), or trim that full model to your text with "
            f"`compsft trim-vocab --model FULL_MODEL_DIR {files} --out DIR` (add the shipped languages' text "
            f"files to keep them covered too).")
