"""Issue 26's "done when": from training to a tagged CoNLL-U file of one's own raw text, with the real
commands: train a language SFT and a task SFT (a few steps, a tiny model, shipped UD English), compose
them, predict raw text, read the file back with `conllu`."""
from __future__ import annotations

import conllu
import pytest
from typer.testing import CliRunner

from compsft.cli import app
from compsft.tasks.pos import UPOS

from training_helpers import make_model_dir, write_text_corpus

STEPS = ["--phase1-epochs", "1", "--phase1-min-steps", "2", "--phase1-max-steps", "2",
         "--phase2-epochs", "1", "--phase2-min-steps", "2", "--phase2-max-steps", "2"]
TEXT = "Il-kelb qiegħed jorqod fuq il-bieb. It-tifel kiel il-ħobż!\nOmm u missier marru d-dar.\n"


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.slow
def test_train_compose_predict_raw_text(tmp_path):
    model = make_model_dir(tmp_path / "model")
    common = ["--max-length", "32", "--batch-size", "8", "--save-steps", "0", "--cpu", *STEPS]
    cli("train-language", "--model", model, "--lang", "mlt", "--text", write_text_corpus(tmp_path / "mt.txt"),
        "--out", tmp_path / "sfts/mlt", "--k", "400", *common)
    cli("train-task", "--task", "pos", "--model", model, "--train", "ud:en_ewt:train", "--max-sentences", "24",
        "--out", tmp_path / "sfts/pos", "--k", "300", *common)
    cli("compose", "--base", model, "--sft", tmp_path / "sfts/mlt", "--sft", tmp_path / "sfts/pos",
        "--out", tmp_path / "merged")
    (tmp_path / "my-text.txt").write_text(TEXT, encoding="utf-8")
    cli("predict", "--task", "pos", "--model", tmp_path / "merged", "--input", tmp_path / "my-text.txt",
        "--out", tmp_path / "my-text.conllu", "--device", "cpu")

    sentences = conllu.parse((tmp_path / "my-text.conllu").read_text(encoding="utf-8"))
    assert [s.metadata["text"] for s in sentences] == ["Il-kelb qiegħed jorqod fuq il-bieb.", "It-tifel kiel il-ħobż!",
                                                       "Omm u missier marru d-dar."]
    assert [t["form"] for t in sentences[1]] == ["It-tifel", "kiel", "il-ħobż", "!"]
    assert all(t["upos"] in UPOS for s in sentences for t in s)
    # The merged model and the SFTs applied on the fly tag alike.
    cli("predict", "--task", "pos", "--model", model, "--sft", tmp_path / "sfts/mlt", "--sft", tmp_path / "sfts/pos",
        "--input", tmp_path / "my-text.txt", "--out", tmp_path / "on-the-fly.conllu", "--device", "cpu")
    assert (tmp_path / "on-the-fly.conllu").read_text(encoding="utf-8") == \
        (tmp_path / "my-text.conllu").read_text(encoding="utf-8")
