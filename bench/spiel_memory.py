"""Peak training memory and step time of SpIEL against LT-SFT phase 1 at the same K (issue 12).

Trains a random BERT-base-sized MLM (12 x 768, 30,522 pieces) on synthetic batches, each method in
its own process (peak RSS is per process), and prints per method

* peak RSS of the process (model creation included, the same for both) and the largest RSS at a
  step end;
* tracked tensor bytes: parameters, their gradients, buffers, optimizer state and SpIEL's gradient
  accumulators, summed over distinct storages just before each optimizer step (gradients present),
  the largest over the steps; for SpIEL separately over accumulation steps and the others. Activations
  (and the θ0 + Δ weights that SpIEL and LT-SFT phase 2 materialise for backward) are not tracked;
* mean step time (first step excluded), and ratios against LT-SFT phase 1 measured in the same run.

    python bench/spiel_memory.py [--layers 12 --hidden 768 --vocab 30522 --batch 8 --seq 128 --steps 9]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def tensor_bytes(model, optimizer, extra=()) -> int:
    import torch

    seen, total = set(), 0

    def add(t):
        nonlocal total
        if t is None or not torch.is_tensor(t):
            return
        key = t.untyped_storage().data_ptr()
        if key in seen or t.numel() == 0:
            return
        seen.add(key)
        total += t.untyped_storage().nbytes()

    for p in model.parameters():
        add(p)
        add(p.grad)
    for b in model.buffers():
        add(b)
    opt = getattr(optimizer, "optimizer", optimizer)
    if opt is not None:
        for state in opt.state.values():
            for t in state.values():
                add(t)
    for t in extra:
        add(t)
    return total


def run_one(a) -> dict:
    import torch
    from torch.utils.data import Dataset
    from transformers import BertConfig, BertForMaskedLM, TrainerCallback, TrainingArguments

    from compsft.training import SftArguments, SparseFineTuner
    from compsft.training.spiel import SpielArguments, SpielTuner

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

    class Probe(TrainerCallback):
        def __init__(self, tuner):
            self.tuner, self.times, self.rss, self.bytes = tuner, [], 0, {"accumulating": 0, "other": 0}
            self.resel_steps = set()

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
            if self.tuner._phase != 1 and a.method == "lt-sft":
                return
            store = getattr(self.tuner, "store", None)
            accs = list(store.accumulators.values()) if store is not None else []
            key = "accumulating" if accs else "other"
            self.bytes[key] = max(self.bytes[key], tensor_bytes(self.tuner.model, optimizer, accs))

        def on_step_end(self, args, state, control, **kw):
            if self.tuner._phase != 1 and a.method == "lt-sft":
                return
            self.times.append(time.perf_counter() - self.t0)
            self.rss = max(self.rss, rss())
            if getattr(self.tuner, "reselections", None) and self.tuner.reselections[-1]["step"] == state.global_step:
                self.resel_steps.add(len(self.times) - 1)

    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    config = BertConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
                        num_attention_heads=max(1, a.hidden // 64), intermediate_size=4 * a.hidden)
    model = BertForMaskedLM(config)
    model_rss = rss()
    with tempfile.TemporaryDirectory() as work:
        args = TrainingArguments(output_dir=work, per_device_train_batch_size=a.batch, learning_rate=5e-5,
                                 save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                                 logging_steps=10_000, dataloader_num_workers=0)
        data = Synthetic(a.batch * a.steps)
        if a.method == "lt-sft":
            # Phase 1 is the part measured; phase 2 runs one step only so that train() completes.
            sft_args = SftArguments(sft_kind="language", density=a.density, full_ft_max_steps=a.steps,
                                    sparse_ft_max_steps=1)
            tuner = SparseFineTuner(model=model, args=args, train_dataset=data, sft_args=sft_args, mlm=True)
        else:
            sft_args = SftArguments(sft_kind="language", density=a.density, sparse_ft_max_epochs=None,
                                    sparse_ft_max_steps=a.steps)
            spiel = SpielArguments(reselection_steps=a.reselection_steps, accumulation_steps=a.accumulation_steps)
            tuner = SpielTuner(model=model, args=args, train_dataset=data, sft_args=sft_args, mlm=True,
                               spiel_args=spiel)
        probe = Probe(tuner)
        tuner.add_callback(probe)
        tuner.train()
    plain = [t for i, t in enumerate(probe.times) if i > 0 and i not in probe.resel_steps]
    return {
        "method": a.method, "k": tuner.k, "num_eligible": tuner.num_eligible,
        "parameters": sum(p.numel() for p in model.parameters()),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "step_end_rss": probe.rss,
        "model_rss": model_rss, "tensor_bytes": probe.bytes,
        "step_time": sum(probe.times[1:]) / max(1, len(probe.times) - 1),
        "step_time_plain": sum(plain) / max(1, len(plain)),
        "reselection_steps": sorted(probe.resel_steps), "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=9, help="steps per method (the first is not timed)")
    ap.add_argument("--density", type=float, default=None, help="default: the paper's language K, scaled")
    ap.add_argument("--reselection-steps", type=int, default=4, help="SpIEL's R (short, to see one in the run)")
    ap.add_argument("--accumulation-steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--method", choices=["lt-sft", "spiel"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.method:
        print(json.dumps(run_one(a)))
        return
    results = {}
    for method in ("lt-sft", "spiel"):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--method", method],
                             check=True, capture_output=True, text=True, cwd=ROOT)
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
    lt, sp = results["lt-sft"], results["spiel"]
    gib = 2 ** 30
    print(f"model: {a.layers} x {a.hidden}, vocab {a.vocab:,}: {lt['parameters']:,} parameters, "
          f"{lt['num_eligible']:,} eligible; K = {lt['k']:,} ({100 * lt['k'] / lt['num_eligible']:.2f}%); "
          f"batch {a.batch} x {a.seq}; {a.steps} steps; {lt['threads']} threads; SpIEL R = {a.reselection_steps}, "
          f"accumulation {a.accumulation_steps} (reselection after step(s) "
          f"{[s + 1 for s in sp['reselection_steps']]})")
    rows = [
        ("peak RSS (process)", lt["peak_rss"], sp["peak_rss"]),
        ("max RSS at step end", lt["step_end_rss"], sp["step_end_rss"]),
        ("tracked tensors, outside accumulation", lt["tensor_bytes"]["other"], sp["tensor_bytes"]["other"]),
        ("tracked tensors, accumulation steps", lt["tensor_bytes"]["other"], sp["tensor_bytes"]["accumulating"]),
    ]
    print(f"{'':40} {'LT-SFT phase 1':>15} {'SpIEL':>10} {'ratio':>7}")
    for name, x, y in rows:
        print(f"{name:40} {x / gib:12.2f} GiB {y / gib:6.2f} GiB {y / x:7.3f}")
    print(f"{'step time (mean, first excluded)':40} {lt['step_time']:13.3f} s {sp['step_time']:8.3f} s "
          f"{sp['step_time'] / lt['step_time']:7.3f}")
    print(f"{'step time without reselection steps':40} {lt['step_time_plain']:13.3f} s "
          f"{sp['step_time_plain']:8.3f} s {sp['step_time_plain'] / lt['step_time_plain']:7.3f}")
    print(f"model alone (RSS after creation): {lt['model_rss'] / gib:.2f} GiB")


if __name__ == "__main__":
    main()
