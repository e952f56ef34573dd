"""Names for the data files shipped in `compsft/tasks/data/` (see data/README.md for sources and licences).

    >>> data_path("ud:mt_mudt:test")           # UD Maltese test (CoNLL-U, gzip)
    >>> data_path("ner:masakhaner:hau:test")   # MasakhaNER Hausa test (NC licence)
"""
from __future__ import annotations

from pathlib import Path

from compsft.errors import CompsftError

DATA_DIR = Path(__file__).resolve().parent / "data"

#: name -> path relative to DATA_DIR
DATASETS: dict[str, str] = {
    "ud:en_ewt:train": "ud/UD_English-EWT/en_ewt-ud-train-first4000.conllu.gz",
    "ud:en_ewt:dev": "ud/UD_English-EWT/en_ewt-ud-dev.conllu.gz",
    "ud:mt_mudt:test": "ud/UD_Maltese-MUDT/mt_mudt-ud-test.conllu.gz",
    "ud:wo_wtb:test": "ud/UD_Wolof-WTB/wo_wtb-ud-test.conllu.gz",
    "ud:ug_udt:test": "ud/UD_Uyghur-UDT/ug_udt-ud-test.conllu.gz",
    "ud:myv_jr:test": "ud/UD_Erzya-JR/myv_jr-ud-test.conllu.gz",
    "ud:gv_cadhan:test": "ud/UD_Manx-Cadhan/gv_cadhan-ud-test.conllu.gz",
    # Source languages for multi-source task training (subsets; see data/README.md). Finnish-TDT has
    # no train split here: its test file is source training data (a source is never a target).
    "ud:ga_idt:train": "ud/UD_Irish-IDT/ga_idt-ud-train-first400.conllu.gz",
    "ud:ga_idt:dev": "ud/UD_Irish-IDT/ga_idt-ud-dev-first200.conllu.gz",
    "ud:fi_tdt:train": "ud/UD_Finnish-TDT/fi_tdt-ud-test-first400.conllu.gz",
    "ud:fi_tdt:dev": "ud/UD_Finnish-TDT/fi_tdt-ud-dev-first200.conllu.gz",
    "ner:uner:en_ewt:train": "ner/uner/en_ewt/en_ewt-ud-train.DRAFT-0c7ce0d.raw.iob2.gz",
    "ner:uner:en_ewt:dev": "ner/uner/en_ewt/en_ewt-ud-dev.iob2.gz",
    "ner:uner:da_ddt:test": "ner/uner/da_ddt/da_ddt-ud-test.iob2.gz",
    **{
        f"ner:masakhaner:{lang}:{split}": f"ner/masakhaner/{lang}/{split}.txt.gz"
        for lang in ("hau", "ibo", "kin", "lug", "luo", "pcm", "swa")
        for split in ("dev", "test")
    },
}

#: UD target treebanks of the demo, by ISO 639 code of their language.
UD_TARGETS = {"mt": "mt_mudt", "wo": "wo_wtb", "ug": "ug_udt", "myv": "myv_jr", "gv": "gv_cadhan"}
MASAKHANER_LANGUAGES = ("hau", "ibo", "kin", "lug", "luo", "pcm", "swa")

#: language (ISO 639-3) of the shipped UD treebanks, by treebank: names a multi-source training source
UD_LANGUAGES = {"en_ewt": "eng", "ga_idt": "gle", "fi_tdt": "fin", "mt_mudt": "mlt", "wo_wtb": "wol",
                "ug_udt": "uig", "myv_jr": "myv", "gv_cadhan": "glv"}


def data_language(name: str | Path) -> str | None:
    """The language of a shipped UD data set (`ud:ga_idt:train` -> "gle"), or None for anything else."""
    parts = str(name).split(":")
    return UD_LANGUAGES.get(parts[1]) if len(parts) == 3 and parts[0] == "ud" else None


def data_path(name: str) -> Path:
    """The shipped file called `name` (a key of DATASETS), or a CompsftError listing the names."""
    try:
        path = DATA_DIR / DATASETS[name]
    except KeyError:
        raise CompsftError(f"no shipped data set {name!r}; known: {', '.join(sorted(DATASETS))}") from None
    if not path.is_file():
        raise CompsftError(f"{path}: shipped data file is missing (broken installation?)")
    return path


def resolve_data(name_or_path: str | Path) -> Path:
    """A shipped data set name (`ud:mt_mudt:test`) or a file path."""
    text = str(name_or_path)
    if text in DATASETS:
        return data_path(text)
    return Path(name_or_path)
