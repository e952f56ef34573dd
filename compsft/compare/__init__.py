"""`compsft compare`: every method through one harness — same data, equal budgets, several seeds, one table.

    from compsft.compare import CompareConfig, compare
    results = compare(CompareConfig(task="pos", targets=["wol", "mlt"], methods=["lt-sft", "full-ft"],
                                    seeds=3, budget="cpu", out="runs/cmp"))

Modules: `config` (settings, targets, the resolved grid), `budgets` (quick, cpu, paper), `grid` (cache
layout and keys), `run` (the cells), `stats` (mean ± sd, paired intervals), `report` (json, csv, md),
`plot` (plot.png), `progress` (the reporter protocol), `presets` (the demo), `graph` (the grid as modules and
cells waiting for each other), `executors` and `slurm` (where they run: here, local workers, SLURM jobs),
`claims` (one trainer per module across processes and machines).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from compsft.errors import CompsftError

from .budgets import BUDGETS, get_budget
from .config import CompareConfig, SourceSpec, TargetSpec, load_targets_file, parse_target, resolve
from .progress import NullReporter, Reporter, TqdmReporter

logger = logging.getLogger(__name__)


def compare(config: CompareConfig, reporter: Reporter | None = None, executor=None) -> dict[str, Any]:
    """Run (or continue, with `config.resume`) the grid; write results.json, results.csv, results.md and
    plot.png into `config.out` and return the results. `executor` decides where the grid's modules and cells
    run (`compsft.compare.executors`: this process by default, local workers, or SLURM jobs); the results
    are the same."""
    from .grid import check_grid_file
    from .executors import SerialExecutor
    from .report import build_results, write_outputs
    from .run import GridRunner

    started = time.perf_counter()
    reporter = reporter or TqdmReporter()
    grid = resolve(config)
    # SLURM jobs run elsewhere: their GPUs are not this machine's (the login node's) to check.
    device = _device(config.device, check_here=not getattr(executor, "remote", False))
    if executor is not None:
        executor.check(device)  # before anything is written: a grid that cannot run leaves nothing to --resume
    grid.out.mkdir(parents=True, exist_ok=True)
    extended = check_grid_file(grid, config.resume or config.report_only, must_exist=config.report_only,
                               extend=config.resume and not config.report_only)
    for change in extended:
        logger.warning("%s: grid extended, %s (finished cells are kept)", grid.out / "grid.json", change)
    runner = GridRunner(grid, reporter, device)
    methods = method_table(grid.methods, grid.model_dir, grid.budget, grid.task, device)

    def report(cells: list) -> dict[str, Any]:
        results = build_results(grid, cells, methods, device, time.perf_counter() - started, runner.setup_seconds)
        results["cells_total"] = len(runner.cells())
        results["execution"] = (executor or SerialExecutor()).describe()
        if runner.lost:
            results["lost"] = list(runner.lost)
        write_outputs(grid.out, results)
        return results

    if config.report_only:
        return report(runner.finished())
    try:
        cells = runner.run(executor)
    except KeyboardInterrupt:
        # What finished is on disk already; the table of it is written before the interrupt goes on.
        done = runner.finished()
        if done:
            report(done)
        raise
    return report(cells)


def method_table(names, model_dir: Path, budget, task: str, device: str = "cpu") -> dict[str, dict[str, Any]]:
    """Each method's description, composition rule and parameter counts for `model_dir` (before training)."""
    from compsft.methods import MethodContext, get_method

    ctx = MethodContext(model_dir=Path(model_dir), budget=budget, device=device)
    table = {}
    for name in names:
        spec = get_method(name)
        entry: dict[str, Any] = {"description": spec.description, "composition": spec.composition,
                                 "language_key": spec.language_key if spec.has_language_module else None,
                                 "task_key": spec.task_key}
        try:
            entry["parameter_counts"] = {k: int(v) for k, v in spec.parameter_counts(ctx, task).items()}
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:  # a table entry, not a reason to stop the grid
            entry["parameter_counts"] = None
            entry["parameter_counts_error"] = f"{type(err).__name__}: {err}"
        table[name] = entry
    return table


def _device(device: str | None, check_here: bool = True) -> str:
    import torch

    if not check_here and device in (None, "cpu", "cuda"):
        return device or "cpu"
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        # The Trainer places the model itself; pick a GPU with CUDA_VISIBLE_DEVICES instead.
        raise CompsftError(f"--device {device}: use cpu or cuda (choose the GPU with CUDA_VISIBLE_DEVICES)")
    if device == "cuda" and not torch.cuda.is_available():
        raise CompsftError("--device cuda: CUDA is not available here")
    return device


__all__ = ["BUDGETS", "CompareConfig", "NullReporter", "Reporter", "SourceSpec", "TargetSpec", "TqdmReporter",
           "compare", "get_budget", "load_targets_file", "method_table", "parse_target", "resolve"]
