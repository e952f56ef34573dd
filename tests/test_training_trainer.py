"""SparseFineTuner on tiny random models: phases, mask, bit-identical non-mask entries, task on source."""
from __future__ import annotations

import pytest
import torch

import compsft
from compsft.training import SftArguments, SparseFineTuner
from compsft.errors import CompsftError
from compsft.training.params import PAPER_K, eligible_parameters, resolve_k

from training_helpers import ToyTagging, tiny_config, training_args


def tagger(seed=0):
    from transformers import BertForTokenClassification

    torch.manual_seed(seed)
    return BertForTokenClassification(tiny_config(num_labels=3))


def test_eligible_parameters():
    model = tagger()
    el = eligible_parameters(model)
    assert "bert.embeddings.word_embeddings.weight" in el
    assert not any("LayerNorm" in n for n in el)
    assert not any(n.startswith("classifier") for n in el)
    assert resolve_k(1000, density=0.05) == 50
    assert resolve_k(1000, k=7) == 7


def _eligible_count(config) -> int:
    """Eligible parameters of an MLM of this config, counted without allocating it (meta device)."""
    from transformers import AutoModelForMaskedLM

    with torch.device("meta"):
        model = AutoModelForMaskedLM.from_config(config)
    return sum(p.numel() for p in eligible_parameters(model).values())


@pytest.mark.parametrize("name, config, language_k, task_k", [
    # mBERT (bert-base-multilingual-cased) and XLM-R base: L = 12, h = 768, 119,547 and 250,002 pieces.
    ("mbert", dict(model_type="bert", vocab_size=119_547), 7_667_712, 14_155_776),
    ("xlmr-base", dict(model_type="xlm-roberta", vocab_size=250_002, max_position_embeddings=514,
                       type_vocab_size=1), 7_667_712, 14_155_776),
    # The default model (multilingual-e5-small, trimmed): L = 12, h = 384 -> 13·384² and 24·384².
    ("default", dict(model_type="bert", vocab_size=61_530, hidden_size=384, intermediate_size=1536,
                     num_attention_heads=12), 1_916_928, 3_538_944),
])
def test_default_k_is_the_adapter_size_of_the_model_shape(name, config, language_k, task_k):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(**config)
    eligible = _eligible_count(cfg)
    assert resolve_k(eligible, kind="language", config=cfg) == language_k
    assert resolve_k(eligible, kind="task", config=cfg) == task_k
    if name != "default":
        assert (language_k, task_k) == (PAPER_K["language"], PAPER_K["task"])


def test_default_k_does_not_grow_with_the_vocabulary():
    from transformers import BertConfig

    small, large = BertConfig(vocab_size=30_000), BertConfig(vocab_size=250_002)
    assert _eligible_count(large) > 1.5 * _eligible_count(small)
    assert resolve_k(_eligible_count(small), config=small) == resolve_k(_eligible_count(large), config=large)


def test_default_k_needs_the_shape_and_is_capped():
    from transformers import BertConfig

    with pytest.raises(CompsftError, match="--k or --density"):
        resolve_k(10_000, kind="task")
    assert resolve_k(100, kind="task", config=BertConfig()) == 100
    with pytest.raises(CompsftError, match="kind"):
        resolve_k(10_000, kind="other", config=BertConfig())


def test_tuner_takes_the_default_k_from_the_model_config(tmp_path):
    # tiny_config: L = 2, h = 16 -> task K = 2·2·16² = 1,024.
    sft_args = SftArguments(full_ft_max_steps=1, sparse_ft_max_steps=1)
    tuner = SparseFineTuner(model=tagger(), args=training_args(tmp_path / "work"), train_dataset=ToyTagging(),
                            sft_args=sft_args)
    assert tuner.k == 1024


def run_tuner(tmp_path, model, **sft_kw):
    sft_args = SftArguments(**{"k": 300, "full_ft_max_steps": 6, "sparse_ft_max_steps": 6, **sft_kw})
    args = training_args(tmp_path / "work", weight_decay=0.1)
    tuner = SparseFineTuner(model=model, args=args, train_dataset=ToyTagging(), sft_args=sft_args)
    tuner.train()
    return tuner


def test_non_mask_entries_bit_identical(tmp_path):
    model = tagger()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    tuner = run_tuner(tmp_path, model, full_l1_reg=5.0, sparse_l1_reg=5.0)
    sft = tuner.sft
    assert sft.k == 300 and sft.config.k == 300
    assert set(sft.dense) == {"classifier.weight", "classifier.bias"}
    # The model now holds θ0 + φ: outside the mask every entry is θ0 bit for bit.
    for name, p in model.named_parameters():
        if name in sft.dense:
            continue
        now, before = p.detach().reshape(-1), theta0[name].reshape(-1)
        keep = torch.ones_like(now, dtype=torch.bool)
        if name in sft.diffs:
            idx = sft.diffs[name].indices.long()
            keep[idx] = False
            assert torch.equal(now[idx], before[idx] + sft.diffs[name].values)
        assert torch.equal(now[keep], before[keep]), name
    assert any(float(d.values.abs().max()) > 0 for d in sft.diffs.values())
    # Reverting restores θ0 exactly (heads included).
    compsft.revert(model)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), theta0[name]), name
    # Losses were logged per phase.
    hist = tuner.state.log_history
    assert {h.get("phase") for h in hist if "loss" in h} == {2}
    assert tuner.phase_info["phase1"]["steps"] == 6 and tuner.phase_info["phase2"]["steps"] == 6
    summary = tuner.summary()
    assert summary["k"] == 300 and sum(r["selected"] for r in summary["by_layer_type"].values()) == 300


def test_phase2_optimizer_state_is_k_sized(tmp_path):
    model = tagger()
    tuner = run_tuner(tmp_path, model)
    state_numel = sum(t.numel() for s in tuner.optimizer.state.values() for t in s.values()
                      if torch.is_tensor(t) and t.dim() > 0)
    heads = sum(t.numel() for t in tuner.sft.dense.values())
    assert state_numel == 2 * (300 + heads)


def test_mask_strategies_run(tmp_path):
    for strategy in ("random", "magnitude", "prune-difference"):
        model = tagger()
        theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        tuner = run_tuner(tmp_path / strategy, model, mask_strategy=strategy)
        assert tuner.sft.k == 300
        assert ("phase1" in tuner.phase_info) == (strategy == "prune-difference")
        assert ("phase2" in tuner.phase_info) == (strategy != "prune-difference")
        if strategy == "magnitude":
            mags = torch.cat([theta0[n].abs().reshape(-1) for n in tuner._eligible_names])
            chosen = torch.cat([theta0[n].reshape(-1)[d.indices.long()].abs() for n, d in tuner.sft.diffs.items()])
            assert float(chosen.min()) >= float(mags.kthvalue(mags.numel() - 300 + 1).values)


def test_task_sft_is_difference_from_source_applied(tmp_path):
    model = tagger()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    # A fake source-language SFT on the word embeddings and one attention matrix.
    g = torch.Generator().manual_seed(5)
    src_diffs = {}
    for name in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight"):
        n = base[name].numel()
        idx = torch.randperm(n, generator=g)[: n // 4].sort().values
        src_diffs[name] = compsft.SparseDelta(tuple(base[name].shape), idx.int(), torch.randn(idx.numel(), generator=g))
    source = compsft.SparseFineTuning(src_diffs, {}, compsft.SftConfig(kind="language", language="xxx"))
    compsft.apply(model, source)
    theta0_src = {n: p.detach().clone() for n, p in model.named_parameters()}
    tuner = run_tuner(tmp_path, model)
    sft = tuner.sft
    # The model holds θ0 + φ_source + φ_task; the task SFT's values are the difference from θ0 + φ_source.
    for name, d in sft.diffs.items():
        flat = dict(model.named_parameters())[name].detach().reshape(-1)
        idx = d.indices.long()
        assert torch.equal(flat[idx], theta0_src[name].reshape(-1)[idx] + d.values)
    # Its base fingerprint is the pretrained model's, not θ0 + φ_source.
    from compsft import fingerprint as fp
    for name in src_diffs:
        if name in sft.diffs:
            assert fp.compare(sft.config.base_fingerprint, name, tuple(base[name].shape),
                              base[name].reshape(-1)[fp.sample_positions(base[name].numel())]) is None
    # Saved and loaded, it applies onto a fresh base with the source SFT.
    out = tmp_path / "task-sft"
    tuner.save_sft(out)
    loaded = compsft.load(out)
    fresh = tagger()
    compsft.apply(fresh, source)
    compsft.apply(fresh, loaded, with_dense=True)
    for name, p in fresh.named_parameters():
        assert torch.allclose(p, dict(model.named_parameters())[name]), name


def test_resume_skips_a_checkpoint_cut_short(tmp_path):
    from compsft.training.trainer import last_complete_checkpoint

    for step, complete in ((10, True), (20, True), (30, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
        if complete:
            (d / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-20")
    assert last_complete_checkpoint(tmp_path / "checkpoint-30") is None


def test_check_checkpoint_names_the_missing_or_damaged_file(tmp_path):
    import re

    from safetensors.torch import save_file

    from compsft.training.trainer import check_checkpoint

    d = tmp_path / "checkpoint-4"
    d.mkdir()
    with pytest.raises(CompsftError, match=re.escape(f"{d}: no model weights")):
        check_checkpoint(d)
    save_file({"w": torch.zeros(3)}, str(d / "model.safetensors"))
    (d / "trainer_state.json").write_text("{}")
    with pytest.raises(CompsftError, match=re.escape(f"{d / 'optimizer.pt'}: missing")):
        check_checkpoint(d, ["optimizer.pt"])
    torch.save({"state": {0: {"exp_avg": torch.arange(100.0)}}}, d / "optimizer.pt")
    check_checkpoint(d, ["optimizer.pt"])
    # torch.load would read this back without complaint; the zip members' CRCs do not match.
    data = bytearray((d / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "optimizer.pt").write_bytes(bytes(data))
    with pytest.raises(CompsftError, match=re.escape(f"{d / 'optimizer.pt'}: unreadable checkpoint file")):
        check_checkpoint(d, ["optimizer.pt"])
    (d / "optimizer.pt").unlink()
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-4])
    with pytest.raises(CompsftError, match=re.escape(f"{d / 'model.safetensors'}: unreadable checkpoint file")):
        check_checkpoint(d)


def test_lt_sft_resume_checks_the_checkpoint_files_first(tmp_path):
    """An LT-SFT run resumed from a checkpoint whose optimizer state is gone stops with an error naming the
    file, instead of going on quietly with a fresh optimizer."""
    import re

    def tuner():
        sft_args = SftArguments(k=300, full_ft_max_steps=4, sparse_ft_max_steps=4)
        args = training_args(tmp_path / "work", save_strategy="steps", save_steps=2)
        return SparseFineTuner(model=tagger(), args=args, train_dataset=ToyTagging(), sft_args=sft_args)

    tuner().train()
    last = tmp_path / "work" / "phase2" / "checkpoint-4"
    (last / "optimizer.pt").unlink()
    with pytest.raises(CompsftError, match=re.escape(f"{last / 'optimizer.pt'}: missing")):
        tuner().train(resume_from_checkpoint=True)
