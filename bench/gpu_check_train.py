"""The training half of `bench/gpu_check.py`: every method of `compare` for a few steps, the paper budget's time
from the measured steps/s, and the torchrun check. Run through `bench/gpu_check.py`, not alone."""
from __future__ import annotations

import dataclasses
import gc
import gzip
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: the methods of experiments/paper_budget.sh: also measured in fp32 (what that run trains in) and, on CUDA, fp16
PAPER_METHODS = ("lt-sft", "task-sft-only", "task-sft-no-source", "full-ft")
PAPER_TARGETS = ("wol", "mlt")
PAPER_SEEDS = 3


def model_dir(given: Path | None, quick: bool, tmp: Path) -> Path:
    """The model the training sections use: `given`, else the default model (prepared once, cached)."""
    if given is not None:
        return given
    from compsft.models import default_model_dir

    return default_model_dir()


# -- memory -------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory of a block: `torch.cuda.max_memory_allocated` on CUDA; on the CPU the process's peak
    RSS (VmHWM, reset through /proc/self/clear_refs where the kernel allows it). `extra` is the peak minus
    what was in use when the block began."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.peak = self.start = 0

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            except OSError:
                pass
            self.start = status_bytes("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = status_bytes("VmHWM")

    @property
    def extra(self) -> int:
        return max(0, self.peak - self.start)


def status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


class StepTimer(TrainerCallback):
    """Seconds between consecutive optimizer steps of every Trainer run (the first step of each run, with its
    warm-up, is not counted), and the steps themselves."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.steps, self.intervals, self.seconds, self._last = cuda, 0, 0, 0.0, None

    def on_train_begin(self, args, state, control, **kw):
        self._last = None

    def on_step_end(self, args, state, control, **kw):
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.steps += 1
        if self._last is not None:
            self.intervals += 1
            self.seconds += now - self._last
        self._last = now

    def steps_per_second(self) -> float | None:
        return round(self.intervals / self.seconds, 3) if self.intervals and self.seconds > 0 else None


def count_sentences(name: str) -> int:
    from compsft.tasks import data_path

    with gzip.open(data_path(name), "rt", encoding="utf-8") as f:
        return sum(1 for line in f if not line.strip())


def measure_budget(quick: bool, steps: int | None):
    """The paper's batch and length with a few fixed steps (quick: the quick budget)."""
    from compsft.compare.budgets import get_budget

    if quick:
        fixed = {} if steps is None else {"lang_steps": steps, "task_steps": steps}
        return dataclasses.replace(get_budget("quick", "pos"), dev_checks=0, **fixed)
    n = steps or 10
    return dataclasses.replace(get_budget("paper", "pos"), lang_steps=n, lang_epochs=None, lang_max_steps=None,
                               lang_min_steps=0, lang_lines=3000, task_steps=n, task_epochs=None,
                               train_sentences=max(200, 16 * n), dev_checks=0, dev_sentences=0, eval_sentences=50)


def precisions(method: str, cuda: bool) -> list[str]:
    extra = ["fp32"] + (["fp16"] if cuda else []) if method in PAPER_METHODS else []
    return ["bf16", *extra]


def training(device: str, quick: bool, model: Path, methods: str | None, steps: int | None, out: Path,
             only: str | None = None) -> dict:
    """A few steps of every method (each precision of `precisions`), with steps/s and peak memory per module,
    then an assembly and a short evaluation on Wolof; and the paper budget's time from those steps/s."""
    from transformers import AutoTokenizer

    from compsft.languages import corpus_files, eval_files
    from compsft.methods import LanguageData, MethodContext, TaskData, get_method, list_methods
    from compsft.tasks import data_path, get_task
    from compsft.training.precision import autocast, use_precision

    cuda = device.startswith("cuda")
    names = [m for m in (methods.split(",") if methods else list_methods()) if m]
    budget = measure_budget(quick, steps)
    out.mkdir(parents=True, exist_ok=True)
    train = "ud:en_ewt:train"  # the methods read the budget's first train_sentences of it
    test = get_task("pos").read(data_path("ud:wo_wtb:test"))[:budget.eval_sentences or 20]
    eng = LanguageData("eng", corpus_files("eng"), eval_files("eng"))
    pos = get_task("pos")
    tokenizer = AutoTokenizer.from_pretrained(model)
    modules: dict = {}  # (kind, key, precision) -> (dir, record): methods sharing a module train it once
    records, rows = [], []
    for name in names:
        spec = get_method(name)
        for prec in [p for p in precisions(name, cuda) if only is None or p in only.split(",")]:
            rec = {"method": name, "precision": prec}
            try:
                timer = StepTimer(cuda)
                ctx = MethodContext(model_dir=model, budget=budget, device="cuda" if cuda else "cpu", callbacks=[timer])
                with use_precision(prec):
                    lang_dir = None
                    if spec.has_language_module and (spec.uses_source_language or spec.uses_target_language):
                        lang_dir, rec["language"] = _module(
                            modules, ("language", spec.language_key, prec), out / f"lang-{spec.language_key}-{prec}",
                            lambda d: spec.train_language(ctx, eng, 0, d), timer, PeakMemory(device))
                    source = lang_dir if spec.uses_source_language else None
                    task_dir, rec["task"] = _module(
                        modules, ("task", spec.task_key, prec), out / f"task-{spec.task_key}-{prec}",
                        lambda d: spec.train_task(ctx, TaskData("pos", train), source, 0, d), timer,
                        PeakMemory(device))
                    t0 = time.perf_counter()
                    assembled, labels = spec.assemble(ctx, task_dir, lang_dir if spec.uses_target_language else None)
                    gold = pos.prepare_gold(test, labels)
                    with autocast(prec, ctx.device), torch.no_grad():
                        metrics, _ = pos.evaluate(assembled, tokenizer, gold, labels)
                    rec["evaluate"] = {"sentences": len(gold), "seconds": round(time.perf_counter() - t0, 2),
                                       "accuracy": round(metrics["accuracy"], 4)}
                    del assembled
                rec["ok"] = True
            except Exception as err:  # noqa: BLE001 - the other methods still run; the record says what failed
                import traceback

                rec.update(ok=False, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-2000:])
            records.append(rec)
            rows.append(_row(rec))
    result = {"ok": all(r["ok"] for r in records), "budget": dataclasses.asdict(budget), "methods": records}
    try:
        result["paper_estimate"] = paper_estimate(records, tokenizer)
        rows.extend(_estimate_rows(result["paper_estimate"]))
    except Exception as err:  # noqa: BLE001
        result.update(ok=False, paper_estimate={"error": f"{type(err).__name__}: {err}"})
        rows.append(("paper estimate", "FAILED", str(err)[:100]))
    result["rows"] = rows
    return result


def _module(cache: dict, key, out: Path, train, timer: StepTimer, mem) -> tuple[Path, dict]:
    """Train a module once per key, recording steps, steps/s, seconds and peak memory."""
    if key in cache:
        return cache[key][0], {**cache[key][1], "shared": True}
    timer.steps, timer.intervals, timer.seconds = 0, 0, 0.0
    t0 = time.perf_counter()
    with mem:
        info = train(out)
    record = {"steps": timer.steps, "steps_per_s": timer.steps_per_second(), "seconds": round(time.perf_counter() - t0, 2),
              "peak_gib": round(mem.peak / 2**30, 3), "trainable": info.trainable}
    cache[key] = (out, record)
    return out, record


def _row(rec: dict) -> tuple[str, str, str]:
    if not rec["ok"]:
        return (f"{rec['method']} {rec['precision']}", "FAILED", rec["error"][:100])
    parts = []
    for kind in ("language", "task"):
        m = rec.get(kind)
        if m:
            parts.append(f"{kind} {m['steps_per_s']} steps/s, {m['peak_gib']} GiB" + (" (shared)" if m.get("shared") else ""))
    parts.append(f"eval {rec['evaluate']['sentences']} sent. {rec['evaluate']['seconds']} s")
    return (f"{rec['method']} {rec['precision']}", "ok", "; ".join(parts))


# -- the paper budget's time --------------------------------------------------------------------------
def paper_estimate(records: list[dict], tokenizer) -> dict:
    """Hours the `paper` budget would train, per method and precision measured, from the measured steps/s:
    per seed, the language modules the method trains in experiments/paper_budget.sh's grid (eng as the source,
    wol and mlt as targets) and its task module; and that grid's total (3 seeds, modules shared between methods
    counted once). Evaluation and the 10 source-dev checks are not counted."""
    from compsft.compare.budgets import get_budget
    from compsft.languages import corpus_files, eval_files, load_mlm_corpus, tokenize_for_mlm
    from compsft.methods import get_method
    from compsft.training.arguments import SftArguments

    paper = get_budget("paper", "pos")
    lang_phase = SftArguments(full_ft_max_epochs=paper.lang_epochs, full_ft_min_steps=paper.lang_min_steps,
                              full_ft_max_steps=paper.lang_max_steps)
    lang_steps = {}
    for code in ("eng", *PAPER_TARGETS):
        corpus = load_mlm_corpus(corpus_files(code), exclude=eval_files(code))
        examples = len(tokenize_for_mlm(corpus.lines, tokenizer, max_length=paper.lang_max_length))
        lang_steps[code] = 2 * lang_phase.phase_steps(1, math.ceil(examples / paper.lang_batch))
    per_epoch = math.ceil(count_sentences("ud:en_ewt:train") / paper.task_batch)
    task_steps = sum(math.ceil(e * per_epoch) for e in paper.task_epochs)
    out = {"language_steps": lang_steps, "task_steps": task_steps, "methods": {}, "grid_hours": {}}
    grid: dict[str, dict] = {}
    for rec in records:
        if not rec["ok"] or not rec["task"]["steps_per_s"]:
            continue
        spec = get_method(rec["method"])
        seconds, parts = task_steps / rec["task"]["steps_per_s"], {}
        parts[("task", spec.task_key)] = seconds
        lang = rec.get("language")
        if lang and lang["steps_per_s"]:
            codes = (["eng"] if spec.uses_source_language else []) + (list(PAPER_TARGETS) if spec.uses_target_language else [])
            for code in codes:
                parts[("language", spec.language_key, code)] = lang_steps[code] / lang["steps_per_s"]
        hours = sum(parts.values()) / 3600
        out["methods"][f"{rec['method']} {rec['precision']}"] = {"hours_per_seed": round(hours, 2),
                                                                "hours_3_seeds": round(PAPER_SEEDS * hours, 2)}
        if rec["method"] in PAPER_METHODS:
            grid.setdefault(rec["precision"], {}).update(parts)
    for prec, parts in grid.items():
        methods = {r["method"] for r in records if r["precision"] == prec and r["ok"]}
        if set(PAPER_METHODS) <= methods:
            out["grid_hours"][prec] = round(PAPER_SEEDS * sum(parts.values()) / 3600, 2)
    return out


def _estimate_rows(est: dict) -> list[tuple[str, str, str]]:
    rows = [(f"paper budget: {m}", "estimate", f"{v['hours_per_seed']} h per seed, {v['hours_3_seeds']} h for 3 seeds")
            for m, v in est["methods"].items()]
    rows += [(f"paper_budget.sh grid, {p}", "estimate", f"{h} h (3 seeds, wol+mlt, modules shared once)")
             for p, h in est["grid_hours"].items()]
    return rows


# -- several GPUs ---------------------------------------------------------------------------------------
def ddp_check(device: str, nproc: int, model: Path, out: Path) -> dict:
    """The same short LT-SFT language run in one process and under torchrun with `nproc` processes: every rank
    selects the same mask (the trainer checks it and logs so), and the result matches one process's (same
    global batch; entries at the selection threshold may swap, so 98% of the mask must agree)."""
    import compsft

    out.mkdir(parents=True, exist_ok=True)
    nodrop = _no_dropout_copy(model, out / "model")
    cpu = not device.startswith("cuda")
    per_rank = 4

    def args(dest: Path, batch: int) -> list[str]:
        return ["train-language", "--model", str(nodrop), "--lang", "eng", "--max-lines", "400", "--out", str(dest),
                "--density", "0.005", "--max-length", "64", "--batch-size", str(batch), "--static-masking",
                "--save-steps", "0", "--phase1-min-steps", "0", "--phase1-max-steps", "6", "--phase2-min-steps", "0",
                "--phase2-max-steps", "6", "--l1", "0", *(["--cpu"] if cpu else [])]

    env = {**os.environ, "PYTHONPATH": str(ROOT), "COMPSFT_LOG_LEVEL": "INFO", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args(out / "single", per_rank * nproc)],
                            env=env, capture_output=True, text=True, timeout=600)
    if single.returncode != 0:
        return {"ok": False, "error": f"single process failed: {single.stderr[-1500:]}"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                          "--master_port", str(_free_port()), str(ROOT / "cli.py"), *args(out / "ddp", per_rank)],
                         env=env, capture_output=True, text=True, timeout=600)
    if ddp.returncode != 0:
        return {"ok": False, "error": f"torchrun failed: {ddp.stderr[-1500:]}"}
    a, b = compsft.load(out / "single"), compsft.load(out / "ddp")
    common, max_diff = 0, 0.0
    for n, d in a.diffs.items():
        if n not in b.diffs:
            continue
        ia, ib = d.indices.long(), b.diffs[n].indices.long()
        both = ia[torch.isin(ia, ib)]
        common += both.numel()
        va, vb = d.values[torch.searchsorted(ia, both)], b.diffs[n].values[torch.searchsorted(ib, both)]
        if both.numel():
            max_diff = max(max_diff, float((va - vb).abs().max()))
    same_masks = f"mask identical on all {nproc} ranks" in ddp.stderr
    overlap = common / a.k if a.k else 0.0
    ok = same_masks and overlap >= 0.98 and max_diff <= 1e-4 and b.config.training["world_size"] == nproc
    return {"ok": ok, "nproc": nproc, "same_mask_on_every_rank": same_masks, "mask_overlap_with_one_process":
            round(overlap, 4), "max_value_difference": max_diff, "k": a.k,
            "rows": [(f"{nproc} processes", "ok" if ok else "FAILED",
                      f"same mask on every rank: {same_masks}; {overlap:.2%} of one process's mask; values within "
                      f"{max_diff:.1e}")]}


def _no_dropout_copy(model: Path, dest: Path) -> Path:
    """Dropout draws per rank: without it, the global batch is the only randomness left to compare."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    AutoModelForMaskedLM.from_pretrained(model, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0) \
        .save_pretrained(dest)
    AutoTokenizer.from_pretrained(model).save_pretrained(dest)
    return dest


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
