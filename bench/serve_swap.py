"""Benchmark: what `compsft serve` pays to switch languages and tasks, against loading a merged model.

On the default model (multilingual-e5-small, trimmed; 384 hidden, 12 layers), with random SFTs built in
code at the paper's K for that shape (language (L+1)·h² = 1,916,928 entries, task 2·L·h² = 3,538,944 plus
the POS head dense), all in the same run and interleaved:

* swap: `ResidentModel.apply` (language + task SFT onto the shared encoder, the head copied in) + `revert`
  (bit-exact: the old values are gathered on apply and written back), as the server does per pair;
* load: `AutoModelForTokenClassification.from_pretrained` of the equivalent merged tagger saved on disk,
  what serving without SFTs would pay per switch: with the page cache warm (transformers may map the
  file rather than read it), then with every weight read once, then with the file evicted from the page
  cache first (`posix_fadvise(DONTNEED)` on that file alone);
* yardstick: `index_add_` of the same entries, decoded (int64 indices, fp32 values), once each way, no
  gathering of old values (what an apply that is never reverted costs, as `compose` to a merged model).

`--memory` adds the resident-memory comparison in fresh processes: one base + a store of 5 language
SFTs and 3 task SFTs (what the server holds), against 15 merged models (5 languages × 3 tasks).

    python bench/serve_swap.py                   # swap vs load vs yardstick, 10 runs
    python bench/serve_swap.py --memory          # plus the RSS comparison (writes and loads 15 merged models, ~3 GB)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compose import random_sft, yardstick  # noqa: E402  (bench/compose.py: K entries spread over the tensors)

import compsft  # noqa: E402
from compsft.serve.resident import ResidentModel  # noqa: E402
from compsft.training.params import adapter_equivalent_k  # noqa: E402

LANGUAGES = ("wol", "mlt", "hau", "uig", "myv")
TASKS = ("pos", "ner", "dep")


def task_sft(resident: ResidentModel, task: str, k: int, seed: int):
    """A random task SFT of `k` entries on the encoder, with a head of the task's real shape (dense)."""
    from compsft.tasks import get_task
    from compsft.tasks.dep import DEPRELS
    from compsft.tasks.pos import UPOS

    labels = {"pos": list(UPOS), "ner": ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"],
              "dep": list(DEPRELS)}[task]
    sft = random_sft(resident.encoder, k, seed)
    torch.manual_seed(seed)
    model = get_task(task).build_model(resident.model_dir, labels)
    prefix = model.base_model_prefix
    sft.dense = {n: torch.randn_like(p) * 0.02 for n, p in model.named_parameters() if not n.startswith(prefix + ".")}
    sft.config.kind, sft.config.task, sft.config.training = "task", task, {"labels": labels}
    sft.config.vocab = resident.vocab
    sft.config.dense_params = sorted(sft.dense)
    sft.source = f"random {task} SFT"
    return sft


def language_sft(resident: ResidentModel, language: str, k: int, seed: int):
    sft = random_sft(resident.encoder, k, seed)
    sft.config.kind, sft.config.language, sft.config.vocab = "language", language, resident.vocab
    sft.source = f"random {language} SFT"
    return sft


def paper_k(resident: ResidentModel) -> tuple[int, int]:
    c = resident.encoder.config
    return (adapter_equivalent_k(c.hidden_size, c.num_hidden_layers, "language"),
            adapter_equivalent_k(c.hidden_size, c.num_hidden_layers, "task"))


def make_store(model_dir: Path, out: Path, languages=LANGUAGES, tasks=TASKS) -> Path:
    """A store of random SFTs at the paper's K on `model_dir`: lang/CODE and task/TASK."""
    resident = ResidentModel(model_dir)
    lang_k, task_k = paper_k(resident)
    for i, code in enumerate(languages):
        language_sft(resident, code, lang_k, seed=10 + i).save(out / "lang" / code)
    for i, task in enumerate(tasks):
        task_sft(resident, task, task_k, seed=100 + i).save(out / "task" / task)
    return out


def fmt(xs: list[float]) -> str:
    return f"best {min(xs) * 1e3:8.1f} ms  median {statistics.median(xs) * 1e3:8.1f} ms  (range {min(xs) * 1e3:.1f}-{max(xs) * 1e3:.1f})"


def touch(model) -> float:
    """Read every weight once (a sum per tensor)."""
    with torch.no_grad():
        return float(sum(p.float().sum() for p in model.parameters()))


def evict(directory: Path) -> None:
    """Drop `directory`'s files from the page cache (these files only), so the next load reads the disk."""
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def swap_vs_load(model_dir: Path, repeat: int, tmp: Path) -> None:
    from transformers import AutoModelForTokenClassification

    resident = ResidentModel(model_dir)
    lang_k, task_k = paper_k(resident)
    lang, task = language_sft(resident, "wol", lang_k, seed=2), task_sft(resident, "pos", task_k, seed=3)
    t0 = time.perf_counter()
    model, labels = resident.apply("pos", lang, task)  # the first apply checks the base fingerprints
    first = time.perf_counter() - t0
    resident.revert()
    # The equivalent merged tagger on disk: θ0 + φ_L + φ_T with the head, as `compsft compose` writes it.
    merged = AutoModelForTokenClassification.from_pretrained(model_dir, num_labels=len(labels),
                                                             id2label=dict(enumerate(labels)))
    compsft.apply(merged, lang, task, with_dense=[False, True])
    merged.save_pretrained(tmp / "merged")
    del merged
    params = dict(model.named_parameters())
    decoded = []
    for sft in (lang, task):
        for name, d in sft.diffs.items():
            p = params[name] if name in params else params[f"{model.base_model_prefix}.{name}"]
            decoded.append((p.data.view(-1), d.indices.to(torch.int64), d.values.to(p.dtype)))
    swap, apply_only, revert_only, load, load_touch, cold, yard = [], [], [], [], [], [], []
    for _ in range(repeat):
        yard.append(yardstick(decoded))  # leaves the weights at θ0 only approximately: the swaps' own
        gc.collect()                     # exactness is the tests' business, their timing is the same
        t0 = time.perf_counter()
        resident.apply("pos", lang, task)
        t1 = time.perf_counter()
        resident.revert()
        t2 = time.perf_counter()
        swap.append(t2 - t0)
        apply_only.append(t1 - t0)
        revert_only.append(t2 - t1)
        gc.collect()
        t0 = time.perf_counter()
        loaded = AutoModelForTokenClassification.from_pretrained(tmp / "merged")
        load.append(time.perf_counter() - t0)
        touch(loaded)  # weights that are mapped from the file rather than read are read now
        load_touch.append(time.perf_counter() - t0)
        del loaded
        gc.collect()
        evict(tmp / "merged")
        t0 = time.perf_counter()
        touch(AutoModelForTokenClassification.from_pretrained(tmp / "merged"))
        cold.append(time.perf_counter() - t0)
    n = sum(p.numel() for p in params.values())
    print(f"default model {model_dir.name}: {n / 1e6:.1f}M parameters (encoder + POS head); language SFT "
          f"{lang.k:,} entries, task SFT {task.k:,} entries + head; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {repeat} runs, interleaved")
    print(f"  first apply (checks base fingerprints)        {first * 1e3:8.1f} ms")
    print(f"  swap: apply + revert (language + task)        {fmt(swap)}")
    print(f"    apply                                       {fmt(apply_only)}")
    print(f"    revert                                      {fmt(revert_only)}")
    print(f"  load merged tagger (from_pretrained)          {fmt(load)}")
    print(f"    + every weight read once                    {fmt(load_touch)}")
    print(f"    the same with the file evicted from cache   {fmt(cold)}")
    print(f"  yardstick: index_add_ of the same entries     {fmt(yard)}")
    for name, xs in (("load", load), ("load + read", load_touch), ("cold load + read", cold)):
        print(f"  {name} / swap: x{min(xs) / min(swap):.1f} best-to-best, "
              f"x{statistics.median(xs) / statistics.median(swap):.1f} median-to-median (goal >= 20)")
    print(f"  swap / yardstick: x{min(swap) / min(yard):.2f} best-to-best, "
          f"x{statistics.median(swap) / statistics.median(yard):.2f} median-to-median "
          f"(apply alone x{min(apply_only) / min(yard):.2f})", flush=True)


def _rss_child(kind: str, model_dir: str, store: str) -> None:
    """Run in a fresh process: hold what `kind` says, then print its peak and current RSS as JSON."""
    held: list = []
    if kind == "baseline":  # the interpreter with torch and transformers imported, holding nothing
        import transformers  # noqa: F401
    elif kind == "resident":
        from compsft.serve.store import SftStore

        resident = ResidentModel(model_dir)
        s = SftStore(store)
        s.refresh()
        held = [s.load(e) for e in list(s.index.languages.values()) + list(s.index.tasks.values())]
        for task in TASKS:  # every head built and every SFT prepared, as after one request per pair
            for language in LANGUAGES:
                resident.apply(task, s.load(s.index.language(language)), s.load(s.index.task(task)))
                resident.revert()
    else:
        from compsft.tasks import get_task

        for task in TASKS:
            for language in LANGUAGES:
                model = get_task(task).load_model(Path(store) / "merged" / f"{language}-{task}")[0]
                touch(model)  # resident as a server would have it after its first request
                held.append(model)
    gc.collect()
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    kib = {k: int(status[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}
    print(json.dumps({"kind": kind, "held": len(held), "rss": kib["VmRSS"], "peak": kib["VmHWM"]}))


def memory(model_dir: Path, tmp: Path) -> None:
    from compsft.tasks import get_task

    store = make_store(model_dir, tmp / "store")
    for task in TASKS:  # 15 merged models on disk, one per pair (each its own file: no shared pages)
        t_sft = compsft.load(store / "task" / task)
        spec = get_task(task)
        for language in LANGUAGES:
            model = spec.build_model(model_dir, t_sft.config.training["labels"])
            compsft.apply(model, compsft.load(store / "lang" / language), t_sft, with_dense=[False, True])
            model.save_pretrained(store / "merged" / f"{language}-{task}")
            del model
    rows = {}
    for kind in ("baseline", "resident", "merged"):
        out = subprocess.run([sys.executable, __file__, "--rss-child", kind, str(model_dir), str(store)],
                             capture_output=True, text=True, check=True)
        rows[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    b, r, m = rows["baseline"], rows["resident"], rows["merged"]
    print(f"memory (fresh processes, VmRSS after loading; peak in brackets):")
    print(f"  python + torch + transformers, nothing loaded       {b['rss'] / 2**20:8.0f} MiB ({b['peak'] / 2**20:.0f})")
    print(f"  one base + 5 language SFTs + 3 task SFTs + 3 heads  {r['rss'] / 2**20:8.0f} MiB ({r['peak'] / 2**20:.0f})")
    print(f"  15 merged models (5 languages x 3 tasks)            {m['rss'] / 2**20:8.0f} MiB ({m['peak'] / 2**20:.0f})")
    print(f"  ratio x{m['rss'] / r['rss']:.1f}; above the baseline x{(m['rss'] - b['rss']) / (r['rss'] - b['rss']):.1f}",
          flush=True)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--rss-child":
        return _rss_child(*sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="base model directory (default: the default model)")
    ap.add_argument("--repeat", type=int, default=10, help="interleaved runs of each measurement")
    ap.add_argument("--memory", action="store_true", help="also compare resident memory (15 merged models)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from compsft.models import default_model_dir

        args.model = default_model_dir()
    with tempfile.TemporaryDirectory() as tmp:
        swap_vs_load(args.model, args.repeat, Path(tmp))
        if args.memory:
            memory(args.model, Path(tmp))


if __name__ == "__main__":
    main()
