"""The language catalogue: codes, names, scripts, the MLM text shipped for each language, and the
evaluation sets the tasks package ships for it.

The catalogue supplies defaults, never a gate: a language SFT trains for any code given raw text
(`language_for_training`). Languages are looked up by ISO 639-3 code, ISO 639-1 code or a listed alias, case-insensitively
(`get_language("mt")`, `get_language("MLT")` and `get_language("Maltese")` are the same entry).
Shipped MLM text lives in `languages/data/<code>/` (gzip, one sentence per line, already
normalised, deduplicated and cleaned of the evaluation sentences named in `data/README.md`).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from compsft.errors import CompsftError

logger = logging.getLogger(__name__)

ISO_639_3 = re.compile(r"[a-z]{3}")
_EVAL_SPLIT = re.compile(r"(^|[-_.])(dev|test)([-_.]|$)")

DATA_DIR = Path(__file__).resolve().parent / "data"

NC = "CC BY-NC 4.0 (non-commercial)"
UD_LICENCE = "CC BY-SA 4.0"
UDHR_LICENCE = "UDHR: free UN document"


@dataclass(frozen=True)
class Corpus:
    """One shipped MLM text file."""

    name: str = field(metadata={"help": "short name: mafand, udhr, ud-train"})
    path: str = field(metadata={"help": "path relative to languages/data/"})
    licence: str = field(metadata={"help": "licence of the text; NC marks non-commercial"})
    description: str = field(default="", metadata={"help": "where the text comes from"})

    @property
    def file(self) -> Path:
        return DATA_DIR / self.path


@dataclass(frozen=True)
class Language:
    """A catalogue entry."""

    code: str = field(metadata={"help": "ISO 639-3 code (the catalogue key)"})
    name: str = field(metadata={"help": "English name"})
    script: str = field(metadata={"help": "ISO 15924 script code"})
    family: str = field(metadata={"help": "language family (genus)"})
    iso1: str | None = field(default=None, metadata={"help": "ISO 639-1 code, where there is one"})
    aliases: tuple[str, ...] = field(default=(), metadata={"help": "other codes accepted for lookup"})
    corpora: tuple[Corpus, ...] = field(default=(), metadata={"help": "shipped MLM text"})
    eval_sets: tuple[str, ...] = field(
        default=(), metadata={"help": "evaluation data shipped by compsft.tasks, as paths under tasks/data/"}
    )
    role: str = field(default="target", metadata={"help": "'source' (task training) or 'target' (transfer)"})

    def corpus_files(self) -> list[Path]:
        """The shipped MLM text files of this language, in catalogue order."""
        return [c.file for c in self.corpora]

    def as_dict(self) -> dict:
        return {
            "code": self.code, "iso1": self.iso1, "name": self.name, "script": self.script,
            "family": self.family, "role": self.role, "aliases": list(self.aliases),
            "corpora": [
                {"name": c.name, "path": str(c.file), "licence": c.licence, "description": c.description}
                for c in self.corpora
            ],
            "eval_sets": list(self.eval_sets),
        }


def _mafand(code: str) -> Corpus:
    return Corpus("mafand", f"{code}/mafand.txt.gz", NC,
                  "MAFAND-MT target side (news), train+dev+test, MasakhaNER dev/test sentences removed")


def _udhr(code: str) -> Corpus:
    return Corpus("udhr", f"{code}/udhr.txt.gz", UDHR_LICENCE, "Universal Declaration of Human Rights")


def _ud(code: str, treebank: str) -> Corpus:
    return Corpus("ud-train", f"{code}/ud-train.txt.gz", UD_LICENCE,
                  f"{treebank} train split `# text =` lines, dev/test sentences removed")


def _masakhaner(code: str) -> str:
    return f"ner/masakhaner/{code}"


_LANGUAGES = (
    Language("eng", "English", "Latn", "Indo-European (Germanic)", "en", ("english",),
             (_udhr("eng"), Corpus("ud-train", "eng/ud-train.txt.gz", UD_LICENCE,
                                   "UD_English-EWT train `# text =` lines (first 6,000 after cleaning)")),
             ("ud/UD_English-EWT", "ner/uner/en_ewt"), role="source"),
    Language("mlt", "Maltese", "Latn", "Afro-Asiatic (Semitic)", "mt", ("maltese",),
             (_ud("mlt", "UD_Maltese-MUDT"), _udhr("mlt")), ("ud/UD_Maltese-MUDT",)),
    Language("wol", "Wolof", "Latn", "Niger-Congo (Atlantic)", "wo", ("wolof",),
             (_ud("wol", "UD_Wolof-WTB"),), ("ud/UD_Wolof-WTB",)),
    Language("uig", "Uyghur", "Arab", "Turkic", "ug", ("uyghur", "uighur"),
             (_ud("uig", "UD_Uyghur-UDT"), _udhr("uig")), ("ud/UD_Uyghur-UDT",)),
    Language("myv", "Erzya", "Cyrl", "Uralic (Mordvinic)", None, ("erzya",),
             (_ud("myv", "UD_Erzya-JR"),), ("ud/UD_Erzya-JR",)),
    Language("glv", "Manx", "Latn", "Indo-European (Celtic)", "gv", ("manx",),
             (_ud("glv", "UD_Manx-Cadhan"), _udhr("glv")), ("ud/UD_Manx-Cadhan",)),
    Language("hau", "Hausa", "Latn", "Afro-Asiatic (Chadic)", "ha", ("hausa",),
             (_mafand("hau"), _udhr("hau")), (_masakhaner("hau"),)),
    Language("ibo", "Igbo", "Latn", "Niger-Congo (Volta-Niger)", "ig", ("igbo",),
             (_mafand("ibo"), _udhr("ibo")), (_masakhaner("ibo"),)),
    Language("kin", "Kinyarwanda", "Latn", "Niger-Congo (Bantu)", "rw", ("kinyarwanda",),
             (_mafand("kin"), _udhr("kin")), (_masakhaner("kin"),)),
    Language("lug", "Luganda", "Latn", "Niger-Congo (Bantu)", "lg", ("luganda", "ganda"),
             (_mafand("lug"), _udhr("lug")), (_masakhaner("lug"),)),
    Language("luo", "Dholuo", "Latn", "Nilo-Saharan (Nilotic)", None, ("dholuo",),
             (_mafand("luo"),), (_masakhaner("luo"),)),
    Language("pcm", "Nigerian Pidgin", "Latn", "English Creole", None, ("naija", "pidgin"),
             (_mafand("pcm"), _udhr("pcm")), (_masakhaner("pcm"),)),
    # MasakhaNER and MAFAND call it `swa` (the macrolanguage); the individual language is `swh`.
    Language("swa", "Swahili", "Latn", "Niger-Congo (Bantu)", "sw", ("swh", "swahili"),
             (_mafand("swa"), _udhr("swa")), (_masakhaner("swa"),)),
)

_BY_KEY: dict[str, Language] = {}
for _lang in _LANGUAGES:
    for _key in (_lang.code, _lang.iso1, _lang.name, *_lang.aliases):
        if _key:
            _BY_KEY.setdefault(_key.casefold(), _lang)


def languages() -> tuple[Language, ...]:
    """Every catalogue entry, in catalogue order (source first)."""
    return _LANGUAGES


def find_language(code: str) -> Language | None:
    """The catalogue entry for an ISO 639-3 or 639-1 code, alias or English name, or None."""
    return _BY_KEY.get(code.strip().casefold())


def get_language(code: str) -> Language:
    """Look a language up by ISO 639-3 or 639-1 code, alias or English name (case-insensitive)."""
    lang = find_language(code)
    if lang is None:
        known = ", ".join(lang.code for lang in _LANGUAGES)
        raise CompsftError(f"unknown language {code!r}; the catalogue has: {known}")
    return lang


def language_for_training(code: str, has_text: bool) -> tuple[str, Language | None]:
    """The code a language SFT records, and its catalogue entry if it has one.

    A catalogue language is recorded by its ISO 639-3 code and supplies its shipped text and the
    evaluation files kept out of training. Any other code trains too, given text (`has_text`): a
    well-formed ISO 639-3 code (three lowercase letters) silently, anything else with a warning.

    >>> language_for_training("mt", has_text=False)[0]
    'mlt'
    >>> language_for_training("fao", has_text=True)
    ('fao', None)
    """
    lang = find_language(code)
    if lang is not None:
        return lang.code, lang
    code = code.strip()
    if not code:
        raise CompsftError("the language code is empty; give an ISO 639-3 code such as 'fao'")
    if not has_text:
        raise CompsftError(f"{code!r} is not in the catalogue, so compsft ships no text for it: give its raw text "
                           f"with --text FILE (plain text, one sentence or paragraph a line; repeatable). "
                           f"Catalogue languages: {', '.join(lang.code for lang in _LANGUAGES)}")
    if not ISO_639_3.fullmatch(code):
        logger.warning("language code %r is not an ISO 639-3 code (three lowercase letters, e.g. 'fao'); "
                       "training anyway and recording it as given", code)
    return code, None


def corpus_files(code: str) -> list[Path]:
    """The shipped MLM text files for a language code, e.g. `corpus_files("mt")`."""
    lang = get_language(code)
    files = lang.corpus_files()
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CompsftError(f"shipped MLM text for {lang.code} is missing: {', '.join(missing)}")
    return files


def tasks_data_dir() -> Path:
    """Where `compsft.tasks` keeps its shipped evaluation data."""
    import compsft.tasks

    return Path(compsft.tasks.__file__).resolve().parent / "data"


def eval_files(code: str) -> list[Path]:
    """The shipped dev and test files of a language: pass them as `exclude=` when loading MLM text
    so no evaluation sentence is trained on. Train splits are not listed (training text may share
    sentences with them); sets not shipped are skipped."""
    root = tasks_data_dir()
    files: list[Path] = []
    for name in get_language(code).eval_sets:
        folder = root / name
        if folder.is_dir():
            files.extend(
                p for p in sorted(folder.iterdir())
                if p.is_file() and p.name.endswith((".conllu", ".conllu.gz", ".iob2", ".iob2.gz",
                                                    ".txt", ".txt.gz"))
                and _EVAL_SPLIT.search(p.name)
            )
    return files


def language_corpus(code: str, paths=(), exclude=None, **kwargs):
    """MLM text for a language: `paths` if given, else its shipped files; cleaned of the sentences
    of `exclude` (default: the language's shipped dev/test files, `eval_files(code)`).

    The call a language-SFT trainer makes for `--lang CODE [--text PATH...]`; keyword arguments go
    to `load_mlm_corpus`.
    """
    from .corpus import load_mlm_corpus

    code, lang = language_for_training(code, has_text=bool(paths))
    sources = list(paths) or corpus_files(code)
    default_exclude = eval_files(code) if lang is not None else []
    return load_mlm_corpus(sources, default_exclude if exclude is None else exclude, **kwargs)
