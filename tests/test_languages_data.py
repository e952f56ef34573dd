"""The catalogue, the shipped MLM text and the `compsft languages` command."""
from __future__ import annotations

import gzip
import json

import pytest
from typer.testing import CliRunner

from compsft.errors import CompsftError
from compsft.languages import corpus_files, eval_files, get_language, languages, leak_key, load_mlm_corpus
from compsft.languages.catalogue import DATA_DIR, tasks_data_dir
from compsft.languages.readers import read_ner_sentences

REQUIRED = ["eng", "mlt", "wol", "uig", "myv", "glv", "hau", "ibo", "kin", "lug", "luo", "pcm", "swa"]
MASAKHANER = ["hau", "ibo", "kin", "lug", "luo", "pcm", "swa"]


def _lines(path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read().splitlines()


def test_lookup_by_iso1_iso3_alias_and_name() -> None:
    assert {lang.code for lang in languages()} >= set(REQUIRED)
    assert get_language("mt") is get_language("MLT") is get_language("Maltese")
    assert get_language("swh") is get_language("sw") is get_language("swa")
    assert get_language("ug").script == "Arab" and get_language("myv").script == "Cyrl"
    with pytest.raises(CompsftError, match="unknown language 'xx'"):
        get_language("xx")


def test_catalogue_files_exist_and_match_manifest() -> None:
    manifest = json.loads((DATA_DIR / "manifest.json").read_text(encoding="utf-8"))
    listed = set()
    for lang in languages():
        assert lang.corpora, f"{lang.code} ships no MLM text"
        for corpus in lang.corpora:
            assert corpus.file.is_file(), corpus.file
            assert corpus.path.startswith(lang.code + "/")
            lines = _lines(corpus.file)
            assert len(lines) == manifest[corpus.path]["kept"] > 0
            listed.add(corpus.path)
        assert corpus_files(lang.code) == [c.file for c in lang.corpora]
    assert listed == set(manifest)
    size = sum(p.stat().st_size for p in DATA_DIR.rglob("*") if p.is_file())
    assert size < 6_000_000
    for licence in ("MAFAND_NOTE.txt", "UDHR_NOTE.txt", "UD_Maltese-MUDT-LICENSE.txt"):
        assert (DATA_DIR / "licenses" / licence).is_file()
    assert "non-commercial" in (DATA_DIR / "README.md").read_text(encoding="utf-8").lower()


def test_shipped_text_is_clean() -> None:
    # Already normalised and deduplicated: loading it again drops nothing.
    for code in ("mlt", "glv", "kin"):
        corpus = load_mlm_corpus(corpus_files(code))
        assert corpus.stats.empty == 0
        assert corpus.stats.duplicates <= 2  # a line may occur in both UDHR and the treebank


def test_eval_sets_are_shipped_by_tasks() -> None:
    root = tasks_data_dir()
    if not root.is_dir():
        pytest.skip("compsft.tasks ships no data yet")
    for lang in languages():
        for name in lang.eval_sets:
            assert (root / name).is_dir(), f"{lang.code}: {root / name} missing"
        files = eval_files(lang.code)
        assert files and all("train" not in f.name for f in files), lang.code


@pytest.mark.slow
@pytest.mark.parametrize("code", MASAKHANER)
def test_no_masakhaner_test_sentence_in_shipped_mafand(code: str) -> None:
    folder = tasks_data_dir() / "ner" / "masakhaner" / code
    files = sorted(folder.glob("test.txt*")) + sorted(folder.glob("dev.txt*"))
    if not files:
        pytest.skip(f"MasakhaNER {code} is not shipped by compsft.tasks")
    mafand = _lines(DATA_DIR / code / "mafand.txt.gz")
    shipped_keys = {leak_key(line) for line in mafand}
    shipped_joined = "\n".join(shipped_keys)
    for path in files:
        for sentence in read_ner_sentences(path):
            key = leak_key(sentence)
            assert key not in shipped_keys, f"{path}: {sentence!r} is in the shipped MAFAND text"
            if len(key) >= 40:
                assert key not in shipped_joined, f"{path}: {sentence!r} is inside a shipped MAFAND line"


def test_igbo_leak_count_recorded() -> None:
    manifest = json.loads((DATA_DIR / "manifest.json").read_text(encoding="utf-8"))
    # About a third of the Igbo MasakhaNER test sentences occur in MAFAND: they were removed.
    assert manifest["ibo/mafand.txt.gz"]["leaked"] > 300
    assert manifest["ibo/mafand.txt.gz"]["excluded_evaluation_files"] == [
        "ner/masakhaner/ibo/dev.txt", "ner/masakhaner/ibo/test.txt"
    ]


def _app():
    from compsft.cli import app

    return app


def test_cli_table_and_json() -> None:
    runner = CliRunner()
    result = runner.invoke(_app(), ["languages"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for code in REQUIRED:
        assert code in result.output
    assert "Maltese" in result.output and "(NC)" in result.output
    result = runner.invoke(_app(), ["languages", "--json", "mt", "ha"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [d["code"] for d in data] == ["mlt", "hau"]
    assert data[1]["corpora"][0]["licence"].startswith("CC BY-NC")
    result = runner.invoke(_app(), ["languages", "--files", "wol"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "wol/ud-train.txt.gz" in result.output


def test_cli_unknown_language() -> None:
    result = CliRunner().invoke(_app(), ["languages", "zz"])
    assert result.exit_code != 0
    assert isinstance(result.exception, CompsftError)


def test_language_corpus_defaults_and_custom_text(tmp_path) -> None:
    from compsft.languages import language_corpus

    corpus = language_corpus("mt")
    assert corpus.sources == corpus_files("mlt") and corpus.stats.leaked == 0
    if not eval_files("mt"):
        pytest.skip("no Maltese evaluation data shipped by compsft.tasks")
    # A Maltese test sentence in user text is dropped by default.
    test_sentence = next(iter(load_mlm_corpus(eval_files("mt"), fmt="conllu")))
    own = tmp_path / "mt.txt"
    own.write_text(f"Xi ħaġa oħra għal kollox.\n{test_sentence}\n", encoding="utf-8")
    assert language_corpus("mlt", [own]).lines == ["Xi ħaġa oħra għal kollox."]
    assert len(language_corpus("mlt", [own], exclude=[])) == 2
