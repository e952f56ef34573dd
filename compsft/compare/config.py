"""What a comparison runs: `CompareConfig` (the user's settings) and `Grid` (the same, resolved and checked).

Targets are catalogue languages with shipped test sets (UD: mlt, wol, uig, myv, glv; MasakhaNER: hau, ibo,
kin, lug, luo, pcm, swa) or a user's own language: a code, its test file and its raw text::

    parse_target("wol", "pos")                               # catalogue: shipped test set and text
    parse_target("fao=fo_oft-ud-test.conllu:faroese.txt", "pos")   # your own (texts: TEXT[,TEXT...])

or a small JSON/TOML file (`load_targets_file`)::

    {"source": {"code": "eng", "train": "ud:en_ewt:train", "dev": "ud:en_ewt:dev"},
     "targets": [{"code": "fao", "test": "fo_oft-ud-test.conllu", "texts": ["faroese.txt"]}, "wol"]}

Relative paths in a file are relative to the file. Every problem is a `CompsftError` naming the file and
the field, before anything is trained.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from compsft.errors import CompsftError
from compsft.methods.base import Budget

from .budgets import budget_dict, get_budget

#: task -> (source training data, source dev data, default targets)
TASK_SOURCES = {
    "pos": ("ud:en_ewt:train", "ud:en_ewt:dev", ("wol", "mlt")),
    "dep": ("ud:en_ewt:train", "ud:en_ewt:dev", ("wol", "mlt")),
    "ner": ("ner:uner:en_ewt:train", "ner:uner:en_ewt:dev", ("hau", "swa")),
}
SOURCE_LANGUAGE = "eng"
DEFAULT_METHODS = ("lt-sft", "task-sft-only", "full-ft")
DEFAULT_SEEDS = 3
FIRST_SEED = 42
#: the baseline of the paired differences
REFERENCE_METHOD = "lt-sft"
PRIMARY_METRIC = {"pos": "accuracy", "dep": "las", "ner": "f1"}

# Codes become directory names: keep them to letters, digits, '-' and '_'.
_CODE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")


@dataclass
class TargetSpec:
    """One target language: a code (the table's column), its test set, its raw text (MLM)."""

    code: str = field(metadata={"help": "language code (ISO 639-3 for catalogue languages)"})
    test: str = field(default="", metadata={"help": "test set: shipped data name or file ('' = the catalogue's)"})
    texts: tuple[str, ...] = field(default=(), metadata={"help": "raw text files (empty = the catalogue's)"})


@dataclass
class SourceSpec:
    """The source language: labelled task data (train, dev for model selection) and its raw text."""

    code: str = field(default=SOURCE_LANGUAGE, metadata={"help": "source language code"})
    train: str = field(default="", metadata={"help": "training data: shipped name or file ('' = task default)"})
    dev: str = field(default="", metadata={"help": "dev data for model selection ('' = task default)"})
    texts: tuple[str, ...] = field(default=(), metadata={"help": "raw text files (empty = the catalogue's)"})


@dataclass
class CompareConfig:
    """Settings of one comparison (all recorded in grid.json and results.json)."""

    task: str = field(default="pos", metadata={"help": "pos, dep or ner"})
    targets: Sequence[str | TargetSpec] = field(default=(), metadata={"help": "targets (empty = task default)"})
    methods: Sequence[str] = field(default=DEFAULT_METHODS, metadata={"help": "method names (compsft.methods)"})
    seeds: int | Sequence[int] = field(default=DEFAULT_SEEDS, metadata={"help": f"N (seeds {FIRST_SEED}.."
                                                                                 f"{FIRST_SEED}+N-1) or a list"})
    budget: str | Budget = field(default="cpu", metadata={"help": "quick, cpu, paper, or a Budget"})
    model: str | None = field(default=None, metadata={"help": "model directory (default: the default model)"})
    out: str = field(default="runs/cmp", metadata={"help": "output directory"})
    resume: bool = field(default=False, metadata={"help": "continue the comparison already in `out` (methods "
                                                           "and seeds may be added)"})
    report_only: bool = field(default=False, metadata={"help": "write the table of the cells finished so far in "
                                                                "`out` (same settings); train nothing"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda if available)"})
    source: SourceSpec | None = field(default=None, metadata={"help": "source side (default: English)"})
    module_cache: str | None = field(default=None, metadata={"help": "where modules are cached (default: "
                                                                      "OUT/modules); share it between grids"})
    targets_file: str | None = field(default=None, metadata={"help": "JSON/TOML file of targets (and source)"})


@dataclass
class LanguageSide:
    """A language as the grid trains it: code, raw text files, and whether the catalogue knows it."""

    code: str
    texts: tuple[str, ...]
    catalogue: bool


@dataclass
class Target:
    language: LanguageSide
    test: str  # shipped data name or absolute path

    @property
    def code(self) -> str:
        return self.language.code


@dataclass
class Grid:
    """A resolved, checked comparison: everything needed to run it and to recognise it on --resume."""

    task: str
    source: LanguageSide
    source_train: str
    source_dev: str
    targets: list[Target]
    methods: list[str]
    seeds: list[int]
    budget_name: str
    budget: Budget
    model_dir: Path
    out: Path
    module_cache: Path
    exclude: tuple[str, ...]  # evaluation files kept out of every language's MLM text

    @property
    def metric(self) -> str:
        return PRIMARY_METRIC[self.task]

    def record(self) -> dict[str, Any]:
        """What defines the grid (grid.json): a --resume with anything else here but the methods and seeds
        is refused."""
        return {
            "task": self.task,
            "source": {"code": self.source.code, "train": self.source_train, "dev": self.source_dev,
                       "texts": _portable(self.source.texts)},
            "targets": [{"code": t.code, "test": t.test, "texts": _portable(t.language.texts)}
                        for t in self.targets],
            "methods": list(self.methods),
            "seeds": list(self.seeds),
            "budget": {"name": self.budget_name, **budget_dict(self.budget)},
            "model": str(self.model_dir),
        }


#: how a grid record names a shipped text file: by its place in the `compsft.languages` package
SHIPPED = "compsft.languages:"


def _portable(texts: Sequence[str]) -> list[str]:
    """Shipped text files by their place in the package (`compsft.languages:data/eng/udhr.txt.gz`), so a
    grid recorded in one checkout or install is resumed from another; the user's own files by their paths."""
    from compsft.languages.catalogue import DATA_DIR

    out = []
    for text in texts:
        try:
            out.append(SHIPPED + "data/" + Path(text).resolve().relative_to(DATA_DIR).as_posix())
        except ValueError:
            out.append(str(text))
    return out


def recorded_text_path(text: str) -> Path:
    """The file a grid record's text entry names (the inverse of `_portable`)."""
    if text.startswith(SHIPPED):
        from compsft.languages.catalogue import DATA_DIR

        return DATA_DIR.parent / text[len(SHIPPED):]
    return Path(text)


# -- targets -----------------------------------------------------------------------------------------
def _check_code(code: str, where: str) -> str:
    if not _CODE.match(code):
        raise CompsftError(f"{where}: language code {code!r} must be letters, digits, '-' or '_' "
                           "(e.g. an ISO 639-3 code such as 'fao')")
    return code


def _existing_file(path: str, where: str, base: Path | None = None) -> str:
    p = Path(path).expanduser()
    if base is not None and not p.is_absolute():
        p = base / p
    if not p.is_file():
        raise CompsftError(f"{where}: no such file: {p}")
    return str(p.resolve())


def _data(name_or_path: str, where: str, base: Path | None = None) -> str:
    """A shipped data name stays a name; anything else must be an existing file (made absolute)."""
    from compsft.tasks import DATASETS

    if name_or_path in DATASETS:
        return name_or_path
    return _existing_file(name_or_path, where, base)


def default_test(task: str, code: str) -> str | None:
    """The shipped test set of catalogue language `code` for `task`, or None."""
    from compsft.languages import get_language
    from compsft.tasks import DATASETS
    from compsft.tasks.catalogue import UD_TARGETS

    lang = get_language(code)
    if task == "ner":
        name = f"ner:masakhaner:{lang.code}:test"
    else:
        tb = UD_TARGETS.get(lang.iso1 or "") or UD_TARGETS.get(lang.code)
        name = f"ud:{tb}:test" if tb else ""
    return name if name in DATASETS else None


def _catalogue_code(code: str) -> str | None:
    from compsft.languages import get_language

    try:
        return get_language(code).code
    except CompsftError:
        return None


def parse_target(text: str, task: str) -> TargetSpec:
    """`CODE` (a catalogue language) or `CODE=TEST[:TEXT[,TEXT...]]` (your own test set and raw text)."""
    code, sep, rest = text.partition("=")
    code = code.strip()
    if not sep:
        return TargetSpec(code=code)
    from compsft.tasks import DATASETS

    # Shipped data names contain ':' themselves (ud:mt_mudt:test): take the longest one the text starts with.
    shipped = [n for n in DATASETS if rest == n or rest.startswith(n + ":")]
    if shipped:
        test = max(shipped, key=len)
        texts = rest[len(test) + 1:]
    else:
        test, _, texts = rest.partition(":")
    if not test.strip():
        raise CompsftError(f"--target {text!r}: give a test file after '=' (CODE=TEST[:TEXT[,TEXT...]])")
    return TargetSpec(code=code, test=test.strip(), texts=tuple(t.strip() for t in texts.split(",") if t.strip()))


def resolve_target(spec: TargetSpec, task: str, where: str, base: Path | None = None) -> Target:
    """Check a target and fill in the catalogue's defaults (test set, shipped text)."""
    _check_code(spec.code, where)
    canonical = _catalogue_code(spec.code)
    code = canonical or spec.code
    if spec.test:
        test = _data(spec.test, f"{where}: test", base)
    else:
        test = default_test(task, code) if canonical else None
        if test is None:
            ok = ", ".join(_targets_with_tests(task))
            raise CompsftError(f"{where}: no shipped {task} test set for {spec.code!r} (shipped targets: {ok}); "
                               f"give your own: {spec.code}=TEST_FILE:TEXT_FILE")
    hint = f"{spec.code}={spec.test or 'TEST'}:TEXT_FILE"
    return Target(resolve_language(spec.code, spec.texts, where, base, hint), test)


def resolve_language(code: str, texts: Sequence[str], where: str, base: Path | None = None,
                     hint: str = "") -> LanguageSide:
    """A language's raw text: the files given, else the catalogue's shipped text (a gate for nothing else)."""
    from compsft.languages import corpus_files

    _check_code(code, where)
    canonical = _catalogue_code(code)
    if texts:
        files = tuple(_existing_file(t, f"{where}: texts", base) for t in texts)
    elif canonical:
        files = tuple(str(p) for p in corpus_files(canonical))
    else:
        raise CompsftError(f"{where}: {code!r} is not in the language catalogue; give its raw text"
                           + (f": {hint}" if hint else ""))
    return LanguageSide(canonical or code, files, canonical is not None)


def _targets_with_tests(task: str) -> list[str]:
    from compsft.languages import languages

    return [lang.code for lang in languages() if lang.role == "target" and default_test(task, lang.code)]


# -- targets file --------------------------------------------------------------------------------------
_TARGET_FIELDS = {"code": str, "test": str, "texts": list}
_SOURCE_FIELDS = {"code": str, "train": str, "dev": str, "texts": list}


def _read_table(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise CompsftError(f"{path}: cannot read the targets file ({err.strerror})") from None
    if path.suffix.lower() == ".toml":
        import tomllib

        try:
            return tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as err:
            raise CompsftError(f"{path}: not valid TOML: {err}") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CompsftError(f"{path}: not valid JSON ({err}); use .toml for TOML") from None


def _fields(entry: Any, allowed: dict[str, type], where: str) -> dict[str, Any]:
    """Check an entry against a table of field types: unknown fields and wrong types name the field."""
    if not isinstance(entry, dict):
        raise CompsftError(f"{where}: expected a table (object), got {type(entry).__name__}")
    for key, value in entry.items():
        if key not in allowed:
            raise CompsftError(f"{where}.{key}: unknown field (known: {', '.join(allowed)})")
        if not isinstance(value, allowed[key]):
            raise CompsftError(f"{where}.{key}: expected {allowed[key].__name__}, got {type(value).__name__}")
        if allowed[key] is list and not all(isinstance(v, str) and v for v in value):
            raise CompsftError(f"{where}.{key}: expected a list of file names")
        if allowed[key] is str and not value.strip():
            raise CompsftError(f"{where}.{key}: must not be empty")
    return entry


def load_targets_file(path: str | Path, task: str) -> tuple[list[Target], SourceSpec | None, Path]:
    """Targets (resolved) and the source side (unresolved; None if the file has none) of a targets file."""
    path = Path(path)
    data = _read_table(path)
    base = path.resolve().parent
    if not isinstance(data, dict):
        raise CompsftError(f"{path}: expected a table with 'targets' (and optionally 'source')")
    unknown = set(data) - {"targets", "source"}
    if unknown:
        raise CompsftError(f"{path}: {sorted(unknown)[0]}: unknown field (known: targets, source)")
    entries = data.get("targets")
    if not isinstance(entries, list) or not entries:
        raise CompsftError(f"{path}: targets: expected a non-empty list of targets")
    targets = []
    for i, entry in enumerate(entries):
        where = f"{path}: targets[{i}]"
        if isinstance(entry, str):
            spec = TargetSpec(code=entry)
        else:
            e = _fields(entry, _TARGET_FIELDS, where)
            if "code" not in e:
                raise CompsftError(f"{where}.code: missing")
            spec = TargetSpec(code=e["code"], test=e.get("test", ""), texts=tuple(e.get("texts", ())))
        targets.append(resolve_target(spec, task, where, base))
    source = None
    if "source" in data:
        e = _fields(data["source"], _SOURCE_FIELDS, f"{path}: source")
        source = SourceSpec(code=e.get("code", SOURCE_LANGUAGE), train=e.get("train", ""), dev=e.get("dev", ""),
                            texts=tuple(e.get("texts", ())))
    return targets, source, base


# -- the grid ----------------------------------------------------------------------------------------
def resolve(config: CompareConfig) -> Grid:
    """Check `config` and fill in every default; no file is written and nothing is trained."""
    from compsft.methods import get_method
    from compsft.tasks import get_task

    get_task(config.task)
    if config.task not in TASK_SOURCES:
        raise CompsftError(f"task {config.task!r} has no default source data; known: {', '.join(TASK_SOURCES)}")
    default_train, default_dev, default_targets = TASK_SOURCES[config.task]

    file_targets, file_source, file_base = (load_targets_file(config.targets_file, config.task)
                                            if config.targets_file else ([], None, None))
    targets = list(file_targets)
    for i, t in enumerate(config.targets):
        spec = parse_target(t, config.task) if isinstance(t, str) else t
        targets.append(resolve_target(spec, config.task, f"target {i + 1} ({spec.code})"))
    if not targets:
        targets = [resolve_target(TargetSpec(code=c), config.task, f"default target {c}") for c in default_targets]
    codes = [t.code for t in targets]
    if len(set(codes)) != len(codes):
        raise CompsftError(f"targets: {sorted({c for c in codes if codes.count(c) > 1})[0]!r} is given twice")

    src = config.source or file_source or SourceSpec()
    base = file_base if (config.source is None and file_source is not None) else None
    source = resolve_language(src.code, src.texts, "source", base, "a source text file")
    source_train = _data(src.train or default_train, "source: train", base)
    source_dev = _data(src.dev or default_dev, "source: dev", base)
    if source.code in codes:
        raise CompsftError(f"targets: {source.code} is the source language")

    methods = list(config.methods)
    if not methods:
        raise CompsftError("methods: give at least one method (see --list-methods)")
    if len(set(methods)) != len(methods):
        raise CompsftError("methods: a method is given twice")
    for name in methods:
        get_method(name)  # unknown names fail here, listing the known ones

    if isinstance(config.seeds, int):
        if config.seeds < 1:
            raise CompsftError(f"seeds: {config.seeds}: give at least one seed")
        seeds = list(range(FIRST_SEED, FIRST_SEED + config.seeds))
    else:
        seeds = [int(s) for s in config.seeds]
        if not seeds or len(set(seeds)) != len(seeds):
            raise CompsftError("seeds: give distinct seeds")

    if isinstance(config.budget, Budget):
        budget_name, budget = "custom", config.budget
    else:
        budget_name, budget = config.budget, get_budget(config.budget, config.task)

    if config.model:
        model_dir = Path(config.model).expanduser().resolve()
        if not (model_dir / "config.json").is_file():
            raise CompsftError(f"--model {config.model}: not a model directory (no config.json); models load "
                               "from local directories only")
    else:
        from compsft.models import default_model_dir

        model_dir = default_model_dir()

    out = Path(config.out)
    exclude = _evaluation_files([source, *(t.language for t in targets)],
                                [source_dev, *(t.test for t in targets)])
    return Grid(task=config.task, source=source, source_train=source_train, source_dev=source_dev,
                targets=targets, methods=methods, seeds=seeds, budget_name=budget_name, budget=budget,
                model_dir=model_dir, out=out,
                module_cache=Path(config.module_cache) if config.module_cache else out / "modules",
                exclude=exclude)


def _evaluation_files(languages: Sequence[LanguageSide], data: Sequence[str]) -> tuple[str, ...]:
    """Every evaluation file of the grid (the leakage filter drops their sentences from all MLM text):
    the test sets, the source dev set, and each catalogue language's shipped dev/test files."""
    from compsft.languages import eval_files
    from compsft.tasks import resolve_data

    files = {str(resolve_data(d).resolve()) for d in data}
    for lang in languages:
        if lang.catalogue:
            files.update(str(p.resolve()) for p in eval_files(lang.code))
    return tuple(sorted(files))


def replace_budget(config: CompareConfig, **changes: Any) -> CompareConfig:
    """`config` with budget fields changed (a named budget becomes a custom one)."""
    budget = config.budget if isinstance(config.budget, Budget) else get_budget(config.budget, config.task)
    return dataclasses.replace(config, budget=dataclasses.replace(budget, **changes))
