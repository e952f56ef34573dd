"""Reading reference-implementation files safely, and the `info` / `compose` / `convert` commands."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertForTokenClassification
from typer.testing import CliRunner

import compsft
from compsft.cli import app
from compsft.errors import CompsftError
from compsft.legacy import convert_legacy

from test_core_sft import random_sft, tiny_config

REPO = Path(__file__).resolve().parents[1]


def write_legacy(directory: Path, model: torch.nn.Module, density: float, seed: int) -> dict[str, torch.Tensor]:
    """Write a `pytorch_diff.bin` exactly as the reference implementation lays it out (column-major
    flat indices, first index then steps, numpy integer steps), returning the dense diffs it encodes."""
    rng = np.random.default_rng(seed)
    diffs, dense_diffs = {}, {}
    for name, p in model.named_parameters():
        if "LayerNorm" in name or name.startswith("cls."):
            continue
        n = p.numel()
        col_major = np.sort(rng.choice(n, max(1, int(n * density)), replace=False))
        values = torch.from_numpy(rng.standard_normal(col_major.size).astype(np.float32))
        steps = np.diff(col_major, prepend=0)  # first index, then differences (numpy int64 scalars)
        diffs[name] = {"size": p.shape, "index_steps": list(steps), "values": values}
        # The reference semantics: entry k of a 2-D tensor (R, C) sits at (k % R, k // R).
        dense = torch.zeros(n)
        dense[torch.from_numpy(col_major)] = values
        if p.dim() == 2:
            dense = dense.view(p.shape[1], p.shape[0]).t().contiguous()
        dense_diffs[name] = dense.view(p.shape)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"diffs": diffs, "abs": {"cls.predictions.bias": torch.ones(model.config.vocab_size)}},
               directory / "pytorch_diff.bin")
    return dense_diffs


def test_convert_matches_reference_semantics(tmp_path):
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_config())
    dense_diffs = write_legacy(tmp_path / "old", model, 0.1, seed=1)
    sft = convert_legacy(tmp_path / "old")
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.warns(UserWarning, match="no base-model fingerprint"):  # converted without a base
        compsft.apply(model, sft, with_dense=True)
    for name, p in model.named_parameters():
        if name in dense_diffs:
            assert torch.allclose(p, theta0[name] + dense_diffs[name]), name
    assert torch.equal(model.cls.predictions.bias, torch.ones(model.config.vocab_size))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil_dir = tmp_path / "evil"
    torch.save({"diffs": {}, "abs": {}, "x": Evil()}, evil_dir.with_suffix(".tmp"))
    evil_dir.mkdir()
    os.replace(evil_dir.with_suffix(".tmp"), evil_dir / "pytorch_diff.bin")
    with pytest.raises(CompsftError, match="refused"):
        convert_legacy(evil_dir)
    assert not marker.exists()
    # A bare pickle (the legacy non-zip format) with the same payload is refused too.
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "pytorch_diff.bin").write_bytes(pickle.dumps({"diffs": Evil()}))
    with pytest.raises(CompsftError):
        convert_legacy(raw)
    assert not marker.exists()


def test_legacy_bad_entries(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    torch.save({"diffs": {"w": {"size": torch.Size([2, 2]), "index_steps": [0, 5], "values": torch.ones(2)}}, "abs": {}},
               d / "pytorch_diff.bin")
    with pytest.raises(CompsftError, match="'w'.*out of range"):
        convert_legacy(d)


# -- CLI ---------------------------------------------------------------------------------------------
runner = CliRunner()


def test_cli_info_json_and_table(tmp_path):
    model = BertForMaskedLM(tiny_config())
    sft = random_sft(model, 0.05, seed=3)
    sft.config.base_model = "tiny-bert"
    sft.save(tmp_path / "s")
    result = runner.invoke(app, ["info", str(tmp_path / "s"), "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output)
    assert facts["k"] == sft.k and facts["num_tensors"] == len(sft.diffs)
    assert facts["base_model"] == "tiny-bert" and facts["dense_params"] == []
    assert facts["bytes"] == sum(p.stat().st_size for p in (tmp_path / "s").iterdir())
    assert set(facts["per_layer_type"]) >= {"embeddings", "attention", "feed-forward"}
    table = runner.invoke(app, ["info", str(tmp_path / "s")])
    assert table.exit_code == 0 and "feed-forward" in table.output


def test_cli_compose_writes_merged_model(tmp_path):
    torch.manual_seed(0)
    model = BertForTokenClassification(tiny_config(num_labels=3))
    model.save_pretrained(tmp_path / "base")
    a, b = random_sft(model, 0.05, seed=4), random_sft(model, 0.05, seed=5)
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    result = runner.invoke(app, ["compose", "--base", str(tmp_path / "base"), "--sft", str(tmp_path / "a"),
                                 "--sft", str(tmp_path / "b"), "--scale", "1.0", "--scale", "0.5",
                                 "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = BertForTokenClassification.from_pretrained(tmp_path / "merged")
    expected = compsft.compose(a, b, scales=[1.0, 0.5])
    for name, p in merged.named_parameters():
        want = model.state_dict()[name] + (expected.diffs[name].dense() if name in expected.diffs else 0)
        assert torch.allclose(p, want, atol=1e-6), name
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_cli_convert(tmp_path):
    model = BertForMaskedLM(tiny_config())
    write_legacy(tmp_path / "old", model, 0.05, seed=6)
    result = runner.invoke(app, ["convert", str(tmp_path / "old"), str(tmp_path / "new")])
    assert result.exit_code == 0, result.output
    back = compsft.load(tmp_path / "new")
    assert back.k > 0 and back.config.dense_params == ["cls.predictions.bias"]


def test_cli_error_is_one_line_and_debug_shows_traceback(tmp_path):
    env = {**os.environ, "COMPSFT_DEBUG": "0"}
    cmd = [sys.executable, str(REPO / "cli.py"), "info", str(tmp_path / "missing")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "not an SFT directory" in out.stderr
    out = subprocess.run(cmd, capture_output=True, text=True, env={**env, "COMPSFT_DEBUG": "1"})
    assert out.returncode != 0 and "Traceback" in out.stderr


@pytest.mark.slow
def test_wheel_contains_only_compsft(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("compsft-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"compsft"}
    assert any(n.startswith("compsft/tasks/") for n in names)
    assert any(n.startswith("compsft/languages/") for n in names)


# -- convert --base: fingerprint and shape check; the warning without one (issue 9, item 3) ---------
def _converted_dirs(tmp_path: Path):
    """A base model directory, a legacy file trained from it, and another model of the same shapes."""
    torch.manual_seed(0)
    base = BertForMaskedLM(tiny_config())
    base.save_pretrained(tmp_path / "base")
    write_legacy(tmp_path / "old", base, 0.05, seed=7)
    torch.manual_seed(1)
    other = BertForMaskedLM(tiny_config())
    return base, other


def test_cli_convert_with_base_records_fingerprint_and_checks_it(tmp_path):
    base, other = _converted_dirs(tmp_path)
    result = runner.invoke(app, ["convert", str(tmp_path / "old"), str(tmp_path / "new"),
                                 "--base", str(tmp_path / "base")])
    assert result.exit_code == 0, result.output
    sft = compsft.load(tmp_path / "new")
    assert sft.config.base_model == str(tmp_path / "base")
    assert set(sft.config.base_fingerprint["tensors"]) == set(sft.diffs)
    with pytest.raises(compsft.FingerprintMismatch, match="trained from another base"):
        compsft.apply(other, sft)
    compsft.apply(base, sft)  # its own base: fine


def test_cli_convert_with_base_checks_every_shape(tmp_path):
    torch.manual_seed(0)
    write_legacy(tmp_path / "old", BertForMaskedLM(tiny_config()), 0.05, seed=8)
    BertForMaskedLM(tiny_config(intermediate_size=40)).save_pretrained(tmp_path / "narrow")
    result = runner.invoke(app, ["convert", str(tmp_path / "old"), str(tmp_path / "new"),
                                 "--base", str(tmp_path / "narrow")])
    assert isinstance(result.exception, CompsftError)
    assert "intermediate.dense.weight" in str(result.exception) and "shape" in str(result.exception)
    assert not (tmp_path / "new").exists()


def test_sft_without_fingerprint_warns_once_naming_the_file(tmp_path):
    import warnings

    from compsft.merge import UnverifiedBaseWarning

    base, other = _converted_dirs(tmp_path)
    assert runner.invoke(app, ["convert", str(tmp_path / "old"), str(tmp_path / "new")]).exit_code == 0
    sft = compsft.load(tmp_path / "new")
    assert sft.config.base_fingerprint is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            compsft.revert(other, compsft.apply(other, sft))  # passes: nothing to check against
    unverified = [w for w in caught if issubclass(w.category, UnverifiedBaseWarning)]
    assert len(unverified) == 1, [str(w.message) for w in caught]  # once per SFT, not per tensor or apply
    assert str(tmp_path / "new") in str(unverified[0].message) and "--base" in str(unverified[0].message)
    # An SFT with a fingerprint applies silently; so does one applied with the check switched off.
    fresh = compsft.load(tmp_path / "new")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compsft.revert(other, compsft.apply(other, fresh, check_base=False))
        compsft.apply(other, random_sft(other, 0.05, seed=9))
    assert not [w for w in caught if issubclass(w.category, UnverifiedBaseWarning)]


def test_converted_task_sft_composes_into_a_tagger(tmp_path):
    from transformers import AutoModelForTokenClassification

    torch.manual_seed(0)
    BertForMaskedLM(tiny_config()).save_pretrained(tmp_path / "base")
    tagger = BertForTokenClassification.from_pretrained(tmp_path / "base", num_labels=3)
    write_legacy(tmp_path / "old", tagger, 0.05, seed=10)
    head = {"classifier.weight": torch.randn(3, 32), "classifier.bias": torch.randn(3)}
    data = torch.load(tmp_path / "old" / "pytorch_diff.bin", weights_only=False)
    data["diffs"] = {n: e for n, e in data["diffs"].items() if not n.startswith("classifier")}
    data["abs"] = head  # the reference keeps the trained head in `abs`
    torch.save(data, tmp_path / "old" / "pytorch_diff.bin")
    (tmp_path / "old" / "config.json").write_text(json.dumps({"id2label": {"0": "A", "1": "B", "2": "C"}}))

    result = runner.invoke(app, ["convert", str(tmp_path / "old"), str(tmp_path / "new"),
                                 "--base", str(tmp_path / "base"), "--task", "pos"])
    assert result.exit_code == 0, result.output
    sft = compsft.load(tmp_path / "new")
    assert (sft.config.kind, sft.config.task, sft.config.training["labels"]) == ("task", "pos", ["A", "B", "C"])
    result = runner.invoke(app, ["compose", "--base", str(tmp_path / "base"), "--sft", str(tmp_path / "new"),
                                 "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    written = AutoModelForTokenClassification.from_pretrained(tmp_path / "merged")
    assert written.config.id2label == {0: "A", 1: "B", 2: "C"}
    expected = BertForTokenClassification.from_pretrained(tmp_path / "base", num_labels=3)
    compsft.apply(expected, convert_legacy(tmp_path / "old", tmp_path / "base"))  # head by default
    ids = torch.tensor([[2, 17, 33, 51, 3]])
    assert torch.equal(written(input_ids=ids).logits, expected(input_ids=ids).logits)
    assert torch.equal(written.classifier.weight, head["classifier.weight"])
    # Labels given on the command line must match the head's size.
    bad = runner.invoke(app, ["convert", str(tmp_path / "old"), str(tmp_path / "bad"), "--labels", "A,B"])
    assert isinstance(bad.exception, CompsftError) and "3 outputs but 2 labels" in str(bad.exception)


# -- model and tokenizer arguments are local directories (issue 9, item 8) ----------------------------
@pytest.mark.parametrize("args,option", [
    (["evaluate", "--task", "pos", "--model", "{base}", "--tokenizer", "bert-base-cased", "--data", "{data}"],
     "--tokenizer"),
    (["evaluate", "--task", "pos", "--model", "xlm-roberta-base", "--data", "{data}"], "--model"),
    (["compose", "--base", "bert-base-cased", "--sft", "{sft}", "--out", "{out}"], "--base"),
    (["convert", "{old}", "{out}", "--base", "bert-base-cased"], "--base"),
    (["trim-vocab", "--model", "bert-base-cased", "--text", "{data}", "--out", "{out}"], "--model"),
])
def test_hub_names_are_refused_naming_the_option(tmp_path, monkeypatch, args, option):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # should the check be missing, fail fast instead of downloading
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_config())
    model.save_pretrained(tmp_path / "base")
    random_sft(model, 0.05, seed=11).save(tmp_path / "sft")
    write_legacy(tmp_path / "old", model, 0.05, seed=12)
    (tmp_path / "data.conllu").write_text("1\tx\t_\tNOUN\t_\t_\t0\troot\t_\t_\n\n")
    paths = {"base": tmp_path / "base", "data": tmp_path / "data.conllu", "sft": tmp_path / "sft",
             "old": tmp_path / "old", "out": tmp_path / "out"}
    result = runner.invoke(app, [a.format(**paths) for a in args])
    assert isinstance(result.exception, CompsftError), result.output
    assert str(result.exception).startswith(option) and "not a local directory" in str(result.exception)
    assert not (tmp_path / "out").exists()


# -- the parser is saved atomically (issue 9, item 8) --------------------------------------------------
def test_parser_save_is_atomic_and_keeps_other_files(tmp_path, monkeypatch):
    import safetensors.torch

    from compsft.tasks.biaffine import HEAD_FILE, BiaffineParser, ParserConfig
    from transformers import BertModel

    torch.manual_seed(0)
    parser = BiaffineParser(BertModel(tiny_config(), add_pooling_layer=False), ParserConfig(labels=["a", "b"],
                                                                                            arc_dim=8, rel_dim=4))
    out = tmp_path / "parser"
    parser.save_pretrained(out)
    (out / "tokenizer.json").write_text("{}")  # saved beside the parser, e.g. by tokenizer.save_pretrained
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with torch.no_grad():
        for p in parser.parameters():
            p.add_(1.0)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)  # the head write fails after the encoder's
    with pytest.raises(OSError, match="disk full"):
        parser.save_pretrained(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old parser, whole
    assert not [p for p in tmp_path.iterdir() if p.name != "parser"]  # no temporary left behind
    monkeypatch.undo()
    parser.save_pretrained(out)
    assert (out / "tokenizer.json").read_text() == "{}"
    loaded = BiaffineParser.from_pretrained(out)
    for (n, a), b in zip(loaded.named_parameters(), parser.parameters()):
        assert torch.equal(a, b), n
    assert (out / HEAD_FILE).read_bytes() != before[HEAD_FILE]
