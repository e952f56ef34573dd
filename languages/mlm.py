"""Turn MLM text into model inputs, and mask an evaluation set once, with a fixed seed.

Training batches are masked on the fly by `transformers.DataCollatorForLanguageModeling`; the
datasets built here carry `special_tokens_mask` so that collator never masks [CLS]/[SEP].
Evaluation batches must be masked the same way in every run, or eval MLM losses of two runs are
not comparable: `mask_for_eval` draws the mask of example *i* from a generator seeded by
`(seed, i)`, so it depends neither on batch size, nor on worker count, nor on the global RNG.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterable, Literal

import numpy as np

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Grouping = Literal["chunk", "line"]


def special_token_template(tokenizer: "PreTrainedTokenizerBase") -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after a single sequence ([CLS] / [SEP], <s> / </s>).

    Found by tokenising a probe with and without special tokens, because
    `build_inputs_with_special_tokens` is gone from tokenizers-backed classes in transformers 5.
    """
    for probe in ("a", "x", "0", "hello"):
        inner = tokenizer(probe, add_special_tokens=False)["input_ids"]
        outer = tokenizer(probe, add_special_tokens=True)["input_ids"]
        if not inner:
            continue
        for start in range(len(outer) - len(inner) + 1):
            if outer[start:start + len(inner)] == inner:
                return list(outer[:start]), list(outer[start + len(inner):])
    raise ValueError(f"cannot find where {type(tokenizer).__name__} puts its special tokens")


def tokenize_for_mlm(
    lines: Iterable[str],
    tokenizer: "PreTrainedTokenizerBase",
    max_length: int = 256,
    grouping: Grouping = "chunk",
    batch_size: int = 1000,
) -> "datasets.Dataset":
    """Tokenise MLM text into a `datasets.Dataset` of `input_ids`, `attention_mask`, `special_tokens_mask`.

    grouping="chunk" (the default, like the reference's `run_mlm` without `--line_by_line`): lines
    are tokenised without special tokens and concatenated; the stream is cut into blocks of
    `max_length - n_special` tokens and each block is wrapped in the tokenizer's special tokens
    (see `special_token_template`). Every example is full length but the last: no padding.
    grouping="line": one example per line, special tokens added, truncated to `max_length`;
    the collator pads each batch.
    """
    import datasets

    if grouping not in ("chunk", "line"):
        raise ValueError(f"grouping must be 'chunk' or 'line', not {grouping!r}")
    lines = list(lines)
    prefix, suffix = special_token_template(tokenizer)
    body = max_length - len(prefix) - len(suffix)
    if body < 1:
        raise ValueError(f"max_length {max_length} leaves no room next to the special tokens")
    examples: list[list[int]] = []
    special: list[list[int]] = []
    stream: list[int] = []

    def emit(block: list[int]) -> None:
        examples.append(prefix + block + suffix)
        special.append([1] * len(prefix) + [0] * len(block) + [1] * len(suffix))

    for start in range(0, len(lines), batch_size):
        batch = lines[start:start + batch_size]
        if grouping == "line":
            enc = tokenizer(batch, truncation=True, max_length=max_length, add_special_tokens=True,
                            return_special_tokens_mask=True)
            for ids, mask in zip(enc["input_ids"], enc["special_tokens_mask"]):
                if not all(mask):  # a line of nothing but special tokens teaches nothing
                    examples.append(list(ids))
                    special.append(list(mask))
            continue
        enc = tokenizer(batch, add_special_tokens=False)
        for ids in enc["input_ids"]:
            stream.extend(ids)
        # Emit whole blocks as they fill, so memory holds at most one partial block of the stream.
        n_full = len(stream) // body
        for b in range(n_full):
            emit(stream[b * body:(b + 1) * body])
        stream = stream[n_full * body:]
    if grouping == "chunk" and stream:
        emit(stream)
    logger.info(
        "tokenised %d lines into %d examples of at most %d tokens (%s)",
        len(lines), len(examples), max_length, grouping,
    )
    return datasets.Dataset.from_dict(
        {
            "input_ids": examples,
            "attention_mask": [[1] * len(ids) for ids in examples],
            "special_tokens_mask": special,
        }
    )


def mask_example(
    input_ids: list[int],
    special_tokens_mask: list[int],
    tokenizer: "PreTrainedTokenizerBase",
    rng: np.random.Generator,
    mlm_probability: float = 0.15,
) -> tuple[list[int], list[int]]:
    """BERT masking of one example: returns (masked input_ids, labels with -100 where not masked).

    Each non-special position is chosen with probability `mlm_probability`; of those 80% become the
    mask token, 10% a random token, 10% stay. At least one position is chosen, so no example has
    an undefined loss.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    candidates = np.asarray(special_tokens_mask, dtype=bool) == 0
    if tokenizer.pad_token_id is not None:
        candidates &= ids != tokenizer.pad_token_id
    chosen = (rng.random(len(ids)) < mlm_probability) & candidates
    if not chosen.any() and candidates.any():
        chosen[rng.choice(np.flatnonzero(candidates))] = True
    labels = np.where(chosen, ids, -100)
    action = rng.random(len(ids))
    masked = ids.copy()
    masked[chosen & (action < 0.8)] = tokenizer.mask_token_id
    to_random = chosen & (action >= 0.8) & (action < 0.9)
    masked[to_random] = rng.integers(0, len(tokenizer), size=int(to_random.sum()))
    return masked.tolist(), labels.tolist()


def mask_for_eval(
    dataset: "datasets.Dataset",
    tokenizer: "PreTrainedTokenizerBase",
    mlm_probability: float = 0.15,
    seed: int = 0,
) -> "datasets.Dataset":
    """Mask a tokenised dataset once, deterministically: adds `labels`, drops `special_tokens_mask`.

    Example *i* is masked with `numpy.random.default_rng([seed, i])`. Batch it with
    `eval_collator(tokenizer)`, which pads but does not mask again.
    """
    if tokenizer.mask_token_id is None:
        raise ValueError("the tokenizer has no mask token: it cannot be used for masked LM")

    special_ids = set(tokenizer.all_special_ids)

    def _mask(example: dict[str, Any], idx: int) -> dict[str, Any]:
        special = example.get("special_tokens_mask")
        if special is None:
            special = [int(i in special_ids) for i in example["input_ids"]]
        rng = np.random.default_rng([seed, idx])
        ids, labels = mask_example(example["input_ids"], special, tokenizer, rng, mlm_probability)
        return {"input_ids": ids, "labels": labels}

    drop = [c for c in ("special_tokens_mask",) if c in dataset.column_names]
    return dataset.map(_mask, with_indices=True, remove_columns=drop, load_from_cache_file=False)


def eval_collator(tokenizer: "PreTrainedTokenizerBase", pad_to_multiple_of: int | None = None):
    """A collator for `mask_for_eval` output: pads inputs with the pad token and labels with -100."""
    from transformers import DataCollatorForTokenClassification

    return DataCollatorForTokenClassification(
        tokenizer, label_pad_token_id=-100, pad_to_multiple_of=pad_to_multiple_of
    )
