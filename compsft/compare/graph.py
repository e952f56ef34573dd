"""A grid as a graph of work: module nodes (language, task) and cell nodes, each waiting for what it uses.

The graph is built from what the runner already knows: the cells not done, and for each the modules it needs
in the order it makes sure of them (`GridRunner.module_plan`: the source language module, the task module
trained on it, the target language module), keyed by their cache directories so that a module shared by
methods, targets or grids is one node. Modules already in the cache are not nodes. Nodes are numbered in
the order a sequential run reaches them (cells seeds outermost, each cell's modules just before it), and
`run_graph` always starts the lowest-numbered node that is ready: with one slot that is exactly the
sequential order, with more it is the same order, overlapped.

Every node runs the sequential grid's own code (`executors.execute_node`: `GridRunner.train_module` or
`GridRunner.run_cell`); the executor decides where and when. What a node leaves behind:

- ok: the module's module.json, or the cell's file (which may record a failed cell);
- failed (a module): its cells are run all the same and fail with its error (`ModuleFailed`), as in a
  sequential run; a task module waiting for a failed language module is not tried;
- lost (its worker or job died: SIGKILL, out of memory, a node gone): nothing that waits for it runs; the grid
  goes on with the rest and ends unfinished, and `--resume` continues the module from its checkpoints.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from .grid import MODULE_FILE, cell_path, read_json
from .run import GridRunner, cell_name, cell_summary

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Node:
    """One piece of work. A module node names the first cell (in grid order) that needs it and its role
    there: that is how a worker finds its training code."""

    index: int
    kind: str  # "module" or "cell"
    method: str
    target: str
    seed: int
    role: str = ""  # a module's role in that cell: source_language, task, target_language
    key_dir: str = ""  # a module's cache directory
    label: str = ""
    deps: tuple[int, ...] = ()


def build_graph(runner: GridRunner) -> list[Node]:
    """The nodes of the cells not done yet, in sequential order."""
    nodes: list[Node] = []
    by_dir: dict[Path, int] = {}
    for seed, method, target in runner.cells():
        if read_json(cell_path(runner.grid.out, method, target.code, seed)) is not None:
            continue
        deps: list[int] = []
        for step in runner.module_plan(method, target, seed):
            if step.key_dir not in by_dir and read_json(step.key_dir / MODULE_FILE) is None:
                # the modules a module waits for are those before it in the plan (a task module, its source)
                before = tuple(d for d in deps if nodes[d].role == "source_language") if step.role == "task" else ()
                nodes.append(Node(len(nodes), "module", method, target.code, seed, step.role, str(step.key_dir),
                                  step.label, before))
                by_dir[step.key_dir] = nodes[-1].index
            if step.key_dir in by_dir:
                deps.append(by_dir[step.key_dir])
        nodes.append(Node(len(nodes), "cell", method, target.code, seed, label=cell_name(method, target.code, seed),
                          deps=tuple(deps)))
    return nodes


def run_graph(runner: GridRunner, executor) -> list[dict[str, Any]]:
    """Run the grid's nodes through `executor`; return every cell record (done before, or run now)."""
    grid, reporter = runner.grid, runner.reporter
    cells = runner.cells()
    done_before = {(s, m, t.code): read_json(cell_path(grid.out, m, t.code, s)) for s, m, t in cells}
    reporter.grid_start(len(cells), sum(r is not None for r in done_before.values()))
    nodes = build_graph(runner)
    state: dict[int, str] = {}  # ok, failed, lost, skipped (a module not tried: what it needs failed)
    failed: dict[str, tuple[str, str]] = {}  # key_dir -> (error, traceback), handed to the cells
    records: dict[tuple, dict[str, Any]] = {}
    running: dict[Any, Node] = {}
    try:
        executor.start(runner)
        while len(state) < len(nodes):
            _start_ready(nodes, state, running, failed, executor, reporter)
            if not running:
                break
            for handle in executor.wait(list(running), timeout=0.5, reporter=reporter):
                node = running.pop(handle)
                outcome = executor.outcome(handle)
                state[node.index] = outcome["status"] if node.kind == "module" else "ok"
                if node.kind == "cell" and "record" in outcome:
                    records[node.seed, node.method, node.target] = outcome["record"]
                if not executor.in_process:
                    _report(reporter, node, outcome, grid.metric)
                if outcome["status"] == "failed" and node.kind == "module":
                    failed[node.key_dir] = (outcome["error"], outcome.get("traceback", ""))
                elif outcome["status"] == "lost":
                    state[node.index] = "lost"
                    logger.warning("%s: %s; what waits for it is left for --resume", node.label, outcome["error"])
            executor.drain(reporter)
    except KeyboardInterrupt:
        executor.stop()
        raise
    finally:
        executor.close()
        reporter.grid_end()
    lost = [n.label for n in nodes if state.get(n.index) == "lost"]
    if lost:
        logger.warning("unfinished: %d node(s) lost (%s); `--resume` continues them", len(lost), "; ".join(lost))
    runner.lost = lost
    out = []
    for s, m, t in cells:
        record = done_before[s, m, t.code] or records.get((s, m, t.code))
        if record is not None:
            out.append(record)
    return out


def _start_ready(nodes, state, running, failed, executor, reporter) -> None:
    """Start ready nodes, lowest number first, while the executor has a free slot."""
    busy = {n.index for n in running.values()}
    for node in nodes:
        if node.index in state or node.index in busy:
            continue
        deps = [state.get(d) for d in node.deps]
        if any(d is None for d in deps):
            continue
        if "lost" in deps:
            state[node.index] = "lost"  # waits for work that --resume must finish first
            continue
        if node.kind == "module" and ("failed" in deps or "skipped" in deps):
            state[node.index] = "skipped"  # a sequential run never tries it either
            continue
        if executor.slots is not None and len(running) >= executor.slots:
            return
        if not executor.in_process and node.kind == "cell":
            reporter.cell_start(node.label)
        running[executor.submit(node, dict(failed))] = node
        busy.add(node.index)


def _report(reporter, node: Node, outcome: dict[str, Any], metric: str) -> None:
    """What the driver shows of a node an out-of-process worker finished."""
    if node.kind == "cell":
        record = outcome.get("record") or {"status": "failed", "error": outcome.get("error", "lost")}
        reporter.cell_end(node.label, cell_summary(record, metric))
    elif outcome["status"] != "ok":
        logger.warning("%s %s: %s", node.label, outcome["status"], outcome.get("error", ""))
