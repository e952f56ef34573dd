"""SpIEL: exactly K active entries, dropped entries back at θ0, optimizer state ∝ K, composition."""
from __future__ import annotations

import math
import re
import shutil

import pytest
import torch
from torch import nn
from transformers import BertForTokenClassification, TrainerCallback

import compsft
from compsft.errors import CompsftError
from compsft.training import SftArguments
from compsft.training.spiel import SpielArguments, SpielStore, SpielTuner, train_spiel_sft

from training_helpers import (ToyTagging, first_sentences, make_model_dir, tiny_config, training_args,
                              write_text_corpus)


# -- the reselection itself, on a hand-made store ---------------------------------------------------
class TwoTensors(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(4, 3)   # 12 entries
        self.lin = nn.Linear(3, 2)      # 6 + 2 entries


def make_store(k_per_tensor):
    torch.manual_seed(0)
    model = TwoTensors()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = {n: torch.arange(k) for n, k in zip(theta0, k_per_tensor)}
    store = SpielStore(model, masks, torch.float32)
    return model, theta0, store


def test_reselect_drops_smallest_delta_grows_largest_gradient_and_seeds_adam():
    model, theta0, store = make_store([2, 2, 0])   # active: emb 0,1; lin.weight 0,1 -> slots 0..3
    opt = torch.optim.AdamW([store.values], lr=0.1, betas=(0.9, 0.99), weight_decay=0.0)
    store.values.grad = torch.ones(4)
    opt.step()  # creates the state (step 1)
    with torch.no_grad():
        store.values.copy_(torch.tensor([0.5, -0.01, 0.02, -0.7]))  # slots 1 and 2 moved least
    store.start_accumulating()
    acc = store.accumulators
    acc["emb.weight"][:] = torch.tensor([9.0, 9.0, 0, 0, 0, 3.0, 0, 0, 0, 0, 0, 0])  # 0, 1 are active
    acc["lin.bias"][:] = torch.tensor([0.0, -4.0])
    store.accumulated = 2
    store.reselect(2, opt)
    counts = store.active_counts()
    assert sum(counts.values()) == store.k == 4
    assert store.parts["emb.weight"].indices.tolist() == [0, 5]       # 1 dropped, 5 grown (|3|)
    assert store.parts["lin.weight"].indices.tolist() == [1]           # 0 dropped (|0.02|)
    assert store.parts["lin.bias"].indices.tolist() == [1]             # grown (|-4|), a tensor that had none
    assert sorted(torch.cat([p.slots for p in store.parts.values()]).tolist()) == [0, 1, 2, 3]
    # Grown entries start at 0; kept ones keep their Δ.
    emb_slots = dict(zip(store.parts["emb.weight"].indices.tolist(), store.parts["emb.weight"].slots.tolist()))
    assert store.values[emb_slots[5]] == 0 and store.values[emb_slots[0]] == 0.5
    # Adam's moments of the grown entries: as after t = 1 steps of the mean gradient Σg / 2.
    state = opt.state[store.values]
    bias_slot = int(store.parts["lin.bias"].slots[0])
    assert torch.allclose(state["exp_avg"][emb_slots[5]], torch.tensor((1 - 0.9) * 1.5))
    assert torch.allclose(state["exp_avg_sq"][bias_slot], torch.tensor((1 - 0.99) * 4.0))
    assert torch.allclose(state["exp_avg"][bias_slot], torch.tensor((1 - 0.9) * -2.0))
    # Every inactive entry is θ0 bit for bit (dropped ones included); the accumulators are freed.
    assert store.accumulators == {}
    for name, part in store.parts.items():
        module, attr = name.split(".")
        weight = getattr(getattr(model, module), attr).detach().reshape(-1)
        inactive = torch.ones(weight.numel(), dtype=torch.bool)
        inactive[part.indices] = False
        assert torch.equal(weight[inactive], theta0[name].reshape(-1)[inactive]), name


def test_arguments_schedule_and_errors():
    a = SpielArguments()
    assert (a.reselection_steps, a.accumulation_steps, a.reselection_rate) == (20, 5, 0.2)
    assert [s for s in range(1, 61) if a.accumulates(s, 60)] == [16, 17, 18, 19, 20, 36, 37, 38, 39, 40]
    assert [s for s in range(1, 61) if a.reselects(s, 60)] == [20, 40]
    assert a.rate(0, 100) == pytest.approx(0.2) and a.rate(100, 100) == pytest.approx(0.0)
    assert a.rate(50, 100) == pytest.approx(0.1)
    with pytest.raises(CompsftError, match="accumulation_steps"):
        SpielArguments(reselection_steps=4, accumulation_steps=5)
    with pytest.raises(CompsftError, match="reselection_rate"):
        SpielArguments(reselection_rate=1.5)


# -- SpIEL inside the Trainer -------------------------------------------------------------------
class Watch(TrainerCallback):
    """After every reselection: the support, the model's weights and the optimizer's state."""

    def __init__(self, tuner, theta0):
        self.tuner, self.theta0, self.records, self.state_elements = tuner, theta0, [], []
        self._before = None

    def on_step_begin(self, args, state, control, **kw):
        store = self.tuner.store
        self._before = {n: dict(zip(p.indices.tolist(), store.values[p.slots].tolist()))
                        for n, p in store.parts.items()}

    def on_step_end(self, args, state, control, optimizer=None, **kw):
        store = self.tuner.store
        opt = getattr(optimizer, "optimizer", optimizer)
        self.state_elements.append(sum(t.numel() for s in opt.state.values() for t in s.values()
                                       if torch.is_tensor(t) and t.dim() > 0))
        if not self.tuner.reselections or self.tuner.reselections[-1]["step"] != state.global_step:
            return
        params = dict(self.tuner.model.named_parameters())
        record = {"k": sum(store.active_counts().values()), "dropped_moved": 0, "inactive_at_theta0": True,
                  "grown_at_zero": True, "moved": self.tuner.reselections[-1]["moved"]}
        for name, part in store.parts.items():
            module = self.tuner.model.get_submodule(name.rpartition(".")[0])
            weight = getattr(module, name.rpartition(".")[2]).detach().reshape(-1)
            assert part.indices.unique().numel() == part.indices.numel()
            active = set(part.indices.tolist())
            inactive = torch.ones(weight.numel(), dtype=torch.bool)
            inactive[part.indices] = False
            record["inactive_at_theta0"] &= torch.equal(weight[inactive], self.theta0[name].reshape(-1)[inactive])
            before = self._before[name]
            record["dropped_moved"] += sum(1 for i, v in before.items() if i not in active and v != 0.0)
            grown = [j for j, i in enumerate(part.indices.tolist()) if i not in before]
            record["grown_at_zero"] &= bool((store.values[part.slots[grown]] == 0).all())
        assert "spiel_store.values" in params
        self.records.append(record)


def run_tuner(tmp_path, k, steps=13, args=None, **spiel):
    torch.manual_seed(0)
    model = BertForTokenClassification(tiny_config(num_labels=3))
    sft_args = SftArguments(sft_kind="task", k=k, sparse_ft_max_epochs=None, sparse_ft_max_steps=steps)
    args = training_args(tmp_path, learning_rate=5e-2, **(args or {}))
    tuner = SpielTuner(model=model, args=args, train_dataset=ToyTagging(),
                       sft_args=sft_args, spiel_args=SpielArguments(**spiel))
    theta0 = {n: t.clone() for n, t in tuner._theta0.items()}
    watch = Watch(tuner, theta0)
    tuner.add_callback(watch)
    tuner.train()
    return tuner, watch, theta0


def test_exactly_k_after_every_reselection_and_dropped_entries_back_at_theta0(tmp_path):
    tuner, watch, theta0 = run_tuner(tmp_path, k=300, steps=10, reselection_steps=3, accumulation_steps=2,
                                     reselection_rate=0.5)
    assert [r["step"] for r in tuner.reselections] == [3, 6, 9]
    assert len(watch.records) == 3 and all(r["moved"] > 0 for r in watch.records)
    assert all(r["k"] == 300 for r in watch.records)
    assert all(r["inactive_at_theta0"] for r in watch.records)
    assert all(r["grown_at_zero"] for r in watch.records)
    assert sum(r["dropped_moved"] for r in watch.records) > 0   # entries with Δ ≠ 0 were dropped (and reset)
    sft = tuner.sft
    assert sft.k == 300 and sft.config.training["method"] == "spiel"
    assert set(sft.dense) == {"classifier.weight", "classifier.bias"}
    assert "bert.embeddings.word_embeddings.weight" in sft.diffs     # embeddings too
    # The model holds θ0 + φ afterwards; reverting gives θ0 back.
    compsft.revert(tuner.model)
    params = dict(tuner.model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in theta0.items())


def test_optimizer_state_is_proportional_to_k(tmp_path):
    from safetensors.torch import load_file

    from compsft.training.spiel import SPIEL_STATE_FILE

    sizes = {}
    for k in (100, 400):
        tuner, watch, _ = run_tuner(tmp_path / str(k), k=k, steps=4, reselection_steps=3, accumulation_steps=1,
                                    args={"save_strategy": "steps", "save_steps": 2})
        # Besides the Trainer's files a checkpoint holds the support: K positions and K slots.
        states = sorted((tmp_path / str(k)).rglob(SPIEL_STATE_FILE))
        assert [p.parent.name for p in states] == ["checkpoint-2", "checkpoint-4"]
        assert sum(t.numel() for t in load_file(states[-1]).values()) == 2 * k
        assert tuner.sft.config.training["mask_strategy"] == "spiel"
        heads = sum(p.numel() for n, p in tuner.model.named_parameters() if n.startswith("classifier."))
        assert set(watch.state_elements) == {2 * k + 2 * heads}   # exp_avg + exp_avg_sq of K values and heads
        sizes[k] = watch.state_elements[-1] - 2 * heads
    assert sizes[400] == 4 * sizes[100]


# -- checkpoints and resume -------------------------------------------------------------------------
RESUME_SPIEL = dict(reselection_steps=3, accumulation_steps=2, reselection_rate=0.5)


class Interrupted(Exception):
    pass


class CrashAt(TrainerCallback):
    """Ends a run as a kill would: at the end of step `step`, after the checkpoints of earlier steps."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupted(self.step)


def resumable_tuner(work, *, save_steps=None, callbacks=(), k=300, steps=12, **spiel):
    torch.manual_seed(0)
    model = BertForTokenClassification(tiny_config(num_labels=3))
    saving = {"save_strategy": "steps", "save_steps": save_steps} if save_steps else {}
    return SpielTuner(model=model, args=training_args(work, learning_rate=5e-2, **saving), train_dataset=ToyTagging(),
                      sft_args=SftArguments(sft_kind="task", k=k, sparse_ft_max_epochs=None, sparse_ft_max_steps=steps),
                      spiel_args=SpielArguments(**{**RESUME_SPIEL, **spiel}), callbacks=list(callbacks))


def assert_same_sft(a, b):
    assert a.diffs.keys() == b.diffs.keys() and a.dense.keys() == b.dense.keys()
    for name, d in a.diffs.items():
        assert torch.equal(d.indices, b.diffs[name].indices), name
        assert torch.equal(d.values, b.diffs[name].values), name
    assert all(torch.equal(t, b.dense[n]) for n, t in a.dense.items())


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A 12-step run straight through, and the same run with checkpoints every 4 steps stopped after step 10.
    Reselections come after steps 3, 6, 9, gradients accumulate in steps 2-3, 5-6, 8-9 (ToyTagging: 8 steps
    an epoch), so the checkpoint due at step 8 falls in a window and is written at step 9."""
    root = tmp_path_factory.mktemp("spiel-resume")
    straight = resumable_tuner(root / "straight")
    straight.train()
    with pytest.raises(Interrupted):
        resumable_tuner(root / "work", save_steps=4, callbacks=[CrashAt(10)]).train()
    shutil.copytree(root / "work", root / "pristine")
    return {"root": root, "straight": straight}


def fresh_work(interrupted, tmp_path):
    shutil.copytree(interrupted["root"] / "pristine", tmp_path / "work")
    return tmp_path / "work"


def test_resumed_run_equals_an_uninterrupted_one_bit_for_bit(interrupted, tmp_path):
    from safetensors.torch import load_file

    from compsft.training.masks import random_mask
    from compsft.training.spiel import SPIEL_STATE_FILE

    straight = interrupted["straight"]
    work = fresh_work(interrupted, tmp_path)
    assert sorted(p.name for p in (work / "phase2").iterdir()) == ["checkpoint-4", "checkpoint-9"]
    # Checkpoint 9 comes after three reselections: its support is not the initial random one.
    saved = load_file(work / "phase2" / "checkpoint-9" / SPIEL_STATE_FILE)
    start = random_mask(straight._theta0, None, straight.k, seed=straight.sft_args.mask_seed)
    assert any(not torch.equal(saved["indices/" + n], idx) for n, idx in start.items())
    for checkpoint in ("checkpoint-9", "checkpoint-4"):
        resumed = resumable_tuner(work, save_steps=4)
        resumed.train(resume_from_checkpoint=True)
        assert resumed.sft.config.training["phases"]["phase2"]["resumed_from"].endswith(checkpoint)
        assert_same_sft(straight.sft, resumed.sft)
        assert resumed.reselections == straight.reselections and len(resumed.reselections) == 3
        assert resumed.sft.config.training["reselections"] == straight.sft.config.training["reselections"]
        # Next: resume from the checkpoint before (after one reselection, before the epoch's end).
        for later in ("checkpoint-12", "checkpoint-9"):
            shutil.rmtree(work / "phase2" / later, ignore_errors=True)


class SaveAt(TrainerCallback):
    """Asks for a checkpoint at `step`, after SpIEL's callback has had its say (as a user's callback might)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True


def test_a_checkpoint_forced_inside_an_accumulation_window_lands_at_its_end(tmp_path):
    tuner = resumable_tuner(tmp_path / "work", steps=10)
    tuner.add_callback(SaveAt(8))  # steps 8-9 accumulate for the reselection after step 9
    tuner.train()
    assert sorted(p.name for p in (tmp_path / "work" / "phase2").iterdir()) == ["checkpoint-9"]


def test_resume_without_a_checkpoint_starts_afresh_and_equals_the_straight_run(interrupted, tmp_path):
    tuner = resumable_tuner(tmp_path / "empty", save_steps=4)
    tuner.train(resume_from_checkpoint=True)
    assert tuner.sft.config.training["phases"]["phase2"]["resumed_from"] is None
    assert_same_sft(interrupted["straight"].sft, tuner.sft)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _drop_values(path):
    # The Trainer loads a model non-strictly: without a check this would resume with Δ = 0.
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    del tensors["spiel_store.values"]
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("name, damage", [
    ("spiel.safetensors", _truncate), ("spiel.safetensors", lambda p: p.unlink()),
    ("model.safetensors", _truncate), ("model.safetensors", _drop_values), ("optimizer.pt", _flip),
    ("optimizer.pt", _truncate),
    ("rng_state.pth", _flip), ("trainer_state.json", lambda p: p.write_text("{")),
])
def test_a_damaged_checkpoint_file_is_a_clear_error_naming_it(interrupted, tmp_path, name, damage):
    work = fresh_work(interrupted, tmp_path)
    path = work / "phase2" / "checkpoint-9" / name
    damage(path)
    tuner = resumable_tuner(work, save_steps=4)
    with pytest.raises(CompsftError, match=re.escape(str(path))):
        tuner.train(resume_from_checkpoint=True)
    assert tuner.store is None  # detached again: the model is usable


def test_a_checkpoint_state_that_does_not_fit_is_refused(interrupted, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers.trainer_utils import SaveStrategy

    work = fresh_work(interrupted, tmp_path)
    with pytest.raises(CompsftError, match="K=300"):
        resumable_tuner(work, save_steps=4, k=200).train(resume_from_checkpoint=True)
    with pytest.raises(CompsftError, match="from a SpIEL run with K=300, .*'reselection_steps': 3"):
        resumable_tuner(work, save_steps=4, reselection_steps=4).train(resume_from_checkpoint=True)
    # Slots given twice (a file written by something else, or damaged past its header).
    path = work / "phase2" / "checkpoint-9" / "spiel.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    name = next(n for n, t in tensors.items() if n.startswith("slots/") and t.numel() > 1)
    tensors[name][1] = tensors[name][0]
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CompsftError, match="slots are not each"):
        resumable_tuner(work, save_steps=4).train(resume_from_checkpoint=True)
    save_file(load_file(path), str(path), metadata={**meta, "reselections": "{"})
    with pytest.raises(CompsftError, match=f"{re.escape(str(path))}: unreadable SpIEL checkpoint state"):
        resumable_tuner(work, save_steps=4).train(resume_from_checkpoint=True)
    with pytest.raises(CompsftError, match="pass True"):
        resumable_tuner(work).train(resume_from_checkpoint=str(work))
    tuner = resumable_tuner(work)
    tuner.args.save_strategy = SaveStrategy.BEST
    with pytest.raises(CompsftError, match="best"):
        tuner.train()


# -- the recipe and composition with an LT-SFT language SFT ------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("spiel")
    model = make_model_dir(root / "model")
    text = write_text_corpus(root / "text.txt")
    common = dict(max_length=32, batch_size=8, cpu=True, logging_steps=2, save_steps=0)
    lang = compsft.train_language_sft(model, "mlt", root / "lang", text=[text], k=400,
                                      phase1=(None, 2, 2), phase2=(None, 2, 2), **common).sft
    spiel = SpielArguments(reselection_steps=2, accumulation_steps=1)
    spiel_lang = train_spiel_sft("language", model, "mlt", root / "lang-spiel", text=[text], k=300,
                                 steps=(None, 5, 5), spiel_args=spiel, **common)
    train = first_sentences("ud:en_ewt:train", 24, root / "train.conllu")
    task = train_spiel_sft("task", "pos", model, train, root / "task", source_sft=root / "lang",
                           max_sentences=24, k=300, steps=(None, 5, 5), spiel_args=spiel, **common)
    return {"model": model, "lang": lang, "root": root, "spiel_lang": spiel_lang, "task": task, "train": train}


def test_recipe_writes_ordinary_sfts(trained):
    lang = compsft.load(trained["root"] / "lang-spiel")
    assert lang.config.kind == "language" and lang.k == 300 and lang.config.training["method"] == "spiel"
    assert any(n.startswith("cls.") for n in lang.dense) and len(lang.config.training["reselections"]) == 2
    task = compsft.load(trained["root"] / "task")
    assert task.config.kind == "task" and task.k == 300 and task.config.training["source_language"] == "mlt"
    with pytest.raises(CompsftError, match="steps"):
        train_spiel_sft("task", "pos", trained["model"], trained["train"], trained["root"] / "x", phase2=(1, 1, 1))


def test_spiel_task_sft_composes_with_lt_sft_language_sft(trained):
    from compsft.tasks import get_task

    task = compsft.load(trained["root"] / "task")
    lang = compsft.load(trained["root"] / "lang")
    labels = task.config.training["labels"]
    model = get_task("pos").build_model(trained["model"], labels)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = compsft.apply(model, lang, task, with_dense=[False, True])
    after = dict(model.named_parameters())
    merged = compsft.compose(lang, task, with_dense=[False, True])
    for name, delta in merged.diffs.items():
        expected = before[name].reshape(-1).clone()
        expected[delta.indices.long()] += delta.values.to(expected.dtype)
        assert torch.allclose(after[name].detach().reshape(-1), expected, atol=1e-6), name
    assert torch.equal(after["classifier.weight"], task.dense["classifier.weight"])
    compsft.revert(model, handle)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # Two SpIEL SFTs compose as well.
    handle = compsft.apply(model, compsft.load(trained["root"] / "lang-spiel"), task, with_dense=[False, True])
    compsft.revert(model, handle)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not math.isnan(float(task.diffs[next(iter(task.diffs))].values.sum()))


# -- the comparison methods -----------------------------------------------------------------------
def tiny_budget(**kw):
    from compsft.methods.base import Budget

    base = dict(lang_steps=2, lang_epochs=None, lang_max_steps=None, lang_batch=8, lang_max_length=32, lang_lines=60,
                lang_lr=1e-3, task_steps=2, task_epochs=None, task_batch=8, task_max_length=32, task_lr=1e-3,
                train_sentences=24, dev_sentences=0, lang_density=0.05, task_density=0.05)
    base.update(kw)
    return Budget(**base)


def test_spiel_methods_through_the_four_calls(trained, tmp_path):
    from compsft.merge import applied
    from compsft.methods import register_method, unregister_method
    from compsft.methods.base import LanguageData, MethodContext, ModuleInfo, TaskData
    from compsft.methods.spiel import MIXED
    from compsft.methods.spiel import METHOD

    ctx = MethodContext(model_dir=trained["model"], budget=tiny_budget())
    text = trained["root"] / "text.txt"
    lang_info = METHOD.train_language(ctx, LanguageData("mlt", [text]), 0, tmp_path / "lang")
    assert lang_info.trainable > 0 and lang_info.stored_bytes > 0 and lang_info.extra["reselections"] == 0
    assert compsft.load(tmp_path / "lang").config.training["phases"]["phase2"]["steps"] == 4  # both phases' steps
    info = METHOD.train_task(ctx, TaskData("pos", trained["train"]), tmp_path / "lang", 0, tmp_path / "task")
    task = compsft.load(tmp_path / "task")
    assert task.config.training["method"] == "spiel" and info.extra["k"] == task.k
    model, labels = METHOD.assemble(ctx, tmp_path / "task", tmp_path / "lang")
    assert labels == task.config.training["labels"] and len(applied(model)) == 1
    counts = METHOD.parameter_counts(ctx, "pos")
    assert counts["task_k"] == task.k and counts["trainable"] > counts["task_trainable"]
    # The mixed pair trains LT-SFT's language module (the registry's "lt-sft") and SpIEL's task module.
    assert MIXED.name == "lt-sft-lang+spiel-task" and MIXED.language_key == "lt-sft" and MIXED.task_key == MIXED.name
    calls = []
    stub = METHOD.__class__(name="lt-sft", description="", composition="", train_task=None, assemble=None,
                            parameter_counts=None,
                            train_language=lambda *a: calls.append(a) or ModuleInfo(trainable=1, stored_bytes=1))
    register_method(stub, replace=True)
    try:
        MIXED.train_language(ctx, LanguageData("mlt", [text]), 0, tmp_path / "x")
    finally:
        unregister_method("lt-sft")
    assert len(calls) == 1


def test_spiel_task_module_resumes_an_interrupted_training_in_the_harness_work_dir(trained, tmp_path):
    """As the comparison harness runs it: checkpoints in `work_dir` at LT-SFT's interval (20 steps here, of
    40), killed after step 25, then `resume=True` continues from checkpoint-20 (right after the reselection
    at step 20) and writes the module, dev-selected state included, an uninterrupted run writes."""
    import dataclasses

    from compsft.methods.base import DEV_SELECTED, MethodContext, TaskData
    from compsft.methods.spiel import METHOD

    data = TaskData("pos", trained["train"], dev=trained["train"])
    ctx = MethodContext(model_dir=trained["model"], budget=tiny_budget(task_steps=20, dev_checks=2, dev_sentences=8))
    source = trained["root"] / "lang"
    METHOD.train_task(ctx, data, source, 0, tmp_path / "straight")
    work = tmp_path / "work"
    crashing = dataclasses.replace(ctx, work_dir=work, callbacks=[CrashAt(25)])
    with pytest.raises(Interrupted):
        METHOD.train_task(crashing, data, source, 0, tmp_path / "task")
    assert sorted(p.name for p in (work / "phase2").iterdir()) == ["checkpoint-20"]
    assert not (tmp_path / "task").exists()
    info = METHOD.train_task(dataclasses.replace(ctx, work_dir=work, resume=True), data, source, 0, tmp_path / "task")
    assert info.extra["reselections"] == 1 and info.extra["moved"] > 0
    resumed, straight = compsft.load(tmp_path / "task"), compsft.load(tmp_path / "straight")
    assert str(resumed.config.training["phases"]["phase2"]["resumed_from"]).endswith("checkpoint-20")
    assert_same_sft(straight, resumed)
    assert_same_sft(compsft.load(tmp_path / "straight" / DEV_SELECTED), compsft.load(tmp_path / "task" / DEV_SELECTED))


def test_spiel_language_module_resumes_an_interrupted_training(trained, tmp_path):
    """The MLM path (dynamic masking by ResumableMlmCollator): killed after step 25, resumed from checkpoint-20."""
    import dataclasses

    from compsft.methods.base import LanguageData, MethodContext
    from compsft.methods.spiel import METHOD

    ctx = MethodContext(model_dir=trained["model"], budget=tiny_budget(lang_steps=20))
    data = LanguageData("mlt", [trained["root"] / "text.txt"])
    METHOD.train_language(ctx, data, 0, tmp_path / "straight")
    work = tmp_path / "work"
    with pytest.raises(Interrupted):
        METHOD.train_language(dataclasses.replace(ctx, work_dir=work, callbacks=[CrashAt(25)]), data, 0,
                              tmp_path / "lang")
    info = METHOD.train_language(dataclasses.replace(ctx, work_dir=work, resume=True), data, 0, tmp_path / "lang")
    resumed = compsft.load(tmp_path / "lang")
    assert str(resumed.config.training["phases"]["phase2"]["resumed_from"]).endswith("checkpoint-20")
    assert info.extra["reselections"] == 1
    assert_same_sft(compsft.load(tmp_path / "straight"), resumed)


# -- source-dev model selection ---------------------------------------------------------------------
class Snapshots(TrainerCallback):
    def __init__(self):
        self.at = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        from compsft.training.spiel import spiel_snapshot

        self.at[state.global_step] = spiel_snapshot(model)


def test_dev_selection_keeps_positions_and_values_of_the_best_check(tmp_path):
    """The support moves between checks, so the selected SFT must be the snapshot's positions *and*
    values at the best check, not the final positions with old values."""
    from compsft.training.dev_selection import DevSelection
    from compsft.training.spiel import INDICES, spiel_snapshot

    scores = iter([0.2, 0.9, 0.1])
    selection = DevSelection(lambda model: next(scores), checks=3, snapshot=spiel_snapshot)
    torch.manual_seed(0)
    model = BertForTokenClassification(tiny_config(num_labels=3))
    tuner = SpielTuner(model=model, args=training_args(tmp_path, learning_rate=5e-2), train_dataset=ToyTagging(),
                       sft_args=SftArguments(sft_kind="task", k=300, sparse_ft_max_epochs=None, sparse_ft_max_steps=9),
                       spiel_args=SpielArguments(reselection_steps=2, accumulation_steps=1, reselection_rate=0.5))
    snaps = Snapshots()
    tuner.add_callback(selection)
    tuner.add_callback(snaps)
    tuner.train()
    assert [s for s, _ in selection.history] == [3, 6, 9] and selection.best_step == 6
    chosen = tuner.sft_from_snapshot(selection.best, selection.summary())
    at6 = snaps.at[6]
    for name, delta in chosen.diffs.items():
        assert torch.equal(delta.indices.long(), at6[INDICES + name])
        assert torch.equal(delta.values, at6["values:" + name].float())
    assert chosen.k == 300 and chosen.config.training["dev_selected"]["step"] == 6
    assert torch.equal(chosen.dense["classifier.weight"], at6["classifier.weight"])
    # The support did move after step 6, so positions from the end would have been wrong.
    final = tuner.sft
    assert any(not torch.equal(final.diffs[n].indices.long(), at6[INDICES + n])
               for n in final.diffs if n in chosen.diffs)


def test_spiel_task_module_writes_the_dev_selected_sft(trained, tmp_path):
    from compsft.methods.base import DEV_SELECTED, MethodContext, TaskData
    from compsft.methods.spiel import METHOD

    ctx = MethodContext(model_dir=trained["model"], budget=tiny_budget(task_steps=3, dev_checks=2, dev_sentences=8))
    data = TaskData("pos", trained["train"], dev=trained["train"])
    info = METHOD.train_task(ctx, data, trained["root"] / "lang", 0, tmp_path / "task")
    selected = compsft.load(tmp_path / "task" / DEV_SELECTED)
    assert info.extra["dev_selected"]["of_steps"] == 6 and len(info.extra["dev_selected"]["checks"]) == 2
    assert selected.k == compsft.load(tmp_path / "task").k
    assert selected.config.training["dev_selected"] == info.extra["dev_selected"]
