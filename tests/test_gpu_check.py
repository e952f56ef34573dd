"""bench/gpu_check.py runs on the CPU (`--device cpu --quick`), so the command prepared for the first GPU
cannot rot; and its checks can fail."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from training_helpers import make_model_dir

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    model = make_model_dir(tmp / "model")
    out = tmp / "report.json"
    rc = gpu_check.main(["--device", "cpu", "--quick", "--model", str(model), "--methods", "lt-sft,full-ft",
                         "--out", str(out)])
    return rc, json.loads(out.read_text())


def test_quick_cpu_run_passes_every_check(quick_report):
    rc, report = quick_report
    assert rc == 0 and report["ok"], json.dumps(report, indent=1)[:3000]
    assert set(report["sections"]) == {"core", "apply", "selection", "training"}
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["device_memory_gib"] > 0
    core = report["sections"]["core"]
    for dtype in ("fp32", "bf16", "fp16"):
        assert core[dtype]["revert_bit_exact"] and core[dtype]["base_fingerprint_matches"] and core[dtype]["compose_ok"]
    assert core["bf16"]["values_dtype"] == "torch.bfloat16"
    assert core["compose_cli"]["same_bits"]
    apply = report["sections"]["apply"]
    assert apply["yardstick_s"] > 0 and apply["ratio"] > 0
    sel = report["sections"]["selection"]
    assert sel["ok"] and sel["extra_peak_gib"] >= 0


def test_quick_cpu_run_measures_every_method_and_estimates_the_paper_budget(quick_report):
    _, report = quick_report
    training = report["sections"]["training"]
    runs = {(m["method"], m["precision"]): m for m in training["methods"]}
    assert set(runs) == {("lt-sft", "bf16"), ("lt-sft", "fp32"), ("full-ft", "bf16"), ("full-ft", "fp32")}
    for m in runs.values():
        assert m["ok"] and m["task"]["steps"] >= 2 and m["task"]["steps_per_s"] > 0 and m["task"]["peak_gib"] > 0
        assert m["evaluate"]["sentences"] > 0
    assert runs[("lt-sft", "bf16")]["language"]["steps"] == 4  # 2 + 2 steps: both phases timed
    est = training["paper_estimate"]
    assert est["task_steps"] > 0 and set(est["language_steps"]) == {"eng", "wol", "mlt"}
    assert est["methods"]["lt-sft fp32"]["hours_3_seeds"] > est["methods"]["full-ft fp32"]["hours_3_seeds"] > 0


def test_cuda_asked_without_cuda_is_a_clear_exit(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    assert gpu_check.main(["--device", "cuda", "--out", str(tmp_path / "r.json")]) == gpu_check.NO_CUDA
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "--device cpu --quick" in err
    assert not (tmp_path / "r.json").exists()


def test_a_failing_section_is_reported_and_the_others_run():
    report = {"quick": True, "sections": {}}

    def boom():
        raise RuntimeError("kernel image not found")

    gpu_check.run_section(report, "selection", boom)
    gpu_check.run_section(report, "ddp", lambda: {"ok": True, "rows": [("2 processes", "ok", "")]})
    assert report["sections"]["selection"]["ok"] is False
    rows = gpu_check.summary_rows(report)
    assert ("selection", "FAILED", "RuntimeError: kernel image not found") in rows
    assert ("ddp: 2 processes", "ok", "") in rows


def test_digest_sees_one_flipped_bit():
    model = torch.nn.Linear(3, 2)
    before = gpu_check.digest(model)
    with torch.no_grad():
        model.weight.view(-1).view(torch.int32)[1] ^= 1  # the last bit of one weight
    assert gpu_check.digest(model) != before


def test_revert_that_is_not_exact_fails_the_core_check(tmp_path, monkeypatch):
    """A revert that subtracts (drifting in the last bits, as the reference does) must turn the check red."""
    import compsft
    import compsft.merge as merge

    def subtracting_revert(model, handle=None):
        handle = merge._STACKS[model].pop()
        with torch.no_grad():
            for t in handle.touched:
                if t.indices is not None:
                    flat = t.param.data.view(-1)
                    flat.index_copy_(0, t.indices, flat.index_select(0, t.indices) * (1 + 2 ** -20))

    monkeypatch.setattr(compsft, "revert", subtracting_revert)
    result = gpu_check.core("cpu", True, tmp_path)
    assert not result["ok"] and not result["fp32"]["revert_bit_exact"]


# -- experiments/paper_budget.sh ------------------------------------------------------------------------

def _paper_budget(*args, timeout=600):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(ROOT / "experiments" / "paper_budget.sh"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_paper_budget_quick_writes_its_results_page_and_resumes(tmp_path):
    """The science run's script, at the quick budget on a tiny model: the grid of the four methods on wol and mlt,
    its results page, and a --resume that trains nothing again (about 45 s of one core: two runs of the CLI)."""
    model = make_model_dir(tmp_path / "model")
    out, page = tmp_path / "grid", tmp_path / "paper-budget.md"
    args = ["--quick", "--model", model, "--out", out, "--results", page, "--device", "cpu"]
    run = _paper_budget(*args)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["budget"]["name"] == "quick" and results["settings"]["seeds"] == [42]
    assert [c["status"] for c in results["cells"]] == ["ok"] * 8, results["failed"]
    text = page.read_text()
    assert text.startswith("# LT-SFT at the paper's budget") and "budget `quick`" in text
    for method in ("lt-sft", "task-sft-only", "task-sft-no-source", "full-ft"):
        assert f"| {method} |" in text
    again = _paper_budget(*args, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "8 already done" in again.stdout + again.stderr
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert [line for line in page.read_text().splitlines() if line.startswith("| ")] == rows  # the same tables


def test_paper_budget_refuses_what_it_does_not_know(tmp_path):
    bad = _paper_budget("--bogus")
    assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr
    missing = _paper_budget("--model", tmp_path / "nope")
    assert missing.returncode == 2 and "no such directory" in missing.stderr


def test_compose_device_option_refuses_a_device_it_cannot_use(tmp_path):
    from typer.testing import CliRunner

    from compsft.cli import app
    from compsft.errors import CompsftError

    cb = gpu_check.bench_module("compose")
    cb.SIZES.setdefault("tiny", gpu_check.TINY)
    model = cb.random_model("tiny", "cpu")
    model.save_pretrained(tmp_path / "base")
    cb.random_sft(model, 500, seed=1).save(tmp_path / "sft")
    args = ["compose", "--base", str(tmp_path / "base"), "--sft", str(tmp_path / "sft"), "--out", str(tmp_path / "m")]
    bad = ["tpu"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad:
        r = CliRunner().invoke(app, [*args, "--device", device])
        assert isinstance(r.exception, CompsftError) and "--device" in str(r.exception), (device, r.output)
    assert not (tmp_path / "m").exists()
    assert CliRunner().invoke(app, [*args, "--device", "cpu"]).exit_code == 0 and (tmp_path / "m").is_dir()
