"""`compsft predict` and `compsft.Predictor` (issue 26): every task from every input kind, checked against
what the task spec predicts on the same composed model; outputs read back with `conllu` and held to the
CoNLL 2018 evaluator's rules; bad input is a clear error. Tiny random-init models built in code."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import conllu
import pytest
from typer.testing import CliRunner

import compsft
from compsft.cli import app
from compsft.errors import CompsftError
from compsft.predict.inputs import split_sentences, tokenize
from compsft.predict.outputs import entities
from compsft.tasks.readers import read_ner, repair_iob2

from predict_helpers import TASKS, check_conll18, composed_model, expected, make_world

runner = CliRunner()

RAW = "The cat sat on the mat. A very small dog barked at the postman yesterday!\n\nShe gave him the book, and he read it.\n"
RAW_WORDS = [["The", "cat", "sat", "on", "the", "mat", "."],
             ["A", "very", "small", "dog", "barked", "at", "the", "postman", "yesterday", "!"],
             ["She", "gave", "him", "the", "book", ",", "and", "he", "read", "it", "."]]
PRETOKENIZED = ["the cat sat on the mat .", "colourless green ideas sleep furiously", "she gave him the book"]
# A CoNLL-U input with gold columns (to be replaced), a comment, a multi-word token and an empty node.
CONLLU = """# sent_id = first
# text = the cat sat on the mat.
1\tthe\tthe\tDET\t_\t_\t2\tdet\t_\t_
2\tcat\tcat\tNOUN\t_\t_\t3\tnsubj\t_\t_
3\tsat\tsit\tVERB\t_\t_\t0\troot\t_\t_
4-5\tonthe\t_\t_\t_\t_\t_\t_\t_\t_
4\ton\ton\tADP\t_\t_\t6\tcase\t_\t_
5\tthe\tthe\tDET\t_\t_\t6\tdet\t_\t_
6\tmat\tmat\tNOUN\t_\t_\t3\tobl\t_\tSpaceAfter=No
6.1\tsat\tsit\tVERB\t_\t_\t_\t_\t3:conj\t_
7\t.\t.\tPUNCT\t_\t_\t3\tpunct\t_\t_

1\tcolourless\t_\t_\t_\t_\t_\t_\t_\t_
2\tgreen\t_\t_\t_\t_\t_\t_\t_\t_
3\tideas\t_\t_\t_\t_\t_\t_\t_\t_

"""
CONLLU_WORDS = [["the", "cat", "sat", "on", "the", "mat", "."], ["colourless", "green", "ideas"]]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    w = make_world(root)
    (root / "raw.txt").write_text(RAW, encoding="utf-8")
    (root / "pretok.txt").write_text("\n".join(PRETOKENIZED) + "\n", encoding="utf-8")
    (root / "in.conllu").write_text(CONLLU, encoding="utf-8")
    w["models"] = {task: composed_model(w, task) for task in TASKS}
    return w


def run(world, task, *args, sft=True, expect=0):
    sfts = ["--sft", str(world["root"] / "lang"), "--sft", str(world["root"] / f"task-{task}")] if sft else []
    result = runner.invoke(app, ["predict", "--task", task, "--model", str(world["base"]), *sfts, "--device", "cpu",
                                 *map(str, args)])
    assert result.exit_code == expect, result.output
    return result


# -- the tokenizer ------------------------------------------------------------------------------------
def test_tokenizer_words_numbers_punctuation_and_offsets():
    text = "It's 3.14, isn't it?! l-allegat (yes)... हिन्दी भाषा।"
    words = [text[s:e] for s, e in tokenize(text)]
    assert words == ["It's", "3.14", ",", "isn't", "it", "?", "!", "l-allegat", "(", "yes", ")", "...",
                     "हिन्दी", "भाषा", "।"]


def test_sentence_splitter():
    def split(text):
        return [[text[s:e] for s, e in sentence] for sentence in split_sentences(text)]

    assert split("One. Two! Three?\" Four") == [["One", "."], ["Two", "!"], ["Three", "?", '"'], ["Four"]]
    assert split("J. Smith came. then he left.") == [["J", ".", "Smith", "came", ".", "then", "he", "left", "."]]
    assert split("3.5 is. 4") == [["3.5", "is", "."], ["4"]]
    assert split("Ukraina. Україна. 北京。东京") == [["Ukraina", "."], ["Україна", "."], ["北京", "。", "东京"]]


def test_entities_from_iob2():
    assert entities(["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "O", "I-ORG"]) == \
        [("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 6), ("ORG", 7, 8)]


# -- every task from every input kind -------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("kind", ["raw", "pretokenized", "conllu"])
def test_predict_matches_the_task_spec(world, task, kind, tmp_path):
    source = {"raw": "raw.txt", "pretokenized": "pretok.txt", "conllu": "in.conllu"}[kind]
    words = {"raw": RAW_WORDS, "pretokenized": [s.split() for s in PRETOKENIZED], "conllu": CONLLU_WORDS}[kind]
    out = tmp_path / "out.conllu"
    run(world, task, "--input", world["root"] / source, "--out", out, *(["--pretokenized"] if kind == "pretokenized" else []),
        "--chunk-size", "2", "--batch-size", "3")
    text = out.read_text(encoding="utf-8")
    parsed = conllu.parse(text)
    rules = check_conll18(text)
    want = expected(world, task, words, world["models"][task])
    assert len(parsed) == len(rules) == len(want)
    for got, ref, sent in zip(rules, want, parsed):
        assert [w["form"] for w in got] == ref.words
        if task == "pos":
            assert [w["upos"] for w in got] == ref.tags
        elif task == "dep":
            assert [w["head"] for w in got] == ref.heads and [w["deprel"] for w in got] == ref.deprels
        else:
            assert [dict(p.split("=") for p in w["misc"].split("|"))["NER"] for w in got] == ref.tags
        assert sent.metadata["sent_id"] and sent.metadata["text"]
    if kind == "raw":
        assert parsed[0].metadata["text"] == "The cat sat on the mat." and parsed[0][5]["misc"]["SpaceAfter"] == "No"
        assert [s.metadata["sent_id"] for s in parsed] == ["1", "2", "3"] and "newpar" in parsed[2].metadata
    if kind == "conllu":
        assert parsed[0].metadata["sent_id"] == "first"
        assert [t["form"] for t in parsed[0] if not isinstance(t["id"], int)] == ["onthe", "sat"]  # kept
        assert parsed[1].metadata["text"] == "colourless green ideas"  # made
        if task == "pos":  # the input's tree stays; a sentence without one gets the placeholder
            assert [t["head"] for t in parsed[0] if isinstance(t["id"], int)] == [2, 3, 0, 6, 6, 3, 3]
            assert [t["head"] for t in parsed[1]] == [0, 1, 1]
        if task == "dep":
            # The input's enhanced graph would contradict the predicted tree.
            assert all(t["deps"] is None for t in parsed[0] if isinstance(t["id"], int))


def test_ner_iob2_and_jsonl(world, tmp_path):
    want = expected(world, "ner", RAW_WORDS, world["models"]["ner"])
    run(world, "ner", "--input", world["root"] / "raw.txt", "--out", tmp_path / "out.iob2", "--format", "iob2")
    assert [s.tags for s in read_ner(tmp_path / "out.iob2", format="iob2")] == [s.tags for s in want]
    run(world, "ner", "--input", world["root"] / "raw.txt", "--out", tmp_path / "out.jsonl", "--format", "jsonl")
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [[w["ner"] for w in line["words"]] for line in lines] == [s.tags for s in want]
    for line, ref in zip(lines, want):
        spans = [(e["type"], e["start"], e["end"]) for e in line["entities"]]
        assert spans == entities(ref.tags)
        for e in line["entities"]:
            assert line["text"][e["start_char"]:e["end_char"]] == e["text"]
            assert e["text"].startswith(ref.words[e["start"]]) and e["text"].endswith(ref.words[e["end"] - 1])


def test_stdin_to_stdout_and_gz_input(world, tmp_path):
    result = runner.invoke(app, ["predict", "--task", "pos", "--model", str(world["base"]), "--sft",
                                 str(world["root"] / "lang"), "--sft", str(world["root"] / "task-pos"),
                                 "--device", "cpu", "--pretokenized"], input="the cat sat\n")
    assert result.exit_code == 0, result.output
    sentence = conllu.parse(result.stdout)[0]
    assert [t["upos"] for t in sentence] == expected(world, "pos", [["the", "cat", "sat"]], world["models"]["pos"])[0].tags
    with gzip.open(tmp_path / "in.conllu.gz", "wt", encoding="utf-8") as f:
        f.write(CONLLU)
    run(world, "dep", "--input", tmp_path / "in.conllu.gz", "--out", tmp_path / "out.conllu")
    assert len(conllu.parse((tmp_path / "out.conllu").read_text(encoding="utf-8"))) == 2


# -- Python ----------------------------------------------------------------------------------------------
def test_python_predictor(world):
    tagger = compsft.Predictor(world["base"], sfts=[world["root"] / "lang", world["root"] / "task-pos"], task="pos",
                               device="cpu", batch_size=2)
    got = tagger(["The cat sat on the mat. A very small dog barked at the postman yesterday!",
                  "She gave him the book, and he read it."])
    want = expected(world, "pos", RAW_WORDS, world["models"]["pos"])
    assert [[w["upos"] for w in s["words"]] for s in got] == [s.tags for s in want]
    assert [s["sent_id"] for s in got] == ["1", "2", "3"]
    assert got[0]["words"][1] == {"id": 2, "form": "cat", "upos": want[0].tags[1], "start_char": 4, "end_char": 7}
    words = [s.split() for s in PRETOKENIZED]
    assert [[w["upos"] for w in s["words"]] for s in tagger.predict_words(words)] == \
        [s.tags for s in expected(world, "pos", words, world["models"]["pos"])]
    parser = compsft.Predictor(world["base"], sfts=[compsft.load(world["root"] / "task-dep")], task="dep", device="cpu")
    heads = [[w["head"] for w in s["words"]] for s in parser.predict_words(words + [[]])]
    assert heads[-1] == [] and all(sum(h == 0 for h in hs) == 1 for hs in heads[:-1])


def test_stream_reads_one_chunk_ahead(world):
    """Memory does not grow with the input: the stream pulls one chunk, predicts it, hands it out."""
    from compsft.predict.inputs import read_text

    tagger = compsft.Predictor(world["base"], sfts=[world["root"] / "task-pos"], task="pos", device="cpu")
    pulled = []

    def records():
        for i in range(50):
            pulled.append(i)
            yield from read_text("the cat sat on the mat .")

    stream = tagger.stream(records(), chunk_size=4)
    first = [next(stream) for _ in range(4)]
    assert len(pulled) == 4 and [len(r.words) for r, _ in first] == [7] * 4
    assert sum(1 for _ in stream) == 46


def test_pipeline_reads_a_composed_model(world, tmp_path):
    """A merged POS or NER directory written by `compsft compose` is an ordinary token-classification model."""
    from transformers import pipeline

    for task in ("pos", "ner"):
        merged = tmp_path / f"merged-{task}"
        result = runner.invoke(app, ["compose", "--base", str(world["base"]), "--sft", str(world["root"] / "lang"),
                                     "--sft", str(world["root"] / f"task-{task}"), "--out", str(merged)])
        assert result.exit_code == 0, result.output
        tagger = pipeline("token-classification", model=str(merged), device="cpu", ignore_labels=[])
        words = ["the", "cat", "sat", "on", "the", "mat", "."]
        tokens = tagger(" ".join(words))
        first = {}  # the label of each word's first sub-word, where compsft reads it
        for t in tokens:
            if not t["word"].startswith("##"):
                first[t["start"]] = t["entity"]
        # compsft writes valid IOB2 (an I-X after O is read as B-X, as seqeval's default mode does)
        labels = repair_iob2(list(first.values()))[0]
        assert labels == expected(world, task, [words], world["models"][task])[0].tags
        # ... and `compsft predict --model merged/` (no --sft) gives the same.
        out = tmp_path / f"{task}.conllu"
        runner.invoke(app, ["predict", "--task", task, "--model", str(merged), "--input", str(world["root"] / "pretok.txt"),
                            "--pretokenized", "--out", str(out), "--device", "cpu"])
        sentence = conllu.parse(out.read_text(encoding="utf-8"))[0]
        got = [t["upos"] if task == "pos" else t["misc"]["NER"] for t in sentence]
        assert got == labels


# -- bad input -------------------------------------------------------------------------------------------
def test_undecodable_bytes_name_the_line(world, tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"the cat sat\nthe \xff\xfe mat\n")
    result = run(world, "pos", "--input", tmp_path / "bad.txt", "--out", tmp_path / "out.conllu", expect=1)
    assert isinstance(result.exception, CompsftError)
    assert f"{tmp_path / 'bad.txt'}:2: not UTF-8" in str(result.exception)
    assert not (tmp_path / "out.conllu").exists()


def test_wrong_columns_name_the_line_and_leave_no_output(world, tmp_path):
    good = "".join(f"1\tthe\t_\t_\t_\t_\t_\t_\t_\t_\n\n" for _ in range(3))
    (tmp_path / "bad.conllu").write_text(good + "1\tthe\t_\t_\n\n", encoding="utf-8")
    result = run(world, "dep", "--input", tmp_path / "bad.conllu", "--out", tmp_path / "out.conllu",
                 "--chunk-size", "1", expect=1)
    assert str(result.exception) == f"{tmp_path / 'bad.conllu'}:7: expected 10 tab-separated columns, found 4"
    # Three sentences were predicted and written before the error: none of it appears under the name.
    assert not (tmp_path / "out.conllu").exists() and not list(tmp_path.glob(".out.conllu*"))


def test_empty_input_writes_an_empty_output_and_says_so(world, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    result = run(world, "ner", "--input", tmp_path / "empty.txt", "--out", tmp_path / "out.conllu")
    assert (tmp_path / "out.conllu").read_text() == ""
    assert "no sentences (empty input)" in result.stderr


def test_long_sentence_is_windowed_with_a_message(world, tmp_path, caplog):
    words = ["the", "cat", "sat", "on", "the", "mat"] * 40  # 240 words, the tiny model's window is 128
    (tmp_path / "long.txt").write_text(" ".join(words) + "\n", encoding="utf-8")
    result = run(world, "dep", "--input", tmp_path / "long.txt", "--out", tmp_path / "out.conllu", "--pretokenized")
    assert f"{tmp_path / 'long.txt'}:1: a sentence of 240 words is longer than the model's window" in caplog.text
    assert "1 sentences were longer than the model's window" in result.stderr
    rules = check_conll18((tmp_path / "out.conllu").read_text(encoding="utf-8"))
    assert [w["head"] for w in rules[0]] == expected(world, "dep", [words], world["models"]["dep"])[0].heads


def test_sft_of_another_task_or_base_model(world, tmp_path):
    result = runner.invoke(app, ["predict", "--task", "pos", "--model", str(world["base"]), "--sft",
                                 str(world["root"] / "task-ner"), "--device", "cpu", "--input",
                                 str(world["root"] / "raw.txt"), "--out", str(tmp_path / "o")])
    assert str(result.exception) == f"{world['root'] / 'task-ner'}: a task SFT for 'ner', not 'pos'"
    other = _other_base(world, tmp_path / "other")
    result = run(world, "pos", "--input", world["root"] / "raw.txt", "--out", tmp_path / "o", sft=False, expect=1)
    assert "not a pos model" in str(result.exception)
    result = runner.invoke(app, ["predict", "--task", "pos", "--model", str(other), "--sft",
                                 str(world["root"] / "task-pos"), "--device", "cpu", "--input",
                                 str(world["root"] / "raw.txt"), "--out", str(tmp_path / "o")])
    assert isinstance(result.exception, compsft.FingerprintMismatch), result.output
    assert not (tmp_path / "o").exists()


def _other_base(world, path: Path) -> Path:
    """The base model with slightly different weights: same shapes and vocabulary, another fingerprint."""
    import torch
    from transformers import BertForMaskedLM

    model = BertForMaskedLM.from_pretrained(world["base"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(path)
    world["tokenizer"].save_pretrained(path)
    return path


def test_existing_out_needs_force(world, tmp_path):
    out = tmp_path / "out.conllu"
    out.write_text("mine\n")
    result = run(world, "pos", "--input", world["root"] / "raw.txt", "--out", out, expect=1)
    assert str(result.exception) == f"--out: {out} exists; pass --force to overwrite it"
    assert out.read_text() == "mine\n"
    run(world, "pos", "--input", world["root"] / "raw.txt", "--out", out, "--force")
    assert len(conllu.parse(out.read_text(encoding="utf-8"))) == 3


def test_cli_main_prints_one_line(world, tmp_path, monkeypatch, capsys):
    from compsft.cli import main

    (tmp_path / "bad.conllu").write_text("1\tthe\t_\n\n", encoding="utf-8")
    monkeypatch.setattr("sys.argv", ["compsft", "predict", "--task", "pos", "--model", str(world["base"]), "--sft",
                                     str(world["root"] / "task-pos"), "--input", str(tmp_path / "bad.conllu"),
                                     "--out", str(tmp_path / "o"), "--device", "cpu"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"error: {tmp_path / 'bad.conllu'}:1: expected 10 tab-separated columns, found 3"


@pytest.mark.slow  # a fresh interpreter: 10-15 s on a busy machine
def test_killed_run_leaves_no_file_under_the_final_name(world, tmp_path):
    """SIGKILL in the middle of a run (sentences already written to the temporary file): nothing under --out."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out.conllu"
    proc = subprocess.Popen([sys.executable, "-m", "compsft.cli", "predict", "--task", "pos", "--model", str(world["base"]),
                             "--sft", str(world["root"] / "task-pos"), "--pretokenized", "--chunk-size", "1",
                             "--out", str(out), "--device", "cpu"],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    try:
        proc.stdin.write(b"the cat sat\nthe mat\n")
        proc.stdin.flush()  # stdin stays open: the run waits for more input, half its output written
        deadline = time.monotonic() + 120
        while not any(p.stat().st_size for p in tmp_path.glob(".out.conllu.*/payload")):
            assert time.monotonic() < deadline and proc.poll() is None, "the run never wrote its first sentences"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
