"""`compsft demo --quick` end to end (the default model, the shipped data), and the demo's pieces."""
from __future__ import annotations

import json
import math

import pytest

from compsft.errors import CompsftError


def test_resolve_target_defaults_and_errors():
    from compsft.demo import resolve_target

    assert resolve_target("pos", None) == ("wol", "ud:wo_wtb:test")
    assert resolve_target("dep", "Maltese") == ("mlt", "ud:mt_mudt:test")
    assert resolve_target("ner", "ha") == ("hau", "ner:masakhaner:hau:test")
    with pytest.raises(CompsftError, match="no shipped pos test set"):
        resolve_target("pos", "hau")
    with pytest.raises(CompsftError, match="unknown task"):
        resolve_target("srl", None)


def test_presets_are_complete():
    from compsft.demo import PRESETS, DemoConfig

    assert set(PRESETS) == {"quick", "default", "paper"}
    assert DemoConfig(preset="quick").resolved_budget() is PRESETS["quick"]
    with pytest.raises(CompsftError, match="unknown preset"):
        DemoConfig(preset="huge").resolved_budget()


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    from typer.testing import CliRunner

    from compsft.cli import app

    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "LT-SFT" in result.output and "full fine-tuning" in result.output

    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["settings"]["task"] == "pos" and report["settings"]["target"] == "wol"
    assert report["settings"]["preset"] == "quick"
    for split in ("target", "source_dev"):
        assert set(report["results"][split]) == {"lt-sft", "task-sft-only", "full-ft"}
        for metrics in report["results"][split].values():
            assert 0.0 <= metrics["accuracy"] <= 1.0 and not math.isnan(metrics["accuracy"])
    assert report["data"]["test"]["sentences"] == 30
    for key in ("language:eng", "language:wol", "task:pos"):
        sft = report["sfts"][key]
        assert 0 < sft["k"] < sft["num_eligible"] and 0 < sft["density"] < 0.2
        assert (out / sft["path"] / "sft.safetensors").is_file()
    assert report["sfts"]["full-ft"]["steps"] == 6  # as many steps as the task SFT's two phases
    assert set(report["stages"]) >= {"prepare model", "language SFT eng", "language SFT wol", "evaluate SFTs"}
    assert report["machine"]["cpu_count"] >= 1 and report["total_seconds"] > 0

    png = (out / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    preds = sorted(p.name for p in (out / "predictions").iterdir())
    assert "wol-test.lt-sft.conllu" in preds and "wol-test.full-ft.conllu" in preds

    # The composed SFT reproduces the LT-SFT predictions through the public API.
    import compsft

    composed = compsft.load(out / "sfts" / "wol-pos-composed")
    assert composed.config.kind == "composed" and composed.dense  # the task head travels with it


def test_bad_device_fails_before_any_work(tmp_path):
    from compsft.demo import DemoConfig, run_demo

    with pytest.raises(CompsftError, match="use cpu or cuda"):
        run_demo(DemoConfig(out=str(tmp_path / "x"), device="cuda:1", preset="quick"))
    assert not (tmp_path / "x").exists()
