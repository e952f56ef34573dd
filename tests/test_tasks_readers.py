"""Readers, writers and the shipped data catalogue of compsft.tasks."""
from __future__ import annotations

import gzip
import logging

import pytest

from compsft.errors import CompsftError
from compsft.tasks import DATASETS, data_path, get_task
from compsft.tasks.base import Sentence
from compsft.tasks.readers import map_unknown_to_o, read_conllu, read_ner, repair_iob2
from compsft.tasks.writers import write_conllu, write_ner_columns

CONLLU = """# sent_id = s1
# text = Don't go.
1-2\tDon't\t_\t_\t_\t_\t_\t_\t_\t_
1\tDo\tdo\tAUX\tVBP\t_\t3\taux\t_\t_
2\tn't\tnot\tPART\tRB\t_\t3\tadvmod\t_\t_
3\tgo\tgo\tVERB\tVB\t_\t0\troot\t_\tSpaceAfter=No
3.1\tgo\tgo\tVERB\tVB\t_\t_\t_\t3:conj\t_
4\t.\t.\tPUNCT\t.\t_\t3\tpunct\t_\t_

# sent_id = s2
1\tTime\ttime\tNOUN\tNN\t_\t2\tobl:tmod\t_\t_
2\tflies\tfly\tVERB\tVBZ\t_\t0\troot\t_\t_

"""


def test_conllu_skips_ranges_and_empty_nodes(tmp_path):
    path = tmp_path / "a.conllu"
    path.write_text(CONLLU, encoding="utf-8")
    first, second = read_conllu(path)
    assert first.words == ["Do", "n't", "go", "."]
    assert first.tags == ["AUX", "PART", "VERB", "PUNCT"]
    assert first.heads == [3, 3, 0, 3]
    assert first.deprels == ["aux", "advmod", "root", "punct"]
    assert first.sent_id == "s1" and first.source == f"{path}:1"
    assert second.deprels == ["obl", "root"]
    assert read_conllu(path, keep_subtypes=True)[1].deprels == ["obl:tmod", "root"]


def test_conllu_gzip_and_round_trip(tmp_path):
    path = tmp_path / "a.conllu.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(CONLLU)
    gold = read_conllu(path, keep_subtypes=True)
    # Writing the gold back as "predictions" reproduces the file byte for byte, ranges and empty nodes included.
    out = tmp_path / "out.conllu"
    write_conllu(out, gold, gold, columns=("upos",))
    assert out.read_text(encoding="utf-8") == CONLLU
    predicted = [gold[0].replace(tags=["X"] * 4, heads=[0, 1, 1, 1], deprels=["root", "dep", "dep", "punct"]), gold[1]]
    write_conllu(out, gold, predicted, columns=("upos", "head", "deprel"))
    again = read_conllu(out)
    assert again[0].tags == ["X"] * 4 and again[0].heads == [0, 1, 1, 1]
    assert again[0].deprels == ["root", "dep", "dep", "punct"]
    text = out.read_text(encoding="utf-8")
    assert "1-2\tDon't" in text and "3.1\tgo" in text and "# text = Don't go." in text


@pytest.mark.parametrize("bad, line, message", [
    ("1\tTime\ttime\tNOUN\tNN\t_\t2\tobl\t_", 3, "10 tab-separated columns"),
    ("1\tTime\ttime\tNOUN\tNN\t_\tx\tobl\t_\t_", 3, "head"),
    ("2\tTime\ttime\tNOUN\tNN\t_\t2\tobl\t_\t_", 3, "out of sequence"),
    ("1\tTime\ttime\tNOUN\tNN\t_\t9\tobl\t_\t_", 3, "HEAD 9"),
])
def test_conllu_malformed_line_names_file_and_line(tmp_path, bad, line, message):
    path = tmp_path / "bad.conllu"
    path.write_text("# sent_id = x\n# text = Time flies\n" + bad + "\n2\tflies\tfly\tVERB\tVBZ\t_\t0\troot\t_\t_\n\n",
                    encoding="utf-8")
    with pytest.raises(CompsftError, match=message) as info:
        read_conllu(path)
    assert f"{path}:{line}" in str(info.value)


def test_empty_files_are_clear_errors(tmp_path):
    empty = tmp_path / "empty.conllu"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(CompsftError, match="empty"):
        read_conllu(empty)
    with pytest.raises(CompsftError, match="empty"):
        read_ner(tmp_path / "empty.conllu", format="conll")
    with pytest.raises(CompsftError, match="no such file"):
        read_conllu(tmp_path / "missing.conllu")


def test_repair_iob2_like_seqeval():
    tags, fixes = repair_iob2(["I-PER", "I-PER", "O", "I-LOC", "B-ORG", "I-LOC", "I-LOC"])
    assert tags == ["B-PER", "I-PER", "O", "B-LOC", "B-ORG", "B-LOC", "I-LOC"]
    assert fixes == 3


def test_ner_formats_mapping_and_repairs(tmp_path, caplog):
    conll = tmp_path / "ner.txt"
    conll.write_text("Ali B-PER\nya O\nje I-LOC\nKano I-LOC\n\njiya B-DATE\n", encoding="utf-8")
    iob2 = tmp_path / "ner.iob2"
    iob2.write_text("# sent_id = a\n1\tJohn\tB-PER\t-\t-\n2\tsaw\tO\t-\t-\n3\tX\tB-OTH\t-\t-\n4\tY\tI-OTH\t-\t-\n"
                    "5\tz\tB-O\t-\t-\n\n", encoding="utf-8")
    with caplog.at_level(logging.INFO):
        a = read_ner(conll)
        b = read_ner(iob2)
    assert a[0].words == ["Ali", "ya", "je", "Kano"]
    assert a[0].tags == ["B-PER", "O", "B-LOC", "I-LOC"]
    assert b[0].words == ["John", "saw", "X", "Y", "z"] and b[0].sent_id == "a"
    assert b[0].tags == ["B-PER", "O", "O", "O", "O"]
    assert "1 invalid IOB2 transitions repaired" in caplog.text
    assert "3 tags of types ['OTH']" in caplog.text
    assert read_ner(iob2, drop_types=())[0].tags[2:4] == ["B-OTH", "I-OTH"]
    mapped, changed = map_unknown_to_o(a, ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"])
    assert changed == 1 and mapped[1].tags == ["O"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a O\nb PER\n", encoding="utf-8")
    with pytest.raises(CompsftError, match=f"{bad}:2: invalid tag 'PER'"):
        read_ner(bad)


def test_ner_columns_writer(tmp_path):
    gold = [Sentence(["Ali", "ya"], ["B-PER", "O"])]
    pred = [Sentence(["Ali", "ya"], ["B-PER", "B-LOC"])]
    path = tmp_path / "p.txt"
    write_ner_columns(path, gold, pred)
    assert path.read_text(encoding="utf-8") == "Ali B-PER B-PER\nya O B-LOC\n\n"
    # The written gold column reads back as the same sentences.
    assert read_ner(path)[0].words == ["Ali", "ya"]


def test_label_lists_are_stable():
    pos, dep, ner = get_task("pos"), get_task("dep"), get_task("ner")
    s = [Sentence(["a"], ["NOUN"], [0], ["root"]), Sentence(["b"], ["WEIRD"], [0], ["obl:tmod"])]
    assert pos.label_list(s)[:3] == ["ADJ", "ADP", "ADV"] and pos.label_list(s)[-1] == "WEIRD"
    assert len(pos.label_list(s)) == 18
    assert dep.label_list(s)[-1] == "obl:tmod" and "punct" in dep.label_list(s)
    n = [Sentence(["a", "b"], ["B-PER", "I-PER"]), Sentence(["c"], ["B-LOC"])]
    assert ner.label_list(n) == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    with pytest.raises(CompsftError, match="unknown task"):
        get_task("nli")


def test_shipped_catalogue():
    for name in DATASETS:
        assert data_path(name).stat().st_size > 1000, name
    with pytest.raises(CompsftError, match="known"):
        data_path("ud:xx:test")
    maltese = read_conllu(data_path("ud:mt_mudt:test"))
    assert len(maltese) == 518
    hausa = read_ner(data_path("ner:masakhaner:hau:test"))
    assert len(hausa) == 552 and any("B-DATE" in s.tags for s in hausa)
    danish = read_ner(data_path("ner:uner:da_ddt:test"))
    assert {t for s in danish for t in s.tags} <= {"O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"}
