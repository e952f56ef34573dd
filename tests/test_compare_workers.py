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
import sys
import threading
import time
from pathlib import Path

import pytest

from compsft.errors import CompsftError
from test_compare_harness import HERE, TRAIN_LOG, config, fakes, model_dir, run, strip_times  # noqa: F401

SETUP = "test_compare_workers:worker_setup"


def worker_setup() -> None:
    """In each worker: the fake methods, sleeping as the test asks (a killed worker must be mid-module)."""
    import test_compare_harness as t

    t.register_fakes(sleep=float(os.environ.get("COMPSFT_TEST_SLEEP", "0")))


def trainings(log: Path) -> list[tuple[str, str, int, float]]:
    """(start|end, module, pid, time) lines the fakes wrote."""
    if not log.exists():
        return []
    rows = [line.split() for line in log.read_text().splitlines() if line.strip()]
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


def test_two_workers_give_the_sequential_scores_and_train_each_module_once(model_dir, tmp_path, train_log,
                                                                           monkeypatch):
    from compsft.compare.executors import LocalWorkers, SerialExecutor

    monkeypatch.setenv("COMPSFT_TEST_SLEEP", "0.5")
    cfg = dict(methods=["fake-a", "fake-c"], seeds=1)
    sequential = compare_with(config(model_dir, tmp_path / "seq", **cfg), SerialExecutor(threads=1))
    train_log.unlink()
    parallel = compare_with(config(model_dir, tmp_path / "par", **cfg), LocalWorkers(2, threads=1, setup=SETUP))
    assert [c["status"] for c in parallel["cells"]] == ["ok"] * 4
    same_scores(sequential, parallel)  # every cell's score, to the last digit; the modules recorded too
    assert parallel["execution"] == {"executor": "local", "workers": 2, "threads_per_worker": 1}
    rows = trainings(train_log)
    started = [m for what, m, _, _ in rows if what == "start"]
    # eng, wol, mlt language modules, fake-a's and fake-c's task modules: each trained once, by two workers
    assert sorted(started) == sorted(set(started)) and len(started) == 5
    assert len({pid for _, _, pid, _ in rows} - {os.getpid()}) == 2
    spans = {}
    for what, module, _, t in rows:
        spans.setdefault(module, {})[what] = t
    overlapped = any(a["start"] < b["end"] and b["start"] < a["end"]
                     for m1, a in spans.items() for m2, b in spans.items() if m1 < m2)
    assert overlapped, "two modules should have trained at the same time"
    assert not list((tmp_path / "par" / "modules").glob("*/*/*/claim.json"))  # claims released


def test_a_killed_worker_loses_its_module_only_and_resume_finishes(model_dir, tmp_path, train_log, monkeypatch):
    from compsft.compare.executors import LocalWorkers, SerialExecutor

    monkeypatch.setenv("COMPSFT_TEST_SLEEP", "1.5")
    out = tmp_path / "cmp"
    cfg = dict(methods=["fake-a"], seeds=1)
    killed: list = []

    def kill_the_first_target_module():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            for what, module, pid, _ in trainings(train_log):
                if what == "start" and module.startswith("language/fake-a/wol"):
                    os.kill(pid, signal.SIGKILL)
                    killed.append((module, pid))
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_first_target_module)
    killer.start()
    first = compare_with(config(model_dir, out, **cfg), LocalWorkers(2, threads=1, setup=SETUP))
    killer.join()
    assert killed, "the wol module never started"
    assert first["lost"] and "wol" in first["lost"][0]
    ended = {m for what, m, _, _ in trainings(train_log) if what == "end"}
    # the other modules finished in the other worker (and in a fresh one that took the dead worker's place)
    assert {"language/fake-a/eng/42", "task/fake-a/pos/42", "language/fake-a/mlt/42"} <= ended
    assert "language/fake-a/wol/42" not in ended
    statuses = {c["target"]: c["status"] for c in first["cells"]}
    assert statuses == {"mlt": "ok"}  # the wol cell waits for --resume; mlt did not wait for wol
    claim = next((out / "modules" / "language" / "fake-a").glob("wol-*/claim.json"))
    assert json.loads(claim.read_text())["pid"] == killed[0][1]  # left by the dead worker: stale

    train_log.unlink()
    resumed = compare_with(config(model_dir, out, resume=True, **cfg), LocalWorkers(2, threads=1, setup=SETUP))
    assert [m for what, m, _, _ in trainings(train_log) if what == "start"] == ["language/fake-a/wol/42"]
    assert "lost" not in resumed and not claim.exists()
    monkeypatch.setenv("COMPSFT_TEST_SLEEP", "0")
    whole = compare_with(config(model_dir, tmp_path / "whole", **cfg), SerialExecutor())
    same_scores(resumed, whole)


CHILD = """
import sys, json
sys.path.insert(0, {here!r})
import test_compare_workers as w
w.worker_setup()
from compsft.compare import NullReporter, compare
from compsft.compare.executors import LocalWorkers
import test_compare_harness as t
cfg = t.config(sys.argv[1], sys.argv[2], methods=["fake-a", "fake-c"], seeds=2)
compare(cfg, NullReporter(), LocalWorkers(2, threads=1, setup=w.SETUP))
"""


def test_ctrl_c_stops_the_workers_and_writes_the_table_of_what_finished(model_dir, tmp_path, train_log):
    out = tmp_path / "cmp"
    env = {**os.environ, "COMPSFT_TEST_SLEEP": "1.0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(here=str(HERE)), str(model_dir), str(out)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not list((out / "cells").glob("*/*/seed*.json")):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no cell finished in time"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGINT)  # the driver only, as `kill -INT`: it must stop its workers itself
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr = proc.stderr.read().decode()
        proc.stderr.close()
    assert rc != 0 and "KeyboardInterrupt" in stderr
    results = json.loads((out / "results.json").read_text())
    done = list((out / "cells").glob("*/*/seed*.json"))
    assert 1 <= len(results["cells"]) == len(done) < results["cells_total"] == 8
    workers = {pid for _, _, pid, _ in trainings(train_log)}
    time.sleep(0.5)
    assert workers and not [pid for pid in workers if _alive(pid)], "a worker outlived the grid"
    assert not list((out / "modules").glob("*/*/*/claim.json"))  # interrupted workers release their claims


def _alive(pid: int) -> bool:
    from compsft.compare.claims import _pid_alive

    return _pid_alive(pid)


def test_submitit_local_runs_every_module_and_cell_as_a_job_with_the_same_scores(model_dir, tmp_path,
                                                                                  monkeypatch):
    pytest.importorskip("submitit")
    from compsft.compare.executors import SerialExecutor, build_executor

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    cfg = dict(methods=["fake-c"], seeds=1, targets=["wol"])
    executor = build_executor("submitit-local", threads=1, setup=SETUP, out=tmp_path / "job",
                              slurm=dict(time_min=10))
    jobs = compare_with(config(model_dir, tmp_path / "job", **cfg), executor)
    sequential = compare_with(config(model_dir, tmp_path / "seq", **cfg), SerialExecutor(threads=1))
    same_scores(jobs, sequential)
    assert jobs["execution"]["executor"] == "submitit-local"
    # one task module and one cell: two jobs, each with its result pickled back in submitit's folder
    assert len(list((tmp_path / "job" / "slurm").glob("*_result.pkl"))) == 2


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
