"""Tokenising MLM text and fixed-seed masking for evaluation, with a tiny word-level tokenizer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from compsft.languages import eval_collator, mask_for_eval, tokenize_for_mlm
from compsft.languages.mlm import special_token_template

WORDS = "the cat sat on a mat dog ran far away and then came back home to eat".split()
LINES = [" ".join(WORDS[(i * 3) % len(WORDS):][: 4 + i % 9]) or "cat" for i in range(60)]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )


def test_special_token_template(tokenizer) -> None:
    assert special_token_template(tokenizer) == ([2], [3])


def test_chunk_grouping_keeps_every_token(tokenizer) -> None:
    ds = tokenize_for_mlm(LINES, tokenizer, max_length=16, grouping="chunk")
    stream = [i for line in LINES for i in tokenizer(line, add_special_tokens=False)["input_ids"]]
    assert all(len(ids) == 16 for ids in ds["input_ids"][:-1]) and len(ds["input_ids"][-1]) <= 16
    body = [i for ids in ds["input_ids"] for i in ids[1:-1]]
    assert body == stream
    for ids, special in zip(ds["input_ids"], ds["special_tokens_mask"]):
        assert ids[0] == 2 and ids[-1] == 3
        assert special == [1] + [0] * (len(ids) - 2) + [1]


def test_line_grouping_truncates(tokenizer) -> None:
    ds = tokenize_for_mlm(LINES + [""], tokenizer, max_length=6, grouping="line")
    assert len(ds) == len(LINES)  # the empty line gives no example
    assert max(len(ids) for ids in ds["input_ids"]) == 6
    assert ds[0]["input_ids"][0] == 2 and ds[0]["input_ids"][-1] == 3


def test_training_collator_accepts_output(tokenizer) -> None:
    from transformers import DataCollatorForLanguageModeling

    ds = tokenize_for_mlm(LINES, tokenizer, max_length=8, grouping="line")
    batch = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.5)([ds[i] for i in range(8)])
    # special tokens are never masked
    assert (batch["labels"][:, 0] == -100).all()
    assert batch["input_ids"].shape == batch["labels"].shape


def test_eval_masking_is_deterministic(tokenizer) -> None:
    ds = tokenize_for_mlm(LINES * 5, tokenizer, max_length=32)
    a = mask_for_eval(ds, tokenizer, seed=7)
    b = mask_for_eval(ds, tokenizer, seed=7)
    c = mask_for_eval(ds, tokenizer, seed=8)
    assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
    assert a["labels"] != c["labels"]
    # The mask of an example does not depend on the rest of the dataset's content.
    sub = mask_for_eval(ds.select(range(3)), tokenizer, seed=7)
    assert sub["labels"] == a["labels"][:3]
    labels = np.array([x for row in a["labels"] for x in row])
    ids = np.array([x for row in ds["input_ids"] for x in row])
    special = np.array([x for row in ds["special_tokens_mask"] for x in row])
    masked = labels != -100
    assert not (masked & (special == 1)).any()
    assert (labels[masked] == ids[masked]).all()
    assert 0.08 < masked[special == 0].mean() < 0.22
    masked_inputs = np.array([x for row in a["input_ids"] for x in row])[masked]
    assert 0.65 < (masked_inputs == tokenizer.mask_token_id).mean() < 0.95
    assert "special_tokens_mask" not in a.column_names


def test_every_example_has_a_masked_token(tokenizer) -> None:
    ds = tokenize_for_mlm(["cat"] * 50, tokenizer, max_length=8, grouping="line")
    masked = mask_for_eval(ds, tokenizer, seed=0, mlm_probability=0.01)
    assert all(sum(x != -100 for x in row) == 1 for row in masked["labels"])


def test_eval_loss_reproducible(tokenizer) -> None:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )).eval()
    ds = tokenize_for_mlm(LINES, tokenizer, max_length=12, grouping="line")
    collate = eval_collator(tokenizer)

    def loss(seed: int, batch_size: int) -> float:
        masked = mask_for_eval(ds, tokenizer, seed=seed)
        total, count = 0.0, 0
        for start in range(0, len(masked), batch_size):
            batch = collate([masked[i] for i in range(start, min(start + batch_size, len(masked)))])
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), reduction="sum"
            ).item()
            count += int((batch["labels"] != -100).sum())
        return total / count

    # Same seed: the same loss whatever the batch size; padding is labelled -100.
    assert loss(1, 4) == pytest.approx(loss(1, 16), rel=1e-5)
