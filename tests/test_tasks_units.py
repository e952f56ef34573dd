"""Alignment, windows, the tree decoder, metrics and the biaffine parser of compsft.tasks."""
from __future__ import annotations

import itertools
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from compsft.tasks import get_task
from compsft.tasks.base import Sentence
from compsft.tasks.decode import decode_tree, is_tree, tree_score
from compsft.tasks.metrics import accuracy, attachment_scores, entity_scores
from compsft.tasks.windows import IGNORE_INDEX, make_windows

from tasks_testutil import make_bert_dir, make_tokenizer

WORDS = ("the quick brown fox jumps over the lazy dog while unbelievably extraordinary "
         "circumstances unfold in Copenhagen and Kinshasa").split()


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(WORDS * 3 + ["a", "b", "c"], vocab_size=120)


def _sentences():
    return [Sentence(WORDS[:5], ["DET", "ADJ", "ADJ", "NOUN", "VERB"]),
            Sentence(WORDS, ["X"] * len(WORDS)),
            Sentence(["\u200b", "fox"], ["SYM", "NOUN"])]


def test_labels_on_first_subword_only(tokenizer):
    spec = get_task("pos")
    sentences = _sentences()
    labels = spec.label_list(sentences)
    ds = spec.encode(sentences, tokenizer, labels, max_length=128)
    assert len(ds) == 3
    for row, s in zip(ds, sentences):
        marked = [(i, lab) for i, lab in enumerate(row["labels"]) if lab != IGNORE_INDEX]
        assert [labels[lab] for _, lab in marked] == s.tags
        enc = tokenizer(s.words, is_split_into_words=True)
        firsts = [i for i, w in enumerate(enc.word_ids()) if w is not None and (i == 0 or enc.word_ids()[i - 1] != w)]
        if "\u200b" not in s.words:
            assert [i for i, _ in marked] == firsts
            assert row["input_ids"] == enc["input_ids"]
        assert row["labels"][0] == IGNORE_INDEX and row["labels"][-1] == IGNORE_INDEX
    # Subword-split words exist, so some positions inside words are ignored.
    assert sum(lab == IGNORE_INDEX for lab in ds[1]["labels"]) > 2


def test_windows_cover_every_word_once(tokenizer, caplog):
    sentences = [s.words for s in _sentences()]
    with caplog.at_level(logging.INFO):
        windows = make_windows(tokenizer, sentences, max_length=8)
    assert "were split into windows" in caplog.text
    for index, words in enumerate(sentences):
        mine = [w for w in windows if w.sentence == index]
        assert mine[0].start == 0 and mine[-1].end == len(words)
        assert all(a.end == b.start for a, b in zip(mine, mine[1:]))
        assert all(len(w.input_ids) <= 8 and len(w.word_starts) == w.end - w.start for w in mine)
    assert len(windows) > len(sentences)


class _EchoTagger(torch.nn.Module):
    """Context-free stand-in for a tagger: label = token id modulo the number of labels."""

    def __init__(self, labels):
        super().__init__()
        self.config = SimpleNamespace(id2label=dict(enumerate(labels)), max_position_embeddings=512)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.n = len(labels)

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=torch.nn.functional.one_hot(input_ids % self.n, self.n).float())


def test_window_stitching_matches_unsplit_prediction(tokenizer):
    spec = get_task("pos")
    sentences = _sentences()
    model = _EchoTagger(spec.label_list(sentences))
    whole = spec.predict(model, tokenizer, sentences, batch_size=2, max_length=128)
    split = spec.predict(model, tokenizer, sentences, batch_size=2, max_length=6)
    assert [p.tags for p in whole] == [p.tags for p in split]
    assert [len(p.tags) for p in split] == [len(s.words) for s in sentences]


def _brute_force(scores):
    n = scores.shape[0]
    best = None
    for combo in itertools.product(range(n), repeat=n - 1):
        heads = np.array((0,) + combo)
        if any(heads[d] == d for d in range(1, n)) or not is_tree(heads):
            continue
        score = tree_score(scores, heads)
        if best is None or score > best:
            best = score
    return best


def test_decoder_hand_made_matrices():
    # Greedy heads would make a cycle 1 <-> 2 and two roots; the decoder must return the best tree.
    s = np.full((4, 4), -5.0)
    s[1, 2] = s[2, 1] = 10.0
    s[3, 0] = 9.0
    s[1, 0] = s[2, 0] = 1.0
    s[2, 3] = 2.0
    heads = decode_tree(s)
    assert is_tree(heads) and (heads[1:] == 0).sum() == 1
    assert list(heads) == [0, 2, 3, 0]
    # Two words that both prefer the root: only one may keep it. 2->0 + 1->2 (6.0) beats 1->0 + 2->1 (5.5).
    s = np.array([[0, 0, 0], [5.0, 0, 1.0], [5.0, 0.5, 0]])
    assert list(decode_tree(s)) == [0, 2, 0]
    assert list(decode_tree(s, single_root=False)) == [0, 0, 0]
    assert list(decode_tree(np.zeros((2, 2)))) == [0, 0]


def test_decoder_is_optimal_on_random_matrices():
    rng = np.random.default_rng(0)
    for _ in range(150):
        n = int(rng.integers(2, 7))
        scores = rng.normal(size=(n, n)) * rng.choice([1.0, 20.0])
        heads = decode_tree(scores)
        assert is_tree(heads)
        assert tree_score(scores, heads) == pytest.approx(_brute_force(scores))


def test_metrics_hand_computed():
    assert accuracy([["A", "B", "C"], ["D"]], [["A", "X", "C"], ["D"]]) == pytest.approx(3 / 4)
    scores = attachment_scores([[2, 0, 2], [0]], [["nsubj", "root", "punct"], ["root"]],
                               [[2, 0, 1], [0]], [["obj", "root", "punct"], ["root"]])
    # Heads right for 3 of 4 words (punctuation counts); of those, labels right for 2.
    assert scores == {"uas": pytest.approx(3 / 4), "las": pytest.approx(2 / 4)}
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["I-ORG", "O"]]
    # Entities: gold {PER, LOC, ORG}; predicted {PER, ORG(wrong span type), ORG} -> 2 correct of 3 and 3.
    out = entity_scores(gold, pred)
    assert out["precision"] == pytest.approx(2 / 3) and out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 / 3)
    assert entity_scores([["O"]], [["O"]])["f1"] == 0.0


def test_biaffine_matches_einsum():
    from compsft.tasks.biaffine import Biaffine

    torch.manual_seed(0)
    layer = Biaffine(5, 3)
    torch.nn.init.normal_(layer.weight)
    x, y = torch.randn(2, 4, 5), torch.randn(2, 6, 5)

    def one(t):
        return torch.cat([t, t.new_ones(*t.shape[:-1], 1)], -1)

    expected = torch.einsum("bid,ode,bje->bijo", one(x), layer.weight, one(y))
    assert torch.allclose(layer(x, y), expected, atol=1e-5)


def test_parser_save_load_and_parameter_names(tmp_path, tokenizer):
    from transformers import BertForMaskedLM

    from compsft.tasks.biaffine import BiaffineParser

    base = make_bert_dir(tmp_path / "base", tokenizer)
    spec = get_task("dep")
    parser = spec.build_model(base, ["root", "nsubj", "punct"], arc_dim=16, rel_dim=8)
    mlm_names = {n for n, _ in BertForMaskedLM.from_pretrained(base).named_parameters()}
    encoder_names = {n for n, _ in parser.named_parameters() if n.startswith("bert.")}
    assert encoder_names and encoder_names <= mlm_names
    assert set(spec.head_param_names(parser)) == {n for n, _ in parser.named_parameters() if not n.startswith("bert.")}
    with torch.no_grad():
        for p in parser.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    parser.save_pretrained(tmp_path / "parser")
    again, labels = spec.load_model(tmp_path / "parser")
    assert labels == ["root", "nsubj", "punct"]
    for (n1, p1), (n2, p2) in zip(parser.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    sentences = [Sentence(WORDS[:6], None, [2, 0, 2, 3, 2, 2], ["nsubj", "root", "punct", "nsubj", "punct", "punct"]),
                 Sentence(WORDS, None, [0] + [1] * (len(WORDS) - 1), ["root"] + ["punct"] * (len(WORDS) - 1))]
    metrics, predictions = spec.evaluate(again, tokenizer, sentences, batch_size=2, max_length=10)
    for p in predictions:
        assert is_tree(np.array([0] + p.heads))
        assert set(p.deprels) <= set(labels)
    assert 0.0 <= metrics["las"] <= metrics["uas"] <= 1.0
    with pytest.raises(Exception, match="parser_config.json"):
        BiaffineParser.from_pretrained(base)
