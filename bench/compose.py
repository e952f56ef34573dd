"""Benchmark: SFT files and composition on BERT-base- and XLM-R-base-sized random models.

Prints, per model size and density: save time, bytes per non-zero (fp32 and fp16 values), load time,
apply+revert time, and ratios against yardsticks measured in the same run:

* a naive dense route (densify each difference, add it to the weight, subtract it again);
* the reference implementation's file route (a `torch.save` pickle of Python lists of index steps,
  read back and decoded the way it does) for save and load.

Then the issue's headline case: from files to a composed model for a language SFT (7.7M) and a task
SFT (14.2M) on the 277.5M model. Run on CPU; on CUDA too when there is one::

    python bench/compose.py                 # both sizes, K = 0.5% and 5%
    python bench/compose.py --sizes xlmr --reference
"""
from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertModel

import compsft  # noqa: E402
from compsft.sft import SparseDelta, SparseFineTuning  # noqa: E402

SIZES = {
    "bert": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512),
    "xlmr": dict(vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1),
}


def random_model(size: str, device: str) -> torch.nn.Module:
    with torch.device("meta"):
        model = BertModel(BertConfig(**SIZES[size]), add_pooling_layer=True)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    return model.eval().requires_grad_(False)


def random_sft(model: torch.nn.Module, k_total: int, seed: int) -> SparseFineTuning:
    """K entries spread over the eligible tensors in proportion to their size (uniform density)."""
    eligible = [(n, p) for n, p in model.named_parameters() if "LayerNorm" not in n]
    total = sum(p.numel() for _, p in eligible)
    g = torch.Generator().manual_seed(seed)
    diffs = {}
    for name, p in eligible:
        k = round(k_total * p.numel() / total)
        if k == 0:
            continue
        idx = torch.randint(0, p.numel(), (int(k * 1.1) + 16,), generator=g).unique()
        idx = idx[torch.randperm(idx.numel(), generator=g)[:k]].sort().values
        diffs[name] = SparseDelta(tuple(p.shape), idx.int(), torch.randn(idx.numel(), generator=g) * 1e-3)
    base = {n: p.detach().cpu() for n, p in eligible}
    from compsft.fingerprint import fingerprint

    sft = SparseFineTuning(diffs)
    sft.config.base_fingerprint = fingerprint(base, diffs)
    return sft


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir())


def dense_route(model: torch.nn.Module, sft: SparseFineTuning) -> None:
    """The yardstick: densify each difference, add, subtract."""
    params = dict(model.named_parameters())
    for name, d in sft.diffs.items():
        p = params[name]
        dense = torch.zeros(p.numel(), device=p.device, dtype=p.dtype)
        dense[d.indices.to(p.device).long()] = d.values.to(p.device, p.dtype)
        p.data += dense.view_as(p)
        p.data -= dense.view_as(p)


# -- the reference implementation's file route, reproduced as a yardstick --------------------------
def reference_save(sft: SparseFineTuning, path: Path) -> None:
    diffs = {}
    for name, d in sft.diffs.items():
        idx = d.indices.long().numpy()
        steps = np.diff(idx, prepend=0).tolist()  # a Python list of ints, as the reference stores them
        diffs[name] = {"size": torch.Size(d.shape), "index_steps": steps, "values": d.values}
    torch.save({"diffs": diffs, "abs": {}}, path)


def reference_load(path: Path) -> dict:
    data = torch.load(path, weights_only=True)
    out = {}
    for name, enc in data["diffs"].items():
        idx = torch.tensor(enc["index_steps"], dtype=torch.int64).cumsum(0)
        out[name] = (idx, enc["values"])
    return out


def run_case(model, size: str, density: float, tmp: Path, reference: bool, rows: list) -> None:
    n_eligible = sum(p.numel() for n, p in model.named_parameters() if "LayerNorm" not in n)
    k = int(n_eligible * density)
    sft = random_sft(model, k, seed=1)
    d32, d16 = tmp / f"{size}-{density}-f32", tmp / f"{size}-{density}-f16"
    t_save = timed(lambda: sft.save(d32), repeat=2)
    sft.save(d16, dtype=torch.float16)
    t_load = timed(lambda: compsft.load(d32))
    loaded = compsft.load(d32)
    device = next(model.parameters()).device

    def apply_revert():
        h = compsft.apply(model, loaded)
        compsft.revert(model, h)

    t_apply = timed(apply_revert)
    t_dense = timed(lambda: dense_route(model, loaded))
    row = {
        "model": size, "device": str(device), "params": sum(p.numel() for p in model.parameters()),
        "k": sft.k, "density": density,
        "save_s": t_save, "load_s": t_load, "apply_revert_s": t_apply, "dense_route_s": t_dense,
        "bytes_per_nz_f32": dir_bytes(d32) / sft.k, "bytes_per_nz_f16": dir_bytes(d16) / sft.k,
    }
    if reference:
        ref = tmp / f"{size}-{density}-ref.bin"
        row["ref_save_s"] = timed(lambda: reference_save(sft, ref), repeat=1)
        row["ref_load_s"] = timed(lambda: reference_load(ref), repeat=1)
        row["ref_bytes_per_nz"] = ref.stat().st_size / sft.k
        ref.unlink()
    rows.append(row)
    print_row(row)


def print_row(r: dict) -> None:
    line = (f"{r['model']:5s} {r['device']:5s} {r['params'] / 1e6:6.1f}M  K={r['k'] / 1e6:6.2f}M ({r['density']:.1%})  "
            f"save {r['save_s']:.3f}s  load {r['load_s']:.3f}s  apply+revert {r['apply_revert_s']:.3f}s  "
            f"dense route {r['dense_route_s']:.3f}s (x{r['dense_route_s'] / r['apply_revert_s']:.1f})  "
            f"bytes/nz f32 {r['bytes_per_nz_f32']:.2f} f16 {r['bytes_per_nz_f16']:.2f}")
    if "ref_save_s" in r:
        line += (f"\n      reference file route: save {r['ref_save_s']:.2f}s (x{r['ref_save_s'] / r['save_s']:.0f} slower), "
                 f"load {r['ref_load_s']:.2f}s (x{r['ref_load_s'] / r['load_s']:.0f} slower), "
                 f"{r['ref_bytes_per_nz']:.2f} bytes/nz")
    print(line, flush=True)


def files_to_composed(model, tmp: Path, reference: bool) -> None:
    """The issue's case: language SFT 7,667,712 + task SFT 14,155,776 entries, files -> composed model
    (load both, apply both; the revert afterwards is not timed)."""
    lang, task = random_sft(model, 7_667_712, seed=2), random_sft(model, 14_155_776, seed=3)
    lang.save(tmp / "lang")
    task.save(tmp / "task")
    times = []
    for _ in range(5):
        t = time.perf_counter()
        compsft.apply(model, compsft.load(tmp / "lang"), compsft.load(tmp / "task"))
        times.append(time.perf_counter() - t)
        compsft.revert(model)
    t = min(times)
    msg = f"files -> composed model (7.7M + 14.2M entries, load + apply): best {t:.3f}s of 5 (all: {', '.join(f'{x:.2f}' for x in times)})"
    if reference:
        reference_save(lang, tmp / "lang.bin")
        reference_save(task, tmp / "task.bin")
        params = dict(model.named_parameters())
        theta0 = {n: p.detach().clone() for n, p in params.items()}
        start = time.perf_counter()
        for f in ("lang.bin", "task.bin"):
            for name, (idx, vals) in reference_load(tmp / f).items():
                params[name].data.view(-1)[idx] += vals
        t_ref = time.perf_counter() - start
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(theta0[n])
        msg += f"; reference-style route (pickle of index steps, load + add) {t_ref:.2f}s -> x{t_ref / t:.1f}"
    print(msg, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["bert", "xlmr"], choices=sorted(SIZES))
    ap.add_argument("--densities", nargs="+", type=float, default=[0.005, 0.05])
    ap.add_argument("--reference", action="store_true", help="also time the reference implementation's file route")
    ap.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, devices {args.devices}")
    rows: list = []
    with tempfile.TemporaryDirectory() as tmp:
        for device in args.devices:
            for size in args.sizes:
                model = random_model(size, device)
                for density in args.densities:
                    run_case(model, size, density, Path(tmp), args.reference, rows)
                if size == "xlmr":
                    files_to_composed(model, Path(tmp), args.reference)
                del model
                gc.collect()


if __name__ == "__main__":
    main()
