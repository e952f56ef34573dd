"""Helpers of the predict tests: tiny models with SFTs, expected predictions, the CoNLL 2018 evaluator's rules."""
from __future__ import annotations

from pathlib import Path

import compsft
from compsft.tasks import Sentence, get_task

from tasks_testutil import make_bert_dir, make_tokenizer
from test_compose_cli import SENTENCES, _labels, language_sft, task_sft

TASKS = ("pos", "dep", "ner")


def make_world(root: Path) -> dict:
    """A tiny base model, a language SFT and a task SFT per task, saved under `root`."""
    tok = make_tokenizer([w for s in SENTENCES for w in s] * 3 + ["The", "A", "She"], vocab_size=140)
    base = make_bert_dir(root / "base", tok)
    language_sft(base).save(root / "lang")
    for task in TASKS:
        task_sft(base, task).save(root / f"task-{task}")
    return {"root": root, "base": base, "tokenizer": tok}


def composed_model(world: dict, task: str):
    """The task model with the language and task SFTs applied in memory (the reference for every test)."""
    model = get_task(task).build_model(world["base"], _labels(task))
    compsft.apply(model, compsft.load(world["root"] / "lang"), compsft.load(world["root"] / f"task-{task}"))
    return model.eval()


def expected(world: dict, task: str, sentences_words: list[list[str]], model=None) -> list[Sentence]:
    """What the task spec itself predicts for these words, on the same composed model."""
    model = model or composed_model(world, task)
    return get_task(task).predict(model, world["tokenizer"], [Sentence(words=list(w)) for w in sentences_words],
                                  _labels(task), batch_size=4)


def check_conll18(text: str) -> list[list[dict]]:
    """Apply the format rules of the CoNLL 2018 evaluator (conll18_ud_eval.py, load_conllu) to `text` and
    return the sentences' words: 10 tab-separated columns; IDs in sequence (multi-word ranges and
    empty nodes aside); a non-empty FORM; HEAD an integer in 0..n; one root; no cycle."""
    sentences, words = [], []
    for number, line in enumerate(text.split("\n"), 1):
        if not line:
            if words:
                _check_tree(words, number)
                sentences.append(words)
                words = []
            continue
        if line.startswith("#"):
            continue
        columns = line.split("\t")
        assert len(columns) == 10, f"line {number}: {len(columns)} columns"
        if "." in columns[0]:
            continue
        assert columns[1].strip(), f"line {number}: empty FORM"
        if "-" in columns[0]:
            first, last = map(int, columns[0].split("-"))
            assert first == len(words) + 1 and last >= first, f"line {number}: bad range {columns[0]}"
            continue
        assert int(columns[0]) == len(words) + 1, f"line {number}: ID {columns[0]} out of sequence"
        head = int(columns[6])  # "Cannot parse HEAD" in the evaluator
        assert head >= 0, f"line {number}: negative HEAD"
        words.append({"id": int(columns[0]), "form": columns[1], "upos": columns[3], "head": head,
                      "deprel": columns[7], "misc": columns[9]})
    assert not words, "the file must end with a blank line"
    return sentences


def _check_tree(words: list[dict], number: int) -> None:
    n = len(words)
    assert all(w["head"] <= n for w in words), f"before line {number}: HEAD outside the sentence"
    assert sum(w["head"] == 0 for w in words) == 1, f"before line {number}: not exactly one root"
    for w in words:
        seen, v = set(), w["id"]
        while v:
            assert v not in seen, f"before line {number}: a cycle"
            seen.add(v)
            v = words[v - 1]["head"]
