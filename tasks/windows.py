"""Words to sub-words: first-sub-word alignment and windows for sentences longer than the model.

A sentence whose sub-words (plus the tokenizer's special tokens) exceed `max_length` is split at
word boundaries into consecutive windows; predictions are stitched back per word. Nothing is
truncated silently: the number of split sentences (and of single words cut because they alone
exceed a window) is logged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from compsft.errors import CompsftError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class Window:
    """Words [start, end) of sentence `sentence`, as model input.

    `word_starts[k]` is the position in `input_ids` of the first sub-word of word `start + k`.
    """

    sentence: int
    start: int
    end: int
    input_ids: list[int]
    word_starts: list[int]


def default_max_length(model, tokenizer=None, cap: int = 512) -> int:
    """The longest input the model takes: position embeddings (less RoBERTa's offset), capped."""
    config = getattr(model, "config", None)
    limit = cap
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        # RoBERTa-style models start positions after the padding index.
        offset = (config.pad_token_id + 1) if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert") else 0
        limit = min(limit, positions - offset)
    if tokenizer is not None and 0 < getattr(tokenizer, "model_max_length", 0) < 100_000:
        limit = min(limit, tokenizer.model_max_length)
    return limit


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The special token ids the tokenizer puts before and after a single sequence.

    Read off an encoded probe word (works with every fast tokenizer, in transformers 4 and 5).
    """
    enc = tokenizer([["a"]], is_split_into_words=True, add_special_tokens=True)
    ids, word_ids = enc["input_ids"][0], enc.word_ids(0)
    inside = [i for i, w in enumerate(word_ids) if w is not None]
    if not inside:
        raise CompsftError(f"tokenizer {type(tokenizer).__name__}: cannot locate a word among special tokens")
    return list(ids[:inside[0]]), list(ids[inside[-1] + 1:])


def subwords_per_word(tokenizer, sentences: Sequence[Sequence[str]]) -> list[list[list[int]]]:
    """Sub-word ids of every word, tokenised as the fast tokenizer does with `is_split_into_words`.

    A word the tokenizer reduces to nothing (a stray control character, say) becomes the unknown
    token, so that every word has a first sub-word to carry its label.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise CompsftError(f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer (word alignment needs one)")
    out: list[list[list[int]]] = []
    chunk = 1024
    unk = tokenizer.unk_token_id
    replaced = 0
    for begin in range(0, len(sentences), chunk):
        batch = [list(words) for words in sentences[begin:begin + chunk]]
        enc = tokenizer(batch, is_split_into_words=True, add_special_tokens=False, verbose=False)
        for b, words in enumerate(batch):
            pieces: list[list[int]] = [[] for _ in words]
            for token_id, word_id in zip(enc["input_ids"][b], enc.word_ids(b)):
                if word_id is not None:
                    pieces[word_id].append(token_id)
            for i, p in enumerate(pieces):
                if not p:
                    if unk is None:
                        raise CompsftError(f"word {words[i]!r} has no sub-words and the tokenizer has no unknown token")
                    p.append(unk)
                    replaced += 1
            out.append(pieces)
    if replaced:
        logger.info("%d words had no sub-words and were replaced by the unknown token", replaced)
    return out


def make_windows(tokenizer, sentences: Sequence[Sequence[str]], max_length: int) -> list[Window]:
    """Model inputs for `sentences` (lists of words), several windows for sentences that are too long."""
    prefix, suffix = special_tokens(tokenizer)
    before = len(prefix)
    budget = max_length - len(prefix) - len(suffix)
    if budget < 1:
        raise CompsftError(f"max_length {max_length} leaves no room after {len(prefix) + len(suffix)} special tokens")
    windows: list[Window] = []
    split = cut_words = 0
    for index, pieces in enumerate(subwords_per_word(tokenizer, sentences)):
        start = 0
        count = 0
        while start < len(pieces):
            ids: list[int] = []
            starts: list[int] = []
            end = start
            while end < len(pieces):
                word = pieces[end]
                if len(word) > budget:
                    # A single word longer than a window: keep its first sub-words, which carry its label.
                    word = word[:budget] if not ids else word
                    if not ids:
                        cut_words += 1
                if len(ids) + len(word) > budget:
                    break
                starts.append(before + len(ids))
                ids.extend(word)
                end += 1
            windows.append(Window(index, start, end, prefix + ids + suffix, starts))
            start = end
            count += 1
        if count > 1:
            split += 1
    if split:
        logger.info("%d of %d sentences exceed %d sub-words and were split into windows (stitched back per word)",
                    split, len(sentences), max_length)
    if cut_words:
        logger.warning("%d words alone exceed %d sub-words; only their first %d sub-words were kept",
                       cut_words, max_length, budget)
    return windows


def length_batches(windows: Sequence[Window], batch_size: int) -> list[list[int]]:
    """Indices of `windows` grouped into batches of similar length (longest first), to cut padding."""
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].input_ids))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def stitch(windows: Sequence[Window], per_window: Sequence[Sequence], num_sentences: int) -> list[list]:
    """Concatenate per-window, per-word outputs back into one list per sentence (windows in order)."""
    out: list[list] = [[] for _ in range(num_sentences)]
    for w in sorted(range(len(windows)), key=lambda i: (windows[i].sentence, windows[i].start)):
        window = windows[w]
        if len(out[window.sentence]) != window.start:
            raise RuntimeError(f"window {w} of sentence {window.sentence} does not continue the previous one")
        out[window.sentence].extend(per_window[w])
    return out
