"""Where a comparison keeps its work, and how it recognises work already done.

Layout under ``--out`` (modules may live elsewhere with `module_cache`, shared between grids)::

    grid.json                                   the grid's definition; --resume must match it
                                                (methods and seeds may be added or dropped)
    modules/language/<language_key>/<code>-seed<S>-<digest>/
        module/        what the method wrote (an SFT directory, a model, ...)
        work/          checkpoints while it trains (removed when the module is done)
        module.json    written last: the module is done (ModuleInfo + wall time)
    modules/task/<task_key>/<task>-<source>-seed<S>-<budget>-<digest>/   the same
    cells/<method>/<target>/seed<S>.json          a finished cell (metrics, modules, times)
    cells/<method>/<target>/seed<S>.failed.json   a failed cell (message, traceback); retried on --resume
    results.json  results.csv  results.md  plot.png

A language module is keyed by (language_key, language, the lines it trains on, seed, the budget's language
fields, model), so it is trained once and reused across methods with the same key, across targets and, with a
shared `module_cache`, across tasks, whose budgets differ in task fields only (`compsft.compare.budgets`), and
across grids of other targets wherever their evaluation files drop the same lines from its text (English
text holds no Wolof test sentence, so the English SFT of a Wolof grid is the English SFT of a Maltese one).
A task module by (task_key, task, source data, the source language module it was trained on, seed, the budget's
other fields, model): the language fields reach it through its source module, so a task module trained on θ0
(full fine-tuning) is shared by every language budget. Files enter a key by their bytes (SHA-256), not their
paths. The digest covers every input; the readable part of the name is for people.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from compsft.errors import CompsftError

from .budgets import language_budget, task_budget
from .config import Grid, LanguageSide, recorded_text_path

GRID_FILE = "grid.json"
MODULE_FILE = "module.json"


def digest(data: Any) -> str:
    """A short, stable hash of JSON-ready data."""
    text = json.dumps(data, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


#: what a --resume may change: a cell depends on its own method and seed only, so a grid grows by methods
#: and seeds without touching the cells it has. Targets may not change: their evaluation files are kept out of
#: every language's MLM text, so another target set can mean other language modules under cells that are
#: named by method, target and seed only.
EXTENSIBLE = ("methods", "seeds")


def check_grid_file(grid: Grid, resume: bool, must_exist: bool = False, extend: bool = False) -> list[str]:
    """Record the grid in OUT/grid.json, or check it against the one there (--resume). `must_exist`: there
    must be one already (a report of a grid run before). `extend`: the methods and seeds may differ from the
    recorded ones (the record becomes the new grid). Returns what was extended, for the log."""
    from compsft.atomic import write_text

    path = grid.out / GRID_FILE
    record = grid.record()
    if must_exist and not path.is_file():
        raise CompsftError(f"{path}: no comparison there to report on (run it first, with the same settings)")
    if not path.is_file():
        write_text(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        return []
    if not resume:
        raise CompsftError(f"{path}: a comparison is already in {grid.out}; pass --resume to continue it, "
                           "or choose another --out")
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CompsftError(f"{path}: unreadable grid file ({err})") from None
    if not isinstance(old, dict):
        raise CompsftError(f"{path}: not a grid file")
    free = EXTENSIBLE if extend else ()
    changed = [k for k in sorted(set(old) | set(record))
               if _by_content(k, old.get(k)) != _by_content(k, record.get(k)) and k not in free]
    if changed:
        detail = "; ".join(f"{k}: {json.dumps(old.get(k))} there, {json.dumps(record.get(k))} now"
                           for k in changed)
        hint = (" (only methods and seeds may change on --resume: other targets can change any language "
                "module; start another --out, with --module-cache OUT/modules to reuse what does not depend on "
                "the targets)" if extend and "targets" in changed else "")
        raise CompsftError(f"{path}: --resume with another configuration ({detail[:600]}){hint}; "
                           "use the same settings, or another --out")
    extended = [f"{k} {old.get(k)} -> {record[k]}" for k in free if old.get(k) != record.get(k)]
    if extended:
        write_text(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return extended


def _text_identity(text: Any) -> Any:
    """A recorded text file as the bytes it holds, where it can be read. Grids recorded before shipped texts
    were named by their place in the package (`compsft.languages:data/...`) hold a checkout's absolute paths;
    the same files under either name are the same grid, as they are the same module keys."""
    if not isinstance(text, str):
        return text
    path = recorded_text_path(text)
    try:
        return "sha256:" + file_digest(path) if path.is_file() else text
    except CompsftError:
        return text


def _by_content(key: str, value: Any) -> Any:
    """A grid record's `source` or `targets` entry with its texts compared by content (`_text_identity`)."""
    if key not in ("source", "targets"):
        return value
    entries = value if isinstance(value, list) else [value]
    out = []
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("texts"), list):
            entry = {**entry, "texts": [_text_identity(t) for t in entry["texts"]]}
        out.append(entry)
    return out if isinstance(value, list) else out[0]


def _common(grid: Grid, seed: int, budget: dict[str, Any]) -> dict[str, Any]:
    return {"seed": seed, "budget": budget, "model": str(grid.model_dir)}


@functools.lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def file_digest(path: str | Path) -> str:
    """The SHA-256 of a file's bytes: modules are keyed by what their data says, not where it lies, so an
    edited text file trains a new module and a copy of the checkout finds the modules of the old one."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise CompsftError(f"{path}: cannot read ({err.strerror or err})") from None
    return _file_sha256(str(path), st.st_size, st.st_mtime_ns)


#: (texts, evaluation files, each with its bytes' SHA-256) -> the SHA-256 of the cleaned lines: a few seconds
#: each to compute, so the driver of a parallel grid hands its own to the workers (`text_digests`)
_CLEANED: dict[tuple, str] = {}


def _cleaned_text_sha256(texts: tuple[tuple[str, str], ...], exclude: tuple[tuple[str, str], ...]) -> str:
    from compsft.languages import load_mlm_corpus

    if (texts, exclude) not in _CLEANED:
        corpus = load_mlm_corpus([path for path, _ in texts], exclude=[path for path, _ in exclude])
        sha = hashlib.sha256()
        for line in corpus.lines:
            sha.update(line.encode("utf-8") + b"\n")
        _CLEANED[texts, exclude] = sha.hexdigest()
    return _CLEANED[texts, exclude]


def text_digests(known: dict[tuple, str] | None = None) -> dict[tuple, str]:
    """The cleaned-text digests computed in this process, after adding `known` (another process's). Their
    keys hold the files' bytes' digests, so an edited file is never matched by an old entry."""
    if known:
        _CLEANED.update(known)
    return dict(_CLEANED)


def cleaned_text_digest(texts: list[str] | tuple[str, ...], exclude: list[str] | tuple[str, ...]) -> str:
    """The SHA-256 of the MLM lines a language module trains on: its texts read, normalised, deduplicated and
    cleaned of every sentence of the evaluation files `exclude`, exactly as the trainers call
    `load_mlm_corpus` (before their `max_lines` cut, which is a language field of the budget, keyed apart).
    Keying the lines rather than the evaluation files' bytes lets grids over other targets share a module
    whose text those targets' files do not touch."""
    # Each file by its bytes too, so that the cache cannot outlive an edit.
    return _cleaned_text_sha256(tuple((str(p), file_digest(p)) for p in texts),
                                tuple(sorted((str(p), file_digest(p)) for p in exclude)))


def language_module_dir(grid: Grid, language_key: str, lang: LanguageSide, seed: int) -> Path:
    # Only the language fields of the budget: a language module never sees the task's, so a parsing grid
    # whose budget trains tasks longer still reuses the POS grid's language modules. A catalogue language's
    # own evaluation files, which its trainers always exclude, are among `grid.exclude` (config.resolve).
    key = {"kind": "language", "key": language_key, "code": lang.code,
           "lines": cleaned_text_digest(lang.texts, grid.exclude),
           **_common(grid, seed, language_budget(grid.budget))}
    return grid.module_cache / "language" / language_key / f"{lang.code}-seed{seed}-{digest(key)}"


def task_module_dir(grid: Grid, task_key: str, seed: int, source_module: Path | None) -> Path:
    from compsft.tasks import resolve_data

    key = {"kind": "task", "key": task_key, "task": grid.task, "source": grid.source.code,
           "train": file_digest(resolve_data(grid.source_train)),
           "dev": file_digest(resolve_data(grid.source_dev)) if grid.source_dev else None,
           "source_module": source_module.name if source_module is not None else None,
           **_common(grid, seed, task_budget(grid.budget))}
    return grid.module_cache / "task" / task_key / \
        f"{grid.task}-{grid.source.code}-seed{seed}-{grid.budget_name}-{digest(key)}"


def cell_path(out: Path, method: str, target: str, seed: int, failed: bool = False) -> Path:
    return out / "cells" / method / target / (f"seed{seed}.failed.json" if failed else f"seed{seed}.json")


def relative_path(path: Path, root: Path) -> str:
    """How results record a path: relative to the grid's directory where it lies inside, else absolute."""
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path.resolve())


def recorded_path(recorded: str, root: Path) -> Path:
    """The path a result records (the inverse of `relative_path`)."""
    path = Path(recorded)
    return path if path.is_absolute() else root / path


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file the harness wrote, or None if it is not there (or not readable: it is then redone)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    from compsft.atomic import write_text

    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
