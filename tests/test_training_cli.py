"""The train-language / train-task commands: smoke, resume after SIGKILL, torchrun with 2 processes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import compsft
from compsft.cli import app

from training_helpers import make_model_dir, write_text_corpus

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STEPS = ["--phase1-epochs", "1", "--phase1-min-steps", "{p1}", "--phase1-max-steps", "{p1}",
         "--phase2-epochs", "1", "--phase2-min-steps", "{p2}", "--phase2-max-steps", "{p2}"]


def steps(p1, p2):
    return [s.format(p1=p1, p2=p2) for s in STEPS]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_cli")
    return {
        "model": make_model_dir(root / "model"),
        "model_nodrop": make_model_dir(root / "model_nodrop", hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0),
        "text": write_text_corpus(root / "text.txt"),
        "root": root,
    }


def run_cli(args):
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def lang_args(assets, out, model="model", p1=4, p2=4, extra=()):
    return ["train-language", "--model", assets[model], "--lang", "mlt", "--text", assets["text"],
            "--out", out, "--k", "400", "--max-length", "32", "--batch-size", "8", "--logging-steps", "2",
            "--save-steps", "0", "--cpu", *steps(p1, p2), *extra]


def assert_same_sft(a, b, atol=0.0):
    assert a.k == b.k and list(a.diffs) == list(b.diffs) and set(a.dense) == set(b.dense)
    for n in a.diffs:
        assert torch.equal(a.diffs[n].indices, b.diffs[n].indices), n
        assert torch.allclose(a.diffs[n].values, b.diffs[n].values, atol=atol, rtol=0), n
    for n in a.dense:
        assert torch.allclose(a.dense[n], b.dense[n], atol=atol, rtol=0), n


def test_train_language_then_task(assets):
    out = assets["root"] / "lang"
    run_cli(lang_args(assets, out))
    lang = compsft.load(out)
    assert lang.config.kind == "language" and lang.config.language == "mlt" and lang.k == 400
    assert lang.config.training["phases"]["phase1"]["steps"] == 4
    # The MLM head is stored dense; the (frozen, untied) output embeddings are not in the SFT.
    assert any(n.startswith("cls.") for n in lang.dense)
    assert "cls.predictions.decoder.weight" not in lang.dense and "cls.predictions.decoder.weight" not in lang.diffs
    assert all(n.startswith("bert.") for n in lang.diffs)

    task_out = assets["root"] / "task"
    run_cli(["train-task", "--task", "pos", "--model", assets["model"], "--train", "ud:en_ewt:train",
             "--dev", "ud:en_ewt:dev", "--max-sentences", "24", "--source-sft", out, "--out", task_out,
             "--k", "300", "--max-length", "32", "--batch-size", "8", "--save-steps", "0", "--cpu",
             "--logging-steps", "2", *steps(3, 3)])
    task = compsft.load(task_out)
    assert task.config.kind == "task" and task.config.task == "pos" and task.k == 300
    assert task.config.training["source_language"] == "mlt"
    assert set(task.config.training["labels"]) >= {"NOUN", "VERB"}
    assert "dev" in task.config.training
    assert set(task.dense) == {"classifier.weight", "classifier.bias"}


def test_bad_input_is_a_clear_error(assets, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    from compsft.errors import CompsftError

    with pytest.raises(CompsftError, match="not a (model|local) directory"):
        CliRunner().invoke(app, ["train-language", "--model", str(tmp_path / "nope"), "--lang", "mlt",
                                 "--out", str(tmp_path / "x")], catch_exceptions=False)
    with pytest.raises(CompsftError, match="no MLM text|no text|empty"):
        CliRunner().invoke(app, ["train-language", "--model", str(assets["model"]), "--lang", "mlt",
                                 "--text", str(empty), "--out", str(tmp_path / "x")], catch_exceptions=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.work").exists()


MADE_UP = "\n".join(f"zorva mil takku {w} venna lo {w}{w[::-1]} sa." for w in
                     ("bara", "kilu", "monte", "sivo", "tuuna", "wella", "yorri", "pesk")) + "\n"


def test_any_language_code_trains_given_its_text(assets, tmp_path, caplog):
    """Outside the catalogue: a well-formed ISO 639-3 code (here one from the local-use range) trains
    from --text; any other code trains with a warning; without --text it is a clear error."""
    import logging

    from compsft.errors import CompsftError
    from compsft.training import train_language_sft

    text = tmp_path / "qxy.txt"
    text.write_text(MADE_UP, encoding="utf-8")
    short = ["--k", "50", "--max-length", "32", "--save-steps", "0", "--cpu", "--logging-steps", "1", *steps(1, 1)]
    with caplog.at_level(logging.WARNING, logger="compsft"):
        run_cli(["train-language", "--model", assets["model"], "--lang", "qxy", "--text", text,
                 "--out", tmp_path / "qxy", *short])
    assert not [r for r in caplog.records if "ISO 639-3" in r.getMessage()]
    sft = compsft.load(tmp_path / "qxy")
    assert sft.config.language == "qxy" and sft.k == 50
    assert sft.config.training["text"] == [str(text)] and sft.config.training["excluded"] == []
    assert sft.config.training["corpus"]["kept"] == 8

    with caplog.at_level(logging.WARNING, logger="compsft"):
        tuner = train_language_sft(assets["model"], "Zorvish", tmp_path / "zorvish", text=[text], k=50,
                                   phase1=(None, 1, 1), phase2=(None, 1, 1), max_length=32, save_steps=0, cpu=True)
    assert tuner.sft.config.language == "Zorvish"
    assert [r for r in caplog.records if "'Zorvish' is not an ISO 639-3 code" in r.getMessage()]

    for lang in ("qxy", "Zorvish"):
        with pytest.raises(CompsftError, match="not in the catalogue.*give its raw text with --text"):
            CliRunner().invoke(app, ["train-language", "--model", str(assets["model"]), "--lang", lang,
                                     "--out", str(tmp_path / "none")], catch_exceptions=False)
        with pytest.raises(CompsftError, match="--text"):
            train_language_sft(assets["model"], lang, tmp_path / "none")
    assert not (tmp_path / "none").exists()
    # A catalogue language given by another name records its ISO 639-3 code and keeps its shipped
    # evaluation sentences out, also when the text is the user's.
    tuner = train_language_sft(assets["model"], "Maltese", tmp_path / "mlt", text=[text], k=50,
                               phase1=(None, 1, 1), phase2=(None, 1, 1), max_length=32, save_steps=0, cpu=True)
    assert tuner.sft.config.language == "mlt"
    assert any("UD_Maltese-MUDT" in p for p in tuner.sft.config.training["excluded"])


def _kill_run(args, phase, step):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COMPSFT_LOG_LEVEL": "WARNING"}
    proc = subprocess.run([sys.executable, str(HERE / "training_kill.py"), str(phase), str(step), "--",
                           *[str(a) for a in args]], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]


def test_resume_after_sigkill_matches_uninterrupted_run(assets):
    root = assets["root"]
    extra = ["--save-steps", "2"]
    run_cli(lang_args(assets, root / "whole", p1=6, p2=6, extra=extra))
    resumed = root / "resumed"
    args = lang_args(assets, resumed, p1=6, p2=6, extra=extra)
    _kill_run(args, phase=1, step=3)  # checkpoint-2 of phase 1 survives, step 3 is lost
    assert (root / "resumed.work" / "phase1" / "checkpoint-2").is_dir()
    assert not (root / "resumed.work" / "mask.safetensors").exists() and not resumed.exists()
    _kill_run(args + ["--resume"], phase=2, step=5)
    assert (root / "resumed.work" / "mask.safetensors").exists()
    assert (root / "resumed.work" / "phase2" / "checkpoint-4").is_dir() and not resumed.exists()
    run_cli(args + ["--resume"])
    whole, again = compsft.load(root / "whole"), compsft.load(resumed)
    assert again.config.training["phases"]["phase2"]["resumed_from"].endswith("checkpoint-4")
    assert_same_sft(whole, again)  # bit-identical


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_torchrun_two_processes_equal_single_process(assets):
    root = assets["root"]
    extra = ["--static-masking", "--save-steps", "4"]
    single = root / "single"
    run_cli(lang_args(assets, single, model="model_nodrop", extra=extra))
    ddp = root / "ddp"
    args = lang_args(assets, ddp, model="model_nodrop", extra=extra)
    args[args.index("--batch-size") + 1] = "4"  # 2 processes x 4 = the single run's 8
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COMPSFT_LOG_LEVEL": "INFO"}
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), str(ROOT / "cli.py"),
                           *[str(a) for a in args]], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "mask identical on all 2 ranks" in proc.stderr
    # Only rank 0 wrote: one SFT, no stray temporary directories.
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("ddp")) == ["ddp", "ddp.work"]
    # Phase 1 ends at the same θ1 within float tolerance (its last checkpoint holds it).
    from safetensors.torch import load_file

    t0 = load_file(str(assets["model_nodrop"] / "model.safetensors"))
    t1 = load_file(str(root / "single.work" / "phase1" / "checkpoint-4" / "model.safetensors"))
    t2 = load_file(str(root / "ddp.work" / "phase1" / "checkpoint-4" / "model.safetensors"))
    diff = sum(float(((t1[n] - t2[n]) ** 2).sum()) for n in t0)
    moved = sum(float(((t1[n] - t0[n]) ** 2).sum()) for n in t0)
    assert diff ** 0.5 < 0.02 * moved ** 0.5
    a, b = compsft.load(single), compsft.load(ddp)
    assert b.config.training["world_size"] == 2 and a.k == b.k == 400
    # Float-level differences (the all-reduce sums in another order) could swap an entry at the
    # selection threshold; allow 2%. Everywhere else the values agree within float tolerance.
    common = 0
    for n in a.diffs:
        ia, ib = a.diffs[n].indices.long(), b.diffs[n].indices.long()
        both, pa, pb = _intersect(ia, ib)
        common += both.numel()
        assert torch.allclose(a.diffs[n].values[pa], b.diffs[n].values[pb], atol=1e-6, rtol=0), n
    assert common >= 0.98 * a.k
    for n in a.dense:
        assert torch.allclose(a.dense[n], b.dense[n], atol=1e-5, rtol=0), n


def _free_port() -> int:
    """A port nothing listens on now (a fixed one collides when two test runs share the machine)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _intersect(a, b):
    both = a[torch.isin(a, b)]
    return both, torch.searchsorted(a, both), torch.searchsorted(b, both)


def test_dev_lines_are_held_out_and_scored_before_and_after(assets, tmp_path):
    """--dev-lines N: the last N lines never reach training; the MLM loss on them is recorded before and
    after, beside the training text's unigram entropy (what a frequency-only predictor scores)."""
    import math
    from collections import Counter

    from transformers import AutoTokenizer

    from compsft.training.recipes import unigram_entropy

    text = write_text_corpus(tmp_path / "text.txt", n=40, seed=3)
    lines = text.read_text(encoding="utf-8").splitlines()
    assert len(set(lines)) == 40  # no duplicates: the corpus keeps every line, in order
    result = run_cli(["train-language", "--model", assets["model"], "--lang", "mlt", "--text", text,
                      "--out", tmp_path / "sft", "--k", "400", "--max-length", "32", "--save-steps", "0", "--cpu",
                      "--lr", "1e-2", "--dev-lines", "10", *steps(3, 3)])
    dev = compsft.load(tmp_path / "sft").config.training["dev_mlm"]
    assert dev["lines"] == 10 and "held-out lines" in result.output
    assert all(math.isfinite(dev[k]) and dev[k] > 0 for k in ("loss_before", "loss_after", "unigram_entropy")), dev
    assert dev["loss_after"] != dev["loss_before"]
    tok = AutoTokenizer.from_pretrained(assets["model"])
    counts = Counter(i for ids in tok(lines[:30], add_special_tokens=False)["input_ids"] for i in ids)
    total = sum(counts.values())
    expected = -sum(c / total * math.log(c / total) for c in counts.values())
    assert dev["unigram_entropy"] == round(expected, 4) == round(unigram_entropy(tok, lines[:30]), 4)

    from compsft.errors import CompsftError
    from compsft.training import train_language_sft

    with pytest.raises(CompsftError, match="dev_lines 40 leaves nothing to train on"):
        train_language_sft(assets["model"], "mlt", tmp_path / "x", text=[text], dev_lines=40, k=50)
