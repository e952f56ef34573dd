"""The parts of LT-SFT that a broken method would get wrong, each checked on a tiny random model:
the L1 pull (reference rule, accumulation, clipping, strength), the reset to θ0 before phase 2, and
the mask chosen from |θ1 − θ0|."""
from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from compsft.training import SftArguments, SparseFineTuner

from training_helpers import ToyTagging, tiny_config, training_args


def tagger(seed=0, dropout=0.1):
    from transformers import BertForTokenClassification

    torch.manual_seed(seed)
    return BertForTokenClassification(tiny_config(num_labels=3, hidden_dropout_prob=dropout,
                                                  attention_probs_dropout_prob=dropout))


def mlm_model(seed=0, dropout=0.1):
    from transformers import BertForMaskedLM

    torch.manual_seed(seed)
    return BertForMaskedLM(tiny_config(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout))


class ToyMlm(ToyTagging):
    """Every third position is a prediction target; the MLM loss is normalised over the whole step."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        labels = item["input_ids"].clone()
        labels[(torch.arange(labels.numel()) + i) % 3 != 0] = -100
        return {**item, "labels": labels}


MODELS = {"tagger": (tagger, ToyTagging), "mlm": (mlm_model, ToyMlm)}


class Spy(TrainerCallback):
    """Calls `fn(tuner, state)` at an event of one phase."""

    def __init__(self, event, phase, fn):
        self.event, self.phase, self.fn, self.tuner = event, phase, fn, None

    def _maybe(self, event, state):
        if event == self.event and self.tuner._phase == self.phase:
            self.fn(self.tuner, state)

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self._maybe("pre_optimizer_step", state)

    def on_step_begin(self, args, state, control, **kw):
        self._maybe("step_begin", state)

    def on_train_end(self, args, state, control, **kw):
        self._maybe("train_end", state)


def make_tuner(tmp_path, model, spies=(), args_kw=None, data=ToyTagging, **sft_kw):
    sft_args = SftArguments(**{"k": 300, "full_ft_max_steps": 6, "sparse_ft_max_steps": 6, **sft_kw})
    args = training_args(tmp_path / "work", **(args_kw or {}))
    tuner = SparseFineTuner(model=model, args=args, train_dataset=data(), sft_args=sft_args,
                            callbacks=list(spies))
    for spy in spies:
        spy.tuner = tuner
    return tuner


# -- L1 ------------------------------------------------------------------------------------------

def _first_step_grads(tmp_path, l1, batch, accumulation, max_grad_norm=0.0, kind="tagger"):
    """Phase-1 gradients at the first optimizer step, with θ moved away from θ0 so sign(θ − θ0) ≠ 0."""
    grads = {}

    def grab(tuner, state):
        if state.global_step == 0:
            grads.update({n: p.grad.detach().clone() for n, p in tuner.model.named_parameters()
                          if p.grad is not None})

    build, data = MODELS[kind]
    model = build(dropout=0.0)
    spy = Spy("pre_optimizer_step", 1, grab)
    tuner = make_tuner(tmp_path / f"l1-{l1}-{accumulation}", model, [spy], data=data, full_l1_reg=l1, sparse_l1_reg=l1,
                       full_ft_max_steps=1, sparse_ft_max_steps=1,
                       args_kw=dict(per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                                    max_grad_norm=max_grad_norm))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # θ0 was taken when the tuner was built; move θ off it
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 1e-3)
    theta0 = {**tuner._theta0, **tuner._heads0}
    signs = {n: torch.sign(p.detach() - theta0[n]) for n, p in model.named_parameters() if n in theta0}
    tuner.train()
    return tuner, grads, signs


@pytest.mark.parametrize("kind, batch, accumulation", [("tagger", 8, 1), ("tagger", 4, 2), ("mlm", 4, 2)])
def test_l1_gradient_is_the_reference_formula(tmp_path, kind, batch, accumulation):
    """∇ of l1 · Σ|θ − θ0| / N (N = all parameters as given, tied embeddings once) on top of the loss's
    gradient, once per optimizer step also with gradient accumulation (the tagger's loss is a mean per
    micro-batch, the MLM's a share of the step's sum); heads included, frozen LayerNorms not."""
    l1 = 50.0
    tuner, with_l1, signs = _first_step_grads(tmp_path, l1, batch, accumulation, kind=kind)
    _, without, _ = _first_step_grads(tmp_path / "off", 0.0, batch, accumulation, kind=kind)
    n_all = sum(p.numel() for p in MODELS[kind][0]().parameters())
    assert tuner.l1_normaliser == n_all
    head = "classifier.weight" if kind == "tagger" else "cls.predictions.transform.dense.weight"
    assert set(with_l1) == set(signs) and head in with_l1
    assert not any("LayerNorm" in n for n in with_l1 if n.startswith("bert."))
    for name, grad in with_l1.items():
        expected = without[name] + l1 * signs[name] / n_all
        assert torch.allclose(grad, expected, rtol=1e-5, atol=1e-7), name
    assert tuner.sft.config.training["l1_normaliser"] == n_all


def test_l1_gradient_is_clipped_with_the_loss(tmp_path):
    """The L1 term is part of the loss: after clipping, the whole gradient has the clipped norm."""
    _, grads, _ = _first_step_grads(tmp_path, 500.0, 8, 1, max_grad_norm=0.01)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
    assert float(norm) == pytest.approx(0.01, rel=1e-3)


def test_larger_l1_gives_a_smaller_difference(tmp_path):
    sizes = {}
    for l1 in (0.0, 300.0):
        tuner = make_tuner(tmp_path / str(l1), tagger(), full_l1_reg=l1, sparse_l1_reg=l1,
                           full_ft_max_steps=4, sparse_ft_max_steps=4, args_kw=dict(weight_decay=0.0))
        tuner.train()
        sizes[l1] = sum(float(d.values.abs().sum()) for d in tuner.sft.diffs.values())
        logged = [h["l1_reg_loss"] for h in tuner.state.log_history if "l1_reg_loss" in h]
        assert bool(logged) == (l1 > 0)
    assert 0 < sizes[300.0] < 0.5 * sizes[0.0], sizes


# -- reset and selection ---------------------------------------------------------------------------

def test_phase2_starts_from_theta0(tmp_path):
    """Before phase 2 every weight (heads too) is back at θ0, bit for bit: LT-SFT retrains the mask
    from the pretrained values, not from θ1."""
    model = tagger()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = {}

    def grab(tuner, state):
        if state.global_step == 0:
            for name in start:
                module_name, _, attr = name.rpartition(".")
                seen[name] = getattr(tuner.model.get_submodule(module_name), attr).detach().clone()

    tuner = make_tuner(tmp_path, model, [Spy("step_begin", 2, grab)])
    tuner.train()
    assert set(seen) == set(start)
    for name, value in seen.items():
        assert torch.equal(value, start[name]), name


def test_mask_is_the_top_k_of_the_phase1_difference(tmp_path):
    """The lottery ticket: the K entries that moved most in phase 1, |θ1 − θ0|, exactly."""
    model = tagger()
    theta1 = {}

    def grab(tuner, state):
        theta1.update({n: p.detach().clone() for n, p in tuner._named(tuner._eligible_names).items()})

    tuner = make_tuner(tmp_path, model, [Spy("train_end", 1, grab)], args_kw=dict(weight_decay=0.1))
    tuner.train()
    names = tuner._eligible_names
    scores = torch.cat([(theta1[n] - tuner._theta0[n]).abs().reshape(-1) for n in names])
    top = torch.sort(-scores, stable=True).indices[:300]
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    chosen[top] = True
    got = torch.cat([torch.zeros(tuner._theta0[n].numel(), dtype=torch.bool).index_fill_(0, tuner.masks[n], True)
                     for n in names])
    assert int(got.sum()) == 300 and torch.equal(got, chosen)
    # Not trivially so: the entries largest in |θ0| (a magnitude mask) are another set.
    magnitude = torch.cat([tuner._theta0[n].abs().reshape(-1) for n in names])
    assert not torch.equal(got, torch.zeros_like(got).index_fill_(0, torch.sort(-magnitude).indices[:300], True))
