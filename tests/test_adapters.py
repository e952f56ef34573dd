"""Adapter-family methods on tiny random-init models built in code (no shipped model, seconds each)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compsft.errors import CompsftError
from compsft.methods.adapters import (AdapterConfig, NICECoupling, Stack, add_adapter, load_adapter_files,
                                      save_adapter_files, set_active)
from compsft.methods.adapters.files import CONFIG_NAME, WEIGHTS_NAME
from compsft.methods.base import DEV_SELECTED, Budget, LanguageData, MethodContext, TaskData

from training_helpers import make_model_dir, tiny_config, write_text_corpus


def _randomise(module: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> None:
    """Non-trivial adapter weights (BERT init leaves biases at zero and weights tiny)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _config(kind="language", hidden=16, layers=2, **kw) -> AdapterConfig:
    extra = {"task": "pos"} if kind == "task" else {}
    return AdapterConfig(kind=kind, hidden_size=hidden, num_layers=layers, **{**extra, **kw})


# -- layers ----------------------------------------------------------------------------------------

def test_nice_inverse_is_exact():
    torch.manual_seed(0)
    nice = NICECoupling(hidden_size=17, reduction_factor=2)  # odd width: unequal halves
    _randomise(nice, scale=1.0)
    x = torch.randn(3, 5, 17, dtype=torch.float64)
    nice = nice.double()
    y = nice(x)
    assert (y - x).abs().max() > 0.1  # it does transform
    assert torch.allclose(nice.inverse(y), x, atol=1e-6, rtol=0)
    assert torch.allclose(nice(nice.inverse(x)), x, atol=1e-6, rtol=0)


def _tiny_tagger(layers=2):
    from transformers import BertForTokenClassification

    torch.manual_seed(0)
    return BertForTokenClassification(tiny_config(num_hidden_layers=layers, hidden_dropout_prob=0.0,
                                                  attention_probs_dropout_prob=0.0, num_labels=3)).eval()


def _expected_output(module, inter, x, adapters):
    """seq_bn by hand (adapters' Pfeiffer wiring): r = h; r = A(LN(r + x)) + r per adapter; LN(r + x)."""
    h = module.dropout(module.dense(inter))
    ln = module.LayerNorm
    r = h
    for a in adapters:
        r = a.adapter_up(a.adapter_down(ln(r + x))) + r
    return ln(r + x)


def test_stack_runs_adapters_in_order():
    model = _tiny_tagger()
    a = add_adapter(model, "a", _config(reduction_factor=2))
    b = add_adapter(model, "b", _config(kind="task", reduction_factor=1))
    _randomise(a, 1)
    _randomise(b, 2)
    block = model.bert.encoder.layer[0].output
    inter, x = torch.randn(2, 4, 32), torch.randn(2, 4, 16)
    with torch.no_grad():
        set_active(model, Stack("a", "b"))
        ab = block(inter, x)
        set_active(model, Stack("b", "a"))
        ba = block(inter, x)
        set_active(model, None)
        bare = block(inter, x)
        assert torch.allclose(ab, _expected_output(block, inter, x, [a.layers["0"], b.layers["0"]]), atol=1e-6)
        assert torch.allclose(ba, _expected_output(block, inter, x, [b.layers["0"], a.layers["0"]]), atol=1e-6)
        assert torch.allclose(bare, block.LayerNorm(block.dense(inter) + x), atol=1e-6)
    assert (ab - ba).abs().max() > 1e-3


def test_zero_adapter_is_identity_and_invertible_only_first():
    model = _tiny_tagger()
    ids = torch.randint(5, 60, (2, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    lang = add_adapter(model, "lang", _config(inv_adapter="nice"))
    task = add_adapter(model, "task", _config(kind="task", reduction_factor=1))
    for adapter in (lang, task):
        for layer in adapter.layers.values():
            torch.nn.init.zeros_(layer.adapter_up.weight)  # bottleneck adds nothing: the layer is unchanged
    _randomise(lang.invertible, 3)
    with torch.no_grad():
        set_active(model, "task")
        assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-6)
        set_active(model, Stack("lang", "task"))  # NICE of the first adapter transforms the embeddings
        assert (model(input_ids=ids).logits - before).abs().max() > 1e-3
        set_active(model, Stack("task", "lang"))  # ... and only of the first
        assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-6)


def test_mlm_inverse_runs_before_decoder():
    """With a zero bottleneck and no layers, NICE then its inverse before the decoder is the identity
    on the MLM logits of a model whose encoder is the identity: check the decoder hook instead, directly."""
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    lang = add_adapter(model, "lang", _config(inv_adapter="nice"))
    _randomise(lang.invertible, 4)
    set_active(model, "lang")
    seen = {}
    model.cls.predictions.decoder.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    transform_out = {}
    model.cls.predictions.transform.register_forward_hook(lambda m, a, o: transform_out.setdefault("y", o))
    with torch.no_grad():
        model(input_ids=torch.randint(5, 60, (1, 6)))
    # The hook order: ours ran first (registered first), so the decoder input is inv(transform output).
    assert torch.allclose(seen["x"], lang.invertible(transform_out["y"], rev=True), atol=1e-6)


# -- files -----------------------------------------------------------------------------------------

def test_adapter_file_round_trip(tmp_path):
    config = _config(inv_adapter="nice", leave_out=[1], language="mlt")
    model = _tiny_tagger()
    adapter = add_adapter(model, "lang", config)
    _randomise(adapter, 5)
    head = {"classifier.weight": torch.randn(3, 16)}
    save_adapter_files(tmp_path / "a", config, adapter.tensors(), head)
    loaded, tensors, loaded_head = load_adapter_files(tmp_path / "a")
    assert loaded == config
    assert set(tensors) == set(adapter.tensors()) and "layers.1.adapter_up.weight" not in tensors
    for k, v in adapter.tensors().items():
        assert torch.equal(tensors[k], v)
    assert torch.equal(loaded_head["classifier.weight"], head["classifier.weight"])
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave nothing behind


@pytest.mark.parametrize("edit, field", [
    (lambda c: c.update(kind="speech"), "kind"),
    (lambda c: c.pop("hidden_size"), "hidden_size"),
    (lambda c: c.update(reduction_factor=-1), "reduction_factor"),
    (lambda c: c.update(leave_out=[7]), "leave_out"),
    (lambda c: c.update(inv_adapter="glow"), "inv_adapter"),
    (lambda c: c.update(colour="blue"), "colour"),
    (lambda c: c.update(format_version=99), "format_version"),
])
def test_malformed_config_names_file_and_field(tmp_path, edit, field):
    config = _config(inv_adapter="nice")
    save_adapter_files(tmp_path, config, add_adapter(_tiny_tagger(), "x", config).tensors())
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    edit(data)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(CompsftError, match=rf"{CONFIG_NAME}.*{field}"):
        load_adapter_files(tmp_path)


def test_malformed_tensors_and_json_are_clear_errors(tmp_path):
    from safetensors.torch import save_file

    config = _config()
    tensors = add_adapter(_tiny_tagger(), "x", config).tensors()
    save_adapter_files(tmp_path, config, tensors)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CompsftError, match=f"{CONFIG_NAME}.*JSON"):
        load_adapter_files(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(config.to_json())
    bad = dict(tensors, **{"layers.0.adapter_up.weight": torch.zeros(16, 3)})
    save_file(bad, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(CompsftError, match=r"adapter\.safetensors.*layers\.0\.adapter_up\.weight.*shape"):
        load_adapter_files(tmp_path)
    bad = dict(tensors, **{"layers.0.adapter_up.bias": torch.full((16,), float("nan"))})
    save_file(bad, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(CompsftError, match="non-finite"):
        load_adapter_files(tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CompsftError, match="safetensors"):
        load_adapter_files(tmp_path)


# -- methods end to end on a tiny model -------------------------------------------------------------

CONLLU = """# text = {text}
{rows}
"""
UPOS = ["NOUN", "VERB", "DET", "ADJ"]


def _write_conllu(path: Path, n: int, seed: int) -> Path:
    import random

    rng = random.Random(seed)
    words = {"NOUN": ["dar", "kelb", "omm"], "VERB": ["ra", "kiel", "mar"], "DET": ["il", "l"],
             "ADJ": ["kbir", "sabiħ"]}
    blocks = []
    for _ in range(n):
        tags = [rng.choice(UPOS) for _ in range(rng.randint(3, 6))]
        toks = [rng.choice(words[t]) for t in tags]
        rows = "\n".join(f"{i + 1}\t{w}\t{w}\t{t}\t_\t_\t{0 if i == 0 else 1}\t{'root' if i == 0 else 'dep'}\t_\t_"
                         for i, (w, t) in enumerate(zip(toks, tags)))
        blocks.append(CONLLU.format(text=" ".join(toks), rows=rows))
    path.write_text("\n".join(blocks), encoding="utf-8")
    return path


def tiny_budget(**kw) -> Budget:
    base = dict(lang_steps=2, lang_epochs=None, lang_max_steps=None, lang_batch=4, lang_max_length=24,
                lang_lines=40, lang_lr=1e-3, task_steps=3, task_epochs=None, task_batch=4, task_max_length=32,
                task_lr=1e-3, train_sentences=None, dev_sentences=None)
    base.update(kw)
    return Budget(**base)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    model = make_model_dir(root / "model")
    return {
        "root": root, "model": model,
        "text_a": write_text_corpus(root / "a.txt", n=40, seed=1),
        "text_b": write_text_corpus(root / "b.txt", n=40, seed=2),
        "train": _write_conllu(root / "train.conllu", 24, 0),
        "dev": _write_conllu(root / "dev.conllu", 8, 1),
    }


def _ctx(world, tmp_path, **budget) -> MethodContext:
    return MethodContext(model_dir=world["model"], budget=tiny_budget(**budget), work_dir=tmp_path / "work")


@pytest.fixture(scope="module")
def madx_languages(tiny_world):
    """MAD-X language adapters for a source and a target language, trained once for the MAD-X tests."""
    from compsft.methods import madx

    root = tiny_world["root"] / "madx"
    ctx = _ctx(tiny_world, root)
    src = madx.METHOD.train_language(ctx, LanguageData("mlt", [tiny_world["text_a"]]), 0, root / "lang_src")
    madx.METHOD.train_language(ctx, LanguageData("wol", [tiny_world["text_b"]]), 0, root / "lang_tgt")
    return src, root / "lang_src", root / "lang_tgt"


@pytest.mark.parametrize("method_name", ["mad-x", "mad-x-2.0"])
def test_madx_train_language_task_assemble(tiny_world, madx_languages, tmp_path, method_name):
    from compsft.methods import madx
    from compsft.tasks import get_task

    spec = {"mad-x": madx.METHOD, "mad-x-2.0": madx.METHOD_2}[method_name]
    assert spec.language_key == "mad-x"  # the variants share mad-x's language adapters (trained once, below)
    ctx = _ctx(tiny_world, tmp_path, dev_checks=2)
    counts = spec.parameter_counts(ctx, "pos")
    src, lang_src, lang_tgt = madx_languages
    assert src.trainable == counts["language_trainable"]
    assert src.stored_bytes > 4 * counts["language_stored"]
    config, tensors, head = load_adapter_files(lang_src)
    assert config.kind == "language" and config.inv_adapter == "nice" and not head
    assert config.training["steps"] == 4  # one phase gets both phases' steps
    task = spec.train_task(ctx, TaskData("pos", tiny_world["train"], tiny_world["dev"]), lang_src, 0,
                           tmp_path / "task")
    n_labels = len(get_task("pos").label_list(get_task("pos").read(tiny_world["train"])))
    assert task.trainable == counts["task_trainable"] and counts["task_head"] == 16 * n_labels + n_labels  # hidden 16
    assert task.extra["dev_selected"]["step"] in (3, 6)  # 6 steps, 2 dev checks
    _, final, _ = load_adapter_files(tmp_path / "task")
    _, selected, _ = load_adapter_files(tmp_path / "task" / DEV_SELECTED)
    same = all(torch.equal(final[k], selected[k]) for k in final)
    assert same == (task.extra["dev_selected"]["step"] == 6)  # the weights of the selected step, not the last
    model, labels = spec.assemble(ctx, tmp_path / "task", lang_tgt)
    assert len(labels) == n_labels and set(UPOS) <= set(labels)
    pos = get_task("pos")
    sentences = pos.read(tiny_world["dev"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_world["model"])
    metrics, _ = pos.evaluate(model, tok, sentences, labels)
    assert 0.0 <= metrics["accuracy"] <= 1.0
    # The target language adapter is what is stacked under the task adapter: swapping it changes outputs.
    other, _ = spec.assemble(ctx, tmp_path / "task", lang_src)
    alone, _ = spec.assemble(ctx, tmp_path / "task", None)
    ids = torch.tensor([tok("dar kelb omm")["input_ids"]])
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (model, other, alone))
    assert (a - b).abs().max() > 0 and (a - c).abs().max() > 0
    if method_name == "mad-x-2.0":
        assert "1" not in model.compsft_adapters.adapters["lang"].layers
        assert counts["language_used"] < counts["language_trainable"]


def test_madx_task_adapter_leaves_base_frozen(tiny_world, madx_languages, tmp_path):
    """Only the task adapter and head move in task training: the source language adapter stays as loaded."""
    from compsft.methods import madx

    ctx = _ctx(tiny_world, tmp_path)
    lang = madx_languages[1]
    _, lang_before, _ = load_adapter_files(lang)
    captured = {}

    from transformers import TrainerCallback

    class Grab(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kw):
            captured["lang"] = {k: v.clone() for k, v in model.compsft_adapters.adapters["lang"].tensors().items()}
            captured["base"] = model.bert.embeddings.word_embeddings.weight.detach().clone()

    ctx.callbacks = [Grab()]
    madx.METHOD.train_task(ctx, TaskData("pos", tiny_world["train"]), lang, 0, tmp_path / "task")
    from transformers import AutoModelForMaskedLM

    base = AutoModelForMaskedLM.from_pretrained(tiny_world["model"]).bert.embeddings.word_embeddings.weight
    assert torch.equal(captured["base"], base)
    for k, v in lang_before.items():
        assert torch.equal(captured["lang"][k], v), k


# -- LoRA through peft ------------------------------------------------------------------------------

def test_lora_train_language_task_assemble(tiny_world, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForTokenClassification

    from compsft.methods import lora

    ctx = _ctx(tiny_world, tmp_path, dev_checks=2)
    counts = lora.METHOD.parameter_counts(ctx, "pos")
    src = lora.METHOD.train_language(ctx, LanguageData("mlt", [tiny_world["text_a"]]), 0, tmp_path / "lang_src")
    lora.METHOD.train_language(ctx, LanguageData("wol", [tiny_world["text_b"]]), 0, tmp_path / "lang_tgt")
    assert src.trainable == counts["language_trainable"] and src.extra["rank"] == counts["language_rank"]
    task = lora.METHOD.train_task(ctx, TaskData("pos", tiny_world["train"], tiny_world["dev"]), tmp_path / "lang_src",
                                  0, tmp_path / "task")
    assert task.extra["dev_selected"]["step"] in (3, 6)
    assert lora.read_side_config(tmp_path / "task" / DEV_SELECTED, "task")["labels"]
    n_labels = len(lora.read_side_config(tmp_path / "task", "task")["labels"])
    assert task.trainable == counts["task_trainable"] and counts["task_head"] == 16 * n_labels + n_labels
    model, labels = lora.METHOD.assemble(ctx, tmp_path / "task", tmp_path / "lang_tgt")
    assert len(labels) == n_labels
    # Composition is the merged sum: W = W0 + s·B_lang A_lang + s·B_task A_task on every adapted layer.
    base = AutoModelForTokenClassification.from_pretrained(tiny_world["model"], num_labels=n_labels)
    name = "bert.encoder.layer.1.intermediate.dense"
    expected = dict(base.named_parameters())[name + ".weight"].detach().clone()
    for part in ("lang_tgt", "task"):
        cfg = json.loads((tmp_path / part / "adapter_config.json").read_text())
        t = load_file(str(tmp_path / part / "adapter_model.safetensors"))
        a = next(v for k, v in t.items() if k.endswith(f"{name}.lora_A.weight"))
        b = next(v for k, v in t.items() if k.endswith(f"{name}.lora_B.weight"))
        expected += cfg["lora_alpha"] / cfg["r"] * (b @ a)
    got = dict(model.named_parameters())[name + ".weight"]
    assert torch.allclose(got, expected, atol=1e-6)
    assert not any("lora" in n for n, _ in model.named_parameters())  # merged: a plain model again
    other, _ = lora.METHOD.assemble(ctx, tmp_path / "task", tmp_path / "lang_src")
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    with torch.no_grad():
        assert (model(input_ids=ids).logits - other(input_ids=ids).logits).abs().max() > 0


def test_lora_merge_unmerge_restores_base_within_bound():
    """peft's merge then unmerge adds and subtracts ΔW in fp32: each weight comes back within
    2 ulp of max(|W|, |W + ΔW|) (rounding of one add and one subtract), and the merged model computes
    what the unmerged one (LoRA active beside the layer) computes."""
    from peft import get_peft_model

    from compsft.methods import lora

    model = _tiny_tagger()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_peft_model(model, lora._lora_config(4, lora.LoraSettings()))
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:  # B starts at zero; make ΔW non-trivial
            torch.nn.init.normal_(p, std=0.5)
    ids = torch.randint(5, 60, (2, 7))
    with torch.no_grad():
        active = peft_model(input_ids=ids).logits
        peft_model.merge_adapter()
        merged = peft_model(input_ids=ids).logits
        merged_w = {n.replace("base_model.model.", "").replace(".base_layer", ""): p.detach().clone()
                    for n, p in peft_model.named_parameters() if "lora_" not in n}
        peft_model.unmerge_adapter()
    assert torch.allclose(active, merged, atol=1e-5)
    changed = 0
    for n, p in peft_model.named_parameters():
        if "lora_" in n:
            continue
        key = n.replace("base_model.model.", "").replace(".base_layer", "")
        bound = 2 * torch.finfo(torch.float32).eps * torch.maximum(before[key].abs(), merged_w[key].abs())
        assert ((p.detach() - before[key]).abs() <= bound).all(), key
        changed += int(not torch.equal(merged_w[key], before[key]))
    assert changed == 2 * 6  # 6 adapted linears per layer, 2 layers: merging did change them


def test_lora_rank_matches_k():
    from compsft.methods import lora
    from compsft.training.params import eligible_parameters, resolve_k

    model = _tiny_tagger()
    rank, k = lora.rank_for_k(model, "task", density=0.05)
    per_rank = 2 * (4 * (16 + 16) + (16 + 32) + (32 + 16))  # q, k, v, attn-out; intermediate; output
    assert k == resolve_k(sum(p.numel() for p in eligible_parameters(model).values()), density=0.05)
    assert rank == max(1, round(k / per_rank))
    assert abs(rank * per_rank - k) <= per_rank / 2 or rank == 1


# -- Hydra ------------------------------------------------------------------------------------------

def _hydra_on_tiny(rank=3, seed=6):
    from compsft.methods import hydra

    model = _tiny_tagger()
    layers = {n: [m.in_features, m.out_features] for n, m in hydra.target_linears(model).items()}
    config = hydra.HydraConfig(kind="task", task="pos", labels=["A", "B", "C"], rank=rank, layers=layers, scale=0.7)
    bank = hydra.attach(model, config)
    _randomise(bank, seed, scale=0.3)
    return hydra, model, config, bank


def test_hydra_branches_follow_the_formula():
    hydra, model, config, bank = _hydra_on_tiny()
    name = "bert.encoder.layer.0.intermediate.dense"
    layer = dict(model.named_modules())[name]
    b = bank.branches[name.replace(".", "/")]
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        base = x @ layer.weight.T + layer.bias
        want = base + 0.7 * (x @ b.Ap.T @ b.Bp.T) + 0.7 * (base @ b.As.T @ b.Bs.T)
        assert torch.allclose(layer(x), want, atol=1e-6)


def test_hydra_merge_matches_hooks_and_unmerge_restores_within_bound():
    """Merged weights compute what the hooks compute (1e-5); unmerging by solving (I + s·Bs As) W0 = W − s·Bp Ap
    in float64 restores every base weight within 1e-5 (fp32 rounding of the merged weights, amplified by
    the condition number of I + s·Bs As, which is small at these scales)."""
    hydra, model, config, bank = _hydra_on_tiny()
    tensors = {f"{k.replace('/', '.')}.{p}": getattr(b, p).detach().clone()
               for k, b in bank.branches.items() for p in hydra.PARTS}
    with torch.no_grad():  # BERT's init leaves biases at zero, where the bias part of the merge is invisible
        for layer in hydra.target_linears(model).values():
            layer.bias.normal_(std=0.1)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith(hydra.BANK_ATTR)}
    ids = torch.randint(5, 60, (2, 7))
    with torch.no_grad():
        hooked = model(input_ids=ids).logits
        hydra.merge(model)
        assert not hasattr(model, hydra.BANK_ATTR)
        merged = model(input_ids=ids).logits
    assert torch.allclose(hooked, merged, atol=1e-5)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, base[n])]
    assert len(changed) == 2 * 6 * 2  # weight and bias of 6 linears in 2 layers
    hydra.unmerge(model, config, tensors)
    worst = max((p - base[n]).abs().max().item() for n, p in model.named_parameters())
    assert worst <= 1e-5


def test_hydra_train_language_task_assemble(tiny_world, tmp_path):
    from compsft.methods import hydra

    ctx = _ctx(tiny_world, tmp_path, dev_checks=1)
    counts = hydra.METHOD.parameter_counts(ctx, "pos")
    src = hydra.METHOD.train_language(ctx, LanguageData("mlt", [tiny_world["text_a"]]), 0, tmp_path / "lang_src")
    hydra.METHOD.train_language(ctx, LanguageData("wol", [tiny_world["text_b"]]), 0, tmp_path / "lang_tgt")
    assert src.trainable == counts["language_trainable"]
    task = hydra.METHOD.train_task(ctx, TaskData("pos", tiny_world["train"], tiny_world["dev"]),
                                   tmp_path / "lang_src", 0, tmp_path / "task")
    assert task.extra["dev_selected"]["step"] == 6  # one check: at the last step
    assert hydra.load(tmp_path / "task" / DEV_SELECTED)[0].labels
    config, _, head = hydra.load(tmp_path / "task")
    n = len(config.labels)
    assert task.trainable == counts["task_trainable"] and counts["task_head"] == 16 * n + n
    assert set(head) == {"classifier.weight", "classifier.bias"}
    model, labels = hydra.METHOD.assemble(ctx, tmp_path / "task", tmp_path / "lang_tgt")
    other, _ = hydra.METHOD.assemble(ctx, tmp_path / "task", tmp_path / "lang_src")
    assert labels == config.labels and not hasattr(model, hydra.BANK_ATTR)
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    with torch.no_grad():
        assert (model(input_ids=ids).logits - other(input_ids=ids).logits).abs().max() > 0
    (tmp_path / "task" / hydra.CONFIG_NAME).write_text('{"kind": "task", "rank": 0, "layers": {}}')
    with pytest.raises(CompsftError, match=r"hydra_config\.json.*rank"):
        hydra.load(tmp_path / "task")


# -- MoSA ------------------------------------------------------------------------------------------

def test_mosa_split_masks_partition_and_merge_is_dense():
    from compsft.methods.adapters import split

    model = _tiny_tagger()
    adapter = add_adapter(model, "a", _config(reduction_factor=2))
    _randomise(adapter, 7)
    dense = {k: v.clone() for k, v in adapter.tensors().items()}
    controller = split.SplitController(3, seed=0)
    names = split.split(adapter, controller, seed=0)
    assert len(names) == 2 * 2  # down and up of 2 layers
    layer = adapter.layers["0"].adapter_up
    seen = torch.zeros_like(dense["layers.0.adapter_up.weight"])
    adapter.train()
    for i in range(3):
        controller.active = i
        assert torch.equal(layer.weight, dense["layers.0.adapter_up.weight"])  # the forward sees all of W
        layer.parametrizations.weight.original.grad = None
        layer.weight.sum().backward()  # d/dW of sum(W) is 1 wherever the gradient is let through
        grad = layer.parametrizations.weight.original.grad
        assert torch.all((grad == 0) | (grad == 1))
        seen += grad
    assert torch.equal(seen, torch.ones_like(seen))  # disjoint and covering: every entry in exactly one
    draws = {controller.draw(step) for step in range(20)}
    assert draws == {0, 1, 2} and controller.draw(5) == controller.draw(5)  # random, reproducible per step
    split.merge(adapter, controller)
    for k, v in adapter.tensors().items():  # back to plain parameters, values unchanged
        assert torch.equal(v, dense[k]), k


def test_mosa_trains_the_model_it_merges():
    """While a sub-module is active the adapter computes what the merged adapter computes; only the gradient
    is sparse. (A forward through the active sub-module's entries alone trained sub-modules whose merge
    predicted one tag for every token on the default model.)"""
    from compsft.methods.adapters import split

    for shared in (None, "down"):
        model = _tiny_tagger()
        adapter = add_adapter(model, "a", _config(reduction_factor=2))
        _randomise(adapter, 7)
        layer = adapter.layers["0"]
        g = torch.Generator().manual_seed(1)
        x, residual = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
        adapter.eval()
        merged = layer(x, residual).detach()
        controller = split.SplitController(4, seed=0)
        split.split(adapter, controller, seed=0, shared=shared)
        adapter.train()
        for i in range(4):
            controller.active = i
            torch.testing.assert_close(layer(x, residual), merged, rtol=0, atol=0)


def test_mosa_train_language_task_assemble(tiny_world, tmp_path):
    from compsft.methods import mosa

    from transformers import TrainerCallback

    ctx = _ctx(tiny_world, tmp_path)
    counts = mosa.METHOD.parameter_counts(ctx, "pos")
    seen = {}

    def raw_weight(model):  # the stored (dense) weight, not the masked view the forward pass sees
        return model.compsft_adapters.adapters["lang"].layers["0"].adapter_down[0].parametrizations.weight.original

    class FirstStep(TrainerCallback):  # Adam's first step moves only entries with a gradient: one sub-module
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen["before"] = raw_weight(model).detach().clone()

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 1:
                seen["moved"] = (raw_weight(model).detach() != seen["before"]).float().mean().item()

    ctx.callbacks = [FirstStep()]
    info = mosa.METHOD.train_language(ctx, LanguageData("mlt", [tiny_world["text_a"]]), 0, tmp_path / "lang")
    assert info.trainable == counts["language_trainable"]
    assert 0.1 < seen["moved"] < 0.4  # about 1 / N_SPLITS of the entries
    ctx.callbacks = []
    mosa.METHOD.train_task(ctx, TaskData("pos", tiny_world["train"]), tmp_path / "lang", 0, tmp_path / "task")
    config, tensors, _ = load_adapter_files(tmp_path / "task")  # merged: the ordinary dense adapter format
    assert config.training["mosa_splits"] == mosa.N_SPLITS
    assert all((t != 0).float().mean() > 0.9 for k, t in tensors.items() if k.endswith("down.0.weight"))
    model, _ = mosa.METHOD.assemble(ctx, tmp_path / "task", tmp_path / "lang")
    assert not any("parametrizations" in n for n, _ in model.named_parameters())


# -- MoSA, hierarchical sparse strategy (mosa-hier): the down projection shared and dense, the up projection split

def _parametrized(module) -> bool:
    from torch.nn.utils import parametrize

    return parametrize.is_parametrized(module, "weight")


def _hier_split(seed=0, n=4, shared="down"):
    from compsft.methods.adapters import split

    model = _tiny_tagger()
    adapter = add_adapter(model, "a", _config(reduction_factor=2))  # per layer: down 8 × 16, up 16 × 8
    _randomise(adapter, 7)  # no exact zeros: a zero in the masked view means "not in this sub-module"
    dense = {k: v.clone() for k, v in adapter.tensors().items()}
    controller = split.SplitController(n, seed=seed)
    names = split.split(adapter, controller, seed=seed, shared=shared)
    return adapter, controller, dense, names


def test_mosa_hier_masks_partition_every_level_and_merge_is_dense():
    from compsft.methods.adapters import split

    adapter, controller, dense, names = _hier_split(n=4)
    assert names == ["layers.0.adapter_up.weight", "layers.1.adapter_up.weight"]  # only the up projections split
    adapter.train()
    for layer in ("0", "1"):
        up, down = adapter.layers[layer].adapter_up, adapter.layers[layer].adapter_down[0]
        dense_up = dense[f"layers.{layer}.adapter_up.weight"]
        dense_down = dense[f"layers.{layer}.adapter_down.0.weight"]
        seen = torch.zeros_like(dense_up)
        for i in range(4):
            controller.active = i
            assert torch.equal(up.weight, dense_up)  # the forward sees all of W
            up.parametrizations.weight.original.grad = None
            up.weight.sum().backward()
            grad = up.parametrizations.weight.original.grad  # 1 on sub-module i's entries, 0 elsewhere
            assert torch.all((grad == 0) | (grad == 1)) and grad.any()  # a subset of W's entries, not empty
            seen += grad
            # the shared level: one part, every entry, whichever sub-module is active
            assert not _parametrized(down) and torch.equal(down.weight, dense_down)
        assert torch.equal(seen, torch.ones_like(seen))  # disjoint and covering: every entry in exactly one
    split.merge(adapter, controller)
    assert controller.active is None
    for module in adapter.modules():
        assert not _parametrized(module)
    for k, v in adapter.tensors().items():  # back to plain parameters, values unchanged
        assert torch.equal(v, dense[k]), k
    with pytest.raises(ValueError, match="down or the up"):
        split.split(adapter, controller, seed=0, shared="middle")


def test_mosa_hier_gradient_reaches_only_the_active_sub_module_and_the_shared_projection():
    adapter, controller, dense, _ = _hier_split(n=4)
    adapter.train()
    layer = adapter.layers["0"]
    g = torch.Generator().manual_seed(1)
    x, residual = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    controller.active = 2
    layer(x, residual).pow(2).sum().backward()
    up = layer.adapter_up.parametrizations.weight
    owner, grad = up[0].owner, up.original.grad
    assert torch.all(grad[owner != 2] == 0)  # entries of the other sub-modules: no gradient
    assert (grad[owner == 2] != 0).float().mean() > 0.9
    # The shared down projection trains at every step: a gradient on (nearly) every entry, where the flat
    # strategy would give one on about a quarter of them.
    assert (layer.adapter_down[0].weight.grad != 0).float().mean() > 0.75


def test_mosa_hier_partition_and_draws_are_reproducible_from_seed_and_step():
    from types import SimpleNamespace

    from compsft.methods.adapters import split

    def owners(adapter):
        return [m.parametrizations.weight[0].owner for m in adapter.modules() if _parametrized(m)]

    first, again, other = _hier_split(seed=3)[0], _hier_split(seed=3)[0], _hier_split(seed=4)[0]
    assert all(torch.equal(a, b) for a, b in zip(owners(first), owners(again), strict=True))  # a resumed run's split
    assert not all(torch.equal(a, b) for a, b in zip(owners(first), owners(other), strict=True))
    a, b = split.SplitController(4, seed=3), split.SplitController(4, seed=3)
    draws = [a.draw(step) for step in range(40)]
    assert draws == [b.draw(step) for step in range(40)] and set(draws) == {0, 1, 2, 3}
    assert draws != [split.SplitController(4, seed=4).draw(step) for step in range(40)]
    # Resuming at step 17: the callback draws from the global step, so the same sub-modules as the first run.
    resumed = split.SplitController(4, seed=3)
    callback, active = split.DrawSubModule(resumed), []
    for step in range(17, 40):
        callback.on_step_begin(None, SimpleNamespace(global_step=step), None)
        active.append(resumed.active)
    assert active == draws[17:]


def test_mosa_hier_train_language_task_assemble(tiny_world, tmp_path):
    from dataclasses import replace

    from transformers import TrainerCallback

    from compsft.methods import get_method, mosa
    from compsft.methods.adapters.recipes import _mosa_training_facts
    from compsft.methods.madx import SETTINGS

    spec = get_method("mosa-hier")
    assert spec is mosa.METHOD_HIER and spec.language_key == "mosa-hier"  # its own language adapters
    ctx = _ctx(tiny_world, tmp_path)
    counts = spec.parameter_counts(ctx, "pos")
    assert counts == mosa.METHOD.parameter_counts(ctx, "pos")  # the same adapters as flat MoSA
    seen = {}

    def weights(model):  # the stored (dense) weights, never the masked view the forward pass sees
        layer = model.compsft_adapters.adapters["lang"].layers["0"]
        return [m.parametrizations.weight.original if _parametrized(m) else m.weight
                for m in (layer.adapter_down[0], layer.adapter_up)]

    class FirstStep(TrainerCallback):  # Adam's first step moves every entry that had a gradient
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen["before"] = [w.detach().clone() for w in weights(model)]

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 1:
                moved = [(w.detach() != b).float().mean().item() for w, b in zip(weights(model), seen["before"])]
                seen["moved"] = moved

    ctx.callbacks = [FirstStep()]
    info = spec.train_language(ctx, LanguageData("mlt", [tiny_world["text_a"]]), 0, tmp_path / "lang")
    assert info.trainable == counts["language_trainable"]
    down_moved, up_moved = seen["moved"]
    assert down_moved > 0.9  # shared: trained at every step
    assert 0.1 < up_moved < 0.4  # split: about 1 / N_SPLITS of the entries
    ctx.callbacks = []
    spec.train_task(ctx, TaskData("pos", tiny_world["train"]), tmp_path / "lang", 0, tmp_path / "task")
    config, tensors, _ = load_adapter_files(tmp_path / "task")  # merged: the ordinary dense adapter format
    assert config.training["mosa_splits"] == mosa.N_SPLITS and config.training["mosa_shared"] == "down"
    assert load_adapter_files(tmp_path / "lang")[0].training["mosa_shared"] == "down"
    assert all((t != 0).float().mean() > 0.9 for k, t in tensors.items() if k.endswith("adapter_up.weight"))
    model, _ = spec.assemble(ctx, tmp_path / "task", tmp_path / "lang")
    assert not any("parametrizations" in n for n, _ in model.named_parameters())
    # Flat MoSA's files keep exactly the keys they had: no mosa_shared entry.
    assert _mosa_training_facts(replace(SETTINGS, mosa_splits=4)) == {"mosa_splits": 4}


def test_mosa_shared_without_splits_is_refused(tiny_world, tmp_path):
    from dataclasses import replace

    from compsft.methods.madx import SETTINGS, make_method

    spec = make_method("mosa-bad", replace(SETTINGS, mosa_shared="down"), "shared but nothing split")
    with pytest.raises(CompsftError, match="mosa_splits >= 2"):
        spec.train_language(_ctx(tiny_world, tmp_path), LanguageData("mlt", [tiny_world["text_a"]]), 0,
                            tmp_path / "lang")


def test_shira_is_sparse_at_k_and_merges(tiny_world, tmp_path):
    from transformers import AutoModelForTokenClassification

    from compsft.methods import lora

    spec = lora.METHOD_SHIRA
    ctx = _ctx(tiny_world, tmp_path)
    counts = spec.parameter_counts(ctx, "pos")
    spec.train_language(ctx, LanguageData("mlt", [tiny_world["text_a"]]), 0, tmp_path / "lang")
    task = spec.train_task(ctx, TaskData("pos", tiny_world["train"]), tmp_path / "lang", 0, tmp_path / "task")
    n_labels = len(lora.read_side_config(tmp_path / "task", "task")["labels"])
    assert task.trainable == counts["task_trainable"] and counts["task_head"] == 16 * n_labels + n_labels
    model, _ = spec.assemble(ctx, tmp_path / "task", None)  # θ0 + the task module alone
    base = AutoModelForTokenClassification.from_pretrained(tiny_world["model"], num_labels=n_labels)
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    moved = (dict(model.named_parameters())[name] != dict(base.named_parameters())[name]).sum().item()
    assert 0 < moved <= counts["task_rank"] * (16 + 32) < 16 * 32  # at most r·(in + out) entries: sparse


def test_dev_selection_save_writes_the_best_state_and_puts_the_final_one_back(tmp_path):
    """`save(out, write)` swaps the best tensors in for the call only: whatever the method writes or
    evaluates afterwards sees the trained (final) state."""
    from compsft.methods.adapters.recipes import DevSelection
    from compsft.training.dev_selection import DevSelection as Core

    w = torch.nn.Parameter(torch.zeros(3))
    scores = iter([0.9, 0.1])
    core = Core(lambda model: next(scores), 2, snapshot=lambda model: {"w": w.detach().clone()})
    selection = DevSelection(core, {"w": w})

    class State:
        max_steps, is_world_process_zero, global_step = 2, True, 0

    core.on_train_begin(None, State, None, model=object())
    for step, value in ((1, 1.0), (2, 2.0)):
        with torch.no_grad():
            w.fill_(value)
        State.global_step = step
        core.on_step_end(None, State, None, model=object())
    written = {}
    summary = selection.save(tmp_path, lambda d: written.setdefault(d, w.detach().clone()))
    assert summary["step"] == 1 and torch.equal(written[tmp_path / DEV_SELECTED], torch.ones(3))
    assert torch.equal(w.detach(), torch.full((3,), 2.0))  # the final state is back
