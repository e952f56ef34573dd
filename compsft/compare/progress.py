"""How a comparison reports progress: one bar for the grid (cells), one for the work in flight.

The library's default is tqdm (`TqdmReporter`); `compsft compare` passes a rich implementation. Training
reports its steps through `StepCallback`, a `transformers.TrainerCallback` every method hands to its
Trainers (`MethodContext.callbacks`).
"""
from __future__ import annotations

from typing import Any, Protocol


class Reporter(Protocol):
    """Receives the grid's progress. `steps_*` describe the work in flight inside the current cell (a
    training phase, an evaluation); each `steps_start` replaces the previous one."""

    def grid_start(self, total: int, done: int) -> None: ...
    def cell_start(self, name: str) -> None: ...
    def steps_start(self, description: str, total: int) -> None: ...
    def steps_advance(self, n: int = 1) -> None: ...
    def cell_end(self, name: str, summary: str) -> None: ...
    def grid_end(self) -> None: ...
    # With local workers, each worker's work in flight (`worker` counts from 0); optional: a reporter
    # without these shows every worker's steps on the one line of `steps_*`.
    def worker_start(self, worker: int, description: str, total: int) -> None: ...
    def worker_advance(self, worker: int, n: int = 1) -> None: ...


class NullReporter:
    """Reports nothing."""

    def grid_start(self, total: int, done: int) -> None: ...
    def cell_start(self, name: str) -> None: ...
    def steps_start(self, description: str, total: int) -> None: ...
    def steps_advance(self, n: int = 1) -> None: ...
    def cell_end(self, name: str, summary: str) -> None: ...
    def grid_end(self) -> None: ...
    def worker_start(self, worker: int, description: str, total: int) -> None: ...
    def worker_advance(self, worker: int, n: int = 1) -> None: ...


class TqdmReporter:
    """The library's default: a tqdm bar for the grid and one for the work in flight."""

    def __init__(self) -> None:
        self._grid: Any = None
        self._steps: Any = None
        self._workers: dict[int, Any] = {}

    def grid_start(self, total: int, done: int) -> None:
        from tqdm.auto import tqdm

        self._grid = tqdm(total=total, initial=done, desc="grid (cells)", position=0)

    def cell_start(self, name: str) -> None:
        if self._grid is not None:
            self._grid.set_postfix_str(name)

    def steps_start(self, description: str, total: int) -> None:
        from tqdm.auto import tqdm

        self._close_steps()
        self._steps = tqdm(total=max(total, 1), desc=description, position=1, leave=False)

    def steps_advance(self, n: int = 1) -> None:
        if self._steps is not None:
            self._steps.update(n)

    def cell_end(self, name: str, summary: str) -> None:
        self._close_steps()
        if self._grid is not None:
            self._grid.update(1)
            self._grid.set_postfix_str(f"{name}: {summary}")

    def grid_end(self) -> None:
        self._close_steps()
        for bar in self._workers.values():
            bar.close()
        self._workers.clear()
        if self._grid is not None:
            self._grid.close()
            self._grid = None

    def _close_steps(self) -> None:
        if self._steps is not None:
            self._steps.close()
            self._steps = None

    def worker_start(self, worker: int, description: str, total: int) -> None:
        from tqdm.auto import tqdm

        if worker in self._workers:
            self._workers.pop(worker).close()
        self._workers[worker] = tqdm(total=max(total, 1), desc=f"[worker {worker + 1}] {description}",
                                     position=1 + worker, leave=False)

    def worker_advance(self, worker: int, n: int = 1) -> None:
        if worker in self._workers:
            self._workers[worker].update(n)


class LineReporter:
    """Plain timestamped lines, for logs (nohup, CI, a batch scheduler) where a live bar shows nothing until
    the end: one line per cell and per piece of work in flight, and one at every tenth of its steps."""

    def __init__(self, stream=None) -> None:
        import sys

        self.stream = stream if stream is not None else sys.stderr
        self.total = self.done = 0
        self.steps_total = self.steps_done = 0
        self.description = ""
        self.workers: dict[int, list] = {}  # worker -> [description, total, done]

    def _line(self, text: str) -> None:
        import time

        print(f"{time.strftime('%H:%M:%S')} {text}", file=self.stream, flush=True)

    def grid_start(self, total: int, done: int) -> None:
        self.total, self.done = total, done
        self._line(f"grid: {total} cells, {done} already done")

    def cell_start(self, name: str) -> None:
        self._line(f"cell {self.done + 1}/{self.total}: {name}")

    def steps_start(self, description: str, total: int) -> None:
        self.description, self.steps_total, self.steps_done = description, max(total, 1), 0
        self._line(f"  {description}: {self.steps_total} steps")

    def steps_advance(self, n: int = 1) -> None:
        before = self.steps_done * 10 // self.steps_total
        self.steps_done += n
        if self.steps_done * 10 // self.steps_total > before and self.steps_done < self.steps_total:
            self._line(f"  {self.description}: {self.steps_done}/{self.steps_total}")

    def cell_end(self, name: str, summary: str) -> None:
        self.done += 1
        self._line(f"cell {self.done}/{self.total} done: {name}: {summary}")

    def worker_start(self, worker: int, description: str, total: int) -> None:
        self.workers[worker] = [description, max(total, 1), 0]
        self._line(f"  [worker {worker + 1}] {description}: {max(total, 1)} steps")

    def worker_advance(self, worker: int, n: int = 1) -> None:
        if worker not in self.workers:
            return
        entry = self.workers[worker]
        before = entry[2] * 10 // entry[1]
        entry[2] += n
        if entry[2] * 10 // entry[1] > before and entry[2] < entry[1]:
            self._line(f"  [worker {worker + 1}] {entry[0]}: {entry[2]}/{entry[1]}")

    def grid_end(self) -> None:
        self._line("grid: finished")


def step_callback(reporter: Reporter, describe):
    """A TrainerCallback that shows every Trainer's steps on the reporter's second bar; `describe()` names
    the module being trained (read at the start of each training run, i.e. of each phase)."""
    from transformers import TrainerCallback

    class StepCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            # Resumed runs start at state.global_step; the bar shows the steps still to do.
            reporter.steps_start(describe(), max(int(state.max_steps or 0) - int(state.global_step or 0), 1))

        def on_step_end(self, args, state, control, **kwargs):
            reporter.steps_advance(1)

    return StepCallback()
