"""NAS-for-PET pruning: the first-order scores, the iterative schedule, retraining, the merged SFT."""
from __future__ import annotations

import pytest
import torch
from transformers import BertForTokenClassification

import compsft
from compsft.errors import CompsftError
from compsft.training.nas_pet import (LoraDelta, NasPetArguments, PetSpace, auto_rank, prune_schedule,
                                      round_targets, survivors_by_layer, train_nas_pet_sft)

from training_helpers import first_sentences, make_model_dir, tiny_config, write_text_corpus

QUERY = "bert.encoder.layer.0.attention.self.query.weight"
OUT_BIAS = "bert.encoder.layer.1.attention.output.dense.bias"


def tiny_space(structured=True, rank=4):
    torch.manual_seed(0)
    model = BertForTokenClassification(tiny_config(num_labels=3, hidden_dropout_prob=0.0,
                                                   attention_probs_dropout_prob=0.0))
    for p in model.base_model.parameters():
        p.requires_grad_(False)
    return model, PetSpace(model, NasPetArguments(structured=structured, rank=rank))


def ones_grads(space):
    return {id(t): torch.ones_like(t) for part in space.parts.values() for t, _ in space.tensors(part)}


def test_space_covers_every_linear_and_bias():
    model, space = tiny_space()
    kinds = {n: type(p).__name__ for n, p in space.parts.items()}
    assert kinds[QUERY] == "LoraDelta" and kinds[OUT_BIAS] == "BiasDelta"
    assert kinds["bert.embeddings.LayerNorm.bias"] == "BiasDelta"
    assert sum(isinstance(p, LoraDelta) for p in space.parts.values()) == 2 * 6   # q k v o, ffn in, ffn out
    assert space.trainable() == space.size()
    assert all(not isinstance(p, LoraDelta) or p.A.shape[0] == 4 for p in space.parts.values())


def test_structured_pruning_keeps_the_units_with_largest_first_order_score():
    model, space = tiny_space()
    grads = ones_grads(space)
    with torch.no_grad():
        for part in space.parts.values():
            for t, _ in space.tensors(part):
                t.zero_()
        q = space.parts[QUERY]
        q.A[2] = 0.5                      # component 2 of the query moved most, but its gradient is 0: score 0
        grads[id(q.A)][2] = 0.0
        q.B[:, 1] = 0.01                  # component 1: |θ · g| = 16 · 0.01 = 0.16
        q.B[:, 3] = -0.01                 # component 3: the same, with the other sign (|Σ θ g|, not Σ θ g)
        space.parts[OUT_BIAS].d.fill_(-1.0)   # the bias vector: |Σ -1 · 0.5| = 8
        grads[id(space.parts[OUT_BIAS].d)].fill_(0.5)
    cost_component = q.A.shape[1] + q.B.shape[0]
    info = space.prune(grads, target=2 * cost_component + 16)
    assert info["after"] == 2 * cost_component + 16
    assert (q.mask_a[:, 0] > 0).tolist() == [False, True, False, True]
    assert bool(space.parts[OUT_BIAS].mask.all())
    alive = {n for n, s in space.survivors().items() if s["entries"]}
    assert alive == {QUERY, OUT_BIAS}
    assert space.survivors()[QUERY]["components"] == 2
    by_layer = survivors_by_layer(space.survivors())
    assert by_layer["bert.encoder.layer.*.attention.self.query.weight"] == {"0": 0.5, "1": 0.0}
    assert by_layer["bert.encoder.layer.*.attention.output.dense.bias"] == {"0": 0.0, "1": 1.0}
    # Pruned units are zero and stay pruned in the next round.
    assert float(q.A[2].detach().abs().sum()) == 0 and float(q.B[:, 0].detach().abs().sum()) == 0
    space.prune(grads, target=16)
    assert space.trainable() == 16 and bool(space.parts[OUT_BIAS].mask.all())


def test_unstructured_pruning_keeps_exactly_the_budget_by_entry_score():
    model, space = tiny_space(structured=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for part in space.parts.values():
            for t, _ in space.tensors(part):
                t.copy_(torch.randn_like(t))
    grads = {key: torch.randn_like(g) for key, g in ones_grads(space).items()}
    scores = torch.cat([(t.detach() * grads[id(t)]).abs().reshape(-1)
                        for p in space.parts.values() for t, _ in space.tensors(p)])
    space.prune(grads, target=500)
    assert space.trainable() == 500
    kept = torch.cat([m.reshape(-1) for p in space.parts.values() for _, m in space.tensors(p)]) > 0
    assert float(scores[kept].min()) >= float(scores[~kept].max())


def test_schedule_is_geometric_down_to_the_budget():
    assert round_targets(10_000, 100, 2) == [1000, 100]
    assert prune_schedule(12, 10_000, 100, NasPetArguments(rounds=2)) == {6: 1000, 12: 100}
    assert round_targets(50, 100, 3) == [50, 50, 50]   # a space below the budget is not pruned
    model, _ = tiny_space()   # 2 layers x (4 · (16 + 16) + 2 · (16 + 32)) = 448 per rank, full rank 16
    assert auto_rank(model, 100) == 8 and auto_rank(model, 1500) == 16 and auto_rank(model, 10**6) == 16
    with pytest.raises(CompsftError):
        NasPetArguments(rank=0)


def test_merged_difference_equals_the_parametrised_model():
    model, space = tiny_space(structured=False)
    with torch.no_grad():
        for part in space.parts.values():
            for t, _ in space.tensors(part):
                t.add_(0.05 * torch.randn_like(t))
    space.prune(ones_grads(space), target=3000)
    ids = torch.randint(5, 60, (2, 8))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        deltas = space.deltas()
        space.detach()
        before = model(input_ids=ids).logits
        params = dict(model.named_parameters())
        for name, d in deltas.items():
            params[name].add_(d)
        got = model(input_ids=ids).logits
    assert not torch.allclose(before, expected, atol=1e-4)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("nas_pet")
    model = make_model_dir(root / "model")
    text = write_text_corpus(root / "text.txt")
    lang = compsft.train_language_sft(model, "mlt", root / "lang", text=[text], k=400, phase1=(None, 2, 2),
                                      phase2=(None, 2, 2), max_length=32, cpu=True, save_steps=0).sft
    train = first_sentences("ud:en_ewt:train", 24, root / "train.conllu")
    return {"model": model, "root": root, "lang": lang, "train": train}


def test_recipe_searches_retrains_and_writes_a_composable_sft(assets, structured=True):
    out = assets["root"] / f"task-{structured}"
    res = train_nas_pet_sft("pos", assets["model"], assets["train"], out, source_sft=assets["root"] / "lang",
                            k=1500, nas_args=NasPetArguments(structured=structured, rank=4, rounds=2, score_steps=2),
                            search=(None, 4, 4), retrain=(None, 2, 2), max_sentences=24, max_length=32, cpu=True)
    assert res.space > 1500 and [h["target"] for h in res.history][-1] == 1500
    assert [h["after"] for h in res.history] == sorted((h["after"] for h in res.history), reverse=True)
    assert res.trainable <= 1500 and (structured or res.trainable == 1500)
    sft = compsft.load(out)
    training = sft.config.training
    assert training["method"] == f"nas-pet-{'structured' if structured else 'unstructured'}"
    assert training["survivors"] == res.survivors and training["stages"]["retrain"]["steps"] == 2
    assert set(sft.dense) == {"classifier.weight", "classifier.bias"}
    # It composes with a LT-SFT language SFT, and reverts bit-identically.
    from compsft.tasks import get_task

    model = get_task("pos").build_model(assets["model"], training["labels"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = compsft.apply(model, assets["lang"], sft, with_dense=[False, True])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed >= set(sft.diffs) | set(assets["lang"].diffs) - {n for n in assets["lang"].diffs if "cls." in n}
    compsft.revert(model, handle)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_methods_through_the_four_calls(assets, tmp_path):
    from compsft.merge import applied
    from compsft.methods.base import Budget, MethodContext, TaskData
    from compsft.methods.nas_pet import METHODS
    from compsft.methods.nas_pet import UNSTRUCTURED as METHOD

    assert set(METHODS) == {"nas-pet-structured", "nas-pet-unstructured"} and METHOD is METHODS["nas-pet-unstructured"]
    assert all(m.language_key == "lt-sft" and m.task_key == m.name for m in METHODS.values())
    budget = Budget(lang_steps=2, lang_epochs=None, lang_max_steps=None, lang_batch=8, lang_max_length=32,
                    lang_lines=60, lang_lr=1e-3, task_steps=3, task_epochs=None, task_batch=8, task_max_length=32,
                    task_lr=1e-3, train_sentences=24, dev_sentences=0, task_density=0.02)
    ctx = MethodContext(model_dir=assets["model"], budget=budget)
    info = METHOD.train_task(ctx, TaskData("pos", assets["train"]), assets["root"] / "lang", 0, tmp_path / "task")
    sft = compsft.load(tmp_path / "task")
    assert sft.config.training["method"] == "nas-pet-unstructured"
    assert info.extra["budget"] == sft.config.training["budget"] == METHOD.parameter_counts(ctx, "pos")["task_k"]
    assert info.trainable == info.extra["budget"] + sum(t.numel() for t in sft.dense.values())
    assert sft.config.training["stages"]["search"]["steps"] == 3 and len(info.extra["prune_history"]) == 3
    model, labels = METHOD.assemble(ctx, tmp_path / "task", assets["root"] / "lang")
    assert labels == sft.config.training["labels"] and len(applied(model)) == 1


def test_compare_draws_which_units_survived(tmp_path):
    """A NAS-PET method's cells give survivors-METHOD.png: the share of each layer's entries that survived,
    averaged over the method's task modules (a module shared by several targets counts once)."""
    from compsft.compare.plot import survivor_shares, write_survivor_plot

    _, space = tiny_space()
    with torch.no_grad():
        space.parts[QUERY].mask_a[2:] = 0
        space.parts[QUERY].mask_b[:, 2:] = 0
        space.parts[OUT_BIAS].mask.zero_()
    half = space.survivors()
    full = tiny_space()[1].survivors()
    cell = lambda d, s, target: {"method": "nas-pet-structured", "target": target,  # noqa: E731
                                 "modules": {"task": {"dir": d, "extra": {"survivors": s}}}}
    cells = [cell("seed42", half, "wol"), cell("seed42", half, "mlt"), cell("seed43", full, "wol"),
             {"method": "lt-sft", "modules": {"task": {"dir": "x", "extra": {}}}}]
    shares = survivor_shares(cells, "nas-pet-structured")
    assert shares["bert.encoder.layer.*.attention.self.query.weight"]["0"] == 0.75  # (0.5 + 1) / 2
    assert shares["bert.encoder.layer.*.attention.output.dense.bias"] == {"0": 1.0, "1": 0.5}
    assert survivor_shares(cells, "lt-sft") == {}
    write_survivor_plot(tmp_path / "s.png", shares, "test")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_dev_selection_merges_the_best_retraining_state_and_keeps_the_final_one(assets):
    """The selected SFT is the PET at the best check (here the first); the fixed-budget SFT is still the
    final state (restoring the best state for merging must not leak into it)."""
    from compsft.training.dev_selection import DevSelection

    scores = iter([0.9, 0.1])
    selection = DevSelection(lambda model: next(scores), checks=2)
    out = assets["root"] / "task-selected"
    res = train_nas_pet_sft("pos", assets["model"], assets["train"], out, source_sft=assets["root"] / "lang",
                            k=1500, nas_args=NasPetArguments(structured=False, rank=4, rounds=2, score_steps=2),
                            search=(None, 4, 4), retrain=(None, 4, 4), max_sentences=24, max_length=32, cpu=True,
                            selection=selection, lr=1e-2)
    assert selection.best_step == 2 and res.selected.config.training["dev_selected"]["step"] == 2
    head = "classifier.weight"
    assert torch.equal(res.selected.dense[head], selection.best[head])
    final = compsft.load(out)
    assert not torch.equal(final.dense[head], res.selected.dense[head])
    assert torch.equal(final.dense[head], res.sft.dense[head])
    assert any(not torch.equal(final.diffs[n].values, res.selected.diffs[n].values)
               for n in final.diffs if n in res.selected.diffs)


def test_an_interrupted_retraining_resumes_after_the_search_and_equals_an_uninterrupted_run(assets):
    """The search's architecture is saved when it ends: a run killed in the retraining resumes without
    searching again, and its SFT is bit for bit the one of a run never interrupted."""
    from transformers import TrainerCallback

    from compsft.training.nas_pet import SEARCH_FILE

    root = assets["root"]
    kw = dict(source_sft=root / "lang", k=1500, nas_args=NasPetArguments(structured=False, rank=4, rounds=2,
                                                                          score_steps=2),
              search=(None, 4, 4), retrain=(None, 3, 3), max_sentences=24, max_length=32, cpu=True, lr=1e-2)

    class Steps(TrainerCallback):
        """Counts the steps run per stage (by length: the search has 4, the retraining 3); can stop one."""

        def __init__(self, stop_at_retrain_step=None):
            self.steps, self.stop = {4: 0, 3: 0}, stop_at_retrain_step

        def on_step_end(self, args, state, control, **kwargs):
            self.steps[state.max_steps] += 1
            if state.max_steps == 3 and state.global_step == self.stop:
                raise KeyboardInterrupt

    whole = train_nas_pet_sft("pos", assets["model"], assets["train"], root / "whole", work_dir=root / "whole.work",
                              **kw)
    killed = Steps(stop_at_retrain_step=2)
    with pytest.raises(KeyboardInterrupt):
        train_nas_pet_sft("pos", assets["model"], assets["train"], root / "again", work_dir=root / "again.work",
                          callbacks=[killed], **kw)
    assert killed.steps == {4: 4, 3: 2} and (root / "again.work" / SEARCH_FILE).is_file()
    resumed_steps = Steps()
    resumed = train_nas_pet_sft("pos", assets["model"], assets["train"], root / "again",
                                work_dir=root / "again.work", callbacks=[resumed_steps], resume=True, **kw)
    assert resumed_steps.steps == {4: 0, 3: 3}  # no search again
    assert resumed.history == whole.history and resumed.survivors == whole.survivors
    assert resumed.sft.config.training == whole.sft.config.training
    assert set(resumed.sft.diffs) == set(whole.sft.diffs)
    for name, d in whole.sft.diffs.items():
        assert torch.equal(resumed.sft.diffs[name].values, d.values)
        assert torch.equal(resumed.sft.diffs[name].indices, d.indices)
    assert all(torch.equal(resumed.sft.dense[n], t) for n, t in whole.sft.dense.items())

    # A search file from other settings, or a damaged one, is an error naming it, not a silent other search.
    other = dict(kw, nas_args=NasPetArguments(structured=True, rank=4, rounds=2, score_steps=2))
    with pytest.raises(CompsftError, match=f"{SEARCH_FILE}: searched with other settings \\(fields nas_pet\\)"):
        train_nas_pet_sft("pos", assets["model"], assets["train"], root / "other", work_dir=root / "again.work",
                          resume=True, **other)
    (root / "model-elsewhere").symlink_to(assets["model"], target_is_directory=True)
    for model, changed, field in [(assets["model"], {"max_length": 48}, "max_length"),
                                  (root / "model-elsewhere", {}, "model")]:
        with pytest.raises(CompsftError, match=f"searched with other settings \\(fields {field}\\)"):
            train_nas_pet_sft("pos", model, assets["train"], root / "other", work_dir=root / "again.work",
                              resume=True, **dict(kw, **changed))
    search = root / "again.work" / SEARCH_FILE
    search.write_bytes(search.read_bytes()[:100])
    with pytest.raises(CompsftError, match=f"{SEARCH_FILE}: unreadable NAS-PET search file"):
        train_nas_pet_sft("pos", assets["model"], assets["train"], root / "other", work_dir=root / "again.work",
                          resume=True, **kw)
