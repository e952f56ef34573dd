"""The compare harness with fake, fast methods (no training: they write tiny module files, and their models
are tiny random BERT taggers, deterministic per module), and one real quick run with the real methods."""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import pytest

from compsft.errors import CompsftError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

UPOS = ["ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN", "PUNCT",
        "SCONJ", "SYM", "VERB", "X"]
#: (what, method key, language or task, seed) -> calls, for the caching tests
CALLS: Counter = Counter()


#: with this set, the fakes append "start|end <module> <pid> <time>" lines to that file (workers are processes)
TRAIN_LOG = "COMPSFT_TEST_TRAIN_LOG"


def log_training(module: str, sleep: float) -> None:
    path = os.environ.get(TRAIN_LOG)
    if path:
        with open(path, "a") as f:
            f.write(f"start {module.replace(' ', '/')} {os.getpid()} {time.time()}\n")
    slow = os.environ.get("COMPSFT_TEST_SLOW")  # this one module sleeps a minute (to be interrupted)
    time.sleep(60 if slow and module.replace(' ', '/') == slow else sleep)
    if path:
        with open(path, "a") as f:
            f.write(f"end {module.replace(' ', '/')} {os.getpid()} {time.time()}\n")


def fake_method(name: str, *, language: bool = True, language_key: str = "", task_key: str = "",
                uses_target_language: bool = True, fail_on: str | None = None, sleep: float = 0.0,
                selected_step: int | None = None):
    """A MethodSpec that trains nothing. `fail_on`: assembling for that target raises. `selected_step`: the
    task module records a dev selection at that step of 3."""
    from compsft.methods import DEV_SELECTED, MethodSpec, ModuleInfo

    def train_language(ctx, data, seed, out):
        CALLS["language", language_key or name, data.code, seed] += 1
        out.mkdir(parents=True)  # before the work: a kill leaves a partial module behind
        log_training(f"language {language_key or name} {data.code} {seed}", sleep)
        (out / "language.json").write_text(json.dumps({"code": data.code, "seed": seed,
                                                       "texts": [str(p) for p in data.texts],
                                                       "exclude": [str(p) for p in data.exclude]}))
        return ModuleInfo(trainable=100, stored_bytes=400, seconds=0.5)

    def train_task(ctx, data, source_dir, seed, out):
        CALLS["task", task_key or name, data.task, seed] += 1
        out.mkdir(parents=True)
        log_training(f"task {task_key or name} {data.task} {seed}", sleep)
        labels = UPOS  # reading the 4,000 training sentences would take seconds
        (out / "labels.json").write_text(json.dumps(labels))
        (out / "source.txt").write_text(str(source_dir))
        # what the assembled model is seeded by: the module's own content, never a path (paths differ per machine)
        (out / "fake.json").write_text(json.dumps({"key": task_key or name, "seed": seed, "variant": "fixed"}))
        if ctx.budget.dev_checks:
            (out / DEV_SELECTED).mkdir()
            (out / DEV_SELECTED / "labels.json").write_text(json.dumps(labels))
            (out / DEV_SELECTED / "fake.json").write_text(
                json.dumps({"key": task_key or name, "seed": seed, "variant": "dev-selected"}))
        extra = {"labels": len(labels)}
        if selected_step is not None:
            extra["dev_selected"] = {"metric": "accuracy", "step": selected_step, "score": 0.5, "of_steps": 3}
        return ModuleInfo(trainable=1000, stored_bytes=4000, seconds=1.5, extra=extra)

    def assemble(ctx, task_dir, language_dir):
        import torch

        from compsft.tasks import get_task

        CALLS["assemble", name] += 1
        if fail_on and language_dir is not None and json.loads(
                (language_dir / "language.json").read_text())["code"] == fail_on:
            raise RuntimeError(f"{name} cannot assemble {fail_on}")
        labels = json.loads((task_dir / "labels.json").read_text())
        # A model that depends on the modules' content only: deterministic per cell on every machine.
        language = json.loads((language_dir / "language.json").read_text()) if language_dir else {}
        key = (task_dir / "fake.json").read_text() + "|" + f"{language.get('code')}-{language.get('seed')}"
        torch.manual_seed(zlib.crc32(key.encode()))
        model = get_task("pos").build_model(ctx.model_dir, labels)
        return model.to(ctx.device), labels

    return MethodSpec(name=name, description=f"fake {name}", composition="task" + (" + language" if language else ""),
                      train_task=train_task, assemble=assemble,
                      parameter_counts=lambda ctx, task: {"trainable": 1100 if language else 1000,
                                                          "stored_bytes": 4400},
                      train_language=train_language if language else None, uses_target_language=uses_target_language,
                      language_key=language_key, task_key=task_key)


FAKES = {
    "fake-a": dict(),
    "fake-b": dict(language_key="fake-a", task_key="fake-a"),  # shares fake-a's modules
    "fake-c": dict(language=False),
    "fake-fail": dict(fail_on="mlt"),
}


def register_fakes(sleep: float = 0.0) -> None:
    from compsft.methods import register_method

    for name, kw in FAKES.items():
        register_method(fake_method(name, sleep=sleep, **kw), replace=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from training_helpers import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("cmp_model") / "model")


@pytest.fixture(autouse=True)
def fakes():
    from compsft.methods import unregister_method

    register_fakes()
    CALLS.clear()
    yield
    for name in FAKES:
        unregister_method(name)


def tiny_budget(**changes):
    import dataclasses

    from compsft.compare import get_budget

    return dataclasses.replace(get_budget("quick"), eval_sentences=6, **changes)


def config(model_dir, out, **kw):
    from compsft.compare import CompareConfig

    base = dict(task="pos", targets=["wol", "mlt"], methods=["fake-a", "fake-c"], seeds=2, budget=tiny_budget(),
                model=str(model_dir), out=str(out), device="cpu")
    base.update(kw)
    return CompareConfig(**base)


def run(cfg):
    from compsft.compare import NullReporter, compare

    return compare(cfg, NullReporter())


def strip_times(data):
    """results.json without what differs between two runs of the same grid (times, the machine's load)."""
    if isinstance(data, dict):
        return {k: strip_times(v) for k, v in data.items()
                if k not in ("times", "machine") and "seconds" not in k}
    if isinstance(data, list):
        return [strip_times(v) for v in data]
    return data


# -- caching and sharing ------------------------------------------------------------------------------
def test_second_run_recomputes_nothing(model_dir, tmp_path):
    out = tmp_path / "cmp"
    first = run(config(model_dir, out))
    assert [c["status"] for c in first["cells"]] == ["ok"] * 8
    trained = dict(CALLS)
    # fake-a: eng and both targets per seed, one task module per seed; fake-c: a task module per seed only
    assert trained[("language", "fake-a", "eng", 42)] == 1 and trained[("language", "fake-a", "wol", 43)] == 1
    assert trained[("task", "fake-a", "pos", 42)] == 1 and trained[("task", "fake-c", "pos", 43)] == 1
    assert sum(v for k, v in trained.items() if k[0] == "language") == 6
    assert sum(v for k, v in trained.items() if k[0] == "task") == 4
    # fixed budget and the dev-selected module: two assemblies per cell
    assert trained[("assemble", "fake-a")] == 8 and trained[("assemble", "fake-c")] == 8

    second = run(config(model_dir, out, resume=True))
    assert dict(CALLS) == trained  # nothing trained, nothing assembled again
    assert strip_times(second["cells"]) == strip_times(first["cells"])


def test_methods_with_the_same_key_share_modules(model_dir, tmp_path):
    results = run(config(model_dir, tmp_path / "cmp", methods=["fake-a", "fake-b"], seeds=1))
    assert CALLS[("language", "fake-a", "wol", 42)] == 1 and CALLS[("task", "fake-a", "pos", 42)] == 1
    assert sum(v for k, v in CALLS.items() if k[0] in ("language", "task")) == 4  # eng, wol, mlt, task
    cells = {(c["method"], c["target"]): c for c in results["cells"]}
    assert cells["fake-a", "wol"]["modules"] == cells["fake-b", "wol"]["modules"]
    # the same modules and the same (deterministic) assembly: the same scores
    assert cells["fake-a", "wol"]["metrics"] == cells["fake-b", "wol"]["metrics"]


def test_a_selection_of_the_final_step_reuses_the_fixed_score(model_dir, tmp_path):
    """Dev selection that kept the last step selected the fixed module itself: scored once, not twice."""
    from compsft.methods import register_method, unregister_method

    register_method(fake_method("fake-final", language=False, selected_step=3))
    register_method(fake_method("fake-early", language=False, selected_step=2))
    try:
        results = run(config(model_dir, tmp_path / "cmp", methods=["fake-final", "fake-early"], seeds=1))
    finally:
        unregister_method("fake-final")
        unregister_method("fake-early")
    assert CALLS[("assemble", "fake-final")] == 2 and CALLS[("assemble", "fake-early")] == 4  # two targets
    cells = {(c["method"], c["target"]): c for c in results["cells"]}
    for target in ("wol", "mlt"):
        final, early = cells["fake-final", target], cells["fake-early", target]
        assert final["dev_selected_is_final"] and not early["dev_selected_is_final"]
        assert final["metrics"]["dev_selected"] == final["metrics"]["fixed"]
        # the early selection is another module (the fake's assembly depends on its directory): another score
        assert early["metrics"]["dev_selected"] != early["metrics"]["fixed"]


def test_language_modules_get_text_and_the_evaluation_files_to_exclude(model_dir, tmp_path):
    from compsft.tasks import data_path

    out = tmp_path / "cmp"
    run(config(model_dir, out, seeds=1, methods=["fake-a"]))
    modules = sorted((out / "modules" / "language" / "fake-a").glob("wol-seed42-*/module/language.json"))
    assert len(modules) == 1
    lang = json.loads(modules[0].read_text())
    assert lang["texts"] and all(Path(p).is_file() for p in lang["texts"])
    for name in ("ud:wo_wtb:test", "ud:mt_mudt:test", "ud:en_ewt:dev"):  # every target's test set, source dev
        assert str(data_path(name).resolve()) in lang["exclude"]


def test_modules_are_keyed_by_their_own_budget_fields_text_bytes_and_source_module(model_dir, tmp_path):
    """A budget that differs in task fields (the per-task budgets) reuses language modules; a text edited
    in place, or another language field, trains a new one, and so a new task module on the new source
    module; a task module trained without a source module (`fake-c`, as full fine-tuning) is reused."""
    text = tmp_path / "own.txt"
    text.write_text("Jamm nga fanaane ?\nMaa ngi fi rekk .\n", encoding="utf-8")
    cache = tmp_path / "modules"

    def grid(out, **budget):
        run(config(model_dir, tmp_path / out, methods=["fake-a", "fake-c"], seeds=1, module_cache=str(cache),
                   targets=[f"own=ud:wo_wtb:test:{text}"], budget=tiny_budget(**budget)))
        return CALLS[("language", "fake-a", "own", 42)], CALLS[("language", "fake-a", "eng", 42)], \
            CALLS[("task", "fake-a", "pos", 42)], CALLS[("task", "fake-c", "pos", 42)]

    assert grid("a") == (1, 1, 1, 1)
    assert grid("b", task_lr=5e-3, task_steps=5) == (1, 1, 2, 2)  # task fields: only the task modules are new
    text.write_text("Jamm nga fanaane ?\n", encoding="utf-8")
    assert grid("c") == (2, 1, 2, 2)  # the same path with other bytes: a new language module
    # a language field: new language modules, so a new task module on the new English one; fake-c's is kept
    assert grid("d", lang_lr=5e-3, lang_steps=3) == (3, 2, 3, 2)


def test_grids_of_other_targets_share_a_language_module_unless_their_evaluation_files_drop_its_lines(
        model_dir, tmp_path):
    """Another target set brings other evaluation files into the leakage filter; a language module is trained
    again only where they drop lines of its text, since only then does it train on other lines."""
    from compsft.languages import iter_corpus_lines
    from compsft.tasks import data_path

    maltese = next(s for s in iter_corpus_lines([data_path("ud:mt_mudt:test")]) if len(s) > 40)
    text = tmp_path / "own.txt"
    text.write_text(f"Jamm nga fanaane ?\n{maltese}\nMaa ngi fi rekk .\n", encoding="utf-8")
    cache = tmp_path / "modules"

    def grid(out, other):
        run(config(model_dir, tmp_path / out, methods=["fake-a"], seeds=1, module_cache=str(cache),
                   targets=[f"own=ud:wo_wtb:test:{text}", other]))
        return CALLS[("language", "fake-a", "own", 42)], CALLS[("language", "fake-a", "eng", 42)]

    assert grid("a", "wol") == (1, 1)
    assert grid("b", "glv") == (1, 1)  # Manx files drop nothing from either text: both modules reused
    assert grid("c", "mlt") == (2, 1)  # the Maltese test sentence leaves `own`'s text: a new module


def test_task_modules_are_keyed_by_the_source_data_bytes(model_dir, tmp_path):
    """Training data edited in place trains a new task module (and no new language module)."""
    from training_helpers import first_sentences

    from compsft.compare import SourceSpec

    train = first_sentences("ud:en_ewt:train", 6, tmp_path / "train.conllu")
    cache = tmp_path / "modules"

    def grid(out):
        run(config(model_dir, tmp_path / out, methods=["fake-a"], seeds=1, targets=["wol"], module_cache=str(cache),
                   source=SourceSpec(train=str(train))))
        return CALLS[("language", "fake-a", "eng", 42)], CALLS[("task", "fake-a", "pos", 42)]

    assert grid("a") == (1, 1)
    assert grid("b") == (1, 1)
    first_sentences("ud:en_ewt:train", 5, train)
    assert grid("c") == (1, 2)


def test_per_task_budgets_change_task_fields_only(model_dir, tmp_path):
    from compsft.compare import CompareConfig
    from compsft.compare.budgets import BUDGETS, TASK_CHANGES, get_budget, language_budget
    from compsft.compare.config import resolve

    for name, tasks in TASK_CHANGES.items():
        for task, changes in tasks.items():
            assert changes and not any(k.startswith("lang_") for k in changes), (name, task)
            assert language_budget(get_budget(name, task)) == language_budget(get_budget(name))
            assert get_budget(name, task) != BUDGETS[name]
    assert get_budget("cpu", "pos") == BUDGETS["cpu"]
    for task in ("pos", "dep", "ner"):  # what a grid trains with
        grid = resolve(CompareConfig(task=task, budget="cpu", model=str(model_dir), out=str(tmp_path / task)))
        assert grid.budget == get_budget("cpu", task) and grid.budget_name == "cpu"


# -- failures -----------------------------------------------------------------------------------------
def test_a_failing_cell_is_recorded_and_the_grid_goes_on(model_dir, tmp_path):
    out = tmp_path / "cmp"
    results = run(config(model_dir, out, methods=["fake-fail", "fake-c"], seeds=1))
    status = {(c["method"], c["target"]): c["status"] for c in results["cells"]}
    assert status == {("fake-fail", "wol"): "ok", ("fake-fail", "mlt"): "failed",
                      ("fake-c", "wol"): "ok", ("fake-c", "mlt"): "ok"}
    failed = next(c for c in results["cells"] if c["status"] == "failed")
    assert "cannot assemble mlt" in failed["error"] and "Traceback" in failed["traceback"]
    assert (out / "cells" / "fake-fail" / "mlt" / "seed42.failed.json").is_file()
    assert not (out / "cells" / "fake-fail" / "mlt" / "seed42.json").exists()
    assert "cannot assemble mlt" in (out / "results.md").read_text()
    saved = json.loads((out / "results.json").read_text())
    assert saved["failed"] and "Traceback" in next(c for c in saved["cells"] if c["status"] == "failed")["traceback"]


def test_a_failing_module_fails_its_cells_once(model_dir, tmp_path):
    from compsft.methods import register_method

    spec = fake_method("fake-a")

    def broken(ctx, data, source_dir, seed, out):
        CALLS["broken task"] += 1
        raise RuntimeError("no GPU memory")

    spec.train_task = broken
    register_method(spec, replace=True)
    results = run(config(model_dir, tmp_path / "cmp", seeds=1))
    failed = [c for c in results["cells"] if c["status"] == "failed"]
    assert len(failed) == 2 and CALLS["broken task"] == 1  # not retried for the second target
    assert all("no GPU memory" in c["error"] for c in failed)
    assert [c["status"] for c in results["cells"] if c["method"] == "fake-c"] == ["ok", "ok"]


# -- resume after SIGKILL -----------------------------------------------------------------------------
CHILD = """
import sys, json
sys.path.insert(0, {here!r})
import test_compare_harness as t
t.register_fakes(sleep=1.0)
from compsft.compare import CompareConfig, NullReporter, compare
cfg = CompareConfig(**json.loads(sys.argv[1]))
cfg.budget = t.tiny_budget()
compare(cfg, NullReporter())
"""


def test_resume_after_sigkill_gives_the_same_results(model_dir, tmp_path):
    settings = dict(task="pos", targets=["wol", "mlt"], methods=["fake-a", "fake-c"], seeds=2, model=str(model_dir),
                    device="cpu")
    killed = tmp_path / "killed"

    def partial_modules():
        return [d for d in (killed / "modules").glob("*/*/*")
                if (d / "module").is_dir() and not (d / "module.json").exists()]

    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(here=str(HERE)),
                             json.dumps({**settings, "out": str(killed)})], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not list((killed / "cells").glob("*/*/seed*.json")):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no cell finished in time"
            time.sleep(0.05)
        # Into the next module (each sleeps 1 s in the child); waited for, not timed: keying a language
        # module reads its text through the leakage filter first, slower on a loaded machine.
        while not partial_modules():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no module started after the first cell"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    done_before = len(list((killed / "cells").glob("*/*/seed*.json")))
    assert 1 <= done_before < 8 and not (killed / "results.json").exists()
    assert partial_modules(), "the kill should leave a module half-written"

    resumed = run(config(model_dir, killed, resume=True))
    assert len(resumed["cells"]) == 8 and all(c["status"] == "ok" for c in resumed["cells"])
    whole = run(config(model_dir, tmp_path / "whole"))
    a = json.loads((killed / "results.json").read_text())
    b = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert strip_times(a) == strip_times(b)


def test_resume_with_another_configuration_is_refused(model_dir, tmp_path):
    out = tmp_path / "cmp"
    run(config(model_dir, out, seeds=1))
    with pytest.raises(CompsftError, match="pass --resume"):
        run(config(model_dir, out, seeds=1))
    with pytest.raises(CompsftError, match=r"--resume with another configuration \(targets.*only methods and"):
        run(config(model_dir, out, seeds=1, targets=["wol"], resume=True))
    with pytest.raises(CompsftError, match=r"--resume with another configuration \(budget"):
        run(config(model_dir, out, seeds=1, budget=tiny_budget(dev_checks=1), resume=True))
    # shipped text by its place in the package, not this checkout's path: another checkout may resume
    record = json.loads((out / "grid.json").read_text())
    texts = record["source"]["texts"] + [t for target in record["targets"] for t in target["texts"]]
    assert texts and all(t.startswith("compsft.languages:data/") for t in texts), texts


def test_resume_finds_a_grid_recorded_with_absolute_text_paths(model_dir, tmp_path):
    """Grids recorded before shipped texts were named by their place in the package hold a checkout's absolute
    paths (runs/dep6 did); the same files under those names are the same grid, other bytes are not."""
    from compsft.languages.catalogue import DATA_DIR

    out = tmp_path / "cmp"
    run(config(model_dir, out, seeds=1, methods=["fake-a"]))
    path = out / "grid.json"
    record = json.loads(path.read_text())
    absolute = lambda t: str(DATA_DIR.parent / t.removeprefix("compsft.languages:"))  # noqa: E731
    record["source"]["texts"] = [absolute(t) for t in record["source"]["texts"]]
    for target in record["targets"]:
        target["texts"] = [absolute(t) for t in target["texts"]]
    assert all(Path(t).is_file() for t in record["targets"][0]["texts"])
    path.write_text(json.dumps(record))
    CALLS.clear()
    assert len(run(config(model_dir, out, seeds=1, methods=["fake-a"], resume=True))["cells"]) == 2
    assert not CALLS  # nothing trained or assembled again
    # a recorded path whose bytes differ from the shipped file is another grid
    other = tmp_path / "other.txt"
    other.write_text("not the shipped text\n", encoding="utf-8")
    record["targets"][0]["texts"] = [str(other)]
    path.write_text(json.dumps(record))
    with pytest.raises(CompsftError, match=r"--resume with another configuration \(targets"):
        run(config(model_dir, out, seeds=1, methods=["fake-a"], resume=True))


# -- outputs ------------------------------------------------------------------------------------------
def test_outputs_exist_and_agree(model_dir, tmp_path):
    out = tmp_path / "cmp"
    results = run(config(model_dir, out, methods=["fake-a", "fake-c"]))
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results, default=str))
    assert saved["versions"]["torch"] and saved["machine"]["cpu_count"] >= 1
    assert saved["settings"]["budget"]["name"] == "custom" and saved["test_sentences"] == {"wol": 6, "mlt": 6}
    assert saved["times"]["overhead_seconds_per_cell"]["cells"] == 8
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert len(rows) == 8
    for row, cell in zip(rows, saved["cells"]):
        assert (row["method"], row["target"], int(row["seed"])) == (cell["method"], cell["target"], cell["seed"])
        assert float(row["score"]) == cell["metrics"]["fixed"]["accuracy"]
    md = (out / "results.md").read_text()
    for variant in ("fixed", "dev_selected"):
        s = saved["summary"][variant]["fake-a"]["targets"]["wol"]
        scores = [c["metrics"][variant]["accuracy"] for c in saved["cells"]
                  if c["method"] == "fake-a" and c["target"] == "wol"]
        assert s["n"] == 2 and s["mean"] == pytest.approx(sum(scores) / 2)
    s = saved["summary"]["fixed"]["fake-a"]["targets"]["wol"]
    assert f"{s['mean']:.4f} ± {s['sd']:.4f}" in md
    assert "| fake-a | 1,100 | 4.4 kB |" in md and "| fake-c | 1,000 | 4.0 kB |" in md  # actual module sizes
    assert "## selected on source dev" in md and "Harness overhead per cell" in md
    png = (out / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


# -- statistics ---------------------------------------------------------------------------------------
def test_paired_difference_interval_on_known_numbers():
    from compsft.compare.stats import paired_differences, paired_interval

    # d = 1, 2, 3, 4: mean 2.5, sd 1.2910, t(0.975, 3) = 3.18245 -> half width 2.0543
    d = paired_interval([1.0, 2.0, 3.0, 4.0])
    assert d["mean"] == 2.5 and d["n"] == 4
    assert d["low"] == pytest.approx(2.5 - 2.05426, abs=1e-4) and d["high"] == pytest.approx(2.5 + 2.05426, abs=1e-4)
    assert paired_interval([0.3])["low"] is None

    def cell(m, t, s, v, status="ok"):
        return {"method": m, "target": t, "seed": s, "status": status, "metrics": {"fixed": {"accuracy": v}}}

    cells = [cell("lt-sft", "wol", 1, 0.5), cell("lt-sft", "wol", 2, 0.6), cell("lt-sft", "mlt", 1, 0.7),
             cell("full-ft", "wol", 1, 0.6), cell("full-ft", "wol", 2, 0.8), cell("full-ft", "mlt", 1, 0.9),
             cell("lt-sft", "mlt", 2, 0.1), cell("full-ft", "mlt", 2, 0.0, status="failed")]  # unpaired: left out
    diff = paired_differences(cells, ["lt-sft", "full-ft"], "lt-sft", "accuracy")["full-ft"]
    assert diff["n"] == 3 and diff["mean"] == pytest.approx((0.1 + 0.2 + 0.2) / 3)
    half = 4.302653 * diff["sd"] / 3 ** 0.5  # t(0.975, 2)
    assert diff["low"] == pytest.approx(diff["mean"] - half, rel=1e-5)


def test_paired_differences_reach_the_outputs(model_dir, tmp_path):
    from compsft.methods import register_method

    register_method(fake_method("lt-sft", language_key="fake-a", task_key="fake-a"), replace=True)
    try:
        out = tmp_path / "cmp"
        results = run(config(model_dir, out, methods=["lt-sft", "fake-c"]))
    finally:
        from compsft.methods import unregister_method

        unregister_method("lt-sft")
    d = results["paired_differences"]["fixed"]["fake-c"]
    score = {(c["method"], c["target"], c["seed"]): c["metrics"]["fixed"]["accuracy"] for c in results["cells"]}
    expected = [score["fake-c", t, s] - score["lt-sft", t, s] for t in ("wol", "mlt") for s in (42, 43)]
    assert d["n"] == 4 and d["mean"] == pytest.approx(sum(expected) / 4)
    assert "Paired differences against `lt-sft`" in (out / "results.md").read_text()


# -- targets ------------------------------------------------------------------------------------------
CONLLU = """# text = Ta xemx kbira .
1\tTa\tta\tADP\t_\t_\t2\tcase\t_\t_
2\txemx\txemx\tNOUN\t_\t_\t0\troot\t_\t_
3\tkbira\tkbir\tADJ\t_\t_\t2\tamod\t_\t_
4\t.\t.\tPUNCT\t_\t_\t2\tpunct\t_\t_

"""


def test_custom_target_from_the_command_line_form(model_dir, tmp_path):
    test = tmp_path / "fo-test.conllu"
    test.write_text(CONLLU * 3, encoding="utf-8")
    text = tmp_path / "faroese.txt"
    text.write_text("Eg eri her.\nTað regnar.\n", encoding="utf-8")
    out = tmp_path / "cmp"
    results = run(config(model_dir, out, targets=[f"fao={test}:{text}", "wol"], methods=["fake-a"], seeds=1))
    assert [t["code"] for t in results["settings"]["targets"]] == ["fao", "wol"]
    assert results["test_sentences"]["fao"] == 3
    assert CALLS[("language", "fake-a", "fao", 42)] == 1
    lang = json.loads(next((out / "modules" / "language" / "fake-a").glob("fao-*/module/language.json")).read_text())
    assert lang["texts"] == [str(text.resolve())] and str(test.resolve()) in lang["exclude"]


def test_parse_target_and_its_errors(tmp_path):
    from compsft.compare.config import TargetSpec, parse_target, resolve_target

    assert parse_target("wol", "pos") == TargetSpec("wol")
    assert parse_target("fao=a.conllu:b.txt,c.txt", "pos") == TargetSpec("fao", "a.conllu", ("b.txt", "c.txt"))
    assert parse_target("mlt=ud:mt_mudt:test:m.txt", "pos") == TargetSpec("mlt", "ud:mt_mudt:test", ("m.txt",))
    assert resolve_target(TargetSpec("Maltese"), "dep", "t").test == "ud:mt_mudt:test"
    assert resolve_target(TargetSpec("ha"), "ner", "t").code == "hau"
    with pytest.raises(CompsftError, match="no shipped pos test set for 'hau'"):
        resolve_target(TargetSpec("hau"), "pos", "t")
    with pytest.raises(CompsftError, match="not in the language catalogue; give its raw text"):
        resolve_target(TargetSpec("fao", "ud:wo_wtb:test"), "pos", "t")
    with pytest.raises(CompsftError, match="no such file"):
        resolve_target(TargetSpec("fao", str(tmp_path / "missing.conllu"), ("x.txt",)), "pos", "t")
    with pytest.raises(CompsftError, match="language code"):
        resolve_target(TargetSpec("../etc", "ud:wo_wtb:test", ()), "pos", "t")
    with pytest.raises(CompsftError, match="give a test file"):
        parse_target("fao=", "pos")


def test_targets_file_json_and_toml(model_dir, tmp_path):
    from compsft.compare.config import load_targets_file

    (tmp_path / "fo.conllu").write_text(CONLLU, encoding="utf-8")
    (tmp_path / "fo.txt").write_text("Eg eri her.\n", encoding="utf-8")
    spec = {"targets": ["wol", {"code": "fao", "test": "fo.conllu", "texts": ["fo.txt"]}],
            "source": {"dev": "ud:en_ewt:dev"}}
    (tmp_path / "t.json").write_text(json.dumps(spec))
    targets, source, _ = load_targets_file(tmp_path / "t.json", "pos")
    assert [t.code for t in targets] == ["wol", "fao"] and targets[1].test == str((tmp_path / "fo.conllu").resolve())
    assert source.dev == "ud:en_ewt:dev"
    (tmp_path / "t.toml").write_text('targets = ["mlt"]\n[source]\ncode = "eng"\n')
    targets, source, _ = load_targets_file(tmp_path / "t.toml", "pos")
    assert [t.code for t in targets] == ["mlt"] and source.code == "eng"
    results = run(config(model_dir, tmp_path / "cmp", targets=[], targets_file=str(tmp_path / "t.json"),
                         methods=["fake-c"], seeds=1))
    assert [c["target"] for c in results["cells"]] == ["wol", "fao"]


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[" * 100_000, "not valid JSON"),  # nesting deep enough to exhaust json's recursion
    ('["wol"]', "expected a table with 'targets'"),
    ('{"targets": []}', "targets: expected a non-empty list"),
    ('{"targets": ["wol"], "extra": 1}', "extra: unknown field"),
    ('{"targets": [{"code": "fao", "tests": "x"}]}', r"targets\[0\]\.tests: unknown field"),
    ('{"targets": [{"code": 7}]}', r"targets\[0\]\.code: expected str, got int"),
    ('{"targets": [{"code": "fao", "test": "x.conllu", "texts": "fo.txt"}]}', r"targets\[0\]\.texts: expected list"),
    ('{"targets": [{"code": "fao", "test": "x.conllu", "texts": [1]}]}', r"targets\[0\]\.texts: expected a list"),
    ('{"targets": [{"test": "x.conllu"}]}', r"targets\[0\]\.code: missing"),
    ('{"targets": [{"code": "fao", "test": "missing.conllu", "texts": ["fo.txt"]}]}',
     r"targets\[0\]: test: no such file"),
    ('{"targets": ["wol"], "source": {"train": 3}}', r"source\.train: expected str"),
    ('{"targets": ["wol"], "source": ["eng"]}', r"source: expected a table"),
])
def test_malformed_targets_file_names_the_file_and_field(tmp_path, content, message):
    from compsft.compare.config import load_targets_file

    path = tmp_path / "targets.json"
    path.write_text(content)
    with pytest.raises(CompsftError, match=message) as err:
        load_targets_file(path, "pos")
    assert str(path) in str(err.value)


def test_bad_settings_fail_before_anything_is_written(model_dir, tmp_path):
    out = tmp_path / "x"
    with pytest.raises(CompsftError, match="unknown method 'nope'"):
        run(config(model_dir, out, methods=["nope"]))
    with pytest.raises(CompsftError, match="use cpu or cuda"):
        run(config(model_dir, out, device="cuda:1"))
    with pytest.raises(CompsftError, match="not a model directory"):
        run(config(model_dir, out, model=str(tmp_path)))
    with pytest.raises(CompsftError, match="unknown budget"):
        run(config(model_dir, out, budget="huge"))
    with pytest.raises(CompsftError, match="is the source language"):
        run(config(model_dir, out, targets=["eng=ud:en_ewt:dev"]))
    assert not out.exists()


# -- the command line ---------------------------------------------------------------------------------
def test_cli_compare_and_list_methods(model_dir, tmp_path):
    from typer.testing import CliRunner

    from compsft.cli import app

    out = tmp_path / "cmp"
    args = ["compare", "--task", "pos", "--targets", "wol", "--methods", "fake-a,fake-c", "--seeds", "1",
            "--budget", "quick", "--model", str(model_dir), "--out", str(out), "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "fake-a" in result.output and "fake-c" in result.output and "wol" in result.output
    # Not a terminal: the progress is written as lines a log keeps, one per finished cell.
    assert "grid: 2 cells, 0 already done" in result.output and "cell 2/2 done: " in result.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["budget"]["name"] == "quick" and saved["test_sentences"] == {"wol": 30}
    again = CliRunner().invoke(app, args + ["--resume"])
    assert again.exit_code == 0 and CALLS[("task", "fake-a", "pos", 42)] == 1
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code != 0 and "pass --resume" in str(refused.exception)

    listed = CliRunner().invoke(app, ["compare", "--list-methods", "--methods", "fake-a,fake-c", "--model",
                                      str(model_dir)])
    assert listed.exit_code == 0, (listed.output, listed.exception)
    assert "1,100" in listed.output and "4.4 kB" in listed.output and "task + language" in listed.output


# -- the real methods ---------------------------------------------------------------------------------
def _real_methods_exist() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(f"compsft.methods.{m}") for m in ("lt_sft", "full_ft"))


@pytest.mark.slow
@pytest.mark.skipif(not _real_methods_exist(), reason="the methods (compsft/methods/lt_sft.py, full_ft.py) are not "
                                                      "in this checkout yet")
def test_real_quick_grid_on_the_default_model(tmp_path):
    """The parser through the harness with two real methods (the demo's test runs POS with three)."""
    from compsft.compare import CompareConfig

    out = tmp_path / "cmp"
    results = run(CompareConfig(task="dep", targets=["wol"], methods=["lt-sft", "full-ft"], seeds=1, budget="quick",
                                out=str(out), device="cpu"))
    assert [c["status"] for c in results["cells"]] == ["ok", "ok"], results["failed"]
    for c in results["cells"]:
        for variant in ("fixed", "dev_selected"):
            assert 0.0 <= c["metrics"][variant]["las"] <= c["metrics"][variant]["uas"] <= 1.0
        assert c["trainable"] > 0 and c["stored_bytes"] > 0
    lt, full = (results["methods"][m] for m in ("lt-sft", "full-ft"))
    assert lt["trainable"] < full["trainable"]  # sparse: fewer trainable parameters than the whole model
    assert "paired_differences" in results and results["paired_differences"]["fixed"]["full-ft"]["n"] == 1
    assert (out / "results.md").is_file() and (out / "plot.png").is_file()


# -- reports of unfinished grids ------------------------------------------------------------------------

def test_resume_may_add_methods_and_seeds(model_dir, tmp_path):
    """A grid grows by methods and seeds: only the new cells' modules train, the finished cells are kept."""
    out = tmp_path / "cmp"
    first = run(config(model_dir, out, seeds=1, methods=["fake-a"]))
    kept = {(c["method"], c["target"], c["seed"]): c for c in first["cells"]}
    CALLS.clear()
    grown = run(config(model_dir, out, seeds=2, methods=["fake-a", "fake-c"], resume=True))
    assert len(grown["cells"]) == 8 and all(c["status"] == "ok" for c in grown["cells"])
    trained = {k for k in CALLS if k[0] in ("language", "task")}
    # seed 43 of fake-a (eng, wol, mlt, its task module) and fake-c's task module per seed: nothing of seed 42's
    # fake-a, whose two cells are not assembled again either
    assert trained == {("language", "fake-a", code, 43) for code in ("eng", "wol", "mlt")} | {
        ("task", "fake-a", "pos", 43), ("task", "fake-c", "pos", 42), ("task", "fake-c", "pos", 43)}
    assert CALLS[("assemble", "fake-a")] == 4  # seed 43's two cells, fixed and dev-selected
    for c in grown["cells"]:
        if (c["method"], c["target"], c["seed"]) in kept:
            assert strip_times(c) == strip_times(kept[c["method"], c["target"], c["seed"]])
    record = json.loads((out / "grid.json").read_text())
    assert record["methods"] == ["fake-a", "fake-c"] and record["seeds"] == [42, 43]
    # the grown grid is the one --report-only now recognises
    CALLS.clear()
    assert len(run(config(model_dir, out, report_only=True))["cells"]) == 8 and not CALLS


def test_interrupted_grid_writes_the_table_of_what_finished_and_report_only_rewrites_it(model_dir, tmp_path):
    from compsft.methods import register_method

    out = tmp_path / "cmp"
    # fake-c's assembly is interrupted (Ctrl-C) after fake-a's two cells of seed 42 finished.
    interrupted = fake_method("fake-c", language=False)
    real_assemble = interrupted.assemble

    def assemble(ctx, task_dir, language_dir):
        raise KeyboardInterrupt

    interrupted.assemble = assemble
    register_method(interrupted, replace=True)
    with pytest.raises(KeyboardInterrupt):
        run(config(model_dir, out))
    saved = json.loads((out / "results.json").read_text())
    assert [(c["method"], c["target"], c["seed"]) for c in saved["cells"]] == [("fake-a", "wol", 42),
                                                                               ("fake-a", "mlt", 42)]
    assert saved["cells_total"] == 8 and "Unfinished grid: 2 of 8 cells" in (out / "results.md").read_text()
    assert saved["summary"]["fixed"]["fake-a"]["targets"]["wol"]["n"] == 1

    # --report-only trains nothing and writes the same cells; a --resume then finishes the grid.
    interrupted.assemble = real_assemble
    CALLS.clear()
    again = run(config(model_dir, out, report_only=True))
    assert not CALLS and strip_times(again["cells"]) == strip_times(saved["cells"])
    done = run(config(model_dir, out, resume=True))
    assert len(done["cells"]) == done["cells_total"] == 8
    assert "Unfinished" not in (out / "results.md").read_text()


def test_report_only_lists_the_failed_cells_too(model_dir, tmp_path):
    out = tmp_path / "cmp"
    run(config(model_dir, out, methods=["fake-fail", "fake-c"], seeds=1))
    CALLS.clear()
    report = run(config(model_dir, out, methods=["fake-fail", "fake-c"], seeds=1, report_only=True))
    assert not CALLS and len(report["cells"]) == report["cells_total"] == 4
    assert [c["target"] for c in report["cells"] if c["status"] == "failed"] == ["mlt"]
    assert "cannot assemble mlt" in (out / "results.md").read_text()


def test_report_only_needs_a_grid_with_the_same_settings(model_dir, tmp_path):
    with pytest.raises(CompsftError, match="no comparison there to report on"):
        run(config(model_dir, tmp_path / "none", report_only=True))
    run(config(model_dir, tmp_path / "cmp", seeds=1))
    with pytest.raises(CompsftError, match="another configuration"):
        run(config(model_dir, tmp_path / "cmp", seeds=2, report_only=True))


def test_recorded_paths_are_relative_inside_the_grid_and_resolve_from_any_directory(tmp_path, monkeypatch):
    """Results record a module inside the grid relative to it (a grid moved or resumed in another checkout
    still finds its modules) and one outside it absolute; `recorded_path` turns both back into the file."""
    from compsft.compare.grid import recorded_path, relative_path

    grid, outside = tmp_path / "grid", tmp_path / "cache" / "modules" / "m"
    inside = grid / "modules" / "task" / "m"
    inside.mkdir(parents=True)
    outside.mkdir(parents=True)
    assert relative_path(inside, grid) == os.path.join("modules", "task", "m")
    assert Path(relative_path(outside, grid)).is_absolute()
    monkeypatch.chdir(tmp_path / "cache")  # not the grid: a recorded relative path must not lean on the cwd
    assert recorded_path(relative_path(inside, grid), grid).resolve() == inside.resolve()
    assert recorded_path(relative_path(outside, grid), grid).resolve() == outside.resolve()
    moved = tmp_path / "moved"
    grid.rename(moved)
    assert recorded_path(relative_path(inside, grid), moved).is_dir()
