"""Vocabulary fallback: text the trimmed default vocabulary does not cover is measured and warned about."""
from __future__ import annotations

import gzip
import logging

import pytest
import torch

from compsft.languages import FALLBACK_THRESHOLD, measure_vocabulary_fallback
from compsft.languages.catalogue import DATA_DIR

# UDHR article 1 and the start of article 3 in Georgian (Mkhedruli), a script the trimmed default
# vocabulary keeps only as single characters.
GEORGIAN = [
    "ყველა ადამიანი იბადება თავისუფალი და თანასწორი თავისი ღირსებითა და უფლებებით.",
    "მათ მინიჭებული აქვთ გონება და სინდისი და ერთმანეთის მიმართ უნდა იქცეოდნენ ძმობის სულისკვეთებით.",
    "ყოველ ადამიანს აქვს სიცოცხლის, თავისუფლებისა და პირადი ხელშეუხებლობის უფლება.",
]


def shipped_english(n=200):
    with gzip.open(DATA_DIR / "eng" / "udhr.txt.gz", "rt", encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()][:n]


@pytest.fixture(scope="module")
def tokenizers():
    from compsft.models.convert import build_e5_tokenizer
    from compsft.models.default import default_keep_ids
    from compsft.vocab import vocab_fingerprint

    full = build_e5_tokenizer()
    return full, default_keep_ids(vocab_fingerprint(full))


@pytest.fixture(scope="module")
def trimmed_model(tmp_path_factory, tokenizers):
    """A tiny random BERT with the trimmed default model's vocabulary (real pieces, 8-wide embeddings)."""
    from transformers import BertConfig, BertForMaskedLM

    from compsft.vocab import trim_vocab

    full, keep = tokenizers
    root = tmp_path_factory.mktemp("coverage")
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(full), hidden_size=8, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=16, max_position_embeddings=64,
                                       pad_token_id=full.pad_token_id))
    model.save_pretrained(root / "full")
    full.save_pretrained(root / "full")
    trim_vocab(root / "full", root / "trimmed", keep=keep)
    return root / "trimmed"


def test_fallback_rate_separates_uncovered_scripts(tokenizers, trimmed_model):
    from transformers import AutoTokenizer

    full, _ = tokenizers
    trimmed = AutoTokenizer.from_pretrained(trimmed_model)
    english = measure_vocabulary_fallback(trimmed, shipped_english())
    georgian = measure_vocabulary_fallback(trimmed, GEORGIAN)
    assert english.words > 1000 and english.rate < 0.01 and not english.too_high
    assert georgian.words >= 25 and georgian.rate > 0.9 and georgian.too_high
    # It is the trimming: the full vocabulary has Georgian pieces.
    assert measure_vocabulary_fallback(full, GEORGIAN).rate < FALLBACK_THRESHOLD
    assert georgian.as_dict()["rate"] == pytest.approx(georgian.rate, abs=1e-4)


def _train(model, lang, out, **kw):
    from compsft.training import train_language_sft

    return train_language_sft(model, lang, out, k=50, phase1=(None, 1, 1), phase2=(None, 1, 1), max_length=32,
                              save_steps=0, logging_steps=1, cpu=True, **kw).sft


def test_training_warns_on_uncovered_text_and_records_the_rate(trimmed_model, tmp_path, caplog):
    text = tmp_path / "kat.txt"
    text.write_text("\n".join(GEORGIAN) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="compsft"):
        sft = _train(trimmed_model, "kat", tmp_path / "kat", text=[text])
    warnings = [r.getMessage() for r in caplog.records if "single characters" in r.getMessage()]
    assert len(warnings) == 1
    assert "compsft prepare-model --full" in warnings[0] and f"compsft trim-vocab" in warnings[0]
    assert f"--text {text}" in warnings[0]
    record = sft.config.training["vocabulary_fallback"]
    assert record["rate"] > record["threshold"] == FALLBACK_THRESHOLD

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="compsft"):
        sft = _train(trimmed_model, "eng", tmp_path / "eng", max_lines=60)  # shipped English
    assert not [r for r in caplog.records if "single characters" in r.getMessage()]
    assert sft.config.training["vocabulary_fallback"]["rate"] < 0.01
