"""End to end on the shipped data: a few Trainer steps on a tiny BERT -> (compose) -> evaluate."""
from __future__ import annotations

import json

import pytest
import torch

from compsft.tasks import data_path, get_task
from compsft.tasks.decode import is_tree

from tasks_testutil import make_bert_dir, make_tokenizer, words_of

pytestmark = pytest.mark.slow

CASES = {
    "pos": ("ud:en_ewt:train", "ud:mt_mudt:test", "accuracy"),
    "dep": ("ud:en_ewt:train", "ud:wo_wtb:test", "las"),
    "ner": ("ner:uner:en_ewt:train", "ner:masakhaner:hau:test", "f1"),
}
HEAD_SIZES = {"dep": {"arc_dim": 32, "rel_dim": 16}}


def _train(spec, model, tokenizer, train, labels, out_dir, steps=12):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=16,
                             learning_rate=2e-3, report_to=[], save_strategy="no", logging_steps=steps,
                             disable_tqdm=True, use_cpu=not torch.cuda.is_available(), seed=0)
    Trainer(model=model, args=args, train_dataset=spec.encode(train, tokenizer, labels, max_length=64),
            data_collator=spec.collator(tokenizer)).train()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Per task: tokenizer, base model dir, label list, and train/test sentences from the shipped files."""
    root = tmp_path_factory.mktemp("e2e")
    out = {}
    for task, (train_name, test_name, _) in CASES.items():
        spec = get_task(task)
        train = spec.read(data_path(train_name))[:160]
        test = spec.read(data_path(test_name))[:60]
        tokenizer = make_tokenizer(words_of(train) + words_of(test), vocab_size=500)
        base = make_bert_dir(root / f"base-{task}", tokenizer)
        out[task] = (spec, tokenizer, base, spec.label_list(train), train, test, root)
    return out


@pytest.mark.parametrize("task", list(CASES))
def test_train_then_evaluate_on_target(setup, task, tmp_path):
    spec, tokenizer, base, labels, train, test, _ = setup[task]
    model = spec.build_model(base, labels, **HEAD_SIZES.get(task, {}))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(spec, model, tokenizer, train, labels, tmp_path / "run")
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n.startswith("bert.encoder"))
    metrics, predictions = spec.evaluate(model, tokenizer, test, labels, batch_size=16, max_length=24)
    key = CASES[task][2]
    assert 0.0 <= metrics[key] <= 1.0 and metrics["sentences"] == len(test)
    assert [len(p.words) for p in predictions] == [len(s.words) for s in test]
    if task == "pos":
        # After a few steps the tagger must beat chance over 17 tags clearly (it learns PUNCT, NOUN...).
        assert metrics["accuracy"] > 0.15
    if task == "dep":
        assert all(is_tree([0] + p.heads) for p in predictions)
    if task == "ner":
        # MasakhaNER DATE is not an English label: scored as O, never predicted.
        assert all("DATE" not in t for p in predictions for t in p.tags)
    path = tmp_path / f"pred{spec.prediction_suffix}"
    spec.write_predictions(path, spec.prepare_gold(test, labels), predictions)
    again = spec.read(path) if task != "ner" else None
    if again is not None:
        assert [s.words for s in again] == [s.words for s in test]
        if task == "pos":
            assert [s.tags for s in again] == [p.tags for p in predictions]
        else:
            assert [s.heads for s in again] == [p.heads for p in predictions]
    # save_pretrained + load_model reproduce the predictions.
    model.save_pretrained(tmp_path / "task-model")
    loaded, loaded_labels = spec.load_model(tmp_path / "task-model")
    assert loaded_labels == labels
    metrics2, _ = spec.evaluate(loaded, tokenizer, test, None, batch_size=16, max_length=24)
    assert metrics2[key] == pytest.approx(metrics[key])


@pytest.mark.parametrize("task", list(CASES))
def test_cli_composes_sfts_then_evaluates(setup, task, tmp_path):
    """pos/dep: --model is the task model with an untrained head; ner: the bare pretrained model, whose
    head is built from the label list the task SFT records and filled from its dense parameters."""
    from typer.testing import CliRunner

    from compsft import SftConfig, SparseFineTuning
    from compsft.cli import app

    spec, tokenizer, base, labels, train, test, _ = setup[task]
    model = spec.build_model(base, labels, **HEAD_SIZES.get(task, {}))
    start = {n: t.detach().clone() for n, t in model.state_dict().items()}
    _train(spec, model, tokenizer, train, labels, tmp_path / "run", steps=8)
    heads = spec.head_param_names(model)
    # The untrained model with its (random) head is the "task model directory"; the task SFT holds the
    # encoder difference plus the trained head (dense); the language SFT carries an MLM head to be ignored.
    untrained = spec.build_model(base, labels, **HEAD_SIZES.get(task, {}))
    untrained.load_state_dict(start)
    untrained.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    model_dir = base if task == "ner" else tmp_path / "model"
    task_sft = SparseFineTuning.from_models(untrained, model, dense_params=heads,
                                            config=SftConfig(kind="task", task=task, training={"labels": labels}))
    task_sft.save(tmp_path / "task-sft")
    name = "bert.encoder.layer.0.output.dense.weight"
    param = dict(untrained.named_parameters())[name]
    lang_tuned = {name: param.detach() + 0.0}
    lang_tuned[name].view(-1)[:50] += 0.01
    lang_sft = SparseFineTuning.from_models({name: param.detach()}, lang_tuned,
                                            config=SftConfig(kind="language", language="mt"))
    lang_sft.dense["cls.predictions.bias"] = torch.zeros(len(tokenizer))
    lang_sft.save(tmp_path / "lang-sft")

    expected, _ = spec.evaluate(model, tokenizer, test, labels, batch_size=16)
    data = tmp_path / f"test{spec.prediction_suffix}"
    spec.write_predictions(data, spec.prepare_gold(test, labels), test)  # the gold, as a plain file
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", "--task", task, "--model", str(model_dir),
                                 "--sft", str(tmp_path / "task-sft"), "--data", str(data),
                                 "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    key = CASES[task][2]
    assert report["metrics"][key] == pytest.approx(expected[key])
    assert report["sfts"][0]["dense_applied"] is True
    assert (tmp_path / "out" / f"predictions{spec.prediction_suffix}").is_file()
    # Composing a language SFT too: its MLM head must not be applied (it would not fit a tagger).
    result = runner.invoke(app, ["evaluate", "--task", task, "--model", str(model_dir),
                                 "--sft", str(tmp_path / "lang-sft"), "--sft", str(tmp_path / "task-sft"),
                                 "--data", str(data), "--out", str(tmp_path / "out2"), "--device", "cpu"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((tmp_path / "out2" / "metrics.json").read_text())
    assert [s["dense_applied"] for s in report["sfts"]] == [False, True]
    # The score is the composed model's: the language SFT's encoder change, the task SFT's head.
    import compsft

    # `model` is the untrained model plus the task SFT's exact difference, so the language SFT's fingerprint
    # (of the untrained model) does not apply to it: what the CLI composed, written out by hand.
    compsft.apply(model, lang_sft, with_dense=False, check_base=False)
    expected2, _ = spec.evaluate(model, tokenizer, test, labels, batch_size=16)
    assert report["metrics"][key] == pytest.approx(expected2[key])
    assert f"{report['metrics'][key]:.4f}" in result.output  # and the table printed it


@pytest.mark.parametrize("task", ["dep", "ner"])
def test_lt_sft_end_to_end(setup, task, tmp_path):
    """LT-SFT (both phases, selection, reset) trains the parser's and the NER tagger's heads with the
    encoder; the saved SFT, applied to a fresh model, reproduces the trained model's predictions."""
    import compsft
    from compsft.training import train_task_sft

    spec, tokenizer, base, labels, _, test, _ = setup[task]
    tuner = train_task_sft(task, base, CASES[task][0], tmp_path / "sft", max_sentences=64, k=3000,
                           phase1=(None, 6, 6), phase2=(None, 6, 6), lr=3e-3, batch_size=16, max_length=64,
                           save_steps=0, logging_steps=1, cpu=True, seed=0)
    sft = compsft.load(tmp_path / "sft")
    assert sft.config.kind == "task" and sft.config.task == task and sft.k == 3000
    assert sft.config.training["labels"] == labels
    heads = spec.head_param_names(tuner.model)
    assert heads and set(sft.dense) == set(heads)
    assert all(n.startswith("bert.") for n in sft.diffs)
    losses = [h["loss"] for h in tuner.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]  # phase 2 (each phase keeps its own log)
    trained, trained_predictions = spec.evaluate(tuner.model, tokenizer, test, labels, batch_size=16,
                                                 max_length=64)
    fresh = spec.build_model(base, labels)
    compsft.apply(fresh, sft, with_dense=True)  # the trained heads come from the SFT
    again, predictions = spec.evaluate(fresh, tokenizer, test, labels, batch_size=16, max_length=64)
    key = CASES[task][2]
    assert again[key] == pytest.approx(trained[key])
    if task == "dep":
        assert [p.heads for p in predictions] == [p.heads for p in trained_predictions]
        assert all(is_tree([0] + p.heads) for p in predictions)
    else:
        assert [p.tags for p in predictions] == [p.tags for p in trained_predictions]
