"""Phase 2 pays for K, not N (issue 4, section 3): optimizer state, memory, step time.

Trains a random BERT-base-sized MLM (12 x 768, 30,522 pieces) for a few steps of each LT-SFT phase
with `SparseFineTuner` on synthetic batches and prints

* phase-2 optimizer-state bytes for the K sparse values (goal <= 12·K + a small constant), and for
  the dense head separately;
* peak RSS (whole process) and the RSS sampled at each step end, per phase;
* mean step time per phase (first step of each phase excluded) and the phase-2 / phase-1 ratio
  (goal <= 1.1).

    python bench/train_step.py [--layers 12 --hidden 768 --vocab 30522 --batch 8 --seq 128 --steps 6]
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6, help="steps per phase (the first is not timed)")
    ap.add_argument("--density", type=float, default=None, help="default: the paper's language K, scaled")
    a = ap.parse_args()

    import torch
    from torch.utils.data import Dataset
    from transformers import BertConfig, BertForMaskedLM, TrainerCallback, TrainingArguments

    from compsft.training import SftArguments, SparseFineTuner

    class Synthetic(Dataset):
        def __init__(self, n):
            g = torch.Generator().manual_seed(0)
            self.ids = torch.randint(5, a.vocab, (n, a.seq), generator=g)
            self.masked = torch.rand(n, a.seq, generator=g) < 0.15

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            ids = self.ids[i].clone()
            labels = torch.where(self.masked[i], ids, torch.full_like(ids, -100))
            ids[self.masked[i]] = 4
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    class Clock(TrainerCallback):
        def __init__(self, tuner):
            self.tuner, self.times, self.rss = tuner, {1: [], 2: []}, {1: 0, 2: 0}

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times[self.tuner._phase].append(time.perf_counter() - self.t0)
            self.rss[self.tuner._phase] = max(self.rss[self.tuner._phase], rss())

    torch.manual_seed(0)
    config = BertConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
                        num_attention_heads=max(1, a.hidden // 64), intermediate_size=4 * a.hidden)
    model = BertForMaskedLM(config)
    before = rss()
    with tempfile.TemporaryDirectory() as work:
        args = TrainingArguments(output_dir=work, per_device_train_batch_size=a.batch, learning_rate=5e-5,
                                 save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                                 logging_steps=10_000, dataloader_num_workers=0)
        sft_args = SftArguments(sft_kind="language", density=a.density, full_ft_max_steps=a.steps,
                                sparse_ft_max_steps=a.steps, full_l1_reg=0.1, sparse_l1_reg=0.1)
        tuner = SparseFineTuner(model=model, args=args, train_dataset=Synthetic(a.batch * a.steps),
                                sft_args=sft_args, mlm=True)
        clock = Clock(tuner)
        tuner.add_callback(clock)
        tuner.train()
        # The optimizer of phase 2 is still the trainer's: measure its state.
        values_ids = {id(p) for n, p in tuner.model.named_parameters()}  # (parametrizations are gone now)
        opt = tuner.optimizer
        inner = getattr(opt, "optimizer", opt)
        sparse_bytes = dense_bytes = 0
        heads = {id(p) for p in tuner._named(tuner._head_names).values()}
        for p, st in inner.state.items():
            nbytes = sum(t.numel() * t.element_size() for t in st.values() if torch.is_tensor(t))
            if id(p) in heads:
                dense_bytes += nbytes
            else:
                sparse_bytes += nbytes
        del values_ids
    k = tuner.k
    t1 = sum(clock.times[1][1:]) / max(1, len(clock.times[1]) - 1)
    t2 = sum(clock.times[2][1:]) / max(1, len(clock.times[2]) - 1)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {a.layers} x {a.hidden}, vocab {a.vocab:,}: {n_params:,} parameters, "
          f"{tuner.num_eligible:,} eligible; K = {k:,} ({100 * k / tuner.num_eligible:.2f}%); "
          f"batch {a.batch} x {a.seq}; {torch.get_num_threads()} threads")
    print(f"phase-2 optimizer state for the K values: {sparse_bytes:,} bytes = {sparse_bytes / k:.2f} · K "
          f"(goal <= 12 · K + small constant)")
    print(f"phase-2 optimizer state for the dense MLM head: {dense_bytes:,} bytes")
    print(f"step time: phase 1 {t1:.3f} s, phase 2 {t2:.3f} s, ratio {t2 / t1:.3f} (goal <= 1.1)")
    print(f"RSS at step ends: phase 1 max {clock.rss[1] / 2**30:.2f} GiB, phase 2 max {clock.rss[2] / 2**30:.2f} GiB; "
          f"process peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB "
          f"(model alone {before / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
