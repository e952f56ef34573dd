"""The SFT object, its file format, apply / revert / compose (issue: foundation)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertForTokenClassification, BertModel

import compsft
from compsft import encoding
from compsft.errors import CompsftError, FingerprintMismatch, VocabularyMismatch
from compsft.serialization import CONFIG_NAME, WEIGHTS_NAME, file_checksum
from compsft.sft import SftConfig, SparseDelta, SparseFineTuning


def tiny_config(**kw) -> BertConfig:
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=48, max_position_embeddings=64)
    base.update(kw)
    return BertConfig(**base)


def random_sft(model: torch.nn.Module, density: float, seed: int, scale: float = 0.1,
               skip=("LayerNorm", "cls.")) -> SparseFineTuning:
    """An SFT touching `density` of every eligible tensor, values N(0, scale)."""
    g = torch.Generator().manual_seed(seed)
    tuned = {}
    masks = {}
    for name, p in model.named_parameters():
        if any(s in name for s in skip):
            continue
        n = p.numel()
        k = max(1, int(n * density))
        idx = torch.randperm(n, generator=g)[:k]
        t = p.detach().clone().reshape(-1)
        t[idx] += torch.randn(k, generator=g, dtype=torch.float32).to(p.dtype) * scale
        tuned[name] = t.view_as(p)
        masks[name] = idx
    base = {n: p.detach() for n, p in model.named_parameters() if n in tuned}
    return SparseFineTuning.from_models(base, tuned, masks)


@pytest.fixture
def mlm():
    torch.manual_seed(0)
    return BertForMaskedLM(tiny_config())


# -- encoding -----------------------------------------------------------------------------------
@pytest.mark.parametrize("universe,n", [(1, 1), (10, 0), (10, 10), (1000, 3), (100_000, 5_000), (2**20, 2**20 // 200)])
def test_elias_fano_round_trip(universe, n):
    rng = np.random.default_rng(universe + n)
    idx = np.sort(rng.choice(universe, size=n, replace=False)).astype(np.int64)
    low, high, l = encoding.encode(idx, universe)
    assert np.array_equal(encoding.decode(low, high, n, universe, l), idx)
    if n >= 1000:  # below that, rounding each part up to whole bytes dominates
        bits = (low.size + high.size) * 8 / n
        assert bits <= 2 + math.ceil(math.log2(universe / n)) + 0.1


def test_elias_fano_detects_corruption():
    idx = np.arange(0, 1000, 7)
    low, high, l = encoding.encode(idx, 1000)
    bad = high.copy()
    bad[0] ^= 0b100
    with pytest.raises(ValueError):
        encoding.decode(low, bad, idx.size, 1000, l)


# -- construction and files -------------------------------------------------------------------
def test_from_models_keeps_mask_and_dense(mlm):
    base = {n: p.detach().clone() for n, p in mlm.named_parameters()}
    tuned = {n: t.clone() for n, t in base.items()}
    w = "bert.encoder.layer.0.attention.self.query.weight"
    tuned[w].view(-1)[[3, 70, 5]] += torch.tensor([1.0, 2.0, 3.0])
    tuned["cls.predictions.bias"] += 1
    sft = SparseFineTuning.from_models(base, tuned, dense_params=["cls.predictions.bias"])
    assert list(sft.diffs) == [w] and sft.k == 3
    assert sft.diffs[w].indices.tolist() == [3, 5, 70]
    assert torch.allclose(sft.diffs[w].values, torch.tensor([1.0, 3.0, 2.0]))
    assert sft.diffs[w].indices.dtype == torch.int32
    assert torch.equal(sft.dense["cls.predictions.bias"], tuned["cls.predictions.bias"])


@pytest.mark.parametrize("encoding_name", ["elias-fano", "raw"])
def test_save_load_round_trip(tmp_path, mlm, encoding_name):
    sft = random_sft(mlm, 0.05, seed=1)
    sft.dense["cls.predictions.bias"] = torch.randn(97)
    sft = SparseFineTuning(sft.diffs, sft.dense, SftConfig(kind="language", language="mlt", base_model="tiny"))
    sft.save(tmp_path / "s", index_encoding=encoding_name)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [WEIGHTS_NAME, CONFIG_NAME]
    back = compsft.load(tmp_path / "s")
    assert back.config.language == "mlt" and back.config.k == sft.k
    assert back.config.dense_params == ["cls.predictions.bias"]
    for name, d in sft.diffs.items():
        assert torch.equal(back.diffs[name].indices, d.indices)
        assert torch.equal(back.diffs[name].values, d.values)
    assert torch.equal(back.dense["cls.predictions.bias"], sft.dense["cls.predictions.bias"])


def test_fp16_values_option(tmp_path, mlm):
    sft = random_sft(mlm, 0.2, seed=2)
    sft.save(tmp_path / "f16", dtype=torch.float16)
    back = compsft.load(tmp_path / "f16")
    d = next(iter(back.diffs.values()))
    assert d.values.dtype == torch.float16
    name = next(iter(sft.diffs))
    assert torch.allclose(back.diffs[name].values.float(), sft.diffs[name].values, rtol=1e-3, atol=1e-4)


def test_bytes_per_nonzero(tmp_path):
    # One 1M-entry tensor at 5% density: fp32 values cost 4 bytes, indices must cost < 1.
    n = 1_000_000
    idx = torch.from_numpy(np.sort(np.random.default_rng(0).choice(n, n // 20, replace=False))).int()
    sft = SparseFineTuning({"w": SparseDelta((1000, 1000), idx, torch.randn(idx.numel()))})
    sft.save(tmp_path / "a")
    sft.save(tmp_path / "b", dtype=torch.float16)
    per = lambda d: sum(p.stat().st_size for p in d.iterdir()) / idx.numel()  # noqa: E731
    assert per(tmp_path / "a") <= 5.0
    assert per(tmp_path / "b") <= 3.0


def test_empty_and_zero_dim(tmp_path):
    empty = SparseFineTuning()
    empty.save(tmp_path / "e")
    assert compsft.load(tmp_path / "e").k == 0
    scalar = SparseFineTuning({"s": SparseDelta((), torch.tensor([0], dtype=torch.int32), torch.tensor([2.5]))})
    scalar.save(tmp_path / "z")
    back = compsft.load(tmp_path / "z")
    assert back.diffs["s"].shape == () and back.diffs["s"].values.item() == 2.5
    model = torch.nn.Module()
    model.s = torch.nn.Parameter(torch.tensor(1.0))
    compsft.apply(model, back)
    assert model.s.item() == 3.5
    compsft.revert(model)
    assert model.s.item() == 1.0


# -- validation ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "indices,values,message",
    [
        ([5, 3], [1.0, 1.0], "not sorted"),
        ([3, 3], [1.0, 1.0], "not sorted and unique"),
        ([0, 12], [1.0, 1.0], "out of range"),
        ([0, 1], [1.0, float("nan")], "NaN"),
        ([0, 1], [1.0, float("inf")], "NaN or Inf"),
    ],
)
def test_invalid_deltas_rejected(indices, values, message):
    d = SparseDelta((3, 4), torch.tensor(indices, dtype=torch.int32), torch.tensor(values))
    with pytest.raises(CompsftError, match=message):
        d.validate("w", "x.sft")


def test_corrupt_and_truncated_files(tmp_path, mlm):
    sft = random_sft(mlm, 0.05, seed=3)
    sft.save(tmp_path / "s")
    path = tmp_path / "s" / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CompsftError, match=str(path)):
        compsft.load(tmp_path / "s")
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(CompsftError, match="corrupt"):
        compsft.load(tmp_path / "s")


def test_unknown_format_version(tmp_path, mlm):
    random_sft(mlm, 0.05, seed=4).save(tmp_path / "s")
    cfg_path = tmp_path / "s" / CONFIG_NAME
    cfg = json.loads(cfg_path.read_text())
    cfg["format_version"] = 99
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CompsftError, match="format_version 99"):
        compsft.load(tmp_path / "s")


def test_nan_in_file_names_tensor(tmp_path):
    from safetensors.torch import save_file

    sft = SparseFineTuning({"w": SparseDelta((4,), torch.tensor([1], dtype=torch.int32), torch.tensor([1.0]))})
    sft.save(tmp_path / "s", index_encoding="raw")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "s" / WEIGHTS_NAME), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["sparse/w/values"] = torch.tensor([float("nan")])
    save_file(tensors, str(tmp_path / "s" / WEIGHTS_NAME), metadata=meta)
    with pytest.raises(CompsftError, match="checksum mismatch"):
        compsft.load(tmp_path / "s")
    # A crafted file with a matching checksum is still validated value by value.
    cfg = json.loads((tmp_path / "s" / CONFIG_NAME).read_text())
    cfg["weights_checksum"] = file_checksum((tmp_path / "s" / WEIGHTS_NAME).read_bytes())
    (tmp_path / "s" / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(CompsftError, match="'w'.*NaN"):
        compsft.load(tmp_path / "s")


def test_failed_save_keeps_previous_file(tmp_path, mlm, monkeypatch):
    good = random_sft(mlm, 0.05, seed=5)
    good.save(tmp_path / "s")
    before = (tmp_path / "s" / WEIGHTS_NAME).read_bytes()
    import compsft.serialization as ser

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ser, "_write_synced", boom)
    with pytest.raises(OSError):
        random_sft(mlm, 0.1, seed=6).save(tmp_path / "s")
    assert (tmp_path / "s" / WEIGHTS_NAME).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary left behind
    assert compsft.load(tmp_path / "s").k == good.k


# -- apply / revert ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_revert_is_bit_identical_after_100_cycles(dtype):
    torch.manual_seed(1)
    model = BertForMaskedLM(tiny_config()).to(dtype)
    sfts = [random_sft(model, 0.3, seed=s, scale=0.37) for s in range(3)]  # heavily overlapping
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(100):
        h1 = compsft.apply(model, sfts[0], sfts[1], scales=[1.0, -0.7])
        h2 = compsft.apply(model, sfts[2])
        if i == 0:
            assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
        compsft.revert(model, h2)
        compsft.revert(model, h1)
    for k, v in model.state_dict().items():
        assert v.dtype == dtype
        assert torch.equal(v.view(torch.uint8) if v.dim() else v, before[k].view(torch.uint8) if v.dim() else before[k]), k


def test_apply_adds_exactly_and_matches_compose():
    torch.manual_seed(2)
    model = BertForMaskedLM(tiny_config())
    a, b = random_sft(model, 0.1, seed=10), random_sft(model, 0.1, seed=11)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    compsft.apply(model, a, b, scales=[0.5, 2.0])
    both = compsft.compose(a, b, scales=[0.5, 2.0])
    assert sum(both.overlap.values()) > 0
    for n, p in model.named_parameters():
        expected = theta0[n].clone()
        if n in both.diffs:
            expected = expected + both.diffs[n].dense()
        assert torch.allclose(p, expected, atol=1e-6), n
    compsft.revert(model)
    compsft.apply(model, both)
    for n, p in model.named_parameters():
        if n in both.diffs:
            assert torch.allclose(p, theta0[n] + both.diffs[n].dense(), atol=1e-6)


def test_compose_union_and_overlap_report():
    a = SparseFineTuning({"w": SparseDelta((10,), torch.tensor([1, 4, 6], dtype=torch.int32), torch.tensor([1.0, 1.0, 1.0]))})
    b = SparseFineTuning({"w": SparseDelta((10,), torch.tensor([4, 9], dtype=torch.int32), torch.tensor([2.0, 3.0]))})
    c = compsft.compose(a, b)
    assert c.diffs["w"].indices.tolist() == [1, 4, 6, 9]
    assert c.diffs["w"].values.tolist() == [1.0, 3.0, 1.0, 3.0]
    assert c.overlap == {"w": 1}
    assert c.config.kind == "composed"


def test_language_sft_onto_tagger_and_bare_encoder(mlm):
    lang = random_sft(mlm, 0.05, seed=7)
    lang.dense["cls.predictions.bias"] = torch.ones(97)
    for cls, kw in ((BertForTokenClassification, {"num_labels": 5}), (BertModel, {})):
        target = cls(tiny_config(**kw))
        sd = {k.removeprefix("bert."): v for k, v in mlm.state_dict().items() if k.startswith("bert.")}
        (target.bert if hasattr(target, "bert") else target).load_state_dict(sd, strict=False)
        before = {k: v.clone() for k, v in target.state_dict().items()}
        compsft.apply(target, lang)  # dense MLM head is not applied by default
        changed = [k for k, v in target.state_dict().items() if not torch.equal(v, before[k])]
        assert changed and all("LayerNorm" not in k for k in changed)
        compsft.revert(target)
        with pytest.raises(CompsftError, match="cls.predictions.bias"):
            compsft.apply(target, lang, with_dense=True)
        assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_tied_embeddings_get_one_update():
    model = BertForMaskedLM(tiny_config(tie_word_embeddings=True))
    emb = model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.weight is emb
    idx = torch.tensor([0, 5], dtype=torch.int32)
    delta = SparseDelta(tuple(emb.shape), idx, torch.tensor([1.0, 1.0]))
    sft = SparseFineTuning({"bert.embeddings.word_embeddings.weight": delta,
                            "cls.predictions.decoder.weight": delta})
    before = emb.detach().clone()
    compsft.apply(model, sft)
    assert torch.allclose(emb.detach().view(-1)[[0, 5]], before.view(-1)[[0, 5]] + 1)
    compsft.revert(model)
    assert torch.equal(emb, before)


def test_bad_sft_leaves_model_untouched(mlm):
    good = random_sft(mlm, 0.05, seed=8)
    bad_shape = SparseFineTuning({"bert.encoder.layer.0.attention.self.query.weight": SparseDelta((3, 3), torch.tensor([0], dtype=torch.int32), torch.tensor([1.0]))})
    unknown = SparseFineTuning({"no.such.weight": SparseDelta((3,), torch.tensor([0], dtype=torch.int32), torch.tensor([1.0]))})
    before = {k: v.clone() for k, v in mlm.state_dict().items()}
    for bad, msg in ((bad_shape, "shape"), (unknown, "no.such.weight")):
        with pytest.raises(CompsftError, match=msg):
            compsft.apply(mlm, good, bad)
        assert all(torch.equal(v, before[k]) for k, v in mlm.state_dict().items())
    assert compsft.applied(mlm) == []


def test_fingerprint_mismatch_names_tensor_and_override(mlm):
    sft = random_sft(mlm, 0.05, seed=9)
    torch.manual_seed(123)
    other = BertForMaskedLM(tiny_config())
    with pytest.raises(FingerprintMismatch, match="bert.embeddings.word_embeddings.weight"):
        compsft.apply(other, sft)
    compsft.apply(other, sft, check_base=False)
    compsft.revert(other)
    # The same base in half precision still matches (the check on), and reverts bit for bit.
    import copy

    for dtype in (torch.bfloat16, torch.float16):
        half = copy.deepcopy(mlm).to(dtype).requires_grad_(False)
        before = {n: t.clone() for n, t in half.state_dict().items()}
        compsft.apply(half, sft)
        assert any(not torch.equal(t, before[n]) for n, t in half.state_dict().items())
        compsft.revert(half)
        assert all(torch.equal(t, before[n]) for n, t in half.state_dict().items())


def test_fingerprint_sees_through_applied_sfts(mlm):
    lang = random_sft(mlm, 0.5, seed=12, scale=5.0)
    task = random_sft(mlm, 0.5, seed=13)
    compsft.apply(mlm, lang)
    compsft.apply(mlm, task)  # its fingerprint is of θ0, which lang has changed: still accepted
    compsft.revert(mlm)
    compsft.revert(mlm)


def test_vocabulary_mismatch(mlm):
    sft = random_sft(mlm, 0.05, seed=14)
    sft.config.vocab = {"size": 97, "sha256": "a" * 64}
    with pytest.raises(VocabularyMismatch, match="97 pieces"):
        compsft.apply(mlm, sft, vocab={"size": 97, "sha256": "b" * 64})
    compsft.apply(mlm, sft, vocab={"size": 97, "sha256": "a" * 64})


def test_revert_order_enforced(mlm):
    a, b = random_sft(mlm, 0.05, seed=15), random_sft(mlm, 0.05, seed=16)
    ha = compsft.apply(mlm, a)
    compsft.apply(mlm, b)
    with pytest.raises(CompsftError, match="reverse order"):
        compsft.revert(mlm, ha)
    compsft.revert(mlm)
    compsft.revert(mlm, ha)
    with pytest.raises(CompsftError, match="no SFT is applied"):
        compsft.revert(mlm)


def test_base_fingerprint_sees_through_applied_sft(mlm):
    from compsft.fingerprint import fingerprint
    from compsft.merge import base_fingerprint

    names = [n for n, _ in mlm.named_parameters() if "LayerNorm" not in n and not n.startswith("cls.")]
    theta0 = fingerprint({n: p for n, p in mlm.named_parameters()}, names)
    compsft.apply(mlm, random_sft(mlm, 0.9, seed=17, scale=3.0))
    assert base_fingerprint(mlm, names)["tensors"] == theta0["tensors"]
    assert fingerprint({n: p for n, p in mlm.named_parameters()}, names)["tensors"] != theta0["tensors"]


def test_compose_dense_flags():
    a = SparseFineTuning({"w": SparseDelta((4,), torch.tensor([1], dtype=torch.int32), torch.tensor([1.0]))},
                         dense={"mlm_head": torch.ones(3)})
    b = SparseFineTuning({}, dense={"classifier": torch.zeros(2)})
    assert sorted(compsft.compose(a, b, with_dense=True).dense) == ["classifier", "mlm_head"]
    assert sorted(compsft.compose(a, b, with_dense=[False, True]).dense) == ["classifier"]
    with pytest.raises(CompsftError, match="with_dense"):
        compsft.compose(a, b, with_dense=[True])
