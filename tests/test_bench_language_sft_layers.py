"""bench/language_sft_layers.py: the parts of a language SFT it composes are the parts it names (issue 13)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from compsft.sft import SparseDelta, SparseFineTuning

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("language_sft_layers", REPO / "bench" / "language_sft_layers.py")
layers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(layers)


def _sft() -> SparseFineTuning:
    names = ["bert.embeddings.word_embeddings.weight"] + [
        f"bert.encoder.layer.{i}.{part}" for i in range(12)
        for part in ("attention.self.query.weight", "output.dense.bias")]
    diffs = {}
    for j, name in enumerate(names):
        idx = torch.arange(0, 400, 2 + j % 3, dtype=torch.int64)
        diffs[name] = SparseDelta((20, 20), idx, torch.randn(idx.numel()))
    return SparseFineTuning(diffs=diffs, dense={"cls.predictions.bias": torch.zeros(20)})


def test_layer_of_reads_the_encoder_layer_and_nothing_else():
    assert layers.layer_of("bert.encoder.layer.10.attention.self.query.weight") == 10
    assert layers.layer_of("roberta.encoder.layer.0.output.dense.bias") == 0
    assert layers.layer_of("bert.embeddings.word_embeddings.weight") is None
    assert layers.layer_of("cls.predictions.transform.dense.weight") is None


def test_a_layer_range_keeps_exactly_its_layers_inclusive_and_drops_the_head():
    sft = _sft()
    part = layers.part_of(sft, (6, 11), None)
    kept = {layers.layer_of(n) for n in part.diffs}
    assert kept == set(range(6, 12))
    assert part.dense == {}
    for name, delta in part.diffs.items():
        assert torch.equal(delta.indices, sft.diffs[name].indices)
        assert torch.equal(delta.values, sft.diffs[name].values)
    assert set(layers.part_of(sft, (0, 0), None).diffs) == {n for n in sft.diffs if ".layer.0." in n}


def test_all_keeps_every_sparse_entry_and_no_head():
    sft = _sft()
    part = layers.part_of(sft, "all", None)
    assert set(part.diffs) == set(sft.diffs) and part.dense == {}
    assert part.k == sft.k


def test_a_random_share_keeps_a_subset_of_that_size_with_its_own_values():
    sft = _sft()
    part = layers.part_of(sft, 0.5, torch.Generator().manual_seed(0))
    assert set(part.diffs) == set(sft.diffs)
    assert 0.35 * sft.k < part.k < 0.65 * sft.k
    for name, delta in part.diffs.items():
        full = dict(zip(sft.diffs[name].indices.tolist(), sft.diffs[name].values.tolist()))
        assert all(full[i] == v for i, v in zip(delta.indices.tolist(), delta.values.tolist()))
        delta.validate(name)  # still sorted and unique
    again = layers.part_of(sft, 0.5, torch.Generator().manual_seed(0))
    assert all(torch.equal(again.diffs[n].indices, part.diffs[n].indices) for n in part.diffs)


@pytest.mark.parametrize("text", ["11-6", "6", "a-b", "random-0", "random-1.5"])
def test_bad_variants_are_refused(text):
    with pytest.raises(ValueError, match=text):
        layers.parse_variant(text)


def test_variants_parse():
    assert layers.parse_variant("6-11") == ("layers6-11", (6, 11))
    assert layers.parse_variant("random-0.57") == ("random-0.57", 0.57)
    assert layers.parse_variant("all") == ("all", "all")
