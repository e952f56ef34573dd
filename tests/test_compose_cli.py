"""`compsft compose` writes a usable task model; one rule for dense parameters (heads) everywhere.

The rule (issue 9, item 2): heads of task SFTs (and of compositions that kept one) are applied by
default, the MLM head of a language SFT never unless asked. Checked at each entry point: `apply`,
library `compose`, CLI `compose` and CLI `evaluate`. Tiny random-init models built in code.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForTokenClassification, BertForMaskedLM
from typer.testing import CliRunner

import compsft
from compsft.cli import app
from compsft.merge import dense_by_kind, resolve_with_dense
from compsft.sft import SftConfig, SparseFineTuning
from compsft.tasks import Sentence, get_task
from compsft.tasks.pos import UPOS

from tasks_testutil import make_bert_dir, make_tokenizer

runner = CliRunner()

SENTENCES = [
    "the cat sat on the mat .".split(),
    "a very small dog barked at the postman yesterday".split(),
    "colourless green ideas sleep furiously".split(),
    "she gave him the book , and he read it".split(),
]
NER_LABELS = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
LABELS = {"pos": list(UPOS), "ner": NER_LABELS, "dep": None}


def _labels(task: str) -> list[str]:
    return LABELS[task] or get_task("dep").label_list([])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny masked-LM base model directory with its tokenizer (the default model's layout)."""
    tok = make_tokenizer([w for s in SENTENCES for w in s] * 3, vocab_size=120)
    return make_bert_dir(tmp_path_factory.mktemp("base") / "base", tok)


def _perturbed(model: torch.nn.Module, names, density: float, seed: int):
    """(θ0, θ0 with `density` of each named tensor moved, masks) for `names`."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    theta0, tuned, masks = {}, {}, {}
    for name in names:
        p = params[name].detach()
        idx = torch.randperm(p.numel(), generator=g)[:max(1, int(p.numel() * density))]
        t = p.clone().reshape(-1)
        t[idx] += torch.randn(idx.numel(), generator=g) * 0.5
        theta0[name], tuned[name], masks[name] = p.clone(), t.view_as(p), idx
    return theta0, tuned, masks


def language_sft(base: Path, seed: int = 1) -> SparseFineTuning:
    """A language SFT as training writes it: sparse encoder entries plus the MLM head, dense."""
    mlm = BertForMaskedLM.from_pretrained(base)
    names = [n for n, _ in mlm.named_parameters() if n.startswith("bert.encoder") and "LayerNorm" not in n]
    theta0, tuned, masks = _perturbed(mlm, names, 0.1, seed)
    tuned["cls.predictions.bias"] = torch.randn(mlm.config.vocab_size, generator=torch.Generator().manual_seed(seed))
    config = SftConfig(kind="language", language="wol", base_model=str(base))
    return SparseFineTuning.from_models(theta0, tuned, masks, dense_params=["cls.predictions.bias"], config=config)


def task_sft(base: Path, task: str, seed: int = 2) -> SparseFineTuning:
    """A task SFT as training writes it: sparse encoder entries, the whole head dense, the labels."""
    spec = get_task(task)
    torch.manual_seed(seed)
    model = spec.build_model(base, _labels(task))
    heads = spec.head_param_names(model)
    names = [n for n, _ in model.named_parameters() if n.startswith("bert.encoder") and "LayerNorm" not in n]
    theta0, tuned, masks = _perturbed(model, names, 0.1, seed)
    g = torch.Generator().manual_seed(seed + 100)
    params = dict(model.named_parameters())
    for name in heads:
        tuned[name] = torch.randn(params[name].shape, generator=g)  # a trained head, not the fresh one
    config = SftConfig(kind="task", task=task, base_model=str(base), training={"labels": _labels(task)})
    return SparseFineTuning.from_models(theta0, tuned, masks, dense_params=heads, config=config)


def _sentences() -> list[Sentence]:
    return [Sentence(words=w) for w in SENTENCES]


def _in_memory(base: Path, task: str, *sfts):
    """The task model built from `base` with `sfts` applied in memory (the default dense rule)."""
    model = get_task(task).build_model(base, _labels(task))
    compsft.apply(model, *sfts)
    return model


def _predict(task: str, model, tok):
    return [(p.tags, p.heads, p.deprels) for p in get_task(task).predict(model, tok, _sentences(), batch_size=2)]


# -- the rule ----------------------------------------------------------------------------------------
def test_rule_by_kind(base):
    lang, task = language_sft(base), task_sft(base, "pos")
    assert (dense_by_kind(lang), dense_by_kind(task)) == (False, True)
    assert resolve_with_dense([lang, task], None) == [False, True]
    assert resolve_with_dense([lang, task], [True, None]) == [True, True]
    assert resolve_with_dense([lang, task], False) == [False, False]
    both = compsft.compose(lang, task)
    assert dense_by_kind(both) and not dense_by_kind(compsft.compose(lang, language_sft(base, seed=3)))
    # A composition that dropped the task head and kept the MLM head must not apply that by default.
    assert not dense_by_kind(compsft.compose(lang, task, with_dense=[True, False]))


def test_apply_default_applies_task_head_never_mlm_head(base):
    lang, task = language_sft(base), task_sft(base, "pos")
    tagger = get_task("pos").build_model(base, _labels("pos"))
    handle = compsft.apply(tagger, lang, task)  # the MLM head would not even fit a tagger
    assert torch.equal(tagger.classifier.weight, task.dense["classifier.weight"])
    compsft.revert(tagger, handle)
    compsft.apply(tagger, lang, task, with_dense=[False, True])  # README's old spelling still works
    assert torch.equal(tagger.classifier.bias, task.dense["classifier.bias"])

    mlm = BertForMaskedLM.from_pretrained(base)
    bias = mlm.cls.predictions.bias.detach().clone()
    handle = compsft.apply(mlm, lang)
    assert torch.equal(mlm.cls.predictions.bias, bias)  # language head: not by default
    compsft.revert(mlm, handle)
    compsft.apply(mlm, lang, with_dense=True)
    assert torch.equal(mlm.cls.predictions.bias, lang.dense["cls.predictions.bias"])  # ... only when asked


def test_library_compose_keeps_task_head_and_labels(base):
    lang, task = language_sft(base), task_sft(base, "pos")
    both = compsft.compose(lang, task)
    assert sorted(both.dense) == ["classifier.bias", "classifier.weight"]
    assert both.config.task == "pos" and both.config.training["labels"] == _labels("pos")
    assert [p["dense"] for p in both.config.training["composed_from"]] == [False, True]
    assert compsft.compose(lang, task, with_dense=True).dense.keys() >= {"cls.predictions.bias"}
    # The composition, applied with the default rule, is the same model as both SFTs applied.
    one, two = _in_memory(base, "pos", both), _in_memory(base, "pos", lang, task)
    for (n, a), b in zip(one.named_parameters(), two.parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


# -- CLI compose ---------------------------------------------------------------------------------------
def _load_written(task: str, out: Path):
    if task == "dep":
        return get_task("dep").load_model(out)[0]
    return AutoModelForTokenClassification.from_pretrained(out)


@pytest.mark.parametrize("task", ["pos", "ner", "dep"])
def test_cli_compose_writes_task_model_with_head_and_labels(base, task, tmp_path):
    from transformers import AutoTokenizer

    lang, tsft = language_sft(base), task_sft(base, task)
    lang.save(tmp_path / "lang")
    tsft.save(tmp_path / "task")
    result = runner.invoke(app, ["compose", "--base", str(base), "--sft", str(tmp_path / "lang"),
                                 "--sft", str(tmp_path / "task"), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    written = _load_written(task, tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")  # the tokenizer travels with the model
    if task != "dep":
        assert [written.config.id2label[i] for i in range(len(_labels(task)))] == _labels(task)
    expected = _in_memory(base, task, lang, tsft)
    assert _predict(task, written, tok) == _predict(task, expected, tok)
    want = dict(expected.named_parameters())
    for name, p in written.named_parameters():
        assert torch.equal(p, want[name]), name


def test_cli_compose_of_a_composed_task_sft(base, tmp_path):
    from transformers import AutoTokenizer

    lang, tsft = language_sft(base), task_sft(base, "ner")
    compsft.save(compsft.compose(lang, tsft), tmp_path / "both")
    result = runner.invoke(app, ["compose", "--base", str(base), "--sft", str(tmp_path / "both"),
                                 "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    written = AutoModelForTokenClassification.from_pretrained(tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(base)
    assert _predict("ner", written, tok) == _predict("ner", _in_memory(base, "ner", lang, tsft), tok)


def test_cli_compose_language_only_writes_masked_lm(base, tmp_path):
    lang = language_sft(base)
    lang.save(tmp_path / "lang")
    args = ["compose", "--base", str(base), "--sft", str(tmp_path / "lang")]
    assert runner.invoke(app, args + ["--out", str(tmp_path / "plain")]).exit_code == 0
    assert runner.invoke(app, args + ["--out", str(tmp_path / "head"), "--with-dense"]).exit_code == 0
    original = BertForMaskedLM.from_pretrained(base).cls.predictions.bias
    plain = BertForMaskedLM.from_pretrained(tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    assert torch.equal(plain.cls.predictions.bias, original)  # no MLM head unless asked
    head = BertForMaskedLM.from_pretrained(tmp_path / "head")
    assert torch.equal(head.cls.predictions.bias, lang.dense["cls.predictions.bias"])


def test_cli_compose_no_dense_keeps_base_class(base, tmp_path):
    task_sft(base, "pos").save(tmp_path / "task")
    result = runner.invoke(app, ["compose", "--base", str(base), "--sft", str(tmp_path / "task"), "--no-dense",
                                 "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]


# -- CLI evaluate --------------------------------------------------------------------------------------
@pytest.mark.parametrize("composed", [False, True])
def test_cli_evaluate_applies_task_head_not_mlm_head(base, tmp_path, composed):
    from transformers import AutoTokenizer

    lang, tsft = language_sft(base), task_sft(base, "pos")
    lang.save(tmp_path / "lang")
    tsft.save(tmp_path / "task")
    sft_args = ["--sft", str(tmp_path / "lang"), "--sft", str(tmp_path / "task")]
    if composed:  # one composed SFT on the bare base model: its head and labels come from the composition
        compsft.compose(lang, tsft).save(tmp_path / "both")
        sft_args = ["--sft", str(tmp_path / "both")]
    conllu = tmp_path / "test.conllu"
    conllu.write_text("".join(
        "".join(f"{i}\t{w}\t_\t{UPOS[(i + j) % 17]}\t_\t_\t{0 if i == 1 else 1}\t{'root' if i == 1 else 'dep'}\t_\t_\n"
                for i, w in enumerate(words, 1)) + "\n" for j, words in enumerate(SENTENCES)), encoding="utf-8")
    result = runner.invoke(app, ["evaluate", "--task", "pos", "--model", str(base), *sft_args, "--data", str(conllu),
                                 "--out", str(tmp_path / "eval"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert [s["dense_applied"] for s in report["sfts"]] == ([True] if composed else [False, True])
    spec = get_task("pos")
    gold = spec.read(conllu)
    metrics, _ = spec.evaluate(_in_memory(base, "pos", lang, tsft), AutoTokenizer.from_pretrained(base), gold,
                               _labels("pos"))
    assert report["metrics"]["accuracy"] == pytest.approx(metrics["accuracy"])
