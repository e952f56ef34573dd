"""Mixed precision on the CPU (bf16 autocast): what a GPU run will do, proven before a GPU exists.

The forward and backward passes run in bf16 while every value LT-SFT computes stays fp32: θ0, the
selection scores |θ1 − θ0|, the L1 term, the phase-2 values and the reset to θ0.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import compsft
from compsft.errors import CompsftError
from compsft.training import SftArguments, SparseFineTuner
from compsft.training import trainer as trainer_module
from compsft.training.precision import autocast, check_precision, resolve_precision, use_precision

from training_helpers import ToyTagging, first_sentences, make_model_dir, tiny_config, training_args, write_text_corpus


def _tagger():
    from transformers import BertForTokenClassification

    torch.manual_seed(0)
    return BertForTokenClassification(tiny_config(num_labels=3))


class _Spy:
    """Records the dtype of one Linear's output in training forwards, and what selection and L1 are given."""

    def __init__(self, model, monkeypatch):
        self.forward, self.selection, self.l1 = set(), [], []
        layer = model.bert.encoder.layer[0].attention.self.query
        layer.register_forward_hook(lambda m, i, o: self.forward.add(o.dtype) if m.training else None)
        real_strategy, real_l1 = trainer_module.get_mask_strategy, trainer_module.l1_distance

        def strategy(name):
            s = real_strategy(name)

            def fn(theta0, theta1, k, **kw):
                self.selection.append(({n: t.clone() for n, t in theta0.items()},
                                       {n: t.clone() for n, t in theta1.items()}))
                return s.fn(theta0, theta1, k, **kw)
            return dataclasses.replace(s, fn=fn)

        def l1(pairs):
            pairs = list(pairs)
            self.l1.append({(t.dtype, None if t0 is None else t0.dtype) for t, t0 in pairs})
            out = real_l1(pairs)
            self.l1[-1].add(("term", out.dtype))
            return out

        monkeypatch.setattr(trainer_module, "get_mask_strategy", strategy)
        monkeypatch.setattr(trainer_module, "l1_distance", l1)


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """One LT-SFT run of a tiny tagger under bf16 autocast, with an L1 pull, spied on."""
    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("bf16")
    model = _tagger()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    spy = _Spy(model, mp)
    args = training_args(tmp / "work", bf16=True, max_steps=4, logging_steps=100)
    tuner = SparseFineTuner(model=model, args=args, train_dataset=ToyTagging(n=32),
                            sft_args=SftArguments(k=300, full_ft_max_steps=4, sparse_ft_max_steps=4,
                                                  full_l1_reg=0.5, sparse_l1_reg=0.5))
    tuner.train()
    mp.undo()
    yield {"tuner": tuner, "model": model, "before": before, "spy": spy, "tmp": tmp}


def test_forward_runs_in_bf16_over_fp32_master_weights(bf16_run):
    assert bf16_run["spy"].forward == {torch.bfloat16}  # autocast was on in every training forward
    assert all(p.dtype == torch.float32 for p in bf16_run["model"].parameters())
    assert bf16_run["tuner"].sft.config.training["precision"] == "bf16"


def test_selection_is_the_top_k_of_fp32_differences(bf16_run):
    (theta0, theta1), = bf16_run["spy"].selection
    assert {t.dtype for t in [*theta0.values(), *theta1.values()]} == {torch.float32}
    names = list(theta0)
    scores = torch.cat([(theta1[n] - theta0[n]).reshape(-1).abs() for n in names])
    k = bf16_run["tuner"].k
    want = set(scores.topk(k).indices.tolist())
    assert scores.topk(k + 1).values[-1] < scores.topk(k).values[-1]  # no tie at the threshold
    sft, offset, got = bf16_run["tuner"].sft, 0, set()
    for n in names:
        if n in sft.diffs:
            got.update((sft.diffs[n].indices.long() + offset).tolist())
        offset += theta0[n].numel()
    assert got == want


def test_l1_is_computed_in_fp32(bf16_run):
    seen = set().union(*bf16_run["spy"].l1)
    assert seen == {(torch.float32, torch.float32), (torch.float32, None), ("term", torch.float32)}


def test_values_are_fp32_and_reset_to_theta0_is_exact(bf16_run):
    tuner, model, before = bf16_run["tuner"], bf16_run["model"], bf16_run["before"]
    assert {d.values.dtype for d in tuner.sft.diffs.values()} == {torch.float32}
    assert tuner.sft.k == tuner.k
    compsft.revert(model)  # the trainer leaves θ0 + φ applied
    for n, p in model.named_parameters():
        if n in tuner._eligible_names:
            assert torch.equal(p, before[n]), n  # bit for bit
    # ... and the values the SFT holds are what training moved the masked entries by.
    handle = compsft.apply(model, tuner.sft)
    params = dict(model.named_parameters())
    for n, d in tuner.sft.diffs.items():
        moved = params[n].detach().reshape(-1)[d.indices.long()] - before[n].reshape(-1)[d.indices.long()]
        assert torch.allclose(moved, d.values, atol=1e-6), n
    compsft.revert(model, handle)


@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_values_saved_in_the_requested_dtype(bf16_run, name, dtype):
    from compsft.training.precision import save_dtype

    sft = bf16_run["tuner"].sft
    out = bf16_run["tmp"] / f"sft-{name}"
    sft.save(out, dtype=save_dtype(name))
    loaded = compsft.load(out)
    for n, d in sft.diffs.items():
        assert loaded.diffs[n].values.dtype == dtype
        assert torch.equal(loaded.diffs[n].values, d.values.to(dtype)), n


def test_a_half_type_model_is_refused_under_mixed_precision(tmp_path):
    model = _tagger().to(torch.bfloat16)
    with pytest.raises(CompsftError, match="fp32 master weights"):
        SparseFineTuner(model=model, args=training_args(tmp_path, bf16=True, max_steps=1),
                        train_dataset=ToyTagging(n=8), sft_args=SftArguments(k=10))


def test_precision_checks():
    assert resolve_precision() == "fp32" and resolve_precision(bf16=True) == "bf16"
    with use_precision("bf16"):
        assert resolve_precision() == "bf16" and resolve_precision("fp32") == "fp32"
    assert resolve_precision() == "fp32"
    for bad, match in [(lambda: check_precision("fp16", "cpu"), "needs a CUDA device"),
                       (lambda: check_precision("fp8"), "unknown precision"),
                       (lambda: resolve_precision(bf16=True, fp16=True), "exclude each other"),
                       (lambda: use_precision("half").__enter__(), "unknown precision")]:
        with pytest.raises(CompsftError, match=match):
            bad()
    with autocast("bf16", "cpu"):
        assert torch.nn.Linear(4, 4)(torch.ones(1, 4)).dtype == torch.bfloat16
    with autocast("fp32", "cpu"):
        assert torch.nn.Linear(4, 4)(torch.ones(1, 4)).dtype == torch.float32


# -- the commands and the methods ------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16cli")
    return {"root": root, "model": make_model_dir(root / "model"),
            "train": first_sentences("ud:en_ewt:train", 16, root / "train.conllu"),
            "dev": first_sentences("ud:en_ewt:dev", 6, root / "dev.conllu"),
            "text": write_text_corpus(root / "eng.txt", n=40, seed=1)}


def _cli(*args):
    from typer.testing import CliRunner

    from compsft.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_train_task_and_full_cli_under_bf16(world):
    root = world["root"]
    steps = ["--phase1-max-steps", "2", "--phase2-max-steps", "2", "--max-length", "32", "--cpu", "--save-steps", "0"]
    r = _cli("train-task", "--task", "pos", "--model", world["model"], "--train", world["train"], "--dev", world["dev"],
             "--density", "0.01", "--out", root / "pos", "--bf16", "--save-dtype", "bf16", *steps)
    assert r.exit_code == 0, r.output
    sft = compsft.load(root / "pos")
    assert sft.config.training["precision"] == "bf16" and "accuracy" in sft.config.training["dev"]["metrics"]
    assert {d.values.dtype for d in sft.diffs.values()} == {torch.bfloat16}
    r = _cli("train-full", "--task", "pos", "--model", world["model"], "--train", world["train"], "--dev", world["dev"],
             "--steps", "2", "--max-length", "32", "--cpu", "--save-steps", "0", "--bf16", "--out", root / "full")
    assert r.exit_code == 0, r.output
    from compsft.training import load_full_ft

    assert load_full_ft(root / "full")[2]["precision"] == "bf16"
    for bad, match in [(["--fp16"], "needs a CUDA device"), (["--bf16", "--fp16"], "exclude each other"),
                       (["--save-dtype", "fp8"], "unknown save dtype")]:
        r = _cli("train-task", "--task", "pos", "--model", world["model"], "--train", world["train"],
                 "--out", root / "bad", *steps, *bad)
        # CliRunner hands the CompsftError back; `compsft` prints it as one line and exits 2.
        assert isinstance(r.exception, CompsftError) and match in str(r.exception), r.output
        assert not (root / "bad.work").exists()  # refused before any work


def test_language_sft_cli_under_bf16(world):
    r = _cli("train-language", "--model", world["model"], "--lang", "eng", "--text", world["text"], "--density", "0.01",
             "--phase1-min-steps", "0", "--phase1-max-steps", "2", "--phase2-min-steps", "0", "--phase2-max-steps", "2",
             "--max-length", "32", "--cpu", "--save-steps", "0", "--bf16", "--out", world["root"] / "eng")
    assert r.exit_code == 0, r.output
    assert compsft.load(world["root"] / "eng").config.training["precision"] == "bf16"


@pytest.mark.parametrize("method", ["lora", "full-ft"])
def test_compare_methods_train_under_use_precision(world, method, monkeypatch):
    """The methods of `compare` take the precision from `use_precision` (adapters build their own
    TrainingArguments; LT-SFT and full fine-tuning go through the recipes)."""
    import transformers

    from compsft.methods import Budget, MethodContext, TaskData, get_method

    seen = []
    real = transformers.Trainer.train

    def train(self, *a, **kw):
        seen.append(self.args.bf16)
        return real(self, *a, **kw)

    monkeypatch.setattr(transformers.Trainer, "train", train)
    budget = Budget(lang_steps=1, lang_epochs=None, lang_max_steps=None, lang_batch=4, lang_max_length=24,
                    lang_lines=20, lang_lr=1e-3, task_steps=1, task_epochs=None, task_batch=4, task_max_length=32,
                    task_lr=1e-3, train_sentences=None, dev_sentences=None)
    ctx = MethodContext(model_dir=world["model"], budget=budget, device="cpu")
    with use_precision("bf16"):
        get_method(method).train_task(ctx, TaskData("pos", world["train"]), None, 0, world["root"] / f"m-{method}")
    assert seen and all(seen)
