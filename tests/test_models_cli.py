"""`compsft prepare-model` gives the model directory whole where a script and a person can take it: alone on
stdout (`M=$(compsft prepare-model)`), with the summary table on stderr (issue 26, found on the way)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import compsft.models
from compsft.cli import app
from compsft.models.convert import INFO_FILE

ROOT = Path(__file__).resolve().parents[1]


def _fake_model(tmp_path: Path) -> Path:
    # Deeper than 80 columns, as the real cache path is: a table cut at the terminal's width loses its end.
    path = tmp_path / ("very-long-directory-name-" * 4) / "multilingual-e5-small-f47f504a61-trimmed"
    path.mkdir(parents=True)
    info = {"vocab": {"size": 61530, "sha256": "d42dbb644fa8ca45" * 4}, "pieces_full": 250002,
            "parameters": 45329370, "parameters_full": 117891090}
    (path / INFO_FILE).write_text(json.dumps(info), encoding="utf-8")
    return path


@pytest.fixture
def fake_default(tmp_path, monkeypatch):
    path = _fake_model(tmp_path)
    monkeypatch.setattr(compsft.models, "default_model_dir", lambda trimmed=True, force=False: path)
    return path


def test_prepare_model_prints_the_whole_path_alone_on_stdout(fake_default):
    result = CliRunner().invoke(app, ["prepare-model"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{fake_default.resolve()}\n"
    assert "default model" in result.stderr and "61,530" in result.stderr


def test_prepare_model_out_prints_the_copy(fake_default, tmp_path):
    out = tmp_path / "copy"
    result = CliRunner().invoke(app, ["prepare-model", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{out.resolve()}\n"
    assert (out / INFO_FILE).is_file()


@pytest.mark.skipif(os.name != "posix", reason="a POSIX shell")
def test_shell_takes_the_path_from_the_real_command(tmp_path):
    """The real console script in a shell, as README shows it: `M=$(compsft prepare-model)` is a directory.
    Uses the default model's cache (prepared once by the other tests and README's pipeline)."""
    compsft_bin = Path(sys.executable).with_name("compsft")
    script = f'M=$("{compsft_bin}" prepare-model) && test -f "$M/config.json" && echo "$M"'
    out = subprocess.run(["sh", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "COLUMNS": "80"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip()).is_dir()
