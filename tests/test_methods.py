"""The methods of the comparison: every registered method trained, assembled and evaluated on a tiny
random-init model, plus the pieces behind them (prune-and-retrain, dev selection, full fine-tuning)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import compsft
from compsft.errors import CompsftError
from compsft.merge import applied, revert
from compsft.methods import (DEV_SELECTED, Budget, LanguageData, MethodContext, MethodSpec, TaskData, get_method,
                             list_methods, register_method, unregister_method)
from compsft.methods.common import clear_task_model, module_bytes
from compsft.tasks import get_task

from training_helpers import (ToyTagging, first_sentences, make_model_dir, tiny_config, training_args,
                              write_text_corpus)

BUDGET = Budget(lang_steps=2, lang_epochs=None, lang_max_steps=None, lang_batch=4, lang_max_length=32, lang_lines=40,
                lang_lr=1e-3, task_steps=3, task_epochs=None, task_batch=8, task_max_length=32, task_lr=1e-3,
                train_sentences=24, dev_sentences=8, dev_checks=2, eval_sentences=None,
                lang_density=0.01, task_density=0.02)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model, source and target text, POS data, and a cache of trained modules shared by the tests
    (keyed like the harness's: methods with the same language_key / task_key share a module)."""
    root = tmp_path_factory.mktemp("methods")
    model = make_model_dir(root / "model")
    data = TaskData("pos", first_sentences("ud:en_ewt:train", 24, root / "train.conllu"),
                    first_sentences("ud:en_ewt:dev", 8, root / "dev.conllu"))
    test = first_sentences("ud:mt_mudt:test", 10, root / "test.conllu")
    langs = {"eng": LanguageData("eng", [write_text_corpus(root / "eng.txt", n=60, seed=1)]),
             "mlt": LanguageData("mlt", [write_text_corpus(root / "mlt.txt", n=60, seed=2)])}
    ctx = MethodContext(model_dir=model, budget=BUDGET, device="cpu")
    yield {"root": root, "model": model, "data": data, "test": test, "langs": langs, "ctx": ctx, "modules": {}}
    clear_task_model()


def language_module(world, spec: MethodSpec, code: str) -> Path:
    key = ("language", spec.language_key, code)
    if key not in world["modules"]:
        out = world["root"] / "modules" / f"{spec.language_key}-{code}"
        info = spec.train_language(world["ctx"], world["langs"][code], 0, out)
        assert out.is_dir() and info.stored_bytes == module_bytes(out) and info.trainable > 0
        if spec.name not in ADAPTER_FAMILY:  # adapters write their own files (tests/test_adapters.py reads them)
            assert compsft.load(out).config.language == code
        world["modules"][key] = out
    return world["modules"][key]


#: the `lang_*` fields of the budget read while training a task module, per task_key (`LanguageFieldsWatched`)
LANG_FIELDS_READ: dict[str, set[str]] = {}


class LanguageFieldsWatched(Budget):
    """BUDGET, recording which `lang_*` fields are read. The harness keys task modules without them (a task
    module depends on the language budget only through its source module), so task training must read none."""

    reads: set[str] = set()

    def __getattribute__(self, name):
        if name.startswith("lang_"):
            type(self).reads.add(name)
        return super().__getattribute__(name)


def task_module(world, spec: MethodSpec):
    key = ("task", spec.task_key)
    if key not in world["modules"]:
        source = language_module(world, spec, "eng") if spec.uses_source_language and spec.has_language_module else None
        out = world["root"] / "modules" / f"{spec.task_key}-pos"
        LanguageFieldsWatched.reads = set()
        ctx = dataclasses.replace(world["ctx"], budget=LanguageFieldsWatched(**dataclasses.asdict(BUDGET)))
        info = spec.train_task(ctx, world["data"], source, 0, out)
        LANG_FIELDS_READ[spec.task_key] = LanguageFieldsWatched.reads
        world["modules"][key] = (out, info)
    return world["modules"][key]


def state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_registry():
    names = list_methods()
    assert names[:3] == ["lt-sft", "task-sft-only", "full-ft"]
    assert {"random-mask", "magnitude-mask", "prune-difference", "prune-difference-noretrain"} <= set(names)
    with pytest.raises(CompsftError, match="unknown method 'nope'.*lt-sft"):
        get_method("nope")
    mine = MethodSpec(name="my-method", description="d", composition="c", train_task=lambda *a: None,
                      assemble=lambda *a: None, parameter_counts=lambda *a: {})
    register_method(mine)
    try:
        assert get_method("my-method") is mine and "my-method" in list_methods()
        with pytest.raises(CompsftError, match="already registered"):
            register_method(mine)
        with pytest.raises(CompsftError, match="already registered"):
            register_method(MethodSpec(name="lt-sft", description="", composition="", train_task=None,
                                       assemble=None, parameter_counts=None))
    finally:
        unregister_method("my-method")
    assert "my-method" not in list_methods()


# The adapter family writes adapter files, not SFTs: its own files are read by tests/test_adapters.py (SPA's
# adapters and channel masks: tests/test_spa.py); here it goes through the same four calls as every method.
ADAPTER_FAMILY = {"mad-x", "mad-x-rf16", "mad-x-2.0", "lora", "shira", "hydra", "mosa", "mosa-hier", "spa", "spa-d75",
                  "spa-d25"}
# Structured pruning removes whole units (rank-1 components, bias vectors): it ends at most K, not exactly K.
PRUNED_TO_AT_MOST_K = {"nas-pet-structured"}
# A merged PET stores ΔW = B·A, dense in every matrix with a surviving component: its size is known only
# after the search (the table reports the measured bytes).
MERGED_DIFFERENCE = {"nas-pet-structured", "nas-pet-unstructured"}


@pytest.mark.parametrize("name", list_methods())
def test_method_trains_assembles_evaluates(world, name):
    """train_language → train_task → assemble → evaluate, for every registered method; assembly
    starts from θ0 each time (the previous target's SFTs never leak into the next)."""
    spec = get_method(name)
    ctx = world["ctx"]
    counts = spec.parameter_counts(ctx, "pos")
    out, info = task_module(world, spec)
    assert out.is_dir() and info.trainable > 0 and info.seconds > 0
    assert LANG_FIELDS_READ[spec.task_key] == set()  # task modules are cached without the language fields
    assert info.stored_bytes == module_bytes(out)
    # Counted before training = what training gives (K of the SFTs, every parameter for full-ft).
    if "task_k" in counts:
        assert counts["task_k"] == info.extra["k"]
        if name in PRUNED_TO_AT_MOST_K:
            assert counts["task_trainable"] - info.extra["k"] < info.trainable <= counts["task_trainable"]
        else:
            assert counts["task_trainable"] == info.trainable
        if name not in MERGED_DIFFERENCE:
            assert 0.5 < counts["task_stored_bytes"] / info.stored_bytes < 1.5
    elif name in ADAPTER_FAMILY:  # the task module: its adapter (LoRA, branches) and the task head
        assert counts["task_trainable"] == info.trainable and counts["task_head"] > 0
        # every value is in the files (which on a tiny model are mostly their JSON config)
        assert counts["task_stored"] * 4 + counts.get("task_mask_bytes", 0) <= info.stored_bytes
    else:
        assert counts["trainable"] == info.trainable
    assert counts["trainable"] > 0 and counts["stored_bytes"] > 0

    target = language_module(world, spec, "mlt") if spec.uses_target_language else None
    pos = get_task("pos")
    tok = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(world["model"])
    gold = pos.read(world["test"])
    model, labels = spec.assemble(ctx, out, target)
    metrics, _ = pos.evaluate(model, tok, gold, labels)
    assert 0.0 <= metrics["accuracy"] <= 1.0
    first = state(model)

    # The dev-selected module exists (best of BUDGET.dev_checks source-dev checks) and assembles too.
    assert (out / DEV_SELECTED).is_dir()
    if name != "prune-difference-noretrain":
        sel = info.extra["dev_selected"]
        assert sel["metric"] == "accuracy" and sel["step"] in [s for s, _ in sel["checks"]] and len(sel["checks"]) == 2
    spec.assemble(ctx, out / DEV_SELECTED, target)

    # Another composition in between, then the first again: exactly the same weights (apply/revert, θ0 kept).
    spec.assemble(ctx, out, None)
    model, _ = spec.assemble(ctx, out, target)
    again = state(model)
    assert first.keys() == again.keys() and all(torch.equal(first[n], again[n]) for n in first)
    if applied(model):  # SFT methods: taking the SFTs off leaves the pretrained encoder bit for bit
        while applied(model):
            revert(model)
        fresh = pos.build_model(world["model"], labels)
        prefix = fresh.base_model_prefix + "."
        fresh_state = {n: p for n, p in fresh.named_parameters() if n.startswith(prefix)}
        assert fresh_state and all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in fresh_state.items())


def test_shared_modules(world):
    """task-sft-only, task-sft-no-source and prune-difference-noretrain train nothing of their own."""
    assert get_method("task-sft-only").task_key == "lt-sft" == get_method("task-sft-only").language_key
    # the ablation's task SFT (trained on θ0) composed alone: no language module on either side
    baseline = get_method("task-sft-no-source")
    assert baseline.task_key == get_method("lt-sft-no-source").task_key
    assert not baseline.uses_source_language and not baseline.uses_target_language
    assert get_method("prune-difference-noretrain").task_key == "prune-difference"
    assert get_method("prune-difference").language_key == "lt-sft"
    assert not get_method("full-ft").has_language_module


# -- prune-difference --------------------------------------------------------------------------------
def _tuner(tmp_path, strategy: str, callbacks=(), k=60):
    from transformers import BertForTokenClassification

    from compsft.training import SftArguments, SparseFineTuner

    torch.manual_seed(0)
    model = BertForTokenClassification(tiny_config(num_labels=3, hidden_dropout_prob=0.0,
                                                   attention_probs_dropout_prob=0.0))
    sft_args = SftArguments(k=k, mask_strategy=strategy, full_ft_max_epochs=None, full_ft_max_steps=4,
                            sparse_ft_max_epochs=None, sparse_ft_max_steps=4)
    return SparseFineTuner(model=model, args=training_args(tmp_path), train_dataset=ToyTagging(32),
                           sft_args=sft_args, callbacks=list(callbacks))


def _capture_callback(store: dict):
    from transformers import TrainerCallback

    from compsft.training.sparse import sparse_parameter_names

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            names = sparse_parameter_names(model)
            if names:  # phase 2: the values it starts from
                store["start"] = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}

        def on_train_end(self, args, state, control, model=None, **kw):
            if not sparse_parameter_names(model):  # end of phase 1: θ1
                store["theta1"] = {n: p.detach().clone() for n, p in model.named_parameters()}

    return Capture()


def test_noretrain_is_theta1_minus_theta0_on_top_k(tmp_path):
    from compsft.methods.prune_difference import pruned_sft

    seen = {}
    tuner = _tuner(tmp_path / "a", "prune-retrain", [_capture_callback(seen)], k=60)
    theta0 = {n: t.clone() for n, t in tuner._theta0.items()}
    tuner.train()
    sft = pruned_sft(tuner)
    theta1 = seen["theta1"]
    # Independently: the 60 largest |θ1 − θ0| over all eligible entries.
    names = list(theta0)
    diff = torch.cat([(theta1[n] - theta0[n]).reshape(-1) for n in names])
    top = set(torch.topk(diff.abs(), 60).indices.tolist())
    offsets = dict(zip(names, torch.tensor([0] + [theta0[n].numel() for n in names]).cumsum(0).tolist()))
    got = {offsets[n] + i for n, d in sft.diffs.items() for i in d.indices.long().tolist()}
    assert sft.k == 60 and got == top
    for n, d in sft.diffs.items():
        expect = (theta1[n] - theta0[n]).reshape(-1)[d.indices.long()]
        assert torch.allclose(d.values, expect, atol=1e-7), n
    for n, t in sft.dense.items():  # the head is θ1's
        assert torch.equal(t, theta1[n]), n
    # The same as the existing prune-difference strategy (θ1 − θ0 on the mask, no phase 2).
    plain = _tuner(tmp_path / "b", "prune-difference", k=60)
    plain.train()
    for n, d in plain.sft.diffs.items():
        assert torch.equal(d.indices, sft.diffs[n].indices) and torch.allclose(d.values, sft.diffs[n].values), n


def test_retrained_variant_starts_phase2_from_pruned_values(tmp_path):
    seen = {}
    tuner = _tuner(tmp_path / "w", "prune-retrain", [_capture_callback(seen)])
    tuner.train()
    values, _ = tuner.phase2_start
    from compsft.training.dev_selection import values_name

    start = seen["start"]
    assert start and all(torch.equal(start[values_name(n)], values[n]) for n in tuner.sft.diffs)
    assert any(v.abs().sum() > 0 for v in start.values())  # not θ0 (all zeros)
    # Phase 2 trains on from there, and the final SFT is θ2 − θ0.
    assert any(not torch.equal(tuner.sft.diffs[n].values, values[n].float()) for n in tuner.sft.diffs)

    # Killed after the mask was chosen, before any phase-2 checkpoint: the resumed phase 2 still
    # starts from the pruned values (read back from the work directory) and ends where the first did.
    import shutil

    first = tuner.sft
    shutil.rmtree(tmp_path / "w" / "phase2", ignore_errors=True)
    again = _tuner(tmp_path / "w", "prune-retrain")
    again.train(resume_from_checkpoint=True)
    for n, d in first.diffs.items():
        assert torch.equal(d.indices, again.sft.diffs[n].indices)
        assert torch.allclose(d.values, again.sft.diffs[n].values, atol=1e-6), n


# -- dev selection -----------------------------------------------------------------------------------
def test_dev_selection_keeps_the_best_snapshot(tmp_path):
    from transformers import BertForTokenClassification, Trainer, TrainerCallback

    from compsft.training.dev_selection import DevSelection, check_steps

    assert check_steps(10, 3) == [3, 7, 10] and check_steps(2, 5) == [1, 2] and check_steps(10, 0) == []
    scores = iter([0.3, 0.7, 0.5])
    snapshots = {}

    class Record(TrainerCallback):  # what the model held at every step, for comparison
        def on_step_end(self, args, state, control, model=None, **kw):
            snapshots[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}

    sel = DevSelection(lambda model: next(scores), 3, state_file=tmp_path / "sel.safetensors", metric="acc")
    torch.manual_seed(0)
    model = BertForTokenClassification(tiny_config(num_labels=3))
    trainer = Trainer(model=model, args=training_args(tmp_path / "w", max_steps=9), train_dataset=ToyTagging(32),
                      callbacks=[Record(), sel])
    trainer.train()
    assert [s for s, _ in sel.history] == [3, 6, 9]
    assert sel.best_step == 6 and sel.best_score == 0.7
    assert all(torch.equal(sel.best[n], snapshots[6][n]) for n in sel.best)
    assert not all(torch.equal(sel.best[n], snapshots[9][n]) for n in sel.best)
    assert sel.summary()["checks"] == [[3, 0.3], [6, 0.7], [9, 0.5]]

    # A resumed run reads the best state back instead of forgetting it.
    again = DevSelection(lambda model: 0.0, 3, state_file=tmp_path / "sel.safetensors")
    again._max_steps = 9
    again._load()
    assert again.best_step == 6 and all(torch.equal(again.best[n], sel.best[n]) for n in sel.best)
    assert [s for s, _ in again.history] == [3, 6, 9]


def test_dev_selection_scores_a_spread_of_the_dev_set(world, tmp_path, monkeypatch):
    """`dev_sentences` of a budget picks sentences spread over the dev file, not its first ones: a prefix of
    EWT's NER dev set holds no PER entity at all."""
    import dataclasses

    from compsft.methods.common import dev_selection
    from compsft.training import dev_selection as core
    from compsft.training.dev_selection import dev_subset

    assert dev_subset(range(10), 3) == [0, 3, 6] and dev_subset(range(10), 5) == [0, 2, 4, 6, 8]
    assert dev_subset(range(4), None) == dev_subset(range(4), 0) == dev_subset(range(4), 9) == [0, 1, 2, 3]
    seen = {}
    monkeypatch.setattr(core, "dev_scorer", lambda spec, tok, sentences, **kw: seen.setdefault("s", sentences))
    ctx = dataclasses.replace(world["ctx"], budget=dataclasses.replace(BUDGET, dev_sentences=3))
    dev_selection(ctx, world["data"], tmp_path, sparse=True)
    every = get_task("pos").read(world["data"].dev)
    assert len(every) == 8 and seen["s"] == [every[0], every[2], every[5]]


# -- full fine-tuning --------------------------------------------------------------------------------
def test_train_full_ft_saves_a_loadable_model(world, tmp_path):
    from transformers import AutoTokenizer

    from compsft.training.full_ft import DEV_SELECTED as SAME_NAME, load_full_ft, train_full_ft

    assert SAME_NAME == DEV_SELECTED  # training cannot import methods: one name, defined twice
    data = world["data"]
    out = tmp_path / "full"
    result = train_full_ft("pos", world["model"], data.train, out, steps=3, batch_size=8, max_length=32, lr=1e-3,
                           save_steps=0, cpu=True, quiet=True, seed=1)
    assert result.info["steps"] == 3 and result.trainable == sum(p.numel() for p in result.model.parameters())
    model, labels, info = load_full_ft(out)
    assert labels == result.labels and info["task"] == "pos"
    loaded, fresh = state(model), state(result.model)
    assert loaded.keys() == fresh.keys() and all(torch.equal(loaded[n], fresh[n]) for n in loaded)
    # Every parameter moved from the pretrained encoder (the whole model is fine-tuned).
    base = get_task("pos").build_model(world["model"], labels)
    base_state = state(base)
    moved = [n for n in base_state if n.startswith("bert.") and "LayerNorm" not in n
             and not torch.equal(base_state[n], loaded[n])]
    assert len(moved) > 0.9 * len([n for n in base_state if n.startswith("bert.") and "LayerNorm" not in n])
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(world["model"]).get_vocab()
    with pytest.raises(CompsftError, match="not a model written by train_full_ft"):
        load_full_ft(world["model"])


def test_train_full_cli(world, tmp_path):
    from compsft.cli import app

    data = world["data"]
    out = tmp_path / "cli-full"
    args = ["train-full", "--task", "pos", "--model", world["model"], "--train", data.train, "--dev", data.dev,
            "--out", out, "--steps", "2", "--batch-size", "8", "--max-length", "32", "--dev-checks", "2",
            "--save-steps", "0", "--cpu"]
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "best by dev: step" in result.output
    assert (out / "model.safetensors").is_file() and (out / DEV_SELECTED / "model.safetensors").is_file()
    bad = CliRunner().invoke(app, [str(a) for a in args] + ["--epochs", "1"], catch_exceptions=True)
    assert bad.exit_code != 0 and isinstance(bad.exception, CompsftError) and "not both" in str(bad.exception)


def test_train_full_ft_resumes_to_the_same_model(world, tmp_path):
    """Interrupted after a checkpoint (the later ones lost), `resume=True` ends where an uninterrupted run does."""
    import shutil

    from compsft.training.full_ft import load_full_ft, train_full_ft

    model_dir = make_model_dir(tmp_path / "nodrop", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    data = world["data"]
    kwargs = dict(steps=4, batch_size=4, max_length=32, lr=1e-3, save_steps=2, cpu=True, quiet=True, seed=3,
                  dev=data.dev, dev_checks=2, dev_max_sentences=4)
    whole = train_full_ft("pos", model_dir, data.train, tmp_path / "a", work_dir=tmp_path / "a.work", **kwargs)
    work = tmp_path / "b.work"
    train_full_ft("pos", model_dir, data.train, tmp_path / "b", work_dir=work, **kwargs)
    shutil.rmtree(tmp_path / "b")
    shutil.rmtree(work / "checkpoint-4")  # killed between the checkpoints of steps 2 and 4
    resumed = train_full_ft("pos", model_dir, data.train, tmp_path / "b", work_dir=work, resume=True, **kwargs)
    assert resumed.info["resumed_from"].endswith("checkpoint-2")
    for sub in (".", DEV_SELECTED):
        a, _, _ = load_full_ft(tmp_path / "a" / sub)
        b, _, _ = load_full_ft(tmp_path / "b" / sub)
        sa, sb = state(a), state(b)
        assert all(torch.allclose(sa[n], sb[n], atol=1e-6) for n in sa), sub
    assert resumed.info["dev_selected"]["checks"] == whole.info["dev_selected"]["checks"]
    # Killed after the last checkpoint, before the model was written: nothing left to train, and the
    # dev-selected model still comes out (read back from the work directory).
    shutil.rmtree(tmp_path / "b")
    last = train_full_ft("pos", model_dir, data.train, tmp_path / "b", work_dir=work, resume=True, **kwargs)
    assert last.info["resumed_from"].endswith("checkpoint-4")
    assert last.info["dev_selected"] == whole.info["dev_selected"]
    a, _, _ = load_full_ft(tmp_path / "a" / DEV_SELECTED)
    b, _, _ = load_full_ft(tmp_path / "b" / DEV_SELECTED)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(state(a).values(), state(b).values()))


def test_budgets_map_onto_phases():
    """Two-phase methods get the budget per phase; one-phase ones (no phase 1, full FT) both phases' sum."""
    import dataclasses

    from compsft.methods.common import (checkpoint_steps, language_phases, one_phase, steps_or_epochs,
                                        task_phases)
    from compsft.methods.sft_method import _phases

    cpu = dataclasses.replace(BUDGET, lang_steps=40, task_steps=80)
    assert language_phases(cpu) == ((None, 40, 40), (None, 40, 40))
    assert task_phases(cpu) == ((None, 80, 80), (None, 80, 80))
    assert steps_or_epochs(one_phase(*task_phases(cpu))) == {"steps": 160}
    assert _phases(task_phases(cpu), "random") == ((None, 80, 80), (None, 160, 160))
    assert _phases(task_phases(cpu), "lottery-ticket") == ((None, 80, 80), (None, 80, 80))
    paper = dataclasses.replace(BUDGET, lang_steps=0, lang_epochs=100.0, lang_max_steps=100_000, lang_min_steps=10_000,
                                task_steps=0, task_epochs=(3.0, 10.0))
    assert language_phases(paper) == ((100.0, 10_000, 100_000),) * 2
    assert task_phases(paper) == ((3.0, None, None), (10.0, None, None))
    assert steps_or_epochs(one_phase(*task_phases(paper))) == {"epochs": 13.0}
    assert _phases(language_phases(paper), "magnitude")[1] == (200.0, 20_000, 200_000)
    assert checkpoint_steps(80) == 40 and checkpoint_steps(3) == 20 and checkpoint_steps(0) == 500
    with pytest.raises(CompsftError, match="task_steps or task_epochs"):
        task_phases(dataclasses.replace(BUDGET, task_steps=0, task_epochs=None))


def test_language_modules_measure_their_dev_mlm_loss_when_the_budget_asks(world, tmp_path):
    import dataclasses

    from compsft.compare.budgets import budget_dict, get_budget

    ctx = MethodContext(model_dir=world["model"], budget=dataclasses.replace(BUDGET, lang_dev_lines=5), device="cpu")
    info = get_method("lt-sft").train_language(ctx, world["langs"]["mlt"], 0, tmp_path / "lang")
    dev = info.extra["dev_mlm"]
    assert dev["lines"] == 5 and dev["loss_before"] > 0 and dev["loss_after"] > 0 and dev["unigram_entropy"] > 0
    assert compsft.load(tmp_path / "lang").config.training["dev_mlm"] == dev
    # A field added later stays out of the record at its default: grids recorded before it still resume.
    assert "lang_dev_lines" not in budget_dict(get_budget("cpu"))
    assert budget_dict(dataclasses.replace(get_budget("cpu"), lang_dev_lines=200))["lang_dev_lines"] == 200


def test_the_no_source_ablation_trains_its_task_sft_without_the_source_language_sft(world):
    from compsft import load

    ablation, plain = get_method("lt-sft-no-source"), get_method("lt-sft")
    assert ablation.language_key == plain.language_key == "lt-sft" and ablation.task_key != plain.task_key
    out, _ = task_module(world, ablation)
    assert load(out).config.training["source_sft"] is None
    out, _ = task_module(world, plain)
    assert load(out).config.training["source_sft"] is not None


def test_lt_sft_upper_composes_the_language_sft_on_the_upper_layers_only(world):
    """Lower layers and embeddings as task-sft-only has them (θ0 + φ_T), upper layers as lt-sft (+ φ_L)."""
    from compsft.training.params import encoder_layer

    plain, upper, task_only = get_method("lt-sft"), get_method("lt-sft-upper"), get_method("task-sft-only")
    out, _ = task_module(world, plain)
    target = language_module(world, plain, "mlt")
    ctx = world["ctx"]
    full = state(plain.assemble(ctx, out, target)[0])
    without = state(task_only.assemble(ctx, out, target)[0])
    model = upper.assemble(ctx, out, target)[0]
    mine = state(model)
    half = model.config.num_hidden_layers // 2
    moved_lower = moved_upper = 0
    for name, value in mine.items():
        layer = encoder_layer(name)
        expected = full[name] if layer is not None and layer >= half else without[name]
        assert torch.equal(value, expected), name
        moved_lower += layer is not None and layer < half and not torch.equal(full[name], without[name])
        moved_upper += layer is not None and layer >= half and not torch.equal(full[name], without[name])
    assert moved_lower and moved_upper  # φ_L has entries on both halves, so the test can tell them apart
