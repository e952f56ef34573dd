"""bench/predict_speed.py runs (in --quick mode: a tiny random model, 40 sentences), so that it cannot rot.
Its figures are not checked here: speed and memory come from the script itself, never from a timed test."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "predict_speed.py"


@pytest.mark.slow
def test_predict_speed_quick_runs(capsys):
    spec = importlib.util.spec_from_file_location("predict_speed", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick"])
    out = capsys.readouterr().out
    for task in ("pos", "dep", "ner"):
        assert re.search(rf"compsft predict {task}: 40 sentences .* sentences/s", out), out
    assert re.search(r"transformers.pipeline\('token-classification'\) pos: 40 sentences", out), out
    assert re.search(r"ratio compsft pos / pipeline: [0-9.]+x", out), out
    assert re.search(r"memory pos 10x: 100 sentences", out), out
    assert re.search(r"ratio peak while predicting 10x / 1x: [0-9.]+", out), out
