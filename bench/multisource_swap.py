"""What applying a source's language SFT per batch costs in multi-source task training (issue 27).

On the default model (a POS tagger on the trimmed multilingual-e5-small), with two synthetic language
SFTs of the paper's language K (random positions over the eligible tensors, word embeddings included),
the batches alternate between them (a change of source at every step: the worst case). Prints

* the shift alone: entering and leaving `SourceShift.applied` (gathering the stored values at φ_S's
  K positions, writing θ + φ_S there, writing the gathered values back), per step, in phase 1
  (trained tensors) and phase 2 (frozen θ0 under the sparse values);
* the step time (forward, backward, AdamW step; batch 16 x 128 sub-words of UD English, the `cpu`
  budget's task batch) with the shift and with a source that has no SFT (the yardstick), interleaved
  step by step, and their ratio: the whole per-step cost of multi-source, backward included;
* for comparison, one `compsft.apply` + `compsft.revert` of the same SFT into the stored weights (what a
  reference-style swap costs, which is not exact while training).

Goal: shift <= 3% of a step.

    python bench/multisource_swap.py [--steps 6 --batch 16 --seq 128 --threads N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per arm and phase (one untimed warm-up)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from compsft import apply, revert
    from compsft.models import default_model_dir
    from compsft.sft import SftConfig, SparseDelta, SparseFineTuning
    from compsft.tasks import data_path, get_task
    from compsft.training.masks import random_mask
    from compsft.training.multisource import SourceShift
    from compsft.training.params import freeze_for_lt_sft, resolve_k
    from compsft.training.sparse import attach_sparse

    if a.threads:
        torch.set_num_threads(a.threads)
    model_dir = default_model_dir()
    spec = get_task("pos")
    sentences = spec.read(data_path("ud:en_ewt:train"))[:200]
    labels = spec.label_list(sentences)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = spec.build_model(model_dir, labels)
    eligible, _ = freeze_for_lt_sft(model, True)
    params = dict(model.named_parameters())
    theta0 = {n: params[n].detach() for n in eligible}
    n_eligible = sum(t.numel() for t in theta0.values())
    k_lang = resolve_k(n_eligible, kind="language", config=model.config)
    k_task = resolve_k(n_eligible, kind="task", config=model.config)

    def synthetic_sft(seed: int) -> SparseFineTuning:
        masks = random_mask(theta0, None, k_lang, seed=seed)
        g = torch.Generator().manual_seed(seed)
        diffs = {n: SparseDelta(tuple(theta0[n].shape), idx, torch.randn(idx.numel(), generator=g) * 1e-3)
                 for n, idx in masks.items() if idx.numel()}
        return SparseFineTuning(diffs, {}, SftConfig(kind="language"))

    sfts = {"a": synthetic_sft(1), "b": synthetic_sft(2), "none": None}
    shift = SourceShift(sfts)
    data = spec.encode(sentences, tokenizer, labels, max_length=a.seq)
    collate = spec.collator(tokenizer)
    batch = collate([data[i] for i in range(a.batch)])
    batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    print(f"model {model_dir.name}: {n_eligible:,} eligible parameters; language K {k_lang:,} over "
          f"{len(sfts['a'].diffs)} tensors; task K {k_task:,}; "
          f"batch {a.batch} x {a.seq}; torch threads {torch.get_num_threads()}")

    def shift_only(n: int = 10) -> float:
        t = []
        for i in range(n):
            t0 = time.perf_counter()
            with shift.applied(model, "ab"[i % 2]):
                pass
            t.append(time.perf_counter() - t0)
        return statistics.median(t)

    def step(opt, source) -> float:
        t0 = time.perf_counter()
        with shift.applied(model, source):
            model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def run_phase(name: str, trainable) -> None:
        model.train()
        opt = torch.optim.AdamW(trainable, lr=1e-5)
        step(opt, "a"), step(opt, "none")  # warm-up: allocations, optimizer state
        with_shift, without = [], []
        for i in range(a.steps):
            with_shift.append(step(opt, "ab"[i % 2]))
            without.append(step(opt, "none"))
        s = shift_only()
        w, wo = statistics.median(with_shift), statistics.median(without)
        print(f"{name}: step {wo:.3f} s without a source SFT, {w:.3f} s with (a change of source every step): "
              f"ratio {w / wo:.4f}; the shift alone {1000 * s:.1f} ms = {100 * s / wo:.2f}% of a step")

    run_phase("phase 1 (dense)", [p for p in model.parameters() if p.requires_grad])
    t0 = time.perf_counter()
    revert(model, apply(model, sfts["a"], with_dense=False, check_base=False))
    print(f"for comparison: compsft.apply + revert of one source SFT into the stored weights: "
          f"{1000 * (time.perf_counter() - t0):.1f} ms")
    for p in model.parameters():
        p.requires_grad_(False)
    sparse = attach_sparse(model, random_mask(theta0, None, k_task, seed=3))
    heads = [p for n, p in model.named_parameters() if n.startswith("classifier")]
    for p in heads:
        p.requires_grad_(True)
    run_phase("phase 2 (sparse)", [sv.values for sv in sparse.values()] + heads)


if __name__ == "__main__":
    main()
