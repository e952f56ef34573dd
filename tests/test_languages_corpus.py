"""Reading MLM text, normalisation, deduplication and the leakage filter (synthetic files)."""
from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from compsft.errors import CompsftError
from compsft.languages import LeakageFilter, deduplicate, leak_key, load_mlm_corpus, normalise_text
from compsft.languages.readers import (
    list_text_files,
    read_conllu_text,
    read_ner_sentences,
    read_sentences,
    sniff_format,
)

CONLLU = """# newdoc id = d1
# sent_id = s1
# text = Ci wàllu xay Kajoor.
# text_en = In the area of Kajoor.
1\tCi\tci\tADP\t_\t_\t2\tcase\t_\t_
2\twàllu\twàll\tNOUN\t_\t_\t0\troot\t_\tSpaceAfter=No
3\t.\t.\tPUNCT\t_\t_\t2\tpunct\t_\t_

# sent_id = s2
1-2\tdon't\t_\t_\t_\t_\t_\t_\t_\t_
1\tdo\tdo\tAUX\t_\t_\t0\troot\t_\t_
2\tn't\tnot\tPART\t_\t_\t1\tadvmod\t_\t_
3\tgo\tgo\tVERB\t_\t_\t1\txcomp\t_\tSpaceAfter=No
3.1\tgone\tgo\tVERB\t_\t_\t_\t_\t_\t_
4\t!\t!\tPUNCT\t_\t_\t1\tpunct\t_\t_
"""

MASAKHANER = """Ya O
kuma O
al B-PER
- I-PER
Barnawi I-PER
, O
ya O
yanke O
. O

Ga O
dai O
: O
"""

UNER = """# sent_id = a-0001
# text = What is this Miramar?
1\tWhat\tO\t-\t-
2\tis\tO\t-\t-
3\tthis\tO\t-\t-
4\tMiramar\tB-LOC\t-\tstephen
5\t?\tO\t-\t-

"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_normalise_text() -> None:
    # NFD "é" becomes NFC; tabs, no-break spaces and runs of spaces become one space.
    assert normalise_text("  caf\u0065\u0301\tau\u00a0 lait \n") == "caf\u00e9 au lait"
    assert normalise_text(" \t ") == ""


def test_conllu_text_and_rebuilt_text(tmp_path: Path) -> None:
    path = write(tmp_path / "x.conllu", CONLLU)
    # s1 has `# text =` (and a `# text_en` that must be ignored); s2 has none and is rebuilt
    # from its forms: multiword token kept, its parts and the empty node skipped, SpaceAfter honoured.
    assert list(read_conllu_text(path)) == ["Ci wàllu xay Kajoor.", "don't go!"]
    assert sniff_format(path) == "conllu"


def test_conllu_bad_columns_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.conllu", "# text = a\n1\ta\n\n")
    with pytest.raises(CompsftError, match=r"bad\.conllu:2"):
        list(read_conllu_text(path))


def test_ner_formats(tmp_path: Path) -> None:
    m = write(tmp_path / "test.txt", MASAKHANER)
    u = write(tmp_path / "en-test.iob2.gz", UNER)
    assert sniff_format(m) == "ner" and sniff_format(u) == "ner"
    assert list(read_ner_sentences(m)) == ["Ya kuma al - Barnawi , ya yanke .", "Ga dai :"]
    assert list(read_sentences(u)) == ["What is this Miramar ?"]
    plain = write(tmp_path / "plain.txt", "Hello there world\nA line\n")
    assert sniff_format(plain) == "text"


def test_directory_listing_skips_docs(tmp_path: Path) -> None:
    write(tmp_path / "b.txt", "b\n")
    write(tmp_path / "a" / "z.hau.gz", "z\n")
    write(tmp_path / "README.md", "doc\n")
    write(tmp_path / "licenses" / "MAFAND_NOTE.txt", "licence\n")
    write(tmp_path / "LICENSE.txt", "licence\n")
    write(tmp_path / "manifest.json", "{}\n")
    write(tmp_path / ".hidden.txt", "h\n")
    assert [p.relative_to(tmp_path).as_posix() for p in list_text_files(tmp_path)] == ["a/z.hau.gz", "b.txt"]


def test_load_corpus_dedup_and_stats(tmp_path: Path) -> None:
    write(tmp_path / "d" / "1.txt.gz", "first  line\n\n   \nsecond line\nfirst line\n")
    write(tmp_path / "t.conllu", CONLLU)
    corpus = load_mlm_corpus([tmp_path / "d", tmp_path / "t.conllu"])
    assert corpus.lines == ["first line", "second line", "Ci wàllu xay Kajoor.", "don't go!"]
    s = corpus.stats
    assert (s.read, s.empty, s.duplicates, s.leaked, s.kept) == (7, 2, 1, 0, 4)
    assert len(corpus.sources) == 2
    ds = corpus.to_dataset()
    assert ds.column_names == ["text"] and ds["text"] == corpus.lines
    assert load_mlm_corpus([tmp_path / "d"], max_lines=1).lines == ["first line"]
    assert load_mlm_corpus([tmp_path / "d"], dedup=False).stats.kept == 3


def test_corpus_split_is_seeded_and_disjoint(tmp_path: Path) -> None:
    write(tmp_path / "a.txt", "".join(f"line {i}\n" for i in range(100)))
    corpus = load_mlm_corpus([tmp_path / "a.txt"])
    train, dev = corpus.split(0.1, seed=3)
    train2, dev2 = corpus.split(0.1, seed=3)
    assert dev.lines == dev2.lines and len(dev) == 10 and len(train) == 90
    assert not set(train.lines) & set(dev.lines)
    assert dev.lines != corpus.split(0.1, seed=4)[1].lines


def test_deduplicate_keeps_first_in_order() -> None:
    assert deduplicate(["b", "a", "b", "c", "a"]) == (["b", "a", "c"], 2)


def test_leak_key_ignores_tokenisation_case_and_quotes() -> None:
    raw = "'Ọ ka mma inye amnesty' karịa ị na-egbu oge n'ụlọikpe' - Ndị ọkaiwu"
    tokenised = "\" Ọ ka mma inye amnesty ' karịa ị na - egbu oge n ' ụlọikpe ' - Ndị ọkaiwu"
    assert leak_key(raw) == leak_key(tokenised)
    assert leak_key("Al-Barnawi, ya!") == "albarnawiya"


def test_leakage_filter_exact_contained_and_inside() -> None:
    test_sentence = "Shugaban kasa ya bayyana cewa za a gudanar da zabe a watan gobe ."
    filt = LeakageFilter([test_sentence, "Ga dai :"], min_contained_chars=30)
    assert filt.is_leak("Shugaban ƙasa".replace("ƙ", "k") + " ya bayyana cewa za a gudanar da zabe a watan gobe.")
    # A raw line holding the test sentence and another one.
    assert filt.is_leak("Labarai na yau. Shugaban kasa ya bayyana cewa za a gudanar da zabe a watan gobe.")
    # A raw line that is a long piece of the test sentence.
    assert filt.is_leak("ya bayyana cewa za a gudanar da zabe a watan")
    # Short evaluation sentences match only whole lines, never inside longer ones.
    assert filt.is_leak("Ga dai:")
    assert not filt.is_leak("Ga dai wani labari mai muhimmanci.")
    # Short pieces of a test sentence are ordinary text.
    assert not filt.is_leak("za a gudanar")
    assert not filt.is_leak("Wani abu daban gaba daya.")
    assert not filt.is_leak("   ")
    kept, dropped = filt.filter(["Ga dai:", "Sannu.", "ya bayyana cewa za a gudanar da zabe a watan"])
    assert kept == ["Sannu."] and dropped == 2


def test_load_corpus_with_exclude(tmp_path: Path) -> None:
    ner_test = write(tmp_path / "ner" / "test.txt", MASAKHANER)
    ud_test = write(tmp_path / "ud-test.conllu", CONLLU)
    text = write(tmp_path / "mafand.hau", "Ya kuma al-Barnawi, ya yanke.\nSabon labari.\nDon't go!\n")
    corpus = load_mlm_corpus([text], exclude=[ner_test, ud_test])
    assert corpus.lines == ["Sabon labari."]
    assert corpus.stats.leaked == 2


def test_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CompsftError, match="missing.txt"):
        load_mlm_corpus([tmp_path / "missing.txt"])
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("ok\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(CompsftError, match=r"latin1\.txt: not UTF-8"):
        load_mlm_corpus([bad])
    empty = write(tmp_path / "empty.txt", "\n \n")
    with pytest.raises(CompsftError, match="no MLM text left"):
        load_mlm_corpus([empty])
    with pytest.raises(CompsftError, match="no text files"):
        (tmp_path / "void").mkdir()
        load_mlm_corpus([tmp_path / "void"])
