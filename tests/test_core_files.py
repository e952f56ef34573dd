"""SFT files as untrusted input: atomic replacement, checksum, schema validation, fuzzing (issue 9, item 8)."""
from __future__ import annotations

import builtins
import importlib.util
import json
import random
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertForMaskedLM

import compsft
import compsft.serialization as ser
from compsft import atomic, legacy
from compsft.errors import CompsftError
from compsft.serialization import CONFIG_NAME, WEIGHTS_NAME, file_checksum
from compsft.sft import SparseDelta, SparseFineTuning

from test_core_sft import random_sft, tiny_config

REPO = Path(__file__).resolve().parents[1]


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fuzz = _bench_module("fuzz_files")


@pytest.fixture
def mlm():
    torch.manual_seed(0)
    return BertForMaskedLM(tiny_config())


def values_equal(a: SparseFineTuning, b: SparseFineTuning) -> bool:
    return a.diffs.keys() == b.diffs.keys() and all(
        torch.equal(a.diffs[n].indices.long(), b.diffs[n].indices.long()) and torch.equal(a.diffs[n].values, b.diffs[n].values)
        for n in a.diffs)


def same_k_pair(mlm) -> tuple[SparseFineTuning, SparseFineTuning]:
    """Two SFTs with the same K and dense parameters but different values: the k cross-check cannot
    tell them apart."""
    old = random_sft(mlm, 0.05, seed=1)
    new = SparseFineTuning({n: SparseDelta(d.shape, d.indices, d.values + 1.0) for n, d in old.diffs.items()},
                           config=old.config)
    assert old.k == new.k
    return old, new


# -- atomic replacement of the whole directory ------------------------------------------------------
def test_overwrite_interrupted_between_the_two_files_keeps_the_old_sft(tmp_path, mlm, monkeypatch):
    old, new = same_k_pair(mlm)
    old.save(tmp_path / "s")
    written = []

    def write_then_die(path, data):
        if path.name == CONFIG_NAME:  # the tensors are written, the config not yet: a crash here
            raise KeyboardInterrupt
        written.append(path.name)
        with open(path, "wb") as f:
            f.write(data)

    monkeypatch.setattr(ser, "_write_synced", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        new.save(tmp_path / "s")
    assert written == [WEIGHTS_NAME]
    monkeypatch.undo()
    assert values_equal(compsft.load(tmp_path / "s"), old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temporary directory left behind
    new.save(tmp_path / "s")
    assert values_equal(compsft.load(tmp_path / "s"), new)


def test_new_tensors_beside_an_old_config_are_refused(tmp_path, mlm):
    # What a writer that replaced the files one by one leaves after a crash between them.
    old, new = same_k_pair(mlm)
    old.save(tmp_path / "old")
    new.save(tmp_path / "new")
    shutil.copy(tmp_path / "new" / WEIGHTS_NAME, tmp_path / "old" / WEIGHTS_NAME)
    with pytest.raises(CompsftError, match=rf"{tmp_path / 'old' / WEIGHTS_NAME}: checksum mismatch"):
        compsft.load(tmp_path / "old")


def test_save_refuses_to_replace_a_directory_that_is_not_an_sft(tmp_path, mlm):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(CompsftError, match="notes.txt"):
        random_sft(mlm, 0.05, seed=1).save(tmp_path / "d")
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine"
    (tmp_path / "f").write_text("a file")
    with pytest.raises(CompsftError, match="not a directory"):
        random_sft(mlm, 0.05, seed=1).save(tmp_path / "f")


@pytest.mark.parametrize("exchange", [True, False])
def test_atomic_directory_replacement_with_and_without_exchange(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "d"
    for content in ("one", "two", "three"):
        with atomic.atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "x").write_text(content)
        assert (target / "x").read_text() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


# -- integrity ------------------------------------------------------------------------------------------
def test_checksum_recorded_and_a_flipped_value_bit_is_caught(tmp_path, mlm):
    sft = random_sft(mlm, 0.05, seed=2)
    sft.save(tmp_path / "s")
    path = tmp_path / "s" / WEIGHTS_NAME
    blob = bytearray(path.read_bytes())
    config = json.loads((tmp_path / "s" / CONFIG_NAME).read_text())
    assert config["weights_checksum"] == file_checksum(blob)
    # Flip the lowest mantissa bit of one fp32 value: still a finite, plausible number.
    header, data_start = fuzz.split(bytes(blob))[0], 8 + struct.unpack_from("<Q", blob)[0]
    key = next(k for k in header if k.endswith("/values"))
    blob[data_start + header[key]["data_offsets"][0]] ^= 1
    path.write_bytes(blob)
    with pytest.raises(CompsftError, match=rf"{path}: checksum mismatch"):
        compsft.load(tmp_path / "s")
    # Files written before the checksum existed have no such field: they load (unverified).
    del config["weights_checksum"]
    (tmp_path / "s" / CONFIG_NAME).write_text(json.dumps(config))
    changed = compsft.load(tmp_path / "s")
    assert not values_equal(changed, sft) and changed.k == sft.k


# -- schema validation --------------------------------------------------------------------------------------
def _edit_header(directory: Path, edit) -> None:
    """Apply `edit(header, index)` to the safetensors header (an edit returning a value replaces the
    index with it) and re-record the checksum, as a forger would."""
    path = directory / WEIGHTS_NAME
    header, data = fuzz.split(path.read_bytes())
    index = json.loads(header["__metadata__"]["index"])
    replaced = edit(header, index)
    index = index if replaced is None else replaced
    if isinstance(header.get("__metadata__"), dict):
        header["__metadata__"]["index"] = json.dumps(index)
    blob = fuzz.join(header, data)
    path.write_bytes(blob)
    _edit_config(directory, lambda c: c.__setitem__("weights_checksum", file_checksum(blob)))


def _edit_config(directory: Path, edit) -> None:
    path = directory / CONFIG_NAME
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


W = "bert.encoder.layer.0.attention.self.query.weight"
BAD_CONFIGS = [
    (lambda c: c.__setitem__("base_fingerprint", True), r"field base_fingerprint: .*got True"),
    (lambda c: c["base_fingerprint"]["tensors"][W].__setitem__("shape", "abc"),
     rf"field base_fingerprint\.tensors\.{W}\.shape: .*valid list"),
    (lambda c: c["base_fingerprint"].__setitem__("tensors", []), r"field base_fingerprint\.tensors: .*dictionary"),
    (lambda c: c.__setitem__("k", None), r"field k: .*integer"),
    (lambda c: c.__setitem__("k", "12"), r"field k: .*integer"),
    (lambda c: c.__setitem__("dense_params", {"a": 1}), r"field dense_params: .*list"),
    (lambda c: c.__setitem__("vocab", {"size": True, "sha256": "x"}), r"field vocab\.size: .*integer"),
    (lambda c: c.__setitem__("training", ["a"]), r"field training: .*dictionary"),
    (lambda c: c.__setitem__("kind", 3), r"field kind"),
    (lambda c: c.__setitem__("weights_checksum", "md5:abc"), r"field weights_checksum"),
]


@pytest.mark.parametrize("edit,message", BAD_CONFIGS)
def test_malformed_config_fields_are_named(tmp_path, mlm, edit, message):
    random_sft(mlm, 0.05, seed=3).save(tmp_path / "s")
    _edit_config(tmp_path / "s", edit)
    with pytest.raises(CompsftError, match=rf"{tmp_path / 's' / CONFIG_NAME}: {message}"):
        compsft.load(tmp_path / "s")


BAD_HEADERS = [
    (lambda h, i: i[W].__setitem__("shape", "abc"), rf"field index\.'{W}'\.shape: .*valid list"),
    (lambda h, i: i[W].__setitem__("nnz", None), rf"field index\.'{W}'\.nnz: .*integer"),
    (lambda h, i: i[W].__setitem__("nnz", -3), rf"field index\.'{W}'\.nnz"),
    (lambda h, i: i[W].__setitem__("low_bits", [2]), rf"field index\.'{W}'\.low_bits"),
    (lambda h, i: i.__setitem__(W, [1, 2]), rf"field index\.'{W}': .*dictionary"),
    (lambda h, i: i.__setitem__(W, {**i[W], "encoding": "zstd"}), rf"field index\.'{W}'\.encoding"),
    (lambda h, i: h[f"sparse/{W}/values"].__setitem__("dtype", "F8_E4M3"), rf"tensor 'sparse/{W}/values': dtype '?F8_E4M3"),
    (lambda h, i: h[f"sparse/{W}/ef_low"].__setitem__("dtype", "I8"), rf"tensor 'sparse/{W}/ef_low': dtype '?I8"),
    (lambda h, i: h[f"sparse/{W}/values"].__setitem__("shape", ["abc"]), rf"field 'sparse/{W}/values'\.shape\.0"),
    (lambda h, i: h[f"sparse/{W}/values"].__setitem__("data_offsets", [0, 10**12]), "data_offsets"),
    (lambda h, i: h.__setitem__("__metadata__", ["x"]), r"field __metadata__"),
]


@pytest.mark.parametrize("edit,message", BAD_HEADERS)
def test_malformed_header_fields_are_named(tmp_path, mlm, edit, message):
    random_sft(mlm, 0.05, seed=4).save(tmp_path / "s")
    _edit_header(tmp_path / "s", edit)
    with pytest.raises(CompsftError, match=rf"{tmp_path / 's' / WEIGHTS_NAME}.*{message}"):
        compsft.load(tmp_path / "s")


def test_index_as_list_and_float8_dense(tmp_path, mlm):
    sft = random_sft(mlm, 0.05, seed=5)
    sft.dense["cls.predictions.bias"] = torch.zeros(97)
    sft.save(tmp_path / "s")
    _edit_header(tmp_path / "s", lambda h, i: [1, 2])
    with pytest.raises(CompsftError, match=r"field index: expected a JSON object, got an array"):
        compsft.load(tmp_path / "s")
    sft.save(tmp_path / "s")
    _edit_header(tmp_path / "s", lambda h, i: h["dense/cls.predictions.bias"].update(dtype="F8_E4M3", shape=[388]))
    with pytest.raises(CompsftError, match=r"'dense/cls.predictions.bias': dtype '?F8_E4M3"):
        compsft.load(tmp_path / "s")


def test_read_header_validates_too(tmp_path, mlm):
    from compsft.serialization import read_header

    random_sft(mlm, 0.05, seed=6).save(tmp_path / "s")
    index, dense = read_header(tmp_path / "s")
    assert index[W]["encoding"] == "elias-fano" and dense == []
    _edit_header(tmp_path / "s", lambda h, i: i[W].__setitem__("nnz", "many"))
    with pytest.raises(CompsftError, match=rf"field index\.'{W}'\.nnz"):
        read_header(tmp_path / "s")


def test_fuzzed_files_load_or_raise_compsft_error(tmp_path):
    """330 mutated directories (30 per mutation kind): each loads (and applies and reverts exactly) or
    raises CompsftError; bench/fuzz_files.py runs thousands."""
    result = fuzz.run(330, seed=12345, work=tmp_path)
    assert result["findings"] == []
    counts = result["counts"]
    assert counts["error"] > 200 and counts["loaded"] > 10  # both paths exercised
    assert result["by_kind"]["bitflip"]["loaded"] == 0  # the checksum catches every flipped bit
    assert result["slowest_s"] < 5


# -- legacy files: numpy 1 and numpy 2 --------------------------------------------------------------
def test_legacy_import_falls_back_to_numpy_core(monkeypatch):
    real_import = builtins.__import__
    seen = []

    def numpy1_import(name, globals=None, locals=None, fromlist=(), level=0):
        caller = (globals or {}).get("__name__")
        if caller == "compsft.legacy" and name.startswith("numpy"):
            seen.append(name)
            if name == "numpy._core":  # numpy < 2 has no numpy._core
                raise ModuleNotFoundError("No module named 'numpy._core'")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", numpy1_import)
    allowed = legacy._numpy_globals()
    assert seen == ["numpy._core", "numpy.core"]
    names = {entry[1] for entry in allowed if isinstance(entry, tuple)}
    assert names == {"numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"}


def test_legacy_files_from_numpy_1_and_2_both_load(tmp_path):
    # The scalar constructor is pickled under the writing numpy's module name; rewrite it to the
    # other one (a pickle protocol 2 GLOBAL is plain text) to get the file the other numpy writes.
    steps = [np.int64(3), np.int64(2), np.int64(4)]
    torch.save({"diffs": {"w": {"size": torch.Size([4, 4]), "index_steps": steps, "values": torch.ones(3)}}, "abs": {}},
               tmp_path / "pytorch_diff.bin", _use_new_zipfile_serialization=False)
    blob = (tmp_path / "pytorch_diff.bin").read_bytes()
    here = b"numpy._core.multiarray" if b"numpy._core.multiarray" in blob else b"numpy.core.multiarray"
    other = b"numpy.core.multiarray" if here == b"numpy._core.multiarray" else b"numpy._core.multiarray"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "pytorch_diff.bin").write_bytes(blob.replace(here, other))
    for d in (tmp_path, tmp_path / "other"):
        sft = legacy.convert_legacy(d)
        assert sft.diffs["w"].indices.tolist() == [5, 6, 12]  # column-major 3, 5, 9 in a 4 x 4 tensor


def test_loaded_indices_are_int64_and_apply_without_conversion(tmp_path, mlm):
    random_sft(mlm, 0.05, seed=7).save(tmp_path / "s")
    sft = compsft.load(tmp_path / "s")
    assert {d.indices.dtype for d in sft.diffs.values()} == {torch.int64}
    handle = compsft.apply(mlm, sft)
    touched = [t for t in handle.touched if t.indices is not None]
    # apply indexes with the loaded tensor itself: no int32 -> int64 copy per apply
    assert all(any(t.indices is d.indices for d in sft.diffs.values()) for t in touched)
    compsft.revert(mlm)


def test_fuzz_generator_is_deterministic(tmp_path):
    model = fuzz.tiny_model()
    bases = fuzz.base_sfts(model, tmp_path)
    a = fuzz.mutate(random.Random(1), bases[0], tmp_path / "a", "index-field")
    b = fuzz.mutate(random.Random(1), bases[0], tmp_path / "b", "index-field")
    assert a == b and (tmp_path / "a" / WEIGHTS_NAME).read_bytes() == (tmp_path / "b" / WEIGHTS_NAME).read_bytes()


# -- the Elias-Fano decoder checks order and range itself ----------------------------------------------
def test_elias_fano_decoder_rejects_disorder_and_overflow():
    from compsft import encoding

    idx = np.array([16, 17, 40, 41, 200], dtype=np.int64)
    low, high, l = encoding.encode(idx, 256)
    assert l == 5 and np.array_equal(encoding.decode(low, high, 5, 256, l), idx)
    swapped = low.copy()
    swapped[0] ^= 0b11  # bit 0 of positions 0 and 1: 16, 17 become 17, 16 (same bucket, wrong order)
    with pytest.raises(ValueError, match="not strictly increasing"):
        encoding.decode(swapped, high, 5, 256, l)
    # A high bitmap whose last set bit is the very last one decodes past the universe.
    nbits = encoding.high_bitmap_length(5, 256, l)
    bits = np.zeros(nbits, np.uint8)
    bits[[0, 2, 4, 6, nbits - 1]] = 1
    late = np.packbits(bits, bitorder="little")
    with pytest.raises(ValueError, match="out of range"):
        encoding.decode(np.zeros_like(low), late, 5, 256, l)
    # Chunk boundaries: a long run decodes identically whatever the chunk size.
    rng = np.random.default_rng(0)
    many = np.sort(rng.choice(10**6, 200_003, replace=False)).astype(np.int64)
    parts = encoding.encode(many, 10**6)
    assert np.array_equal(encoding.decode(parts[0], parts[1], many.size, 10**6, parts[2]), many)
