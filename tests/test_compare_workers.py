"""A grid's modules and cells in parallel (`compsft.compare.executors`, `graph`, `claims`): the same scores as
the sequential run, one trainer per module, a killed worker loses its module only, Ctrl-C writes the table,
and submitit's local executor runs every module and cell as a job. The fake methods of
test_compare_harness.py, registered in the workers by `worker_setup`."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from compsft.errors import CompsftError
from test_compare_harness import TRAIN_LOG, config, fakes, model_dir, run, strip_times  # noqa: F401

SETUP = "test_compare_workers:worker_setup"


def worker_setup() -> None:
    """In each worker: the fake methods, sleeping as the test asks (a killed worker must be mid-module)."""
    import test_compare_harness as t

    t.register_fakes(sleep=float(os.environ.get("COMPSFT_TEST_SLEEP", "0")))


def trainings(log: Path) -> list[tuple[str, str, int, float]]:
    """(start|end, module, pid, time) lines the fakes wrote."""
    if not log.exists():
        return []
    # A worker may be appending while this reads: a line without its newline is not written yet (reading it
    # raised in the Ctrl-C test's watcher thread, which then never sent its SIGINT).
    text = log.read_text()
    rows = [line.split() for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]
    return [(what, module, int(pid), float(t)) for what, module, pid, t in rows]


def compare_with(cfg, executor):
    from compsft.compare import NullReporter, compare

    return compare(cfg, NullReporter(), executor)


def same_scores(a: dict, b: dict) -> None:
    drop = lambda r: {k: v for k, v in strip_times(r).items() if k not in ("execution", "lost")}  # noqa: E731
    assert drop(a) == drop(b)


@pytest.fixture
def train_log(tmp_path, monkeypatch):
    log = tmp_path / "train.log"
    monkeypatch.setenv(TRAIN_LOG, str(log))
    return log


GRID = dict(methods=["fake-a", "fake-c"], seeds=1)


@pytest.fixture(scope="module")
def sequential(model_dir, tmp_path_factory):
    """The grid run in this process, one thread: what every parallel run must reproduce."""
    from compsft.compare.executors import SerialExecutor
    from test_compare_harness import register_fakes

    register_fakes()
    return compare_with(config(model_dir, tmp_path_factory.mktemp("seq") / "cmp", **GRID), SerialExecutor(threads=1))


def test_two_workers_give_the_sequential_scores_and_train_each_module_once(model_dir, tmp_path, train_log,
                                                                           monkeypatch, sequential):
    from compsft.compare.executors import LocalWorkers

    monkeypatch.setenv("COMPSFT_TEST_SLEEP", "0.5")
    parallel = compare_with(config(model_dir, tmp_path / "par", **GRID), LocalWorkers(2, threads=1, setup=SETUP))
    assert [c["status"] for c in parallel["cells"]] == ["ok"] * 4
    same_scores(sequential, parallel)  # every cell's score, to the last digit; the modules recorded too
    assert parallel["execution"] == {"executor": "local", "workers": 2, "threads_per_worker": 1}
    rows = trainings(train_log)
    started = [m for what, m, _, _ in rows if what == "start"]
    # eng, wol, mlt language modules, fake-a's and fake-c's task modules: each trained once, by two workers
    assert sorted(started) == sorted(set(started)) and len(started) == 5
    assert len({pid for _, _, pid, _ in rows} - {os.getpid()}) == 2
    spans: dict = {}
    for what, module, _, t in rows:
        spans.setdefault(module, {})[what] = t
    overlapped = any(a["start"] < b["end"] and b["start"] < a["end"]
                     for m1, a in spans.items() for m2, b in spans.items() if m1 < m2)
    assert overlapped, "two modules should have trained at the same time"
    assert not list((tmp_path / "par" / "modules").glob("*/*/*/claim.json"))  # claims released


def _when_started(log: Path, prefix: str, action) -> threading.Thread:
    """Call `action(pid)` (once) when a module whose name starts with `prefix` starts training."""
    def watch():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for what, module, pid, _ in trainings(log):
                if what == "start" and module.startswith(prefix):
                    action(pid)
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_killed_worker_loses_its_module_only_and_resume_finishes(model_dir, tmp_path, train_log, monkeypatch,
                                                                   sequential):
    from compsft.compare.executors import LocalWorkers, SerialExecutor

    monkeypatch.setenv("COMPSFT_TEST_SLEEP", "1.5")
    out = tmp_path / "cmp"
    killed: list[int] = []
    _when_started(train_log, "language/fake-a/wol", lambda pid: (os.kill(pid, signal.SIGKILL), killed.append(pid)))
    first = compare_with(config(model_dir, out, **GRID), LocalWorkers(2, threads=1, setup=SETUP))
    assert killed, "the wol module never started"
    assert first["lost"] and "wol" in first["lost"][0]
    ended = {m for what, m, _, _ in trainings(train_log) if what == "end"}
    # the other modules finished in the other worker (and in a fresh one that took the dead worker's place)
    assert {"language/fake-a/eng/42", "task/fake-a/pos/42", "language/fake-a/mlt/42", "task/fake-c/pos/42"} <= ended
    assert "language/fake-a/wol/42" not in ended
    statuses = {(c["method"], c["target"]): c["status"] for c in first["cells"]}
    # the fake-a → wol cell waits for --resume; the others did not wait for wol
    assert statuses == {("fake-c", "wol"): "ok", ("fake-a", "mlt"): "ok", ("fake-c", "mlt"): "ok"}
    claim = next((out / "modules" / "language" / "fake-a").glob("wol-*/claim.json"))
    assert json.loads(claim.read_text())["pid"] == killed[0]  # left by the dead worker: stale

    train_log.unlink()
    monkeypatch.setenv("COMPSFT_TEST_SLEEP", "0")
    resumed = compare_with(config(model_dir, out, resume=True, **GRID), SerialExecutor(threads=1))
    assert [m for what, m, _, _ in trainings(train_log) if what == "start"] == ["language/fake-a/wol/42"]
    assert "lost" not in resumed and not claim.exists()
    same_scores(resumed, sequential)


DRIVER = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a shell starts it, even under an ignoring parent
sys.path.insert(0, sys.argv[3])
import test_compare_harness as t
from test_compare_workers import GRID, SETUP, compare_with
from compsft.compare.executors import LocalWorkers
t.register_fakes()
try:
    compare_with(t.config(sys.argv[1], sys.argv[2], **GRID), LocalWorkers(2, threads=1, setup=SETUP))
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_ctrl_c_stops_the_workers_and_writes_the_table_of_what_finished(model_dir, tmp_path, train_log,
                                                                        monkeypatch):
    """SIGINT to the driver only (as `kill -INT`; a terminal's Ctrl-C reaches the workers too): it must stop
    its workers itself, and they release their claims on the way out. The driver is a fresh interpreter, as
    a user's `compsft compare` is: inside the test process it failed now and then in the full suite only."""
    import sys

    monkeypatch.setenv("COMPSFT_TEST_SLEEP", "0.5")
    monkeypatch.setenv("COMPSFT_TEST_SLOW", "language/fake-a/mlt/42")  # a minute: interrupted, not waited for
    out = tmp_path / "cmp"
    tests = str(Path(__file__).resolve().parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    started = time.monotonic()
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(model_dir), str(out), tests], env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (list((out / "cells").glob("*/*/seed*.json")) and any(
                m == "language/fake-a/mlt/42" for _, m, _, _ in trainings(train_log))):
            assert driver.poll() is None, "the grid ended before the slow module started"
            time.sleep(0.05)
        driver.send_signal(signal.SIGINT)
        assert driver.wait(timeout=60) == 130  # KeyboardInterrupt reached the driver's top
    finally:
        if driver.poll() is None:
            driver.kill()
    assert time.monotonic() - started < 75, "the driver waited for the slow module instead of interrupting it"
    results = json.loads((out / "results.json").read_text())
    done = list((out / "cells").glob("*/*/seed*.json"))
    assert 1 <= len(results["cells"]) == len(done) < results["cells_total"] == 4
    workers = {pid for _, _, pid, _ in trainings(train_log)}
    assert workers and not [pid for pid in workers if _alive(pid)], "a worker outlived the grid"
    left = [p.read_text() for p in (out / "modules").glob("*/*/*/claim.json")]
    assert not left, (left, train_log.read_text())  # released, not left stale


def test_the_graph_waits_for_what_each_node_uses_in_sequential_order(model_dir, tmp_path):
    from compsft.compare import NullReporter, resolve
    from compsft.compare.graph import build_graph
    from compsft.compare.run import GridRunner

    runner = GridRunner(resolve(config(model_dir, tmp_path / "cmp", **GRID)), NullReporter(), "cpu")
    nodes = build_graph(runner)
    names = [n.label.split(" (")[0] if n.kind == "module" else n.label for n in nodes]
    # cells seeds outermost, then methods, then targets (GridRunner.cells); each cell's new modules before it
    assert names == ["fake-a: language module eng", "fake-a: task module pos", "fake-a: language module wol",
                     "fake-a → wol, seed 42", "fake-a: language module mlt", "fake-a → mlt, seed 42",
                     "fake-c: task module pos", "fake-c → wol, seed 42", "fake-c → mlt, seed 42"]
    assert [n.deps for n in nodes] == [(), (0,), (), (0, 1, 2), (), (0, 1, 4), (), (6,), (6,)]


def test_the_graph_leaves_out_finished_cells_and_cached_modules(model_dir, tmp_path):
    """A resumed grid's graph holds only what is left: no node for a finished cell or a cached module."""
    from compsft.compare import NullReporter, resolve
    from compsft.compare.graph import build_graph
    from compsft.compare.run import GridRunner

    out = tmp_path / "cmp"
    run(config(model_dir, out, **dict(GRID, methods=["fake-a"])))
    # fake-b trains nothing of its own: it uses fake-a's modules, all cached now
    grown = dict(GRID, methods=["fake-a", "fake-b"])
    runner = GridRunner(resolve(config(model_dir, out, **grown, resume=True)), NullReporter(), "cpu")
    names = [n.label for n in build_graph(runner)]
    assert names == ["fake-b → wol, seed 42", "fake-b → mlt, seed 42"]


def _alive(pid: int) -> bool:
    from compsft.compare.claims import _pid_alive

    return _pid_alive(pid)


def test_submitit_runs_every_module_and_cell_as_a_job_with_the_same_scores(model_dir, tmp_path, sequential):
    """submitit's debug executor: the SLURM path (jobs pickled to its folder, results read back) in this
    process; `bench/grid_workers.py --submitit local` runs it as processes."""
    pytest.importorskip("submitit")
    from compsft.compare.executors import build_executor

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)  # anything but the jobs' one thread
    try:
        executor = build_executor("submitit-debug", threads=1, out=tmp_path / "job", slurm=dict(time_min=10))
        jobs = compare_with(config(model_dir, tmp_path / "job", **GRID), executor)
        # The debug executor runs jobs in this process: it must leave the thread count as it found it.
        assert torch.get_num_threads() == threads + 1
    finally:
        torch.set_num_threads(threads)
    same_scores(jobs, sequential)
    assert jobs["execution"]["executor"] == "submitit-debug"
    assert executor.submitted == 9  # five modules and four cells, each one job


# -- claims ---------------------------------------------------------------------------------------------------
def _claim(key_dir: Path, **fields) -> Path:
    key_dir.mkdir(parents=True, exist_ok=True)
    path = key_dir / "claim.json"
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": "t", **fields}))
    return path


class _Waited(Exception):
    pass


def _must_wait(holder: str):
    raise _Waited(holder)


def test_a_live_claim_makes_others_wait_and_a_stale_one_is_taken_over(tmp_path, monkeypatch):
    from compsft.compare import claims

    # held by a live process on this host: wait
    live = _claim(tmp_path / "live")
    with pytest.raises(_Waited, match=str(os.getpid())):
        with claims.claim_module(tmp_path / "live", on_wait=_must_wait):
            pass
    assert live.exists()
    # held by a process that is gone: taken over, and released after
    dead = subprocess.Popen(["true"])
    dead.wait()
    _claim(tmp_path / "dead", pid=dead.pid)
    with claims.claim_module(tmp_path / "dead", on_wait=_must_wait):
        assert json.loads((tmp_path / "dead" / "claim.json").read_text())["pid"] == os.getpid()
    assert not (tmp_path / "dead" / "claim.json").exists()
    # another host's: stale only when its heartbeat is old
    other = _claim(tmp_path / "other", host="elsewhere", pid=1)
    with pytest.raises(_Waited, match="elsewhere"):
        with claims.claim_module(tmp_path / "other", on_wait=_must_wait):
            pass
    old = time.time() - claims.STALE_SECONDS - 5
    os.utime(other, (old, old))
    with claims.claim_module(tmp_path / "other", on_wait=_must_wait):
        pass
    # the holder's heartbeat keeps its claim fresh
    monkeypatch.setattr(claims, "HEARTBEAT_SECONDS", 0.05)
    with claims.claim_module(tmp_path / "beat"):
        path = tmp_path / "beat" / "claim.json"
        os.utime(path, (old, old))
        time.sleep(0.3)
        assert claims.stale_reason(path) is None and time.time() - path.stat().st_mtime < 5


def test_cuda_workers_get_one_gpu_each_or_a_clear_error(monkeypatch):
    from types import SimpleNamespace

    from compsft.compare.executors import LocalWorkers, build_executor

    runner = SimpleNamespace(grid=None, device="cuda")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    workers = LocalWorkers(2, threads=1)
    workers.start(runner)
    assert workers.gpus == ["3", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(CompsftError, match="--workers 2 with --device cuda: 1 GPU"):
        LocalWorkers(2).start(runner)
    with pytest.raises(CompsftError, match="--workers 0"):
        build_executor("local", workers=0)


def test_worker_progress_is_a_timestamped_line_per_worker_in_a_log():
    import io
    import re

    from compsft.compare.executors import forward_event
    from compsft.compare.progress import LineReporter

    stream = io.StringIO()
    reporter = LineReporter(stream)
    forward_event(reporter, 0, "steps_start", ("lt-sft: language module wol (seed 42)", 10))
    forward_event(reporter, 1, "steps_start", ("full-ft: task module pos (seed 42)", 4))
    for _ in range(5):
        forward_event(reporter, 0, "steps_advance", (1,))
    forward_event(reporter, 1, "cell_end", ("ignored: the driver reports cells", "x"))
    lines = stream.getvalue().splitlines()
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) for line in lines) and len(lines) == 7
    assert lines[0].endswith("[worker 1] lt-sft: language module wol (seed 42): 10 steps")
    assert lines[1].endswith("[worker 2] full-ft: task module pos (seed 42): 4 steps")
    assert lines[-1].endswith("[worker 1] lt-sft: language module wol (seed 42): 5/10")


def test_a_cell_of_a_module_that_failed_in_another_worker_fails_with_its_error_untrained(model_dir, tmp_path):
    """What the driver hands a worker: the modules that failed elsewhere in this run. The cell fails with the
    module's error and traceback, as in a sequential run, and the worker does not train the module again."""
    from compsft.compare import NullReporter, resolve
    from compsft.compare.executors import execute_node
    from compsft.compare.graph import build_graph
    from compsft.compare.run import GridRunner
    from test_compare_harness import CALLS

    grid = resolve(config(model_dir, tmp_path / "cmp", methods=["fake-a"], seeds=1, targets=["wol"]))
    runner = GridRunner(grid, NullReporter(), "cpu")
    nodes = build_graph(runner)
    task = next(n for n in nodes if n.role == "task")
    cell = next(n for n in nodes if n.kind == "cell")
    for n in nodes[:-1]:
        if n is not task and n.role != "task":
            assert execute_node(runner, n, {})["status"] == "ok"
    CALLS.clear()
    fresh = GridRunner(grid, NullReporter(), "cpu")  # another worker's runner: knows only what it is handed
    outcome = execute_node(fresh, cell, {task.key_dir: ("RuntimeError: no GPU memory", "Traceback: here")})
    record = outcome["record"]
    assert record["status"] == "failed" and "failed earlier in this run: RuntimeError: no GPU memory" in record["error"]
    assert record["traceback"] == "Traceback: here"
    assert not [k for k in CALLS if k[0] in ("language", "task")]  # nothing trained for it
    assert (tmp_path / "cmp" / "cells" / "fake-a" / "wol" / "seed42.failed.json").is_file()
