"""The GPU check: everything compsft does on a GPU, in one command, before any long run (issue 29).

    python bench/gpu_check.py                       # on cuda: about 5-10 minutes on one GPU
    python bench/gpu_check.py --device cpu --quick  # the same code on the CPU in about a minute (a test runs it)

Writes one JSON report (``--out``, default gpu-check.json) and prints a short table. Sections:

- ``environment``: torch, CUDA and transformers versions, the device's name and memory.
- ``core``: for fp32, bf16 and fp16 models and SFT values: load onto the device, apply, revert (bit-exact:
  a digest of every parameter's bytes, and the SFT's base fingerprint, `compsft.fingerprint`), compose
  (composed = applied one after the other); `compsft compose --device` writes the same model as on the CPU.
- ``apply``: files -> composed model for a 5.7M-entry SFT (the default model's LT-SFT size) against the
  `index_add_` yardstick in the same run (`bench/compose.py`; the goal is <= 2.5x, as on the CPU).
- ``selection``: LT-SFT's exact top-K on the device, its time and extra peak memory.
- ``training``: a few steps of every method of `compsft compare` on the default model at the paper's batch
  and length (`bench/gpu_check_train.py`), in bf16 autocast; lt-sft, full-ft and task-sft-no-source also in
  fp32 and, on CUDA, fp16 with a gradient scaler. Steps/s and peak memory (`torch.cuda.max_memory_allocated`;
  on the CPU the process's peak RSS) per module, and the time the `paper` budget would take from them.
- ``ddp`` (with several GPUs, or ``--ddp N``): the same short LT-SFT run under ``torchrun --nproc_per_node=N``
  selects the same mask on every rank and gives the result of one process.

Exit status: 0 when every check passed, 1 when one failed (the report says which), 3 when ``--device cuda``
was asked and CUDA is not available. A failing section does not stop the others.
"""
from __future__ import annotations

import argparse
import functools
import gc
import hashlib
import importlib.util
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

import compsft
from compsft import fingerprint as fp

HERE = Path(__file__).resolve().parent
NO_CUDA = 3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
APPLY_K = 5_672_555  # the default model's LT-SFT (language + task SFT entries, `compsft compare --list-methods`)
TINY = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
            max_position_embeddings=64)


@functools.lru_cache(maxsize=None)
def bench_module(name: str):
    """A sibling script of bench/ as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gib(n: int) -> float:
    return round(n / 2**30, 3)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# -- sections -----------------------------------------------------------------------------------------
def environment(device: str) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "transformers": transformers.__version__, "compsft": getattr(compsft, "__version__", None),
           "device": device, "cpu_threads": torch.get_num_threads(), "host": platform.node()}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(device_name=props.name, device_memory_gib=gib(props.total_memory),
                   capability=f"{props.major}.{props.minor}", device_count=torch.cuda.device_count(),
                   bf16_supported=torch.cuda.is_bf16_supported())
    else:
        env.update(device_name=platform.processor() or platform.machine(),
                   device_memory_gib=gib(_meminfo_total()))
    return env


def _meminfo_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def base_matches(model: torch.nn.Module, sft) -> bool:
    """The SFT's recorded base fingerprint matches the model's weights (`compsft.fingerprint.compare`)."""
    params = dict(model.named_parameters())
    for name in sft.diffs:
        p = params[name].detach()
        sample = p.reshape(-1)[fp.sample_positions(p.numel()).to(p.device)]
        if fp.compare(sft.config.base_fingerprint, name, tuple(p.shape), sample) is not None:
            return False
    return True


def core(device: str, quick: bool, tmp: Path) -> dict:
    """Load, apply, revert and compose on `device` for each dtype of model and SFT values."""
    cb = bench_module("compose")
    cb.SIZES.setdefault("tiny", TINY)
    out: dict = {}
    for name, dtype in DTYPES.items():
        try:
            out[name] = core_dtype(cb.random_model("tiny" if quick else "xlmr", device).to(dtype), name, device, tmp)
        except Exception as err:  # noqa: BLE001 - the other dtypes still run
            out[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:500]}
        gc.collect()
    out["compose_cli"] = compose_cli(device, tmp)
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


def core_dtype(model: torch.nn.Module, name: str, device: str, tmp: Path) -> dict:
    cb = bench_module("compose")
    dtype = DTYPES[name]
    params = sum(p.numel() for p in model.parameters())
    k = max(1000, params // 200)
    a, b = cb.random_sft(model, k, seed=11), cb.random_sft(model, k, seed=12)
    a.save(tmp / f"a-{name}", dtype=dtype)
    b.save(tmp / f"b-{name}", dtype=dtype)
    before = digest(model)
    sync(device)
    t0 = time.perf_counter()
    la, lb = compsft.load(tmp / f"a-{name}", device=device), compsft.load(tmp / f"b-{name}", device=device)
    sync(device)
    t1 = time.perf_counter()
    handle = compsft.apply(model, la, lb)
    sync(device)
    t2 = time.perf_counter()
    changed = digest(model) != before
    compsft.revert(model, handle)
    sync(device)
    t3 = time.perf_counter()
    record = {"revert_bit_exact": digest(model) == before, "base_fingerprint_matches": base_matches(model, la),
              "values_dtype": str(next(iter(la.diffs.values())).values.dtype), "params": params, "k": la.k + lb.k,
              "load_s": round(t1 - t0, 4), "apply_s": round(t2 - t1, 4), "revert_s": round(t3 - t2, 4)}
    record["compose_ok"] = record["revert_bit_exact"] and composed_equals_applied(model, la, lb, dtype)
    record["ok"] = bool(changed and record["revert_bit_exact"] and record["base_fingerprint_matches"]
                        and record["compose_ok"] and {d.values.dtype for d in la.diffs.values()} == {dtype})
    return record


def composed_equals_applied(model, a, b, dtype) -> bool:
    """apply(compose(a, b)) equals apply(a, b) within rounding (composing adds in fp32 and rounds once; applying
    one after the other rounds twice in a half type), and reverts to the same bits."""
    before = digest(model)
    compsft.apply(model, a, b)
    one_by_one = {n: p.detach().clone() for n, p in model.named_parameters()}
    compsft.revert(model)
    compsft.apply(model, compsft.compose(a, b))
    rtol = 1e-6 if dtype == torch.float32 else 2.0 ** -7
    same = all(torch.allclose(p.detach().float(), one_by_one[n].float(), rtol=rtol, atol=1e-6)
               for n, p in model.named_parameters())
    compsft.revert(model)
    return bool(same and digest(model) == before)


def compose_cli(device: str, tmp: Path) -> dict:
    """`compsft compose --device DEVICE` writes the same model, bit for bit, as `--device cpu`."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from compsft.cli import app

    cb = bench_module("compose")
    model = cb.random_model("tiny", "cpu")
    base = tmp / "compose-base"
    model.save_pretrained(base)
    cb.random_sft(model, 5000, seed=13).save(tmp / "compose-sft")
    files = {}
    for dev in dict.fromkeys(["cpu", device]):
        out = tmp / f"composed-{dev.replace(':', '-')}"
        r = CliRunner().invoke(app, ["compose", "--base", str(base), "--sft", str(tmp / "compose-sft"),
                                     "--out", str(out), "--device", dev])
        if r.exit_code != 0:
            return {"ok": False, "error": f"compose --device {dev}: {r.exception or r.output[-300:]}"}
        files[dev] = load_file(str(out / "model.safetensors"))
    same = all(torch.equal(files["cpu"][n], files[device][n]) for n in files["cpu"])
    return {"ok": same, "devices": list(files), "same_bits": same}


def apply_speed(device: str, quick: bool, tmp: Path, model_dir: Path | None) -> dict:
    """Files -> composed model of an APPLY_K-entry SFT against index_add_ (`bench/compose.files_to_composed`)."""
    cb = bench_module("compose")
    cb.SIZES.setdefault("tiny", TINY)
    if model_dir is not None and not quick:
        from transformers import AutoModel

        model = AutoModel.from_pretrained(model_dir).to(device).eval().requires_grad_(False)
    else:
        model = cb.random_model("tiny" if quick else "xlmr", device)
    eligible = sum(p.numel() for n, p in model.named_parameters() if "LayerNorm" not in n)
    k = min(APPLY_K, eligible // 4)
    times = cb.files_to_composed(model, tmp, repeat=2 if quick else 5, ks=(k,))
    ratio = min(times["load_apply"]) / min(times["yardstick"])
    return {"ok": True, "k": k, "params": sum(p.numel() for p in model.parameters()),
            "yardstick_s": round(min(times["yardstick"]), 4), "load_s": round(min(times["load"]), 4),
            "apply_s": round(min(times["apply"]), 4), "load_apply_s": round(min(times["load_apply"]), 4),
            "ratio": round(ratio, 2), "goal": 2.5, "meets_goal": ratio <= 2.5}


def selection(device: str, quick: bool) -> dict:
    """LT-SFT's exact top-K of |θ1 − θ0| on the device: seconds and extra peak memory."""
    from compsft.training import lottery_ticket

    shapes = bench_module("selection").xlmr_base_shapes()
    if quick:
        shapes = [tuple(max(1, s // 16) for s in shape) for shape in shapes]
    k = 14_155_776 if not quick else sum(torch.Size(s).numel() for s in shapes) // 20
    g = torch.Generator(device=device).manual_seed(0)
    theta0 = {f"t{i}": torch.randn(s, generator=g, device=device) for i, s in enumerate(shapes)}
    theta1 = {n: t + 1e-3 * torch.randn(t.shape, generator=g, device=device) for n, t in theta0.items()}
    with bench_module("gpu_check_train").PeakMemory(device) as mem:
        t0 = time.perf_counter()
        masks = lottery_ticket(theta0, theta1, k)
        sync(device)
        seconds = time.perf_counter() - t0
    # exact: the selected scores are the K largest (as a multiset: rounding makes ties at the threshold,
    # which the selection breaks by position and topk by its own rule)
    scores = torch.cat([(theta1[n] - theta0[n]).reshape(-1).abs() for n in theta0])
    offsets = torch.tensor([0] + [t.numel() for t in theta0.values()]).cumsum(0)
    got = torch.cat([masks[n].long() + offsets[i] for i, n in enumerate(theta0)]).to(scores.device)
    exact = bool(got.unique().numel() == k and torch.equal(scores[got].sort().values, scores.topk(k).values.sort().values))
    del scores
    return {"ok": exact, "k": k, "entries": sum(t.numel() for t in theta0.values()), "equals_topk": exact,
            "seconds": round(seconds, 3), "extra_peak_gib": gib(mem.extra)}


# -- the report ---------------------------------------------------------------------------------------
def run_section(report: dict, name: str, fn, *args) -> None:
    print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        result = fn(*args)
    except Exception as err:  # noqa: BLE001 - one failing section must not hide the others
        result = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
    result["section_seconds"] = round(time.perf_counter() - t0, 1)
    report["sections"][name] = result


def summary_rows(report: dict) -> list[tuple[str, str, str]]:
    rows = []
    s = report["sections"]
    for name, r in s.items():
        if "error" in r:
            rows.append((name, "FAILED", r["error"][:100]))
        elif name == "core":
            rows.append((name, "ok" if r["ok"] else "FAILED", ", ".join(
                f"{d}: " + (r[d]["error"][:60] if "error" in r[d] else
                            f"revert {'exact' if r[d]['revert_bit_exact'] else 'NOT exact'}, apply {r[d]['apply_s']} s")
                for d in DTYPES) + f"; compose --device {'same bits' if r['compose_cli'].get('ok') else 'FAILED'}"))
        elif name == "apply":
            verdict = "n/a (quick)" if report["quick"] else "ok" if r["meets_goal"] else "slow"
            rows.append((name, verdict, f"K={r['k']:,}: load+apply {r['load_apply_s']} s = "
                         f"x{r['ratio']} index_add_ ({r['yardstick_s']} s); goal x{r['goal']}"))
        elif name == "selection":
            rows.append((name, "ok" if r["ok"] else "FAILED", f"top-{r['k']:,} of {r['entries']:,}: {r['seconds']} s, "
                         f"{r['extra_peak_gib']} GiB extra"))
        else:
            rows.extend((f"{name}: {a}", b, c) for a, b, c in r.get("rows", [("", "ok" if r.get("ok") else "FAILED", "")]))
    return rows


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    env = report["environment"]
    table = Table(title=f"compsft GPU check on {env['device']} ({env.get('device_name')}, "
                        f"{env.get('device_memory_gib')} GiB); torch {env['torch']}, CUDA {env['cuda']}")
    for col in ("check", "result", "figures"):
        table.add_column(col, overflow="fold")
    for row in summary_rows(report):
        table.add_row(*row)
    Console(width=160).print(table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and the quick budget: a smoke run")
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: the default model)")
    ap.add_argument("--methods", default=None, help="comma-separated methods to train (default: all of compare)")
    ap.add_argument("--precisions", default=None,
                    help="comma-separated subset of bf16,fp32,fp16 to train in (default: bf16 for every method, and "
                         "fp32 and on CUDA fp16 too for the methods of experiments/paper_budget.sh)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per phase, at least 3 for NAS-PET's pruning rounds (default 10; --quick: the "
                         "quick budget's 2 language and 3 task steps)")
    ap.add_argument("--ddp", type=int, default=None,
                    help="processes for the torchrun check (default: the GPU count when > 1, else none)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip")
    ap.add_argument("--out", type=Path, default=Path("gpu-check.json"), help="the JSON report")
    args = ap.parse_args(argv)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: --device {device} but CUDA is not available (torch {torch.__version__}, built for CUDA "
              f"{torch.version.cuda}). Install the CUDA build of torch (docs/gpu.md), or run "
              "`python bench/gpu_check.py --device cpu --quick`.", file=sys.stderr)
        return NO_CUDA
    import transformers

    transformers.logging.set_verbosity_error()  # load reports and warnings would bury the table
    transformers.utils.logging.disable_progress_bar()
    train = bench_module("gpu_check_train")
    skip = {s for s in args.skip.split(",") if s}
    report = {"command": " ".join(["python", "bench/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "quick": args.quick,
              "environment": environment(device), "sections": {}}
    ddp = args.ddp if args.ddp is not None else (torch.cuda.device_count() if device.startswith("cuda") else 0)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        tmp = Path(tmp)
        model_dir = train.model_dir(args.model, args.quick, tmp)
        sections = [("core", core, device, args.quick, tmp),
                    ("apply", apply_speed, device, args.quick, tmp, None if args.quick else model_dir),
                    ("selection", selection, device, args.quick),
                    ("training", train.training, device, args.quick, model_dir, args.methods, args.steps, tmp / "train",
                     args.precisions)]
        if ddp > 1:
            sections.append(("ddp", train.ddp_check, device, ddp, model_dir, tmp / "ddp"))
        for name, fn, *fn_args in sections:
            if name not in skip:
                run_section(report, name, fn, *fn_args)
    report["ok"] = all(s.get("ok") for s in report["sections"].values())
    from compsft.atomic import write_text

    write_text(args.out, json.dumps(report, indent=2, default=str) + "\n")
    print_table(report)
    print(f"report: {args.out}; {'all checks passed' if report['ok'] else 'SOME CHECKS FAILED'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
