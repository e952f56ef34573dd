"""`compsft demo --quick` end to end: `compare` with the demo preset on the default model and shipped data."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from compsft.errors import CompsftError


def test_demo_preset():
    from compsft.compare.presets import DEMO_METHODS, demo_config

    cfg = demo_config()
    assert (cfg.task, list(cfg.targets), list(cfg.methods), list(cfg.seeds), cfg.budget) == \
        ("pos", ["wol"], list(DEMO_METHODS), [42], "cpu")
    assert list(DEMO_METHODS) == ["lt-sft", "task-sft-only", "full-ft"]
    assert demo_config(task="ner").targets == ["hau"]
    assert demo_config(task="dep", target="mlt", budget="quick").targets == ["mlt"]


def test_demo_has_no_training_code_of_its_own():
    import compsft.commands.demo as demo

    source = Path(demo.__file__).read_text(encoding="utf-8")
    for word in ("Trainer", "train_language_sft", "train_task_sft", "SparseFineTuner", "apply("):
        assert word not in source
    for gone in ("demo.py", "demo_stages.py"):
        assert not (Path(demo.__file__).parents[1] / gone).exists()


def test_quick_and_paper_exclude_each_other(tmp_path):
    from typer.testing import CliRunner

    from compsft.cli import app

    result = CliRunner().invoke(app, ["demo", "--quick", "--paper", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and isinstance(result.exception, CompsftError)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    from typer.testing import CliRunner

    from compsft.cli import app

    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, (result.output, result.exception)
    for method in ("lt-sft", "task-sft-only", "full-ft"):
        assert method in result.output

    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    s = results["settings"]
    assert (s["task"], [t["code"] for t in s["targets"]], s["budget"]["name"], s["seeds"]) == \
        ("pos", ["wol"], "quick", [42])
    assert results["test_sentences"] == {"wol": 30}
    cells = {c["method"]: c for c in results["cells"]}
    assert set(cells) == {"lt-sft", "task-sft-only", "full-ft"}
    for c in cells.values():
        assert c["status"] == "ok", c.get("error")
        for variant in ("fixed", "dev_selected"):
            acc = c["metrics"][variant]["accuracy"]
            assert 0.0 <= acc <= 1.0 and not math.isnan(acc)
    # task-sft-only evaluates lt-sft's task SFT: one task module, trained once
    assert cells["task-sft-only"]["modules"]["task"] == cells["lt-sft"]["modules"]["task"]
    assert "target_language" in cells["lt-sft"]["modules"] and "target_language" not in cells["full-ft"]["modules"]
    sizes = {m: results["methods"][m]["trainable"] for m in cells}
    assert sizes["task-sft-only"] < sizes["lt-sft"] < sizes["full-ft"]
    for name in ("results.md", "results.csv"):
        assert (out / name).is_file()
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The recorded LT-SFT score is what a user gets from the modules through the public API:
    # θ0 + target language SFT (no MLM head) + task SFT (with its head), evaluated on the same sentences.
    import compsft
    from compsft.tasks import data_path, get_task
    from transformers import AutoTokenizer

    lt = cells["lt-sft"]["modules"]
    lang = compsft.load(out / lt["target_language"]["dir"] / "module")
    task = compsft.load(out / lt["task"]["dir"] / "module")
    labels = task.config.training["labels"]
    pos = get_task("pos")
    model = pos.build_model(s["model"], labels)
    compsft.apply(model, lang, task, with_dense=[False, True])
    gold = pos.prepare_gold(pos.read(data_path("ud:wo_wtb:test"))[:30], labels)
    metrics, _ = pos.evaluate(model, AutoTokenizer.from_pretrained(s["model"]), gold, labels)
    assert metrics["accuracy"] == pytest.approx(cells["lt-sft"]["metrics"]["fixed"]["accuracy"], abs=1e-9)

    # Running it again recomputes nothing (--resume), and without --resume it refuses to overwrite.
    again = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "--device", "cpu", "--resume"])
    assert again.exit_code == 0, (again.output, again.exception)
    assert json.loads((out / "results.json").read_text())["cells"] == results["cells"]
    refused = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "--device", "cpu"])
    assert refused.exit_code != 0 and "pass --resume" in str(refused.exception)
