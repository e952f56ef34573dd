"""Parts of a language SFT by encoder layer (issue 13): `encoder_layer`, `SparseFineTuning.restricted`,
`lt-sft-upper`'s `upper_layers` and experiments/language_sft_layers.py keep exactly the parts they name."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from compsft.errors import CompsftError
from compsft.methods import get_method
from compsft.methods.sft_method import upper_layers
from compsft.sft import SparseDelta, SparseFineTuning
from compsft.training.params import encoder_layer

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("language_sft_layers",
                                               REPO / "experiments" / "language_sft_layers.py")
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


def test_encoder_layer_reads_the_encoder_layer_and_nothing_else():
    assert encoder_layer("bert.encoder.layer.10.attention.self.query.weight") == 10
    assert encoder_layer("roberta.encoder.layer.0.output.dense.bias") == 0
    assert encoder_layer("model.layers.7.attn.Wqkv.weight") == 7
    assert encoder_layer("bert.embeddings.word_embeddings.weight") is None
    assert encoder_layer("cls.predictions.transform.dense.weight") is None
    assert encoder_layer("bert.encoder.player.3.weight") is None


def test_restricted_keeps_the_accepted_differences_as_they_are_and_no_dense_parameters():
    sft = _sft()
    part = sft.restricted(lambda n: "query" in n)
    assert set(part.diffs) == {n for n in sft.diffs if "query" in n} and part.dense == {}
    assert all(part.diffs[n] is sft.diffs[n] for n in part.diffs)
    assert part.k == sum(sft.diffs[n].nnz for n in part.diffs) and sft.dense  # the original is untouched
    assert sft.k == sum(d.nnz for d in sft.diffs.values())


def test_upper_layers_keeps_the_upper_half_of_the_encoder_only():
    sft = _sft()
    part = upper_layers(sft, SimpleNamespace(config=SimpleNamespace(num_hidden_layers=12)))
    assert {encoder_layer(n) for n in part.diffs} == set(range(6, 12)) and part.dense == {}
    odd = upper_layers(sft, SimpleNamespace(config=SimpleNamespace(num_hidden_layers=5)))
    assert {encoder_layer(n) for n in odd.diffs} == {2, 3, 4, 5, 6, 7, 8, 9, 10, 11}
    only_embeddings = sft.restricted(lambda n: "embeddings" in n)
    with pytest.raises(CompsftError, match="no entry on a numbered encoder layer"):
        upper_layers(only_embeddings, SimpleNamespace(config=SimpleNamespace(num_hidden_layers=12)))


def test_lt_sft_upper_shares_lt_sft_modules_and_composes_less_of_the_language_sft():
    upper, plain = get_method("lt-sft-upper"), get_method("lt-sft")
    assert upper.language_key == plain.language_key == "lt-sft" == upper.task_key == plain.task_key
    assert upper.assemble.keywords["language_part"] is upper_layers


def test_a_layer_range_keeps_exactly_its_layers_inclusive_and_drops_the_head():
    sft = _sft()
    part = layers.part_of(sft, (6, 11), None)
    assert {encoder_layer(n) for n in part.diffs} == set(range(6, 12))
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


def test_a_scale_keeps_every_entry_times_the_scale_and_no_head():
    sft = _sft()
    part = layers.part_of(sft, ("scale", 0.5), None)
    assert set(part.diffs) == set(sft.diffs) and part.dense == {}
    for name, delta in part.diffs.items():
        assert torch.equal(delta.indices, sft.diffs[name].indices)
        assert torch.allclose(delta.values, 0.5 * sft.diffs[name].values)


def test_embeddings_keep_the_embedding_entries_alone_or_beside_a_layer_range():
    sft = _sft()
    emb = layers.part_of(sft, "embeddings", None)
    assert set(emb.diffs) == {"bert.embeddings.word_embeddings.weight"} and emb.dense == {}
    assert emb.diffs["bert.embeddings.word_embeddings.weight"] is sft.diffs["bert.embeddings.word_embeddings.weight"]
    both = layers.part_of(sft, (6, 11, "embeddings"), None)
    assert set(both.diffs) == set(layers.part_of(sft, (6, 11), None).diffs) | set(emb.diffs)
    whole = layers.part_of(sft, (0, 11, "embeddings"), None)
    assert whole.k == sft.k and whole.dense == {}


@pytest.mark.parametrize("text", ["11-6", "6", "a-b", "random-0", "random-1.5", "random-x", "scale-0", "scale-x",
                                  "random-0.5+embeddings", "embeddings+embeddings"])
def test_bad_variants_are_refused(text):
    with pytest.raises(ValueError, match=re.escape(text)):
        layers.parse_variant(text)


def test_variants_parse():
    assert layers.parse_variant("6-11") == ("layers6-11", (6, 11))
    assert layers.parse_variant("random-0.57") == ("random-0.57", 0.57)
    assert layers.parse_variant("all") == ("all", "all")
    assert layers.parse_variant("scale-0.5") == ("scale-0.5", ("scale", 0.5))
    assert layers.parse_variant("embeddings") == ("embeddings", "embeddings")
    assert layers.parse_variant("6-11+embeddings") == ("layers6-11+embeddings", (6, 11, "embeddings"))


def test_recorded_scores_are_the_grids_own_cells(tmp_path):
    """What the script's scores of `none`, `all` and `--baseline` are checked against: the grid's cells of
    task-sft-only, lt-sft and the baseline method for the same target and seed."""
    import json

    def cell(method, score):
        path = tmp_path / "cells" / method / "wol" / "seed42.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"status": "ok", "target": "wol", "seed": 42,
                                    "metrics": {"fixed": {"accuracy": score}}}))
        return json.loads(path.read_text())

    lt = cell("lt-sft", 0.5)
    cell("task-sft-only", 0.4)
    cell("task-sft-no-source", 0.6)
    assert layers.recorded_score(tmp_path, lt, "all", "accuracy") == 0.5
    assert layers.recorded_score(tmp_path, lt, "none", "accuracy") == 0.4
    assert layers.recorded_score(tmp_path, lt, "task-sft-no-source", "accuracy", "task-sft-no-source") == 0.6
    assert layers.recorded_score(tmp_path, lt, "task-sft-no-source", "accuracy") is None  # not asked for
    assert layers.recorded_score(tmp_path, lt, "scale-0.5", "accuracy", "task-sft-no-source") is None
    assert layers.recorded_score(tmp_path, {**lt, "seed": 43}, "none", "accuracy") is None  # no such cell
