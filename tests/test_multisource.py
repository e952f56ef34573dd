"""Multi-source task training (issue 27): each batch sees exactly its own source's SFT, the stored
weights never hold one, upsampling, resume after SIGKILL and the CLI forms."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset
from transformers import TrainerCallback

import compsft
from compsft.errors import CompsftError
from compsft.merge import base_fingerprint
from compsft.sft import SftConfig, SparseDelta, SparseFineTuning
from compsft.training.arguments import SftArguments
from compsft.training.multisource import (MultiSourceBatchSampler, MultiSourceDataset, MultiSourceFineTuner,
                                          SourceShift, TaskSource, check_sources)

from training_helpers import VOCAB, make_model_dir, tiny_config, training_args

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TENSOR = "bert.encoder.layer.0.intermediate.dense.weight"   # 32 x 16: where the test sources write
MARK = {"a": 10.0, "b": -10.0}                                # far outside any trained weight: a fingerprint
POSITIONS = {"a": torch.tensor([3, 40, 77, 200]), "b": torch.tensor([5, 41, 300, 511])}
ID_RANGE = {"a": (5, 25), "b": (25, 45), "c": (45, VOCAB)}   # each source's batches have their own token ids


class Ids(Dataset):
    """Tag = id mod 3, ids drawn from one source's range (the probe tells a batch's source by them)."""

    def __init__(self, lo, hi, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(lo, hi, (n, 8), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids % 3}


def source_sft(name, model=None, values=None):
    model = model if model is not None else tiny_tagger()
    pos = POSITIONS[name]
    vals = torch.full((len(pos),), MARK[name]) if values is None else values
    config = SftConfig(kind="language", language=name,
                       base_fingerprint=base_fingerprint(model, [TENSOR]) if model is not None else None)
    return SparseFineTuning({TENSOR: SparseDelta((32, 16), pos.to(torch.int32), vals)}, {}, config)


def tiny_tagger(seed=0):
    from transformers import BertForTokenClassification

    torch.manual_seed(seed)
    return BertForTokenClassification(tiny_config(num_labels=3))


def which_source(input_ids):
    lo = int(input_ids.min())
    return next(s for s, (a, b) in ID_RANGE.items() if a <= lo < b)


def marks_on(weight):
    flat = weight.detach().reshape(-1)
    return {s for s in ("a", "b") if bool((flat[POSITIONS[s]] * (1 if MARK[s] > 0 else -1) > 5).all())}


class StoredClean(TrainerCallback):
    """After every step the weights hold no source mark (nothing left applied after its batch)."""

    def __init__(self, tuner):
        self.tuner, self.bad = tuner, []

    def on_step_end(self, args, state, control, **kwargs):
        module = self.tuner.model.get_submodule(TENSOR.rsplit(".", 1)[0])
        stored = module.parametrizations.weight.original if hasattr(module, "parametrizations") else module.weight
        if marks_on(stored):
            self.bad.append((self.tuner._phase, state.global_step))


def make_tuner(tmp_path, sfts, sizes=(24, 16, 8), upsample=(1, 1, 2), order="random", seed=0, **kw):
    model = tiny_tagger()
    shift = SourceShift(sfts)
    shift.check(model)
    names = list(sfts)
    data = [Ids(*ID_RANGE[n], size, seed=i) for i, (n, size) in enumerate(zip(names, sizes))]
    sampler = MultiSourceBatchSampler(sizes, 4, upsample=list(upsample), order=order, seed=seed)
    sft_args = SftArguments(k=200, full_ft_max_epochs=None, full_ft_max_steps=kw.pop("p1", 12),
                            sparse_ft_max_epochs=None, sparse_ft_max_steps=kw.pop("p2", 12))
    from transformers import default_data_collator

    return MultiSourceFineTuner(model=model, args=training_args(tmp_path / "work", seed=seed, **kw),
                                train_dataset=MultiSourceDataset(data), data_collator=default_data_collator,
                                shift=shift, source_names=names, batch_sampler=sampler, sft_args=sft_args, mlm=False)


def test_each_batch_sees_exactly_its_own_source_sft_and_none_is_left_applied(tmp_path):
    tuner = make_tuner(tmp_path, {"a": source_sft("a"), "b": source_sft("b"), "c": None})
    seen = []

    def probe(module, args, kwargs):
        if module.training:
            layer = module.get_submodule(TENSOR.rsplit(".", 1)[0])
            seen.append((tuner._phase, which_source(kwargs["input_ids"]), marks_on(layer.weight)))

    tuner.model.register_forward_pre_hook(probe, with_kwargs=True)
    clean = StoredClean(tuner)
    tuner.add_callback(clean)
    tuner.train()
    assert {p for p, _, _ in seen} == {1, 2} and {s for _, s, _ in seen} == {"a", "b", "c"}
    wrong = [(p, s, m) for p, s, m in seen if m != ({s} if s != "c" else set())]
    assert not wrong, wrong[:5]
    assert not clean.bad
    # upsampling: c (8 examples x2) gives 4 batches an epoch, a 6, b 4 (batch 4)
    assert tuner.batch_sampler.batches_per_source() == [6, 4, 4]
    assert sum(tuner.source_batches.values()) == 24 and all(v > 0 for v in tuner.source_batches.values())


def test_theta_after_training_is_theta0_plus_task_sft_bit_for_bit(tmp_path):
    tuner = make_tuner(tmp_path, {"a": source_sft("a"), "b": source_sft("b"), "c": None}, p1=10, p2=10)
    tuner.train()
    fresh = tiny_tagger()
    compsft.apply(fresh, tuner.sft, check_base=False)
    trained = dict(tuner.model.named_parameters())
    for name, p in fresh.named_parameters():
        assert torch.equal(p, trained[name]), name
    assert not any(".parametrizations." in n for n in trained)


def test_the_task_update_under_a_source_sft_survives(tmp_path):
    """A source SFT of zeros changes nothing: the run equals one whose source has no SFT, bit for bit.
    A revert after the optimizer step (restoring the values gathered at apply time) would wipe the
    task's updates at the SFT's positions and differ."""
    zeros = {"a": source_sft("a", values=torch.zeros(4)), "b": source_sft("b", values=torch.zeros(4)), "c": None}
    runs = []
    for sfts in (zeros, {"a": None, "b": None, "c": None}):
        tuner = make_tuner(tmp_path / str(len(runs)), sfts, p1=8, p2=6)
        tuner.train()
        runs.append(tuner.sft)
    assert runs[0].diffs.keys() == runs[1].diffs.keys()
    for n in runs[0].diffs:
        assert torch.equal(runs[0].diffs[n].indices, runs[1].diffs[n].indices), n
        assert torch.equal(runs[0].diffs[n].values, runs[1].diffs[n].values), n


def test_shift_is_exact_over_many_source_changes():
    """1,000 steps alternating three sources: the stored weight equals a reference trained with the
    source SFT added in its forward by hand, bit for bit (no drift from apply/revert pairs)."""
    torch.manual_seed(0)
    lin, ref = torch.nn.Linear(16, 32, bias=False), torch.nn.Linear(16, 32, bias=False)
    ref.load_state_dict(lin.state_dict())
    name = "weight"
    sfts = {s: SparseFineTuning({name: SparseDelta((32, 16), POSITIONS[s].to(torch.int32),
                                                   torch.randn(len(POSITIONS[s])) * 0.5)}, {}, SftConfig())
            for s in ("a", "b")}
    sfts["c"] = None
    shift = SourceShift(sfts)
    opt, ref_opt = torch.optim.SGD(lin.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    x = torch.randn(4, 16)
    for step in range(1000):
        source = "abc"[step * 7 % 3 if step % 5 else 0]
        with shift.applied(lin, source):
            lin(x).pow(2).mean().backward()
        w = ref.weight
        if sfts[source] is not None:
            d = sfts[source].diffs[name]
            w = w.reshape(-1).index_add(0, d.indices.long(), d.values).view_as(w)
        torch.nn.functional.linear(x, w).pow(2).mean().backward()
        opt.step(), ref_opt.step(), opt.zero_grad(), ref_opt.zero_grad()
    assert torch.equal(lin.weight, ref.weight)
    assert shift.changes > 100 and isinstance(lin._parameters["weight"], torch.nn.Parameter)
    theta0 = torch.zeros(32, 16)
    with shift.applied(lin, "a"):   # the L1 pull's reference while "a" is in: θ0 + φ_a
        expected = theta0.reshape(-1).index_add(0, POSITIONS["a"], sfts["a"].diffs[name].values).view(32, 16)
        assert torch.equal(shift.reference(lin.weight, theta0), expected)
    assert shift.reference(lin.weight, theta0) is theta0


def test_sampler_upsamples_orders_and_depends_on_seed_and_epoch_only():
    s = MultiSourceBatchSampler([10, 3], 4, upsample=[1, 3], order="sequential", seed=1)
    plan = s.plan()
    assert [src for src, _ in plan] == [0, 0, 0, 1, 1, 1] and len(s) == 6
    counts = torch.bincount(torch.tensor([i for src, b in plan if src == 1 for i in b]), minlength=3)
    assert counts.tolist() == [3, 3, 3]
    r = MultiSourceBatchSampler([10, 3], 4, upsample=[1, 3], order="random", seed=1)
    first = list(r)
    assert first == list(MultiSourceBatchSampler([10, 3], 4, upsample=[1, 3], order="random", seed=1))
    assert all(max(b) < 10 or min(b) >= 10 for b in first)   # one source per batch (global indices)
    r.set_epoch(1)
    assert list(r) != first and sorted(map(sorted, r)) != []
    with pytest.raises(CompsftError, match="order"):
        MultiSourceBatchSampler([3], 2, order="shuffled")
    with pytest.raises(CompsftError, match="twice"):
        check_sources([TaskSource("gle", "x"), TaskSource("gle", "y")])
    with pytest.raises(CompsftError, match="upsample"):
        TaskSource("gle", "x", upsample=0)


# -- the recipe and the command line ---------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_assets(tmp_path_factory):
    """A tiny model with a character vocabulary and two source SFTs (gle, fin) marking TENSOR."""
    from transformers import BertForMaskedLM

    root = tmp_path_factory.mktemp("multisource_cli")
    model_dir = make_model_dir(root / "model")
    mlm = BertForMaskedLM.from_pretrained(model_dir)
    for lang, mark in (("gle", "a"), ("fin", "b")):
        sft = source_sft(mark, model=mlm)
        sft.config.language = lang
        compsft.save(sft, root / lang)
    return {"model": model_dir, "root": root}


def task_args(assets, out, p1=4, p2=4, extra=()):
    root = assets["root"]
    return ["train-task", "--task", "pos", "--model", assets["model"], "--out", out,
            "--train", "ud:ga_idt:train", "--train", "ud:fi_tdt:train", "--max-sentences", "12",
            "--source-sft", f"gle={root / 'gle'}", "--source-sft", root / "fin",   # fin: named by the SFT itself
            "--upsample", "fin=2", "--k", "300", "--max-length", "32", "--batch-size", "8", "--logging-steps", "2",
            "--cpu", "--phase1-epochs", "1", "--phase1-min-steps", str(p1), "--phase1-max-steps", str(p1),
            "--phase2-epochs", "1", "--phase2-min-steps", str(p2), "--phase2-max-steps", str(p2), *extra]


def run_cli(args):
    from typer.testing import CliRunner

    from compsft.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_cli_multi_source_records_its_sources_and_dev_mean(cli_assets):
    out = cli_assets["root"] / "pos"
    result = run_cli(task_args(cli_assets, out, extra=["--dev", "ud:ga_idt:dev", "--dev", "fin=ud:fi_tdt:dev",
                                                       "--dev-checks", "2", "--dev-sentences", "20", "--save-steps", "0"]))
    sft = compsft.load(out)
    multi = sft.config.training["multi_source"]
    assert [(r["name"], r["upsample"], r["language_sft"]) for r in multi["sources"]] == \
        [("gle", 1, True), ("fin", 2, True)]
    # a character vocabulary: every word falls back (measured per source, warned about as for train-language)
    assert all(r["vocabulary_fallback"]["rate"] > r["vocabulary_fallback"]["threshold"] for r in multi["sources"])
    assert sum(multi["batches"]["phase1"].values()) == 4 and set(multi["batches"]["phase2"]) == {"gle", "fin"}
    dev = sft.config.training["dev"]
    assert set(dev["per_source"]) == {"gle", "fin"}
    assert dev["metrics"]["accuracy"] == pytest.approx(
        sum(m["accuracy"] for m in dev["per_source"].values()) / 2)
    assert (out / "dev-selected").is_dir() and "dev (mean over sources)" in result.output
    assert compsft.load(out / "dev-selected").config.training["dev_selected"]["checks"]
    assert "source fin: 12 sentences x2" in result.output and "over the threshold" in result.output


def test_cli_multi_source_errors(cli_assets):
    from typer.testing import CliRunner

    from compsft.cli import app

    root = cli_assets["root"]
    cases = [(["--train", "ud:ga_idt:train", "--train", "some/file.conllu"], "say which language"),
             (["--train", "ud:ga_idt:train", "--train", "gle=ud:fi_tdt:train"], "given twice"),
             (["--train", "ud:ga_idt:train", "--train", "ud:fi_tdt:train", "--dev", "ud:en_ewt:dev"], "not one of"),
             (["--train", "ud:ga_idt:train", "--train", "ud:fi_tdt:train", "--upsample", "gle=0"], "N >= 1")]
    for extra, message in cases:
        args = ["train-task", "--task", "pos", "--model", cli_assets["model"], "--out", root / "bad", "--cpu", *extra]
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert isinstance(result.exception, CompsftError) and message in str(result.exception), (extra, result.output)


def _kill_run(args, phase, step):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COMPSFT_LOG_LEVEL": "WARNING"}
    proc = subprocess.run([sys.executable, str(HERE / "training_kill.py"), str(phase), str(step), "--",
                           *[str(a) for a in args]], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]


def test_resume_after_sigkill_matches_uninterrupted_run(cli_assets):
    """Killed in phase 1 after its checkpoint at step 6, in the second epoch of the batch order (3 sentences
    per source give a few batches an epoch): the resumed run trains on the same batches, bit for bit."""
    root = cli_assets["root"]
    extra = ["--save-steps", "3", "--source-order", "random", "--max-sentences", "3"]
    run_cli(task_args(cli_assets, root / "whole", p1=10, p2=4, extra=extra))
    whole = compsft.load(root / "whole")
    per_epoch = sum(r["batches_per_epoch"] for r in whole.config.training["multi_source"]["sources"])
    assert per_epoch < 6, per_epoch   # the checkpoint at step 6 lies past the first epoch
    resumed = root / "resumed"
    args = task_args(cli_assets, resumed, p1=10, p2=4, extra=extra)
    _kill_run(args, phase=1, step=8)
    assert (root / "resumed.work" / "phase1" / "checkpoint-6").is_dir() and not resumed.exists()
    run_cli(args + ["--resume"])
    again = compsft.load(resumed)
    assert again.config.training["phases"]["phase1"]["resumed_from"].endswith("checkpoint-6")
    assert again.config.training["multi_source"]["batches"] == whole.config.training["multi_source"]["batches"]
    for n in whole.diffs:
        assert torch.equal(whole.diffs[n].indices, again.diffs[n].indices), n
        assert torch.equal(whole.diffs[n].values, again.diffs[n].values), n
    for n in whole.dense:
        assert torch.equal(whole.dense[n], again.dense[n]), n


def test_shift_on_many_tensors_with_threads_is_exact():
    """The CPU path that spreads tensors over torch's threads: θ + φ inside, θ bit for bit after."""
    model = tiny_tagger()
    params = {n: p for n, p in model.named_parameters() if n.startswith("bert.encoder")}
    g = torch.Generator().manual_seed(0)
    diffs = {n: SparseDelta(tuple(p.shape), torch.arange(0, p.numel(), 3, dtype=torch.int32),
                            torch.randn(len(range(0, p.numel(), 3)), generator=g)) for n, p in params.items()}
    shift = SourceShift({"a": SparseFineTuning(diffs, {}, SftConfig(kind="language"))})
    before = {n: p.detach().clone() for n, p in params.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with shift.applied(model, "a"):
            for n, p in params.items():
                d = diffs[n]
                assert torch.equal(p.detach().reshape(-1), before[n].reshape(-1).index_add(0, d.indices.long(), d.values))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(p, before[n]) for n, p in params.items())
