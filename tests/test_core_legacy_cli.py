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
