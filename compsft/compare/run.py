"""Running a grid: cells (method × target × seed) in order, modules trained on demand and cached.

For each cell the runner makes sure the method's modules exist (source language module, task module, target
language module; trained once, see `grid.py`), asks the method to assemble the model for the target, evaluates
it on the target's test set (and the module selected on source dev, when the budget asks for model selection;
when the selection kept the final step, that module is the fixed one and its score is reused,
`dev_selected_is_final` in the cell), and writes the cell's JSON atomically. A cell whose file exists is never
recomputed; a failing cell is recorded with its error and the grid goes on; an interrupted module resumes from
its checkpoints (`MethodContext.resume` with the module's `work_dir`).

Times per cell: `train_seconds` (modules trained during this cell), `assemble_seconds`,
`evaluate_seconds`, and `overhead_seconds`: the cell's wall time minus those three, i.e. the harness's
own cost (keys, files, bookkeeping). Reading the test sets and the tokenizer happens once per run
before the first cell (`setup_seconds` in results.json).
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from compsft.methods import DEV_SELECTED, LanguageData, MethodContext, ModuleInfo, TaskData, get_method

from .config import Grid, LanguageSide, Target
from .grid import (MODULE_FILE, cell_path, language_module_dir, read_json, relative_path, task_module_dir,
                   write_json)
from .progress import Reporter, step_callback

logger = logging.getLogger(__name__)


class ModuleFailed(Exception):
    """A module this cell needs failed earlier in this run (not retried until the next run)."""

    def __init__(self, message: str, trace: str = "") -> None:
        super().__init__(message)
        self.trace = trace


@dataclasses.dataclass(frozen=True)
class ModuleStep:
    """One module a cell needs: its role in the cell, its directory in the cache (its key), and how to train it."""

    role: str  # source_language, task, target_language
    key_dir: Path
    label: str
    train: Callable[[MethodContext, Path], ModuleInfo]


@dataclasses.dataclass
class CellTimes:
    train: float = 0.0
    assemble: float = 0.0
    evaluate: float = 0.0


class GridRunner:
    """Runs the cells of `grid` that are not done yet; `run()` returns every cell record (done or new)."""

    def __init__(self, grid: Grid, reporter: Reporter, device: str) -> None:
        self.grid = grid
        self.reporter = reporter
        self.device = device
        self._describe = ""
        self.ctx = MethodContext(model_dir=grid.model_dir, budget=grid.budget, device=device,
                                 callbacks=[step_callback(reporter, lambda: self._describe)])
        #: modules that failed in this run (key directory -> (error, traceback)): their cells fail, untrained
        self.failed_modules: dict[Path, tuple[str, str]] = {}
        self._test_sets: dict[str, list] = {}
        self._tokenizer = None
        self.cells_run = 0
        #: nodes whose worker or job died in this run (their cells are left for --resume)
        self.lost: list[str] = []
        #: reading the test sets and the tokenizer, before the first cell
        self.setup_seconds = 0.0

    # -- the grid -----------------------------------------------------------------------------------
    def cells(self) -> list[tuple[int, str, Target]]:
        """Seeds outermost, so that a partial grid already has every method at the first seed."""
        return [(s, m, t) for s in self.grid.seeds for m in self.grid.methods for t in self.grid.targets]

    def finished(self) -> list[dict[str, Any]]:
        """The records of the cells written so far (finished, or failed on their last try), in grid order."""
        records = []
        for s, m, t in self.cells():
            record = read_json(cell_path(self.grid.out, m, t.code, s))
            record = record or read_json(cell_path(self.grid.out, m, t.code, s, failed=True))
            if record is not None:
                records.append(record)
        return records

    def run(self, executor=None) -> list[dict[str, Any]]:
        """Run the cells not done yet through `executor` (default: in this process, one node at a time, in
        grid order: `compsft.compare.graph`) and return every cell record, done before or now."""
        from .executors import SerialExecutor
        from .graph import run_graph

        executor = executor or SerialExecutor()
        if executor.in_process and any(read_json(cell_path(self.grid.out, m, t.code, s)) is None
                                       for s, m, t in self.cells()):
            # once per run, not per cell: timed apart from the cells' overhead (workers read their own)
            started = time.perf_counter()
            self._get_tokenizer()
            for target in self.grid.targets:
                self._test_set(target)
            self.setup_seconds = time.perf_counter() - started
        return run_graph(self, executor)

    def target(self, code: str) -> Target:
        return next(t for t in self.grid.targets if t.code == code)

    # -- one cell -----------------------------------------------------------------------------------
    def run_cell(self, method: str, target: Target, seed: int) -> dict[str, Any]:
        name = cell_name(method, target.code, seed)
        self.reporter.cell_start(name)
        started = time.perf_counter()
        times = CellTimes()
        record: dict[str, Any] = {"method": method, "target": target.code, "seed": seed}
        failed_file = cell_path(self.grid.out, method, target.code, seed, failed=True)
        try:
            record.update(status="ok", **self._compute(method, target, seed, times))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:  # one cell's failure must not stop the grid
            logger.warning("cell %s failed: %s", name, err)
            record.update(status="failed", error=f"{type(err).__name__}: {err}",
                          traceback=err.trace if isinstance(err, ModuleFailed) else traceback.format_exc())
        wall = time.perf_counter() - started
        record["times"] = {"wall_seconds": round(wall, 4), "train_seconds": round(times.train, 4),
                           "assemble_seconds": round(times.assemble, 4), "evaluate_seconds": round(times.evaluate, 4),
                           "overhead_seconds": round(max(wall - times.train - times.assemble - times.evaluate, 0.0),
                                                     4)}
        if record["status"] == "ok":
            write_json(cell_path(self.grid.out, method, target.code, seed), record)
            failed_file.unlink(missing_ok=True)
        else:
            write_json(failed_file, record)  # kept for the record; the cell is retried on --resume
        self.cells_run += 1
        self.reporter.cell_end(name, cell_summary(record, self.grid.metric))
        return record

    def _compute(self, method: str, target: Target, seed: int, times: CellTimes) -> dict[str, Any]:
        spec = get_method(method)
        modules: dict[str, dict[str, Any]] = {}
        dirs = {step.role: self._module(step, times, modules) for step in self.module_plan(method, target, seed)}
        task_dir, target_dir = dirs["task"], dirs.get("target_language")
        metrics = {"fixed": self._evaluate(spec, task_dir, target_dir, target, times, "fixed"), "dev_selected": None}
        selected = task_dir / DEV_SELECTED
        has_selection = self.grid.budget.dev_checks > 0 and selected.is_dir()
        # When the best check was the last step, the dev-selected module is the fixed one, already scored.
        selected_is_final = has_selection and _selected_final_step(modules["task"])
        if selected_is_final:
            metrics["dev_selected"] = dict(metrics["fixed"])
        elif has_selection:
            metrics["dev_selected"] = self._evaluate(spec, selected, target_dir, target, times, "dev-selected")
        used = [k for k in ("task", "target_language") if k in modules]  # what the target's model holds
        return {"metrics": metrics, "dev_selected_is_final": selected_is_final, "modules": modules,
                "test_sentences": len(self._test_set(target)),
                "trainable": sum(modules[k]["trainable"] for k in used),
                "stored_bytes": sum(modules[k]["stored_bytes"] for k in used),
                "module_seconds": round(sum(m["seconds"] for m in modules.values()), 3)}

    # -- modules ------------------------------------------------------------------------------------
    def module_plan(self, method: str, target: Target, seed: int) -> list[ModuleStep]:
        """The modules a cell needs, in the order it makes sure of them (the task module after the source
        language module it is trained on). The grid's graph (`graph.py`) is built from this same list."""
        spec = get_method(method)
        steps = []
        source_dir = None
        if spec.has_language_module and spec.uses_source_language:
            steps.append(self._language_step(spec, self.grid.source, seed, "source_language"))
            source_dir = steps[-1].key_dir / "module"
        key_dir = task_module_dir(self.grid, spec.task_key, seed, source_dir.parent if source_dir else None)
        data = TaskData(task=self.grid.task, train=self.grid.source_train, dev=self.grid.source_dev)
        steps.append(ModuleStep("task", key_dir, f"{spec.task_key}: task module {self.grid.task} (seed {seed})",
                                lambda ctx, out: spec.train_task(ctx, data, source_dir, seed, out)))
        if spec.has_language_module and spec.uses_target_language:
            steps.append(self._language_step(spec, target.language, seed, "target_language"))
        return steps

    def _language_step(self, spec, lang: LanguageSide, seed: int, role: str) -> ModuleStep:
        data = LanguageData(code=lang.code, texts=[Path(p) for p in lang.texts],
                            exclude=[Path(p) for p in self.grid.exclude])
        return ModuleStep(role, language_module_dir(self.grid, spec.language_key, lang, seed),
                          f"{spec.language_key}: language module {lang.code} (seed {seed})",
                          lambda ctx, out: spec.train_language(ctx, data, seed, out))

    def train_module(self, method: str, target: Target, seed: int, role: str) -> dict[str, Any]:
        """Make sure of the module `role` of a cell (the modules before it in the plan must be done): the
        node of a module in the grid's graph. Returns its module.json."""
        modules: dict[str, dict[str, Any]] = {}
        step = next(s for s in self.module_plan(method, target, seed) if s.role == role)
        self._module(step, CellTimes(), modules)
        return modules[role]

    def _module(self, step: ModuleStep, times: CellTimes, modules: dict) -> Path:
        from .claims import claim_module

        key_dir, label = step.key_dir, step.label
        out, work, info_file = key_dir / "module", key_dir / "work", key_dir / MODULE_FILE
        info = read_json(info_file)
        if info is None:
            if key_dir in self.failed_modules:
                error, trace = self.failed_modules[key_dir]
                raise ModuleFailed(f"{label} failed earlier in this run: {error}", trace)
            # One trainer per module, across workers, grids and machines sharing the cache: the claim is
            # held while training; whoever waited finds module.json written when it gets the claim.
            with claim_module(key_dir, label, on_wait=lambda holder: self.reporter.steps_start(
                    f"{label}: waiting for {holder}", 1)):
                info = read_json(info_file) or self._train(out, work, info_file, label, step.train, times, key_dir)
        # `resumed` stays in module.json: a resumed grid's results must equal an uninterrupted one's.
        modules[step.role] = {"dir": relative_path(key_dir, self.grid.out),
                              **{k: v for k, v in info.items() if k != "resumed"}}
        return out

    def _train(self, out: Path, work: Path, info_file: Path, label: str, train, times: CellTimes,
               key_dir: Path) -> dict[str, Any]:
        if out.exists():  # a module killed while being written: start it again (checkpoints are in work/)
            shutil.rmtree(out)
        work.mkdir(parents=True, exist_ok=True)
        resume = any(work.iterdir())
        ctx = dataclasses.replace(self.ctx, work_dir=work, resume=resume)
        self._describe = label
        self.reporter.steps_start(label, 1)
        started = time.perf_counter()
        try:
            result = train(ctx, out)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:
            self.failed_modules[key_dir] = (f"{type(err).__name__}: {err}", traceback.format_exc())
            raise
        finally:
            times.train += time.perf_counter() - started
        wall = time.perf_counter() - started
        if not isinstance(result, ModuleInfo):
            raise TypeError(f"{label}: the method returned {type(result).__name__}, not a ModuleInfo")
        if not out.exists():
            raise RuntimeError(f"{label}: the method wrote nothing into {out}")
        info = {"trainable": int(result.trainable), "stored_bytes": int(result.stored_bytes),
                "seconds": round(float(result.seconds or wall), 3), "wall_seconds": round(wall, 3),
                "resumed": resume, "extra": result.extra}
        write_json(info_file, info)  # last: the module is done
        shutil.rmtree(work, ignore_errors=True)
        return info

    # -- evaluation ---------------------------------------------------------------------------------
    def _evaluate(self, spec, task_dir: Path, target_dir: Path | None, target: Target, times: CellTimes,
                  variant: str) -> dict[str, float]:
        from compsft.tasks import get_task

        task = get_task(self.grid.task)
        self.reporter.steps_start(f"{spec.name}: evaluate on {target.code} ({variant})", 2)
        started = time.perf_counter()
        model, labels = spec.assemble(self.ctx, task_dir, target_dir)
        times.assemble += time.perf_counter() - started
        self.reporter.steps_advance(1)
        sentences = self._test_set(target)
        tokenizer = self._get_tokenizer()
        started = time.perf_counter()
        gold = task.prepare_gold(sentences, labels)
        metrics, predictions = task.evaluate(model, tokenizer, gold, labels, batch_size=32)
        times.evaluate += time.perf_counter() - started
        self.reporter.steps_advance(1)
        del model
        return {k: float(v) for k, v in metrics.items()}

    def _test_set(self, target: Target) -> list:
        if target.code not in self._test_sets:
            from compsft.tasks import get_task, resolve_data

            sentences = get_task(self.grid.task).read(resolve_data(target.test))
            n = self.grid.budget.eval_sentences
            self._test_sets[target.code] = sentences[:n] if n else sentences
        return self._test_sets[target.code]

    def _get_tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.grid.model_dir)
        return self._tokenizer


def cell_name(method: str, target: str, seed: int) -> str:
    return f"{method} → {target}, seed {seed}"


def cell_summary(record: dict[str, Any], metric: str) -> str:
    """A finished cell in a few words, for the progress display."""
    if record.get("status") != "ok":
        return "FAILED: " + str(record.get("error", ""))[:80]
    score = (record["metrics"]["fixed"] or {}).get(metric)
    return f"{metric} {score:.4f}" if score is not None else "done"


def _selected_final_step(task_module: dict[str, Any]) -> bool:
    """Whether the task module's dev selection kept its final step (then the selected state is the final one)."""
    sel = (task_module.get("extra") or {}).get("dev_selected")
    return isinstance(sel, dict) and sel.get("step") is not None and sel.get("step") == sel.get("of_steps")
