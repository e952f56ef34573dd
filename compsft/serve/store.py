"""The SFT store of `compsft serve`: an index of a directory of SFTs by kind, language and task.

The store is a directory holding SFT directories (`sft.safetensors` + `sft_config.json`, written by
compsft, converted reference files included) at any depth up to `MAX_DEPTH`; hidden entries (the
temporary names of an atomic save) are skipped. Indexing reads each `sft_config.json` only; the tensors
are loaded when a request first needs them, and kept in a small LRU cache.

Requests name a language and a task; they are looked up in the index (a dict), never joined onto a
path. `refresh()` re-reads the directory and swaps the whole index in one assignment, so a reader sees
the old index or the new one. An SFT directory replaced in place (compsft saves atomically) gets a new
signature (inode, mtime, size of both files), so the cache never serves the old tensors under the new
config; `load` checks that the directory did not change while it read it, and `load_sft` checks that the
tensors are the ones the config was saved with (`weights_checksum`).

    store = SftStore("sfts/")
    store.refresh()
    entry = store.index.language("wol")     # StoreEntry, or a CompsftError naming what is there
    sft = store.load(entry)                 # a SparseFineTuning, cached
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from compsft.errors import CompsftError
from compsft.serialization import CONFIG_NAME, WEIGHTS_NAME, load_sft, read_config
from compsft.sft import SftConfig, SparseFineTuning

logger = logging.getLogger(__name__)

MAX_DEPTH = 3

# Why an SFT (given its config) cannot serve on the resident model, or None; run when indexing.
Check = Callable[[SftConfig], "str | None"]


class SftUnavailable(CompsftError):
    """The SFT a request needs is in the store but cannot be used (corrupt, conflicting, mismatched)."""


@dataclass(frozen=True)
class StoreEntry:
    """One SFT directory of the store, as its config describes it (tensors not read)."""

    name: str  # path relative to the store, for messages (never the absolute path)
    path: Path
    kind: str
    language: str | None
    task: str | None
    k: int
    labels: tuple[str, ...] | None
    base_fingerprint: str | None  # a short digest of the recorded fingerprint, None if none recorded
    base_model: str | None
    signature: tuple
    error: str | None = None

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "language": self.language, "task": self.task, "k": self.k,
                "labels": len(self.labels) if self.labels else None, "base_fingerprint": self.base_fingerprint,
                "error": self.error}


@dataclass
class StoreIndex:
    """Languages and tasks of the store; a name claimed by two SFTs is a conflict, reported per request."""

    languages: dict[str, StoreEntry] = field(default_factory=dict)
    tasks: dict[str, StoreEntry] = field(default_factory=dict)
    conflicts: dict[tuple[str, str], list[StoreEntry]] = field(default_factory=dict)
    problems: list[StoreEntry] = field(default_factory=list)  # unreadable configs, kinds the server cannot use

    def entries(self) -> list[StoreEntry]:
        seen = list(self.languages.values()) + list(self.tasks.values()) + self.problems
        seen += [e for group in self.conflicts.values() for e in group]
        return sorted({e.name: e for e in seen}.values(), key=lambda e: e.name)

    def _get(self, table: dict[str, StoreEntry], what: str, name: str) -> StoreEntry:
        group = self.conflicts.get((what, name))
        if group:
            names = ", ".join(e.name for e in group)
            raise SftUnavailable(f"the store holds {len(group)} SFTs for {what} {name!r} ({names}); keep one")
        entry = table.get(name)
        if entry is None:
            known = ", ".join(sorted(table)) or "none"
            raise KeyError(f"unknown {what} {name!r}; the store offers: {known}")
        if entry.error:
            raise SftUnavailable(f"{entry.name}: {entry.error}")
        return entry

    def language(self, name: str) -> StoreEntry:
        return self._get(self.languages, "language", name)

    def task(self, name: str) -> StoreEntry:
        return self._get(self.tasks, "task", name)

    def offers(self, language: str, task: str) -> bool:
        return (language in self.languages or ("language", language) in self.conflicts) and \
            (task in self.tasks or ("task", task) in self.conflicts)


def _stat(path: Path) -> tuple:
    st = os.stat(path)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def signature(directory: Path) -> tuple:
    """What changes when an SFT directory is written again: the directory and both files' identities."""
    return (_stat(directory), _stat(directory / CONFIG_NAME), _stat(directory / WEIGHTS_NAME))


def fingerprint_digest(fingerprint: dict | None) -> str | None:
    """A short stable digest of a recorded base fingerprint (the full one is a few KB of samples)."""
    if not fingerprint:
        return None
    blob = json.dumps(fingerprint, sort_keys=True).encode()
    return f"{fingerprint.get('method', '?')}:{hashlib.sha256(blob).hexdigest()[:16]}"


def _entry(root: Path, directory: Path, check: Check | None) -> StoreEntry:
    name = directory.relative_to(root).as_posix()
    try:
        sig = signature(directory)
        config = read_config(directory)
    except (CompsftError, OSError) as err:
        return StoreEntry(name, directory, "unknown", None, None, 0, None, None, None, (), error=str(err))
    training = config.training if isinstance(config.training, dict) else {}
    labels = training.get("labels")
    error = None
    if config.kind == "language" and not config.language:
        error = "a language SFT that records no language"
    elif config.kind == "task" and not config.task:
        error = "a task SFT that records no task"
    elif config.kind == "task" and not labels:
        error = "a task SFT that records no labels (training.labels)"
    elif config.kind not in ("language", "task"):
        error = f"kind {config.kind!r}: the server composes one language SFT and one task SFT"
    elif check is not None:
        error = check(config)
    return StoreEntry(name, directory, config.kind, config.language, config.task, config.k,
                      tuple(labels) if labels else None, fingerprint_digest(config.base_fingerprint),
                      config.base_model, sig, error)


def scan(root: Path, check: Check | None = None) -> StoreIndex:
    """Index every SFT directory under `root` (depth <= MAX_DEPTH, hidden names skipped)."""
    index = StoreIndex()
    claims: dict[tuple[str, str], list[StoreEntry]] = {}
    for directory, subdirs, files in os.walk(root):
        here = Path(directory)
        depth = len(here.relative_to(root).parts)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".")) if depth < MAX_DEPTH else []
        if CONFIG_NAME not in files:
            continue
        subdirs[:] = []  # an SFT directory holds no other SFTs
        entry = _entry(root, here, check)
        if entry.error and entry.kind not in ("language", "task"):
            index.problems.append(entry)
            continue
        key = ("language", entry.language) if entry.kind == "language" else ("task", entry.task)
        claims.setdefault(key, []).append(entry)
    for (what, name), group in claims.items():
        if len(group) > 1:
            index.conflicts[(what, name)] = group
        else:
            (index.languages if what == "language" else index.tasks)[name] = group[0]
    return index


class SftStore:
    """The index of a directory of SFTs and an LRU cache of the loaded ones (thread-safe)."""

    def __init__(self, root: str | os.PathLike, cache_size: int = 32, check: Check | None = None) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise CompsftError(f"--store: {root} is not a directory")
        self.cache_size = max(1, cache_size)
        self.check = check
        self._cache: OrderedDict[tuple, SparseFineTuning] = OrderedDict()
        self._lock = threading.Lock()
        self.index = StoreIndex()
        self.generation = 0

    def refresh(self) -> bool:
        """Re-read the directory; swap in the new index if anything changed. True when it did."""
        new = scan(self.root, self.check)
        old_sigs = {(e.name, e.signature, e.error) for e in self.index.entries()}
        changed = {(e.name, e.signature, e.error) for e in new.entries()} != old_sigs
        if changed:
            self.index = new  # one assignment: readers see the old index or the new one
            self.generation += 1
            with self._lock:
                live = {(e.path, e.signature) for e in new.entries()}
                for key in [k for k in self._cache if k not in live]:
                    del self._cache[key]
            logger.info("store %s: %d languages, %d tasks, %d problems", self.root, len(new.languages),
                        len(new.tasks), len(new.problems) + len(new.conflicts))
        return changed

    def load(self, entry: StoreEntry) -> SparseFineTuning:
        """The tensors of `entry`, from the cache or the disk; SftUnavailable when they cannot be used."""
        key = (entry.path, entry.signature)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        try:
            sft = load_sft(entry.path)
            now = signature(entry.path)
        except (CompsftError, OSError) as err:
            raise SftUnavailable(f"{entry.name}: {_relative(str(err), entry.path, entry.name)}") from None
        if now != entry.signature:
            # Replaced between indexing and loading: the caller's index is stale; it retries after refresh.
            raise SftChanged(f"{entry.name}: replaced while it was being loaded")
        c = sft.config
        if (c.kind, c.language, c.task) != (entry.kind, entry.language, entry.task):
            raise SftChanged(f"{entry.name}: its config changed since the store was indexed")
        sft.source = entry.name
        with self._lock:
            self._cache[key] = sft
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return sft


class SftChanged(CompsftError):
    """An SFT directory changed while it was read: refresh the index and try again."""


def _relative(message: str, path: Path, name: str) -> str:
    """`message` with the store's absolute path replaced by the entry's name (clients see no server paths)."""
    return message.replace(str(path), name)
