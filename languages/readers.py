"""Read sentences from the file kinds MLM text and evaluation data come in.

- plain text: one sentence or paragraph per line (`.gz` accepted);
- CoNLL-U: the `# text =` line of each sentence (rebuilt from the word forms where it is missing);
- NER column files (MasakhaNER `token TAG`, UNER `.iob2` `ID word TAG ...`): the words of each
  sentence joined by single spaces.

All readers yield raw strings; normalisation is the caller's job (see `corpus.normalise_text`).
"""
from __future__ import annotations

import gzip
import io
import os
import re
from pathlib import Path
from typing import Iterator, Literal

from compsft.errors import CompsftError

FileFormat = Literal["auto", "text", "conllu", "ner"]

_NER_TAG = re.compile(r"^(O|[BIESLU]-\S+)$")
_ID = re.compile(r"^\d+$")
# `# key = value` comment lines (`# text = ...`, `# newdoc id = ...`); a `#` token line is not one.
_COMMENT = re.compile(r"^#\s*\w+( \w+)?\s*=")
# Files (or folders) in a data directory that are documentation, not text.
_SKIP_NAMES = re.compile(r"(readme|licen[cs]e|notice|copying|provenance)", re.IGNORECASE)
_SKIP_SUFFIXES = {".md", ".json", ".py", ".xml", ".yaml", ".yml", ".csv", ".tsv", ".html"}


def open_text(path: str | os.PathLike) -> io.TextIOBase:
    """Open a UTF-8 text file for reading, transparently decompressing `.gz`."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline=None)
        return open(path, encoding="utf-8", newline=None)
    except FileNotFoundError:
        raise CompsftError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CompsftError(f"{path}: is a directory, expected a file") from None


def _base_name(path: Path) -> str:
    return path.name[:-3] if path.name.endswith(".gz") else path.name


def list_text_files(path: str | os.PathLike) -> list[Path]:
    """A file gives itself; a directory gives every text file below it, sorted by path.

    Hidden files, files or folders whose name contains README, LICENSE/LICENCE, NOTICE, COPYING or
    PROVENANCE, and documentation or table suffixes (`.md`, `.json`, ...) are skipped, so a data
    folder with its licences can be passed as is.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CompsftError(f"{path}: no such file or directory")
    files = []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        base = _base_name(p)
        if any(_SKIP_NAMES.search(part) for part in rel.parts) or Path(base).suffix.lower() in _SKIP_SUFFIXES:
            continue
        files.append(p)
    if not files:
        raise CompsftError(f"{path}: directory holds no text files")
    return files


def sniff_format(path: str | os.PathLike, probe_lines: int = 50) -> Literal["text", "conllu", "ner"]:
    """Guess a file's kind: by suffix for `.conllu`/`.iob2`/`.bio`, otherwise from its first lines.

    A file whose first non-comment lines all look like `word TAG` or `ID word TAG ...` with an IOB
    tag is an NER column file (MasakhaNER files are named `test.txt`); anything else is plain text.
    """
    base = _base_name(Path(path)).lower()
    if base.endswith(".conllu"):
        return "conllu"
    if base.endswith((".iob2", ".bio", ".iob")):
        return "ner"
    seen = 0
    with open_text(path) as f:
        try:
            for line in f:
                line = line.strip()
                if not line or _COMMENT.match(line) or line.startswith("-DOCSTART-"):
                    continue
                if _ner_word(line.split()) is None:
                    return "text"
                seen += 1
                if seen >= probe_lines:
                    break
        except UnicodeDecodeError as err:
            raise CompsftError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return "ner" if seen else "text"


def _ner_word(fields: list[str]) -> str | None:
    """The word of an NER column line, or None if the line does not look like one."""
    if len(fields) >= 3 and _ID.match(fields[0]) and _NER_TAG.match(fields[2]):
        return fields[1]
    if len(fields) >= 2 and (_NER_TAG.match(fields[-1]) or _NER_TAG.match(fields[1])):
        return fields[0]
    return None


def read_plain(path: str | os.PathLike) -> Iterator[str]:
    """Every line of a plain-text file, as is (without the newline)."""
    with open_text(path) as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):
                yield line.rstrip("\n")
        except UnicodeDecodeError as err:
            raise CompsftError(f"{path}: not UTF-8 text after line {lineno} ({err.reason})") from None


def read_conllu_text(path: str | os.PathLike) -> Iterator[str]:
    """The `# text =` of each sentence of a CoNLL-U file.

    A plain line scan (fast, and tolerant of column errors that do not matter here). Where a
    sentence has no `# text =`, the text is rebuilt from its word forms, honouring `SpaceAfter=No`
    and multiword tokens.
    """
    text: str | None = None
    words: list[str] = []
    skip_until = 0
    for lineno, line in enumerate(read_plain(path), 1):
        line = line.strip()
        if not line:
            if text is not None:
                yield text
            elif words:
                yield "".join(words).strip()
            text, words, skip_until = None, [], 0
            continue
        if line.startswith("#"):
            if line.startswith("# text =") or line.startswith("# text="):
                text = line.split("=", 1)[1].strip()
            continue
        cols = line.split("\t")
        if len(cols) != 10:
            raise CompsftError(f"{path}:{lineno}: expected 10 tab-separated CoNLL-U columns, got {len(cols)}")
        if text is not None:
            continue
        tid, form, misc = cols[0], cols[1], cols[9]
        if "." in tid:  # empty node: no surface form
            continue
        if "-" in tid:
            skip_until = int(tid.split("-")[1])
        elif skip_until and int(tid) <= skip_until:
            continue
        no_space = "SpaceAfter=No" in misc.split("|")
        words.append(form if no_space else form + " ")
    if text is not None:
        yield text
    elif words:
        yield "".join(words).strip()


def read_ner_sentences(path: str | os.PathLike) -> Iterator[str]:
    """Each sentence of an NER column file as its words joined by single spaces."""
    words: list[str] = []
    for lineno, line in enumerate(read_plain(path), 1):
        fields = line.split()
        if not fields:
            if words:
                yield " ".join(words)
            words = []
            continue
        if _COMMENT.match(line):
            continue
        if fields[0] == "-DOCSTART-":
            continue
        word = _ner_word(fields)
        if word is None:
            # A bare token line (no tag) still carries the word.
            if len(fields) == 1:
                word = fields[0]
            else:
                raise CompsftError(f"{path}:{lineno}: not an NER column line: {line[:80]!r}")
        words.append(word)
    if words:
        yield " ".join(words)


def read_sentences(path: str | os.PathLike, fmt: FileFormat = "auto") -> Iterator[str]:
    """Sentences of one file of any supported kind (`fmt="auto"` sniffs it)."""
    kind = sniff_format(path) if fmt == "auto" else fmt
    if kind == "conllu":
        return read_conllu_text(path)
    if kind == "ner":
        return read_ner_sentences(path)
    if kind == "text":
        return read_plain(path)
    raise CompsftError(f"{path}: unknown format {fmt!r} (expected auto, text, conllu or ner)")
