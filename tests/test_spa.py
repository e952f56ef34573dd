"""Structured Pruning Adapters (`compsft.methods.spa`, SPLoRA) on tiny random-init models built in code."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from compsft.errors import CompsftError
from compsft.methods import get_method
from compsft.methods import spa
from compsft.methods import spa_layers as L
from compsft.methods.base import DEV_SELECTED, Budget, LanguageData, MethodContext, TaskData

from training_helpers import make_model_dir, tiny_config, write_text_corpus

HEADS = 4  # tiny_config's hidden size 16: head_dim 4, so head pruning has more than two choices
VARIANTS = {"spa": 0.5, "spa-d75": 0.75, "spa-d25": 0.25}


def _tagger():
    from transformers import BertForTokenClassification

    torch.manual_seed(0)
    return BertForTokenClassification(tiny_config(num_attention_heads=HEADS, hidden_dropout_prob=0.0,
                                                  attention_probs_dropout_prob=0.0, num_labels=3)).eval()


def _task_config(model, density=0.5, rank=3) -> L.SpaConfig:
    layers = {n: [m.in_features, m.out_features] for n, m in L.target_linears(model).items()}
    return L.SpaConfig(kind="task", rank=rank, layers=layers, density=density, groups=L.prunable_groups(model),
                       task="pos", labels=["A", "B", "C"])


def _pruned(density=0.5, seed=6):
    """A tagger with random adapters and biases and masks pruned on random scores."""
    model = _tagger()
    config = _task_config(model, density)
    bank = L.attach(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bank.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for layer in L.target_linears(model).values():  # BERT's init leaves them at zero, hiding the bias mask
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.1)
        for mask in bank.masks.values():
            mask.score.copy_(torch.rand(mask.score.shape, generator=g, dtype=torch.float64))
    bank.prune_to(density)
    return model, config, bank


IDS = torch.randint(5, 60, (2, 7), generator=torch.Generator().manual_seed(1))


def _off(mask: L.UnitMask) -> torch.Tensor:
    return ~mask.keep.repeat_interleave(mask.unit_size)


# -- layers ------------------------------------------------------------------------------------------

def test_merged_model_equals_hooked_model():
    model, config, bank = _pruned()
    masks = {k.replace("/", "."): m.keep.clone() for k, m in bank.masks.items()}
    assert all(0 < int(k.sum()) < k.numel() for k in masks.values())
    with torch.no_grad():
        hooked = model(input_ids=IDS).logits
        L.merge(model)
        merged = model(input_ids=IDS).logits
    assert not hasattr(model, L.BANK_ATTR)
    assert (hooked - merged).abs().max() <= 1e-5
    linears = L.target_linears(model)
    for group, keep in masks.items():  # the pruned model is in the weights: rows, biases, dead columns
        gated, _, dead = L.group_linears(group)
        off = ~keep.repeat_interleave(config.groups[group][1])
        for name in gated:
            assert torch.all(linears[name].weight[off] == 0) and torch.all(linears[name].bias[off] == 0)
            assert torch.all(linears[name].weight[~off].abs().sum(1) > 0)
        assert torch.all(linears[dead].weight[:, off] == 0)


def test_pruned_units_give_exactly_zero_before_the_residual():
    model, _, bank = _pruned()
    seen = {}
    modules = dict(model.named_modules())

    def grab(name, pre=False):
        if pre:
            return modules[name].register_forward_pre_hook(lambda m, a: seen.__setitem__(name, a[0].detach()))
        return modules[name].register_forward_hook(lambda m, a, o: seen.__setitem__(name, o.detach()))

    handles = []
    for key in bank.masks:
        group = key.replace("/", ".")
        gated, _, dead = L.group_linears(group)
        handles += [grab(n) for n in gated] + [grab(dead, pre=True)]
        if group.endswith(L.FFN):
            handles.append(grab(group[:-len(".dense")]))  # after the activation
    with torch.no_grad():
        model(input_ids=IDS)
    for h in handles:
        h.remove()
    for key, mask in bank.masks.items():
        group, off = key.replace("/", "."), _off(mask)
        gated, _, dead = L.group_linears(group)
        outputs = [seen[n] for n in gated] + [seen[dead]]  # q/k/v rows, then the input of the output dense
        if group.endswith(L.FFN):
            outputs.append(seen[group[:-len(".dense")]])
        for out in outputs:
            assert torch.equal(out[..., off], torch.zeros_like(out[..., off])), group
            assert out[..., ~off].abs().amax(dim=(0, 1)).min() > 0, group


def test_taylor_score_is_the_squared_gate_gradient():
    """The score of a unit after one backward pass is (∂L/∂ξ)², ξ a gate on the unit's output (on the
    value rows for a head: the head's output is linear in its values)."""
    model, _, bank = _pruned()
    gates, handles = {}, []
    modules = dict(model.named_modules())
    for key, mask in bank.masks.items():
        group = key.replace("/", ".")
        scored = f"{group}.value" if group.endswith(L.HEADS) else group  # spelled out, not group_linears'
        gate = torch.ones(mask.keep.numel(), requires_grad=True)
        gates[key] = gate
        handles.append(modules[scored].register_forward_hook(  # after the bank's hook: sees its output
            lambda m, a, o, gate=gate, size=mask.unit_size: o * gate.repeat_interleave(size)))
        mask.score.zero_()
    model.train()
    w = torch.randn(2, 7, 3, generator=torch.Generator().manual_seed(2))
    (model(input_ids=IDS).logits * w).sum().backward()
    for h in handles:
        h.remove()
    for key, mask in bank.masks.items():
        want = gates[key].grad.double() ** 2
        assert torch.allclose(mask.score, want, rtol=1e-4, atol=1e-12), key
        assert torch.all(mask.score[~mask.keep] == 0) and torch.all(mask.score[mask.keep] > 0)


def test_prune_to_drops_the_lowest_and_never_restores():
    mask = L.UnitMask(6, 2)
    mask.score.copy_(torch.tensor([5.0, 1.0, 4.0, 0.5, 3.0, 2.0], dtype=torch.float64))
    mask.prune_to(0.5)
    assert mask.keep.tolist() == [True, False, True, False, True, False]
    assert torch.all(mask.score == 0)  # re-scored from scratch before the next event
    mask.score.copy_(torch.tensor([0.1, 99.0, 0.2, 99.0, 0.3, 99.0], dtype=torch.float64))
    mask.prune_to(0.34)
    assert mask.keep.tolist() == [False, False, True, False, True, False]
    mask.prune_to(0.9)  # a higher density never brings units back
    assert int(mask.keep.sum()) == 2
    assert [L.keep_count(d, 4) for d in (0.25, 0.5, 0.625, 0.75, 0.01, 1.0)] == [1, 2, 3, 3, 1, 4]


def test_schedule_is_cubic_monotone_and_ends_at_two_thirds():
    events = L.PruneSchedule(0.25).at(300)
    assert [s for s, _ in events] == [50, 100, 150, 200]
    densities = [d for _, d in events]
    assert densities[-1] == 0.25 and all(a > b for a, b in zip(densities, densities[1:]))
    assert densities[0] == pytest.approx(0.25 + 0.75 * 0.75 ** 3)
    assert L.PruneSchedule(0.5).at(1) == [(1, 0.5)]  # events on one step: the last (lowest) wins
    assert all(d == 1.0 for _, d in L.PruneSchedule(1.0).at(30))


# -- files -------------------------------------------------------------------------------------------

def _saved(tmp_path: Path) -> tuple[Path, torch.nn.Module, L.SpaConfig, L.SpaBank]:
    model, config, bank = _pruned()
    head = {"classifier.weight": model.classifier.weight, "classifier.bias": model.classifier.bias}
    L.save(tmp_path / "m", config, bank, head)
    return tmp_path / "m", model, config, bank


def test_save_load_round_trip(tmp_path):
    out, model, config, bank = _saved(tmp_path)
    loaded, tensors, head = L.load(out)
    assert dataclasses.asdict(loaded) == dataclasses.asdict(config)
    for key, a in bank.adapters.items():
        name = key.replace("/", ".")
        assert torch.equal(tensors[f"{name}.A"], a.A) and torch.equal(tensors[f"{name}.B"], a.B)
    for key, m in bank.masks.items():
        keep = tensors[f"{key.replace('/', '.')}.keep"]
        assert keep.dtype == torch.bool and torch.equal(keep, m.keep)
    assert torch.equal(head["classifier.weight"], model.classifier.weight)
    fresh = _tagger()
    with torch.no_grad():  # the same biases as `model` (random, set after init)
        for name, layer in L.target_linears(fresh).items():
            layer.bias.copy_(L.target_linears(model)[name].bias)
        L.attach(fresh, loaded, tensors)
        assert torch.equal(fresh(input_ids=IDS).logits, model(input_ids=IDS).logits)


CONFIG_EDITS = [
    (lambda c: c.pop("rank"), "rank"),
    (lambda c: c.update(rank=0), "rank"),
    (lambda c: c.update(density=1.5), "density"),
    (lambda c: c.update(kind="adapter"), "kind"),
    (lambda c: c.update(format="compsft.hydra"), "format"),
    (lambda c: c.update(layers={"x": [3]}), "layers"),
    (lambda c: c.update(groups={"bert.encoder.layer.0.intermediate.dense": [31, 1]}), "groups"),
    (lambda c: c.update(labels=[]), "labels"),
    (lambda c: c.update(extra=1), "extra"),
]


@pytest.mark.parametrize("edit,field", CONFIG_EDITS)
def test_malformed_config_names_file_and_field(tmp_path, edit, field):
    out, *_ = _saved(tmp_path)
    data = json.loads((out / L.CONFIG_NAME).read_text())
    edit(data)
    (out / L.CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(CompsftError, match=rf"spa_config\.json.*{field}"):
        L.load(out)


def test_malformed_tensors_name_file_and_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    out, *_ = _saved(tmp_path)
    path = out / L.WEIGHTS_NAME
    good = load_file(str(path))
    a = "bert.encoder.layer.1.intermediate.dense.A"
    keep = "bert.encoder.layer.0.attention.self.keep"
    cases = [({**good, a: good[a][:, :-1].contiguous()}, rf"spa\.safetensors: tensor '{a}' has shape"),
             ({**good, keep: torch.ones(HEADS, dtype=torch.bool)},
              rf"spa\.safetensors: mask '{keep}' keeps 4.*density"),
             ({**good, keep: good[keep].float()}, rf"spa\.safetensors: mask '{keep}' must hold 0/1"),
             ({k: v for k, v in good.items() if k != keep}, rf"spa\.safetensors: tensor '{keep}' is missing"),
             ({**good, a: good[a] * float("nan")}, rf"spa\.safetensors: tensor '{a}' must hold finite")]
    for tensors, pattern in cases:
        save_file(tensors, str(path))
        with pytest.raises(CompsftError, match=pattern):
            L.load(out)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CompsftError, match=r"spa\.safetensors: not a readable safetensors"):
        L.load(out)
    (out / L.CONFIG_NAME).write_text("{not json")
    with pytest.raises(CompsftError, match=r"spa_config\.json: not valid JSON"):
        L.load(out)


# -- the method end to end ---------------------------------------------------------------------------

CONLLU_ROW = "{i}\t{w}\t{w}\t{t}\t_\t_\t{h}\t{r}\t_\t_"


def _conllu(path: Path, n: int, seed: int) -> Path:
    import random

    rng = random.Random(seed)
    words = {"NOUN": ["dar", "kelb"], "VERB": ["ra", "kiel"], "DET": ["il", "l"], "ADJ": ["kbir", "sabih"]}
    blocks = []
    for _ in range(n):
        tags = [rng.choice(list(words)) for _ in range(rng.randint(3, 6))]
        toks = [rng.choice(words[t]) for t in tags]
        rows = [CONLLU_ROW.format(i=i + 1, w=w, t=t, h=0 if i == 0 else 1, r="root" if i == 0 else "dep")
                for i, (w, t) in enumerate(zip(toks, tags))]
        blocks.append(f"# text = {' '.join(toks)}\n" + "\n".join(rows) + "\n")
    path.write_text("\n".join(blocks), encoding="utf-8")
    return path


class DensityRecorder:
    """A TrainerCallback recording the bank's density at the end of every step (before that step's pruning)."""

    def __new__(cls, log: list):
        from transformers import TrainerCallback

        class Recorder(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kw):
                log.append(getattr(model, L.BANK_ATTR).density())

        return Recorder()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Language modules for a source and a target, and a task module for each density (6 steps each)."""
    root = tmp_path_factory.mktemp("spa")
    model_dir = make_model_dir(root / "model", num_attention_heads=HEADS)
    budget = Budget(lang_steps=2, lang_epochs=None, lang_max_steps=None, lang_batch=4, lang_max_length=24,
                    lang_lines=40, lang_lr=1e-3, task_steps=3, task_epochs=None, task_batch=4, task_max_length=32,
                    task_lr=1e-3, train_sentences=None, dev_sentences=None, dev_checks=2)
    ctx = MethodContext(model_dir=model_dir, budget=budget)
    spec = get_method("spa")
    langs = {code: spec.train_language(ctx, LanguageData(code, [write_text_corpus(root / f"{code}.txt", 40, seed)]),
                                       0, root / f"lang-{code}")
             for code, seed in (("mlt", 1), ("wol", 2))}
    data = TaskData("pos", _conllu(root / "train.conllu", 24, 0), _conllu(root / "dev.conllu", 8, 1))
    tasks = {}
    for name in VARIANTS:
        log: list[float] = []
        info = get_method(name).train_task(dataclasses.replace(ctx, callbacks=[DensityRecorder(log)]), data,
                                           root / "lang-mlt", 0, root / f"task-{name}")
        tasks[name] = (root / f"task-{name}", info, log)
    return {"root": root, "ctx": ctx, "langs": langs, "tasks": tasks}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_density_after_training_is_the_target_and_never_rises(trained, name):
    density = VARIANTS[name]
    out, info, log = trained["tasks"][name]
    config, tensors, _ = L.load(out)
    assert config.density == density
    kept_heads = {0.5: 2, 0.75: 3, 0.25: 1}[density]
    for group, (units, _) in config.groups.items():
        want = kept_heads if group.endswith(L.HEADS) else {0.5: 16, 0.75: 24, 0.25: 8}[density]
        assert int(tensors[f"{group}.keep"].sum()) == want == L.keep_count(density, units), group
    assert info.extra["density"] == density  # whole units: 4 heads and 32 channels per layer divide evenly
    pruned = config.training["schedule"]["pruned"]
    assert [s for s, _, _ in pruned] == [1, 2, 3, 4] and pruned[-1][2] == density  # over the first 2/3 of 6 steps
    assert len(log) == 6 and log[0] == 1.0
    assert all(a >= b for a, b in zip(log, log[1:])) and len(set(log)) >= 3  # gradual, only downwards
    assert info.extra["dev_selected"]["step"] >= 4  # selected only among modules at the final density
    dev_config, dev_tensors, _ = L.load(out / DEV_SELECTED)
    assert all(torch.equal(dev_tensors[k], tensors[k]) for k in tensors if k.endswith(".keep"))


def test_counts_are_what_training_gives(trained):
    from safetensors.torch import load_file

    ctx = trained["ctx"]
    counts = {name: get_method(name).parameter_counts(ctx, "pos") for name in VARIANTS}
    assert trained["langs"]["mlt"].trainable == counts["spa"]["language_trainable"]
    for name, (out, info, _) in trained["tasks"].items():
        config, _, head = L.load(out)
        assert info.trainable == counts[name]["task_trainable"]  # the task head included
        assert counts[name]["task_head"] == sum(t.numel() for t in head.values()) > 0
        kept = sum(L.keep_count(VARIANTS[name], u) for u, _ in config.groups.values())
        assert counts[name]["task_kept_units"] == kept
        stored = sum(t.numel() * t.element_size() for d in (out, trained["root"] / "lang-wol")
                     for t in load_file(str(d / L.WEIGHTS_NAME)).values())
        stored += sum(t.numel() * t.element_size() for t in head.values())
        assert counts[name]["stored_bytes"] == stored  # fp32 adapters and head + one byte per mask unit
    assert counts["spa"]["task_mask_bytes"] == 2 * (HEADS + 32) > 0
    assert {get_method(n).language_key for n in VARIANTS} == {"spa"}  # one unpruned language module for all


def test_composition_is_the_rule(trained):
    """assemble = θ0 + B_T·A_T + B_task·A_task, then the task's masks (rows, biases, dead columns)."""
    from compsft.tasks import get_task

    ctx, root = trained["ctx"], trained["root"]
    out = trained["tasks"]["spa"][0]
    model, labels = spa.METHOD.assemble(ctx, out, root / "lang-wol")
    task, task_t, head = L.load(out)
    _, lang_t, _ = L.load(root / "lang-wol")
    expect = get_task("pos").build_model(ctx.model_dir, labels)
    params = dict(expect.named_parameters())
    with torch.no_grad():
        for name in task.layers:
            w = params[f"{name}.weight"].double()
            for t in (lang_t, task_t):
                w = w + t[f"{name}.B"].double() @ t[f"{name}.A"].double()
            params[f"{name}.weight"].copy_(w.float())
        for group, (_, size) in task.groups.items():
            off = ~task_t[f"{group}.keep"].repeat_interleave(size)
            gated, _, dead = L.group_linears(group)
            for name in gated:
                params[f"{name}.weight"][off] = 0
                params[f"{name}.bias"][off] = 0
            params[f"{dead}.weight"][:, off] = 0
        for name, value in head.items():
            params[name].copy_(value)
    got = dict(model.named_parameters())
    assert got.keys() == params.keys()
    assert max((got[n] - p).abs().max().item() for n, p in params.items()) <= 1e-6
    other, _ = spa.METHOD.assemble(ctx, out, root / "lang-mlt")
    with torch.no_grad():
        ids = torch.tensor([[2, 10, 11, 12, 3]])
        assert (model(input_ids=ids).logits - other(input_ids=ids).logits).abs().max() > 0
    with pytest.raises(CompsftError, match=r"spa_config\.json: field 'kind' is 'language'"):
        spa.METHOD.assemble(ctx, root / "lang-wol", None)


def test_assembled_model_evaluates(trained):
    from transformers import AutoTokenizer

    from compsft.tasks import get_task

    ctx, root = trained["ctx"], trained["root"]
    pos = get_task("pos")
    for name in VARIANTS:
        model, labels = get_method(name).assemble(ctx, trained["tasks"][name][0], root / "lang-wol")
        gold = pos.read(_conllu(root / "test.conllu", 6, 3))
        metrics, _ = pos.evaluate(model, AutoTokenizer.from_pretrained(ctx.model_dir), gold, labels)
        assert 0.0 <= metrics["accuracy"] <= 1.0
