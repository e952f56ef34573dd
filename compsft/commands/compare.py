"""`compsft compare`: every method through one harness (see `compsft.compare`), with rich progress bars.

    compsft compare --task pos --targets wol,mlt --methods lt-sft,full-ft --seeds 3 --budget cpu --out runs/cmp
    compsft compare --target fao=fo_oft-ud-test.conllu:faroese.txt --methods lt-sft,full-ft --out runs/fao
    compsft compare --list-methods
"""
from __future__ import annotations

import contextlib
import logging
from enum import Enum
from pathlib import Path
from typing import Annotated, Iterator, List, Optional

import typer


class BudgetName(str, Enum):
    quick = "quick"
    cpu = "cpu"
    paper = "paper"


class DeviceName(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class ExecutorName(str, Enum):
    local = "local"
    slurm = "slurm"
    submitit_local = "submitit-local"
    submitit_debug = "submitit-debug"


# Options `compare` and `demo` share.
Task = Annotated[str, typer.Option("--task", help="pos, dep or ner.")]
ModelDir = Annotated[Optional[Path], typer.Option("--model", help="Model directory (default: the prepared default "
                                                                   "model; see `compsft prepare-model`).")]
Device = Annotated[Optional[DeviceName], typer.Option("--device", help="cpu or cuda (default: cuda if available).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the comparison in --out (same settings, "
                                                          "but methods and seeds may be added): finished cells "
                                                          "are kept, interrupted modules resume.")]


class RichReporter:
    """The grid's bar and the bar of the work in flight (with an ETA), on one rich Progress."""

    def __init__(self, progress) -> None:
        self.progress = progress
        self.grid = None
        self.steps = None
        self.workers: dict[int, object] = {}

    def grid_start(self, total: int, done: int) -> None:
        self.grid = self.progress.add_task("grid (cells)", total=max(total, 1), completed=done, summary="")

    def cell_start(self, name: str) -> None:
        if self.grid is not None:
            self.progress.update(self.grid, summary=name)

    def steps_start(self, description: str, total: int) -> None:
        if self.steps is not None:
            self.progress.remove_task(self.steps)
        self.steps = self.progress.add_task(f"  {description}", total=max(total, 1), summary="")

    def steps_advance(self, n: int = 1) -> None:
        if self.steps is not None:
            self.progress.advance(self.steps, n)

    def cell_end(self, name: str, summary: str) -> None:
        if self.steps is not None:
            self.progress.remove_task(self.steps)
            self.steps = None
        if self.grid is not None:
            self.progress.update(self.grid, advance=1, summary=f"{name}: {summary}")

    def grid_end(self) -> None:
        if self.steps is not None:
            self.progress.remove_task(self.steps)
            self.steps = None
        for task in self.workers.values():
            self.progress.remove_task(task)
        self.workers.clear()

    def worker_start(self, worker: int, description: str, total: int) -> None:
        """A line per worker (`--workers`): the module or evaluation in flight there."""
        if worker in self.workers:
            self.progress.remove_task(self.workers.pop(worker))
        self.workers[worker] = self.progress.add_task(f"  [{worker + 1}] {description}", total=max(total, 1),
                                                      summary="")

    def worker_advance(self, worker: int, n: int = 1) -> None:
        if worker in self.workers:
            self.progress.advance(self.workers[worker], n)


@contextlib.contextmanager
def rich_progress() -> Iterator:
    """A RichReporter on stderr (plain lines when stderr is not a terminal); the libraries' INFO lines are
    kept out of the way while it runs (and their levels restored after: the command may run inside a larger
    program)."""
    import transformers
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    quiet = ("compsft", "transformers", "datasets", "matplotlib")
    levels = {name: logging.getLogger(name).level for name in quiet}
    hf_verbosity = transformers.utils.logging.get_verbosity()
    columns = (TextColumn("{task.description:<44}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[summary]}"))
    try:
        for name in quiet:
            logging.getLogger(name).setLevel(logging.WARNING)
        # Load reports of task models built from an MLM checkpoint (head missing, MLM head unused) are expected.
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        console = Console(stderr=True)
        if not console.is_terminal:
            # A live bar renders nothing into a log file until it stops: write lines there instead.
            from compsft.compare.progress import LineReporter

            yield LineReporter()
            return
        with Progress(*columns, console=console) as progress:
            yield RichReporter(progress)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        transformers.utils.logging.set_verbosity(hf_verbosity)
        transformers.utils.logging.enable_progress_bar()


def results_tables(results: dict, title: str) -> list:
    """Rich tables of a comparison: the scores per variant and the paired differences."""
    from rich.table import Table

    from compsft.compare.report import VARIANTS, difference_rows, table_rows

    tables = []
    for variant in results["summary"]:
        header, rows = table_rows(results, variant)
        table = Table(title=f"{title} — {VARIANTS[variant]}")
        for i, column in enumerate(header):
            table.add_column(column, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        diffs = difference_rows(results, variant)
        if diffs:
            table.caption = "paired Δ vs lt-sft, 95% t-interval over seeds × targets: " + "; ".join(
                f"{m} {mean} {ci} (n={n})" for m, mean, ci, n in diffs)
        tables.append(table)
    return tables


def print_results(results: dict, out: Path, title: str) -> None:
    from rich.console import Console

    console = Console()
    for table in results_tables(results, title):
        console.print(table)
    s, t = results["settings"], results["times"]
    o = t["overhead_seconds_per_cell"]
    Console(stderr=True).print(
        f"budget {s['budget']['name']}, seeds {', '.join(map(str, s['seeds']))}, metric {results['metric']}; "
        f"{t['run_seconds']:.0f} s on {s['device']}"
        + (f"; harness overhead {o['mean']:.3f} s/cell" if o["cells"] else "")
        + (f"; [red]{len(results['failed'])} failed cell(s)[/red] (see results.md)" if results["failed"] else "")
        + (f"; [yellow]unfinished grid: {len(results['cells'])} of {results['cells_total']} cells[/yellow] "
           "(--resume continues it)" if results.get("cells_total", 0) > len(results["cells"]) else "")
        + (f"; [yellow]{len(results['lost'])} module(s) or cell(s) lost with their worker[/yellow] "
           f"({'; '.join(results['lost'])[:300]})" if results.get("lost") else "")
        + f"\nwrote {out / 'results.md'}, results.json, results.csv, plot.png")


def print_methods(names: list[str], model: Optional[Path], budget: str, task: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from compsft.compare import get_budget, method_table
    from compsft.compare.report import fmt_bytes, fmt_int
    from compsft.models import default_model_dir

    model_dir = model or default_model_dir()
    table = Table(title=f"compare methods ({task}, model {model_dir})")
    for column in ("method", "composition", "trainable params", "stored", "description"):
        table.add_column(column, overflow="fold", no_wrap=column == "method",
                         justify="right" if column in ("trainable params", "stored") else "left")
    for name, info in method_table(names, model_dir, get_budget(budget, task), task).items():
        counts = info.get("parameter_counts") or {}
        table.add_row(name, info["composition"], fmt_int(counts.get("trainable")),
                      fmt_bytes(counts.get("stored_bytes")),
                      info["description"] + (f" [red]({info['parameter_counts_error']})[/red]"
                                             if "parameter_counts_error" in info else ""))
    Console().print(table)


def _key_value(text: str, option: str) -> tuple[str, str]:
    from compsft.errors import CompsftError

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise CompsftError(f"{option} {text!r}: expected KEY=VALUE")
    return key.strip().replace("-", "_"), value.strip()


def _split(values: List[str]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def register(app: typer.Typer) -> None:
    @app.command("compare")
    def compare_command(
        task: Task = "pos",
        targets: Annotated[List[str], typer.Option(
            "--targets", help="Catalogue targets, comma-separated (default: wol,mlt for pos/dep, hau,swa for "
                              "ner).")] = [],
        target: Annotated[List[str], typer.Option(
            "--target", help="Your own target, repeatable: CODE=TEST_FILE:TEXT_FILE[,TEXT_FILE...].")] = [],
        targets_file: Annotated[Optional[Path], typer.Option(
            "--targets-file", help="JSON or TOML file with 'targets' (and optionally 'source').")] = None,
        methods: Annotated[List[str], typer.Option(
            "--methods", help="Methods, comma-separated (see --list-methods).")] = [],
        seeds: Annotated[int, typer.Option("--seeds", min=1, help="Number of seeds (42, 43, ...).")] = 3,
        budget: Annotated[BudgetName, typer.Option("--budget", help="quick (smoke run), cpu, paper (GPU).")]
        = BudgetName.cpu,
        model: ModelDir = None,
        out: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path("runs/cmp"),
        resume: ResumeOpt = False,
        report_only: Annotated[bool, typer.Option("--report-only", help="Write the table of the cells finished "
                                                  "so far in --out (same settings as the run), training "
                                                  "nothing.")] = False,
        device: Device = None,
        source_train: Annotated[Optional[str], typer.Option("--source-train", help="Source training data "
                                                            "(shipped name or file).")] = None,
        source_dev: Annotated[Optional[str], typer.Option("--source-dev", help="Source dev data (model "
                                                          "selection).")] = None,
        source_lang: Annotated[str, typer.Option("--source-lang", help="Source language code.")] = "eng",
        source_text: Annotated[List[Path], typer.Option("--source-text", help="Source raw text (repeatable; "
                                                        "default: the catalogue's).")] = [],
        module_cache: Annotated[Optional[Path], typer.Option(
            "--module-cache", help="Where modules are cached (default: OUT/modules); share it between "
                                   "comparisons to reuse language modules across tasks.")] = None,
        list_methods_: Annotated[bool, typer.Option("--list-methods", help="List the methods with their "
                                                    "composition, trainable parameters and stored bytes for "
                                                    "--model, and exit.")] = False,
        workers: Annotated[int, typer.Option("--workers", min=1, help="Worker processes on this machine "
                                             "(modules and cells in parallel; with --device cuda one GPU each). "
                                             "With --executor slurm: jobs in flight at most (default: all "
                                             "that are ready).", rich_help_panel="Parallel")] = 1,
        threads_per_worker: Annotated[Optional[int], typer.Option(
            "--threads-per-worker", min=1, help="Torch threads per worker (default: CPU cores / workers); "
            "give the same number to compare timings or scores with a sequential run.",
            rich_help_panel="Parallel")] = None,
        executor: Annotated[ExecutorName, typer.Option(
            "--executor", help="local (processes here), slurm (a job per module and cell, through submitit; "
            "the slurm extra: pip install 'compsft\\[slurm]'); submitit-local / submitit-debug: the slurm "
            "path run here.",
            rich_help_panel="Parallel")] = ExecutorName.local,
        worker_setup: Annotated[Optional[str], typer.Option(
            "--worker-setup", help="MODULE:FUNCTION called in each worker before its first node (to register "
            "your own methods there).", rich_help_panel="Parallel")] = None,
        slurm_partition: Annotated[Optional[str], typer.Option("--slurm-partition",
                                                               rich_help_panel="SLURM")] = None,
        slurm_time: Annotated[int, typer.Option("--slurm-time", min=1, help="Minutes per job.",
                                                rich_help_panel="SLURM")] = 24 * 60,
        slurm_gpus: Annotated[Optional[int], typer.Option("--slurm-gpus", min=0, help="GPUs per job.",
                                                          rich_help_panel="SLURM")] = None,
        slurm_mem: Annotated[Optional[float], typer.Option("--slurm-mem", min=0, help="Memory per job (GB).",
                                                           rich_help_panel="SLURM")] = None,
        slurm_cpus: Annotated[Optional[int], typer.Option("--slurm-cpus", min=1, help="CPUs per job (also the "
                                                          "torch threads unless --threads-per-worker).",
                                                          rich_help_panel="SLURM")] = None,
        slurm_folder: Annotated[Optional[Path], typer.Option(
            "--slurm-folder", help="submitit's folder: job scripts, logs (default OUT/slurm; on a filesystem "
            "the nodes share, like --out).", rich_help_panel="SLURM")] = None,
        slurm_extra: Annotated[List[str], typer.Option(
            "--slurm-extra", help="Any other sbatch option, KEY=VALUE, repeatable (account=..., qos=...).",
            rich_help_panel="SLURM")] = [],
    ) -> None:
        """Compare methods on the same data with equal budgets over several seeds: one table, one plot.

        Example: compsft compare --task pos --targets wol,mlt --methods lt-sft,full-ft --seeds 3 --out runs/cmp
        """
        from compsft.compare import CompareConfig, SourceSpec, compare
        from compsft.compare.config import DEFAULT_METHODS
        from compsft.methods import list_methods

        method_names = _split(methods)
        if list_methods_:
            print_methods(method_names or list_methods(), model, budget.value, task)
            return
        source = None
        if source_train or source_dev or source_text or source_lang != "eng":
            source = SourceSpec(code=source_lang, train=source_train or "", dev=source_dev or "",
                                texts=tuple(str(p) for p in source_text))
        config = CompareConfig(task=task, targets=[*_split(targets), *target], methods=method_names or
                               list(DEFAULT_METHODS), seeds=seeds, budget=budget.value,
                               model=str(model) if model else None, out=str(out), resume=resume,
                               report_only=report_only, device=device.value if device else None, source=source,
                               module_cache=str(module_cache) if module_cache else None,
                               targets_file=str(targets_file) if targets_file else None)
        from compsft.compare.executors import build_executor

        extra = dict(_key_value(e, "--slurm-extra") for e in slurm_extra)
        runner = build_executor(executor.value, workers, threads_per_worker, worker_setup, out, dict(
            partition=slurm_partition, time_min=slurm_time, gpus=slurm_gpus, mem_gb=slurm_mem, cpus=slurm_cpus,
            extra=extra, folder=slurm_folder, max_jobs=workers if workers > 1 else None))
        with rich_progress() as reporter:
            results = compare(config, reporter, runner)
        print_results(results, out, f"compsft compare: {task}")
