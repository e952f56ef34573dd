"""`compsft demo`: the whole LT-SFT pipeline on the shipped data, with a progress bar per stage."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


class RichReporter:
    """A rich progress bar per stage, kept on screen when the stage is done."""

    def __init__(self, progress) -> None:
        self.progress = progress
        self.tasks: dict[str, int] = {}

    def start(self, stage: str, total: int) -> None:
        self.tasks[stage] = self.progress.add_task(stage, total=max(total, 1), summary="")

    def advance(self, stage: str, n: int = 1) -> None:
        if stage in self.tasks:
            self.progress.advance(self.tasks[stage], n)

    def finish(self, stage: str, summary: str) -> None:
        task = self.tasks.get(stage)
        if task is not None:
            total = self.progress.tasks[[t.id for t in self.progress.tasks].index(task)].total
            self.progress.update(task, completed=total, summary=summary)


def results_table(report: dict):
    """The final rich table: each method's metrics on the target test set and the source dev set."""
    from rich.table import Table

    from compsft.demo import METHOD_TITLES, METHODS
    from compsft.demo_stages import PRIMARY_METRIC

    s = report["settings"]
    task = s["task"]
    res = report["results"]
    keys = {"pos": ["accuracy"], "dep": ["uas", "las"], "ner": ["precision", "recall", "f1"]}[task]
    test = report["data"]["test"]
    dev = report["data"].get("source_dev", {})
    table = Table(title=f"compsft demo: {task}, {s['source']} -> {s['target']} zero-shot ({s['preset']} budget)")
    table.add_column("method")
    for k in keys:
        table.add_column(f"{s['target']} test {k}", justify="right")
    if res.get("source_dev"):
        table.add_column(f"{s['source']} dev {PRIMARY_METRIC[task]}", justify="right")
    for m in METHODS:
        row = [METHOD_TITLES[m]] + [f"{res['target'][m][k]:.4f}" if m in res["target"] else "-" for k in keys]
        if res.get("source_dev"):
            row.append(f"{res['source_dev'][m][PRIMARY_METRIC[task]]:.4f}" if m in res["source_dev"] else "-")
        table.add_row(*row)
    sfts = report["sfts"]
    lang_k = sfts.get(f"language:{s['target']}", {})
    task_k = sfts.get(f"task:{task}", {})
    table.caption = (
        f"{test.get('sentences')} {test.get('data')} sentences, {dev.get('sentences', 0)} source dev sentences; "
        f"language SFT K {lang_k.get('k', 0):,} ({100 * lang_k.get('density', 0):.2f}%), task SFT K "
        f"{task_k.get('k', 0):,} ({100 * task_k.get('density', 0):.2f}%), {sfts.get('full-ft', {}).get('steps')} "
        f"task steps each; {report['total_seconds']:.0f} s on {report['machine']['device']} "
        f"({report['machine']['cpu_count']} CPUs)"
    )
    return table


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        out: Path = typer.Option(Path("compsft-demo"), "--out", help="Output directory (report.json, plot.png, "
                                                                    "SFTs, predictions)."),
        task: str = typer.Option("pos", "--task", help="pos, dep or ner."),
        target: Optional[str] = typer.Option(None, "--target", help="Target language (default: wol for pos/dep, "
                                                                    "hau for ner); see `compsft languages`."),
        quick: bool = typer.Option(False, "--quick", help="A smoke run of a few minutes (tiny budgets)."),
        paper: bool = typer.Option(False, "--paper", help="The paper's budgets (epochs, K, lengths): for a GPU."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda if available)."),
        model: Optional[Path] = typer.Option(None, "--model", help="Use this model directory instead of the "
                                                                   "default model (an MLM model: mBERT, XLM-R...)."),
        seed: int = typer.Option(42, "--seed", help="Seed of every stage."),
    ) -> None:
        """Run the whole LT-SFT pipeline: language SFTs, task SFT, composition, zero-shot evaluation."""
        import logging

        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from compsft.demo import DemoConfig, run_demo
        from compsft.errors import CompsftError

        if quick and paper:
            raise CompsftError("--quick and --paper exclude each other")
        preset = "quick" if quick else "paper" if paper else "default"
        config = DemoConfig(out=str(out), task=task, target=target, preset=preset, device=device, seed=seed,
                            model=str(model) if model else None)
        import transformers

        # The stages report through the bars; keep the libraries' INFO lines out of the way while the
        # demo runs (and restore the levels after it: the command may run inside a larger program).
        quiet = ("compsft", "transformers", "datasets", "matplotlib")
        levels = {name: logging.getLogger(name).level for name in quiet}
        hf_verbosity = transformers.utils.logging.get_verbosity()
        console = Console(stderr=True)
        columns = (TextColumn("{task.description:<32}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[summary]}"))
        try:
            for name in quiet:
                logging.getLogger(name).setLevel(logging.WARNING)
            # The load report of a tagger built from an MLM checkpoint (head missing, MLM head unused) is expected.
            transformers.utils.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
            with Progress(*columns, console=console) as progress:
                report = run_demo(config, RichReporter(progress))
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
            transformers.utils.logging.set_verbosity(hf_verbosity)
            transformers.utils.logging.enable_progress_bar()
        Console().print(results_table(report))
        console.print(f"wrote {out / 'report.json'}, {out / 'plot.png'}, SFTs in {out / 'sfts'}, "
                      f"predictions in {out / 'predictions'}")
