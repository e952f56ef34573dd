"""Readers for CoNLL-U treebanks and NER column files (plain or gzip-compressed).

Every problem a user can fix raises CompsftError naming the file and line.
"""
from __future__ import annotations

import gzip
import io
import logging
import re
from pathlib import Path
from typing import Iterator, Sequence, TextIO

from compsft.errors import CompsftError

from .base import Sentence

logger = logging.getLogger(__name__)

_TAG = re.compile(r"^(?:O|[BI]-.+)$")


def open_text(path: str | Path) -> TextIO:
    """Open a text file for reading, transparently decompressing `.gz`."""
    path = Path(path)
    if not path.is_file():
        raise CompsftError(f"{path}: no such file")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _blocks(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Blank-line separated blocks of lines, each with the 1-based number of its first line."""
    with open_text(path) as f:
        block: list[str] = []
        start = 0
        try:
            for number, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if line.strip():
                    if not block:
                        start = number
                    block.append(line)
                elif block:
                    yield start, block
                    block = []
        except (UnicodeDecodeError, OSError, EOFError) as err:
            raise CompsftError(f"{path}: cannot be read as UTF-8 text ({err})") from err
        if block:
            yield start, block


# -- CoNLL-U --------------------------------------------------------------------------------------

def read_conllu(path: str | Path, keep_subtypes: bool = False) -> list[Sentence]:
    """Read a CoNLL-U file: UPOS into `tags`, HEAD and DEPREL into `heads` and `deprels`.

    Multi-word token ranges (`3-4`) and empty nodes (`5.1`) are skipped for the word sequence but
    kept in `tokenlist` for writing. Deprel subtypes (`obl:tmod` -> `obl`) are stripped unless
    `keep_subtypes`. A malformed line raises CompsftError naming file and line.
    """
    import conllu
    from conllu.exceptions import ParseException

    path = Path(path)
    sentences: list[Sentence] = []
    for start, lines in _blocks(path):
        for offset, line in enumerate(lines):
            if line.startswith("#"):
                continue
            columns = line.split("\t")
            if len(columns) != 10:
                raise CompsftError(
                    f"{path}:{start + offset}: expected 10 tab-separated columns, found {len(columns)}"
                )
        try:
            tokenlist = conllu.parse("\n".join(lines) + "\n\n")[0]
        except ParseException as err:
            bad = _find_bad_line(lines)
            where = f"{path}:{start + bad}" if bad is not None else f"{path}:{start}"
            raise CompsftError(f"{where}: {err}") from err
        sentences.append(_to_sentence(tokenlist, path, start, lines, keep_subtypes))
    if not sentences:
        raise CompsftError(f"{path}: no sentences (the file is empty)")
    logger.info("read %d sentences from %s", len(sentences), path)
    return sentences


def _find_bad_line(lines: Sequence[str]) -> int | None:
    import conllu

    for offset, line in enumerate(lines):
        if line.startswith("#"):
            continue
        try:
            conllu.parse(line + "\n\n")
        except Exception:
            return offset
    return None


def _to_sentence(tokenlist, path: Path, start: int, lines: Sequence[str], keep_subtypes: bool) -> Sentence:
    words, upos, heads, deprels, numbers = [], [], [], [], []
    token_lines = [start + i for i, line in enumerate(lines) if not line.startswith("#")]
    for token, number in zip(tokenlist, token_lines):
        tid = token["id"]
        if not isinstance(tid, int):  # multi-word range (tuple with '-') or empty node (tuple with '.')
            continue
        if tid != len(words) + 1:
            raise CompsftError(f"{path}:{number}: word ID {tid} out of sequence (expected {len(words) + 1})")
        head = token["head"]
        if head is None or not isinstance(head, int):
            raise CompsftError(f"{path}:{number}: HEAD must be an integer, got {head!r}")
        deprel = token["deprel"] or "_"
        if not keep_subtypes:
            deprel = deprel.split(":", 1)[0]
        words.append(token["form"])
        upos.append(token["upos"] or "_")
        heads.append(head)
        deprels.append(deprel)
        numbers.append(number)
    if not words:
        raise CompsftError(f"{path}:{start}: sentence without words")
    for i, head in enumerate(heads):
        if not 0 <= head <= len(words):
            raise CompsftError(f"{path}:{numbers[i]}: word {i + 1} has HEAD {head} outside 0..{len(words)}")
    sent_id = tokenlist.metadata.get("sent_id")
    return Sentence(words, upos, heads, deprels, sent_id=sent_id, source=f"{path}:{start}", tokenlist=tokenlist)


# -- NER column files -----------------------------------------------------------------------------

NER_FORMATS = ("conll", "iob2")


def detect_ner_format(path: str | Path) -> str:
    """`iob2` for UNER files (`.iob2`, also compressed), else `conll` (MasakhaNER `token TAG`)."""
    name = Path(path).name
    if name.endswith(".gz"):
        name = name[:-3]
    return "iob2" if name.endswith(".iob2") else "conll"


def read_ner(
    path: str | Path,
    format: str | None = None,
    drop_types: Sequence[str] = ("OTH",),
) -> list[Sentence]:
    """Read a NER column file into sentences with IOB2 `tags`.

    Formats: `conll` (`token TAG` per line, MasakhaNER / CoNLL-2003 style; the tag is the last
    column) and `iob2` (UNER: ID, word, tag, two spare columns; `#` comments). Chosen by extension
    unless `format` is given. Entity types in `drop_types` (UNER's OTH) become O; invalid IOB
    sequences are repaired the way seqeval's default mode reads them. Both are counted in the log.
    """
    path = Path(path)
    format = format or detect_ner_format(path)
    if format not in NER_FORMATS:
        raise CompsftError(f"unknown NER format {format!r}; expected one of {NER_FORMATS}")
    drop = set(drop_types)
    sentences: list[Sentence] = []
    dropped = repaired = 0
    for start, lines in _blocks(path):
        words: list[str] = []
        tags: list[str] = []
        sent_id = None
        for offset, line in enumerate(lines):
            number = start + offset
            if format == "iob2":
                if line.startswith("#"):
                    if line.startswith("# sent_id"):
                        sent_id = line.split("=", 1)[-1].strip()
                    continue
                columns = line.split("\t")
                if len(columns) < 3:
                    raise CompsftError(f"{path}:{number}: expected ID, word and tag separated by tabs")
                word, tag = columns[1], columns[2]
            else:
                columns = line.split()
                if len(columns) < 2:
                    raise CompsftError(f"{path}:{number}: expected 'token TAG', found {line!r}")
                word, tag = columns[0], columns[-1]
            if not _TAG.match(tag):
                raise CompsftError(f"{path}:{number}: invalid tag {tag!r} (expected O, B-TYPE or I-TYPE)")
            if tag != "O" and tag[2:] in drop | {"O"}:
                tag = "O"
                dropped += 1
            words.append(word)
            tags.append(tag)
        if not words:
            continue
        tags, fixes = repair_iob2(tags)
        repaired += fixes
        sentences.append(Sentence(words, tags, sent_id=sent_id, source=f"{path}:{start}"))
    if not sentences:
        raise CompsftError(f"{path}: no sentences (the file is empty)")
    logger.info("read %d sentences from %s", len(sentences), path)
    if dropped:
        logger.info("%s: %d tags of types %s (or B-O/I-O) mapped to O", path, dropped, sorted(drop))
    if repaired:
        logger.info("%s: %d invalid IOB2 transitions repaired (I-X after O or another type -> B-X)", path, repaired)
    return sentences


def repair_iob2(tags: Sequence[str]) -> tuple[list[str], int]:
    """Make a tag sequence valid IOB2 the way seqeval's default (conlleval) mode reads it.

    An `I-X` that does not continue an `X` entity starts a new one, so it becomes `B-X`.
    Returns the repaired tags and the number of changes.
    """
    out: list[str] = []
    fixes = 0
    previous = "O"
    for tag in tags:
        if tag.startswith("I-") and previous[2:] != tag[2:]:
            tag = "B-" + tag[2:]
            fixes += 1
        out.append(tag)
        previous = tag
    return out, fixes


def map_unknown_to_o(sentences: Sequence[Sentence], labels: Sequence[str], where: str = "") -> tuple[list[Sentence], int]:
    """Replace gold tags outside `labels` (e.g. MasakhaNER DATE for an English-trained model) with O.

    Returns new sentences (repaired again, as dropping a B- can orphan nothing but keeps the
    invariant cheap) and the number of tags changed; the count is logged.
    """
    known = set(labels)
    changed = 0
    out = []
    for s in sentences:
        tags = []
        for tag in s.tags or []:
            if tag not in known:
                changed += 1
                tag = "O"
            tags.append(tag)
        tags, _ = repair_iob2(tags)
        out.append(s.replace(tags=tags))
    if changed:
        unknown = sorted({t[2:] for s in sentences for t in (s.tags or []) if t not in known})
        logger.info("%s%d gold tags outside the model's label set (types %s) mapped to O",
                    f"{where}: " if where else "", changed, unknown)
    return out, changed
