"""Vocabulary fingerprints and trimming, on tiny random-init models with real tokenizers."""
from __future__ import annotations

import json

import pytest
import torch

from compsft.errors import CompsftError, VocabularyMismatch
from compsft.vocab import check_vocab, keep_ids_for, read_text_lines, trim_vocab, vocab_fingerprint

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Il-Malti huwa l-lingwa nazzjonali ta' Malta.",
    "Kowane mutum yana da 'yancin rayuwa.",
    "Haki za binadamu ni za kila mtu.",
    "ئۇيغۇر تىلى تۈركىي تىللار ئائىلىسىگە تەۋە.",
    "Эрзянь келесь финн-угорской келес.",
    "我们都是人。",
]


@pytest.fixture(scope="module")
def e5_tokenizer():
    from compsft.models.convert import build_e5_tokenizer

    return build_e5_tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, e5_tokenizer):
    """A tiny BertForMaskedLM over the real 250k-piece e5 vocabulary, saved like a real model."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(e5_tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, pad_token_id=1)
    model = BertForMaskedLM(config)
    with torch.no_grad():
        model.cls.predictions.bias.normal_()
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    e5_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def trimmed(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trim") / "model"
    summary = trim_vocab(tiny_dir, out, texts=CORPUS)
    return out, summary


def test_fingerprint_is_stable_and_order_sensitive(e5_tokenizer):
    fp = vocab_fingerprint(e5_tokenizer)
    assert fp["size"] == 250002 and len(fp["sha256"]) == 64
    assert vocab_fingerprint(e5_tokenizer) == fp
    assert vocab_fingerprint(e5_tokenizer.backend_tokenizer) == fp
    check_vocab(fp, e5_tokenizer)
    with pytest.raises(VocabularyMismatch, match="250002"):
        check_vocab({"size": 250002, "sha256": "0" * 64}, e5_tokenizer)


def test_trim_keeps_used_pieces_single_characters_and_specials(trimmed, e5_tokenizer):
    from transformers import AutoTokenizer

    out, summary = trimmed
    new = AutoTokenizer.from_pretrained(out)
    vocab = new.get_vocab()
    assert summary["before"]["pieces"] == 250002
    assert summary["after"]["pieces"] == len(new) < 20000
    assert summary["after"]["parameters"] < summary["before"]["parameters"]
    for special in ("<s>", "<pad>", "</s>", "<unk>", "<mask>"):
        assert special in vocab
    assert [vocab[s] for s in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert vocab["<mask>"] == len(new) - 1
    singles = [p for p in e5_tokenizer.get_vocab() if len(p) == 1]
    assert all(p in vocab for p in singles)
    assert json.loads((out / "kept_piece_ids.json").read_text())[:4] == [0, 1, 2, 3]


def test_covered_text_tokenises_exactly_as_before(trimmed, e5_tokenizer):
    from transformers import AutoTokenizer

    new = AutoTokenizer.from_pretrained(trimmed[0])
    texts = CORPUS + ["the lazy fox.  Malta,  mtu"]  # re-combinations of covered words
    for text in texts:
        assert new.tokenize(text) == e5_tokenizer.tokenize(text), text
        assert new.decode(new(text)["input_ids"], skip_special_tokens=True) == \
            e5_tokenizer.decode(e5_tokenizer(text)["input_ids"], skip_special_tokens=True)
    # Uncovered text still tokenises without <unk>, falling back to kept pieces and single characters.
    unseen = new.tokenize("Zebras quietly yodel")
    assert unseen and new.unk_token not in unseen
    assert "".join(unseen) == "".join(e5_tokenizer.tokenize("Zebras quietly yodel"))


def test_embedding_rows_and_mlm_bias_follow_their_pieces(trimmed, tiny_dir, e5_tokenizer):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    old_model = AutoModelForMaskedLM.from_pretrained(tiny_dir).eval()
    new_model = AutoModelForMaskedLM.from_pretrained(trimmed[0]).eval()
    new_tok = AutoTokenizer.from_pretrained(trimmed[0])
    old_vocab, new_vocab = e5_tokenizer.get_vocab(), new_tok.get_vocab()
    pieces = e5_tokenizer.tokenize(CORPUS[1]) + ["<mask>", "<s>"]
    old_ids = torch.tensor([old_vocab[p] for p in pieces])
    new_ids = torch.tensor([new_vocab[p] for p in pieces])
    old_emb = old_model.get_input_embeddings().weight
    new_emb = new_model.get_input_embeddings().weight
    assert new_emb.shape[0] == len(new_tok) == new_model.config.vocab_size
    assert torch.equal(new_emb[new_ids], old_emb[old_ids])
    assert torch.equal(new_model.cls.predictions.bias[new_ids], old_model.cls.predictions.bias[old_ids])
    assert new_model.get_output_embeddings().weight.data_ptr() == new_emb.data_ptr()  # still tied
    # Same text, same logits on the kept pieces.
    with torch.no_grad():
        old_logits = old_model(**e5_tokenizer(CORPUS[3], return_tensors="pt")).logits
        new_logits = new_model(**new_tok(CORPUS[3], return_tensors="pt")).logits
    assert torch.allclose(new_logits, old_logits[..., torch.tensor(json.loads((trimmed[0] / "kept_piece_ids.json").read_text()))], atol=1e-5)
    assert vocab_fingerprint(new_tok) != vocab_fingerprint(e5_tokenizer)


def test_wordpiece_trimming(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "wor", "##ld", "un", "##believ",
             "##able", "foo", "bar"] + list("abcdefghijklmnopqrstuvwxyz") + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizerFast(str(tmp_path / "vocab.txt"))
    model = BertModel(BertConfig(vocab_size=len(words), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=16, max_position_embeddings=32))
    src = tmp_path / "src"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    summary = trim_vocab(src, tmp_path / "out", texts=["hello unbelievable"])
    from transformers import AutoTokenizer

    new = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert "foo" not in new.get_vocab() and "bar" not in new.get_vocab()
    assert new.tokenize("hello unbelievable") == tok.tokenize("hello unbelievable")
    assert summary["after"]["pieces"] == len(words) - 5  # world, wor, ##ld, foo and bar dropped
