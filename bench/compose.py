"""Benchmark: SFT files and composition on BERT-base- and XLM-R-base-sized random models.

The headline is the issue's case, from files to a composed model: load a language SFT (7,667,712
entries) and a task SFT (14,155,776 entries) and apply both onto the 277.5M-parameter XLM-R-base-shaped
model. Its yardstick, measured in the same run and interleaved with it, cannot flatter: a plain
`index_add_` of the same entries, already decoded (int64 indices, fp32 values, in memory). Printed:
yardstick, load, apply, load + apply, their ratio, and what the checksum verified on load costs.

`--table` adds, per model size and density: save time, bytes per non-zero (fp32 and fp16 values), load
time, apply + revert time, and a naive dense route (densify each difference, add it, subtract it).

    python bench/compose.py                  # the headline case, best of 5 and range
    python bench/compose.py --table          # plus the per-size table (BERT-base, XLM-R-base; 0.5%, 5%)
"""
from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

import compsft
from compsft.fingerprint import fingerprint
from compsft.serialization import WEIGHTS_NAME, file_checksum
from compsft.sft import SparseDelta, SparseFineTuning

SIZES = {
    "bert": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512),
    "xlmr": dict(vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1),
}
LANGUAGE_K, TASK_K = 7_667_712, 14_155_776  # the paper's K (MAD-X adapter sizes)


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
    sft = SparseFineTuning(diffs)
    sft.config.base_fingerprint = fingerprint(base, diffs)
    return sft


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        sync()
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir())


def dense_route(model: torch.nn.Module, sft: SparseFineTuning) -> None:
    """Densify each difference, add, subtract."""
    params = dict(model.named_parameters())
    for name, d in sft.diffs.items():
        p = params[name]
        dense = torch.zeros(p.numel(), device=p.device, dtype=p.dtype)
        dense[d.indices.to(p.device).long()] = d.values.to(p.device, p.dtype)
        p.data += dense.view_as(p)
        p.data -= dense.view_as(p)


def run_case(model, size: str, density: float, tmp: Path) -> None:
    n_eligible = sum(p.numel() for n, p in model.named_parameters() if "LayerNorm" not in n)
    sft = random_sft(model, int(n_eligible * density), seed=1)
    d32, d16 = tmp / f"{size}-{density}-f32", tmp / f"{size}-{density}-f16"
    t_save = timed(lambda: sft.save(d32), repeat=2)
    sft.save(d16, dtype=torch.float16)
    t_load = timed(lambda: compsft.load(d32))
    loaded = compsft.load(d32)

    def apply_revert():
        compsft.revert(model, compsft.apply(model, loaded))

    t_apply = timed(apply_revert)
    t_dense = timed(lambda: dense_route(model, loaded))
    params = sum(p.numel() for p in model.parameters())
    print(f"{size:5s} {next(model.parameters()).device.type:5s} {params / 1e6:6.1f}M  K={sft.k / 1e6:6.2f}M "
          f"({density:.1%})  save {t_save:.3f}s  load {t_load:.3f}s  apply+revert {t_apply:.3f}s  "
          f"dense route {t_dense:.3f}s (x{t_dense / t_apply:.1f})  "
          f"bytes/nz f32 {dir_bytes(d32) / sft.k:.2f} f16 {dir_bytes(d16) / sft.k:.2f}", flush=True)


def yardstick(decoded: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> float:
    """Seconds of one `index_add_` of decoded entries (flat parameter, int64 indices, values), then
    subtracted again untimed (back to θ0 approximately: for timings only)."""
    gc.collect()
    sync()
    t0 = time.perf_counter()
    for flat, idx, vals in decoded:
        flat.index_add_(0, idx, vals)
    sync()
    seconds = time.perf_counter() - t0
    for flat, idx, vals in decoded:
        flat.index_add_(0, idx, vals, alpha=-1)
    return seconds


def files_to_composed(model, tmp: Path, repeat: int, ks: tuple[int, ...] = (LANGUAGE_K, TASK_K)) -> dict:
    """Files -> composed model for SFTs of `ks` entries (default: the paper's language and task K), against
    the index_add_ yardstick in the same run. Returns the timings (seconds per run) by name."""
    names = ("lang", "task") if len(ks) == 2 else tuple(f"sft{i}" for i in range(len(ks)))
    made = [random_sft(model, k, seed=2 + i) for i, k in enumerate(ks)]
    for name, sft in zip(names, made):
        sft.save(tmp / name)
    params = dict(model.named_parameters())
    decoded = [(params[n].data.view(-1), d.indices.to(params[n].device, torch.int64),
                d.values.to(params[n].device, params[n].dtype)) for sft in made for n, d in sft.diffs.items()]
    del made
    yard, load, appl, total, check = [], [], [], [], []
    for _ in range(repeat):
        yard.append(yardstick(decoded))
        gc.collect()
        sync()
        t0 = time.perf_counter()
        loaded = [compsft.load(tmp / name) for name in names]
        sync()
        t1 = time.perf_counter()
        compsft.apply(model, *loaded)
        sync()
        t2 = time.perf_counter()
        load.append(t1 - t0)
        appl.append(t2 - t1)
        total.append(t2 - t0)
        compsft.revert(model)
        del loaded
        blobs = [(tmp / d / WEIGHTS_NAME).read_bytes() for d in names]
        t0 = time.perf_counter()
        for blob in blobs:
            file_checksum(blob)
        check.append(time.perf_counter() - t0)
        del blobs

    def fmt(xs: list[float]) -> str:
        return f"best {min(xs):.3f}s (range {min(xs):.3f}-{max(xs):.3f}, median {statistics.median(xs):.3f})"

    print(f"files -> composed model, {' + '.join(f'{n} {k:,}' for n, k in zip(names, ks))} entries, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {repeat} runs:")
    print(f"  yardstick (index_add_ of decoded entries) {fmt(yard)}")
    print(f"  load (both files, checksum + validation)   {fmt(load)}")
    print(f"    of which checksum (xxh3-64)             {fmt(check)}  = {min(check) / min(load):.0%} of best load")
    print(f"  apply (both SFTs)                         {fmt(appl)}")
    print(f"  load + apply                              {fmt(total)}")
    ratios = [t / y for t, y in zip(total, yard)]
    print(f"  ratio load+apply / yardstick: best-to-best x{min(total) / min(yard):.2f}; "
          f"per run x{min(ratios):.2f}-x{max(ratios):.2f}", flush=True)
    return {"yardstick": yard, "load": load, "apply": appl, "load_apply": total, "checksum": check}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", action="store_true", help="also the per-size table of save/load/apply")
    ap.add_argument("--sizes", nargs="+", default=["bert", "xlmr"], choices=sorted(SIZES))
    ap.add_argument("--densities", nargs="+", type=float, default=[0.005, 0.05])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, devices {args.devices}")
    with tempfile.TemporaryDirectory() as tmp:
        for device in args.devices:
            if args.table:
                for size in args.sizes:
                    model = random_model(size, device)
                    for density in args.densities:
                        run_case(model, size, density, Path(tmp))
                    del model
                    gc.collect()
            model = random_model("xlmr", device)
            files_to_composed(model, Path(tmp), args.repeat)
            del model
            gc.collect()


if __name__ == "__main__":
    main()
