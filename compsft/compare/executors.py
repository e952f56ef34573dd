"""Where the grid's nodes run (`graph.py` decides what runs when): this process, local worker processes, or
SLURM jobs through submitit. Module code never knows which one runs it: every node is `execute_node`.

    compare(config, reporter)                                   # SerialExecutor: in this process, in order
    compare(config, reporter, LocalWorkers(workers=2, threads=1))        # two processes, one thread each
    compare(config, reporter, SubmititExecutor("slurm", "runs/cmp/slurm", partition="gpu", gpus=1))

Workers are processes started with the spawn method (a fresh interpreter: no forked torch state, safe with
CUDA) that receive the resolved `Grid` (paths and numbers, never a model) and a `Node`; each keeps its own
`GridRunner` (tokenizer, test sets) between nodes. A worker process that dies takes only its node with it
(one single-process pool per worker, so the others go on). Methods registered at run time (your own, or a
test's) must be registered in the workers too: `setup="package.module:function"` is imported and called in
each worker before its first node.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import importlib
import logging
import multiprocessing
import os
import signal
import time
import traceback
from pathlib import Path
from typing import Any

from compsft.errors import CompsftError

from .config import Grid

logger = logging.getLogger(__name__)


# -- what every node runs ---------------------------------------------------------------------------------
def execute_node(runner, node, failed: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """Run one node with `runner` (the sequential grid's code): {"status": "ok" | "failed", ...}; a cell's
    record (which may be a failed cell) is in "record"."""
    runner.failed_modules.update({Path(k): v for k, v in failed.items()})
    target = runner.target(node.target)
    if node.kind == "cell":
        return {"status": "ok", "record": runner.run_cell(node.method, target, node.seed)}
    try:
        runner.train_module(node.method, target, node.seed, node.role)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # recorded for the cells that need it; the grid goes on
        logger.warning("%s failed: %s", node.label, err)
        return {"status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    return {"status": "ok"}


_WORKER: dict[str, Any] = {}


def _setup_process(threads: int | None, setup: str | None, gpu: str | None = None,
                   digests: dict | None = None) -> None:
    """Once per worker process, before its first node."""
    from .grid import text_digests

    text_digests(digests)  # the driver's module keys: not recomputed from the texts in every worker
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before CUDA is initialised: the worker sees its GPU only
    if threads:
        import torch

        torch.set_num_threads(threads)
    import transformers

    # As the command does for itself: load reports of task models built from an MLM checkpoint are expected.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if setup:
        module, _, function = setup.partition(":")
        try:
            getattr(importlib.import_module(module), function or "setup")()
        except (ImportError, AttributeError) as err:
            raise CompsftError(f"worker setup {setup!r}: {err}") from None


def _runner(grid: Grid, device: str, reporter):
    from .run import GridRunner

    runner = _WORKER.get("runner")
    if runner is None or runner.grid != grid or runner.device != device:
        runner = _WORKER["runner"] = GridRunner(grid, reporter, device)
    return runner


def _worker_init(worker: int, threads: int | None, setup: str | None, gpu: str | None, events,
                 digests: dict) -> None:
    _WORKER.update(worker=worker, events=events)
    _setup_process(threads, setup, gpu, digests)


def run_worker_node(grid: Grid, device: str, node, failed: dict) -> dict[str, Any]:
    """A node in a local worker process (module-level, so that it is pickled by name)."""
    events = _WORKER["events"]
    return execute_node(_runner(grid, device, QueueReporter(events, _WORKER["worker"])), node, failed)


def run_job_node(grid: Grid, device: str, node, failed: dict, threads: int | None,
                 setup: str | None, digests: dict | None = None) -> dict[str, Any]:
    """A node as a submitit job (a fresh process, or a reused one with the debug executor)."""
    import torch

    from .progress import NullReporter

    saved = torch.get_num_threads()
    if not _WORKER.get("job_setup"):
        _setup_process(None, setup, digests=digests)
        _WORKER["job_setup"] = True
    if threads:
        torch.set_num_threads(threads)
    try:
        return execute_node(_runner(grid, device, NullReporter()), node, failed)
    finally:
        # submitit's debug executor runs jobs in the driver's own process: leave its thread count as found (a
        # test process left at one thread made a later bit-exactness test compare 1- and 2-thread sums).
        torch.set_num_threads(saved)


class QueueReporter:
    """A worker's progress, sent to the driver as (worker, method, args) events."""

    def __init__(self, events, worker: int) -> None:
        self.events, self.worker = events, worker

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)
        return lambda *args: self.events.put((self.worker, method, args))


def forward_event(reporter, worker: int, method: str, args: tuple) -> None:
    """Show a worker's steps on the worker's own line (its cells the driver shows, as it starts and ends them)."""
    if method in ("steps_start", "steps_advance"):
        own = getattr(reporter, "worker_" + method.split("_")[1], None)
        if own is not None:
            own(worker, *args)
        else:  # a reporter without worker lines: the shared line
            getattr(reporter, method)(*args)


# -- executors --------------------------------------------------------------------------------------------
class SerialExecutor:
    """In this process, one node at a time: the default, and what a one-worker grid is."""

    slots = 1
    in_process = True

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads
        self._saved: int | None = None

    def describe(self) -> dict[str, Any]:
        return {"executor": "serial", "workers": 1, "threads_per_worker": self.threads}

    def check(self, device: str) -> None: ...

    def start(self, runner) -> None:
        self.runner = runner
        if self.threads:
            import torch

            self._saved = torch.get_num_threads()
            torch.set_num_threads(self.threads)

    def submit(self, node, failed: dict):
        done = _Done()
        done.outcome = execute_node(self.runner, node, failed)
        return done

    def wait(self, handles: list, timeout: float, reporter=None) -> list:
        return handles

    def outcome(self, handle) -> dict[str, Any]:
        return handle.outcome

    def drain(self, reporter) -> None: ...
    def stop(self) -> None: ...

    def close(self) -> None:
        if self._saved is not None:
            import torch

            torch.set_num_threads(self._saved)
            self._saved = None


class _Done:
    """A node run already (hashable by identity, as the other executors' handles)."""

    outcome: dict[str, Any]


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES if set, else all that torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


class LocalWorkers:
    """`workers` processes on this machine, `threads` torch threads each; with device cuda, one GPU each."""

    slots: int
    in_process = False

    def __init__(self, workers: int, threads: int | None = None, setup: str | None = None) -> None:
        if workers < 1:
            raise CompsftError(f"--workers {workers}: give at least one worker")
        self.slots = workers
        self.threads = threads or max(1, (os.cpu_count() or 1) // workers)
        self.setup = setup
        self._pools: list[cf.ProcessPoolExecutor | None] = [None] * workers
        self._slot_of: dict[cf.Future, int] = {}
        self._nodes: dict[cf.Future, Any] = {}

    def describe(self) -> dict[str, Any]:
        return {"executor": "local", "workers": self.slots, "threads_per_worker": self.threads}

    def check(self, device: str) -> None:
        self.gpus: list[str | None] = [None] * self.slots
        if device == "cuda":
            gpus = visible_gpus()
            if len(gpus) < self.slots:
                raise CompsftError(f"--workers {self.slots} with --device cuda: {len(gpus)} GPU(s) visible "
                                   f"({', '.join(gpus) or 'none'}); one worker per GPU")
            self.gpus = list(gpus[:self.slots])

    def start(self, runner) -> None:
        self.grid, self.device = runner.grid, runner.device
        self.check(self.device)
        self._ctx = multiprocessing.get_context("spawn")
        self._events = self._ctx.Queue()

    def _pool(self, slot: int) -> cf.ProcessPoolExecutor:
        from .grid import text_digests

        if self._pools[slot] is None:
            self._pools[slot] = cf.ProcessPoolExecutor(
                1, mp_context=self._ctx, initializer=_worker_init,
                initargs=(slot, self.threads, self.setup, self.gpus[slot], self._events, text_digests()))
        return self._pools[slot]

    def submit(self, node, failed: dict):
        slot = next(i for i in range(self.slots) if i not in self._slot_of.values())
        future = self._pool(slot).submit(run_worker_node, self.grid, self.device, node,
                                         {str(k): v for k, v in failed.items()})
        self._slot_of[future], self._nodes[future] = slot, node
        return future

    def wait(self, handles: list, timeout: float, reporter=None) -> list:
        done, _ = cf.wait(handles, timeout=timeout, return_when=cf.FIRST_COMPLETED)
        return [h for h in handles if h in done]

    def outcome(self, handle: cf.Future) -> dict[str, Any]:
        slot, node = self._slot_of.pop(handle), self._nodes.pop(handle)
        # `exception()` hands the worker's exception over as an object. Catching what `result()` raises
        # instead would also swallow the driver's own Ctrl-C when its handler happens to run inside that
        # `try` (SIGINT taken by another thread runs the handler at the main thread's next bytecode): the
        # grid then went on as if nothing had happened (seen once in the full suite).
        err = handle.exception()
        if err is None:
            return handle.result()
        if isinstance(err, cf.process.BrokenProcessPool):
            # The worker died (killed, out of memory): only its own pool is broken; a fresh one takes its slot.
            self._pools[slot].shutdown(wait=False, cancel_futures=True)
            self._pools[slot] = None
            return {"status": "lost", "error": f"worker {slot + 1} died while running it"}
        # KeyboardInterrupt in the worker (Ctrl-C reaches the whole group), ...
        return {"status": "lost", "error": f"worker {slot + 1}: {type(err).__name__}: {err}"}

    def drain(self, reporter) -> None:
        import queue

        while True:
            try:
                worker, method, args = self._events.get_nowait()
            except (queue.Empty, OSError, ValueError):
                return
            forward_event(reporter, worker, method, args)

    def stop(self) -> None:
        """Ctrl-C: interrupt the workers (their claims are released on the way out), then end them."""
        workers = multiprocessing.active_children()
        for p in workers:
            with contextlib.suppress(OSError):
                os.kill(p.pid, signal.SIGINT)
        for i, pool in enumerate(self._pools):  # a worker back from its interrupted node then exits
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
                self._pools[i] = None
        deadline = time.monotonic() + 15
        for p in workers:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()

    def close(self) -> None:
        for i, pool in enumerate(self._pools):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
                self._pools[i] = None



EXECUTORS = ("local", "slurm", "submitit-local", "submitit-debug")


def build_executor(kind: str = "local", workers: int = 1, threads: int | None = None, setup: str | None = None,
                   out: str | Path = "runs/cmp", slurm: dict[str, Any] | None = None):
    """The executor `compsft compare` options ask for: `local` with one worker is the serial run (this
    process); `slurm` submits through submitit (`submitit-local`/`submitit-debug`: its stand-ins, here).
    `slurm` holds SubmititExecutor's options (partition, time_min, gpus, mem_gb, cpus, max_jobs, extra,
    folder)."""
    if kind == "local":
        if workers < 1:
            raise CompsftError(f"--workers {workers}: give at least one worker")
        return SerialExecutor(threads) if workers == 1 else LocalWorkers(workers, threads, setup)
    if kind not in EXECUTORS:
        raise CompsftError(f"--executor {kind}: use one of {', '.join(EXECUTORS)}")
    from .slurm import SubmititExecutor

    options = dict(slurm or {})
    folder = options.pop("folder", None) or Path(out) / "slurm"
    cluster = kind.removeprefix("submitit-")
    return SubmititExecutor(cluster, folder, threads=threads, setup=setup, **options)
