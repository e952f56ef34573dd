"""A comparison grid run sequentially and with parallel workers: wall time of each, their ratio, and whether
every cell's scores are identical (issue 30).

The full measurement (the default grid: lt-sft, task-sft-only, full-ft; wol, mlt; 3 seeds; budget cpu;
about an hour per run on an idle 2-core machine)::

    .venv/bin/python bench/grid_workers.py --out runs/bench-workers

sequential with 2 threads against `--workers 2` with 1 thread each (`--sequential-threads`, `--workers`,
`--threads-per-worker`). Each run starts from an empty module cache, so both train every module. A reduced
run: `--seeds 1 --scale 0.25` (every step count of the budget a quarter, test sentences too).

`--parallel-executor submitit-local` runs the parallel arm as submitit jobs (every module and cell a job);
`--show-sbatch` prints the job script submitit would submit to SLURM for each node with the given options (a
stand-in `sbatch` on PATH takes it; nothing is submitted).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def budget(name: str, task: str, scale: float):
    from compsft.compare import get_budget

    b = get_budget(name, task)
    if scale == 1.0:
        return name
    scaled = lambda n: None if n is None else max(1, round(n * scale))  # noqa: E731
    return dataclasses.replace(b, lang_steps=scaled(b.lang_steps), task_steps=scaled(b.task_steps),
                               eval_sentences=scaled(b.eval_sentences))


def run_arm(args, name: str, executor) -> tuple[float, dict]:
    from compsft.compare import CompareConfig, compare
    from compsft.compare.progress import LineReporter

    out = Path(args.out) / name
    if out.exists():
        shutil.rmtree(out)  # an empty module cache: both arms train everything
    config = CompareConfig(task=args.task, targets=args.targets.split(","), methods=args.methods.split(","),
                           seeds=args.seeds, budget=budget(args.budget, args.task, args.scale), out=str(out),
                           device="cpu")
    started = time.perf_counter()
    results = compare(config, LineReporter(), executor)
    return time.perf_counter() - started, results


def scores(results: dict) -> dict:
    return {(c["method"], c["target"], c["seed"]): (c.get("status"), json.dumps(c.get("metrics"), sort_keys=True))
            for c in results["cells"]}


def show_sbatch(args) -> None:
    """The sbatch script submitit writes for a node's job, taken by a stand-in sbatch (and srun)."""
    from compsft.compare.executors import build_executor

    with tempfile.TemporaryDirectory() as tmp:
        bin_dir = Path(tmp) / "bin"
        bin_dir.mkdir()
        for tool, text in (("sbatch", "echo Submitted batch job 4242"), ("srun", "true")):
            path = bin_dir / tool
            path.write_text(f"#!/bin/sh\n{text}\n")
            path.chmod(path.stat().st_mode | stat.S_IEXEC)
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
        executor = build_executor("slurm", threads=args.threads_per_worker, out=args.out, slurm=dict(
            partition=args.slurm_partition, time_min=args.slurm_time, gpus=args.slurm_gpus, mem_gb=args.slurm_mem,
            cpus=args.slurm_cpus, folder=Path(tmp) / "slurm"))
        ex = executor.executor()
        job = ex.submit(print, "a node")
        print(f"# a node's job ({job.paths.submission_file.name}):")
        print(job.paths.submission_file.read_text().replace(tmp, "OUT"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="pos")
    ap.add_argument("--methods", default="lt-sft,task-sft-only,full-ft")
    ap.add_argument("--targets", default="wol,mlt")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget", default="cpu", choices=["quick", "cpu", "paper"])
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the budget's step counts and test "
                                                             "sentences (a reduced run)")
    ap.add_argument("--out", default="runs/bench-workers")
    ap.add_argument("--sequential-threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads-per-worker", type=int, default=1)
    ap.add_argument("--parallel-executor", default="local", choices=["local", "submitit-local"])
    ap.add_argument("--skip-sequential", action="store_true", help="only the parallel arm")
    ap.add_argument("--show-sbatch", action="store_true")
    ap.add_argument("--slurm-partition", default="gpu")
    ap.add_argument("--slurm-time", type=int, default=240)
    ap.add_argument("--slurm-gpus", type=int, default=1)
    ap.add_argument("--slurm-mem", type=float, default=32)
    ap.add_argument("--slurm-cpus", type=int, default=8)
    args = ap.parse_args()
    if args.show_sbatch:
        show_sbatch(args)
        return

    import transformers

    from compsft.compare.executors import SerialExecutor, build_executor

    transformers.utils.logging.set_verbosity_error()  # load reports of task models built from an MLM model
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    arms = {}
    if not args.skip_sequential:
        arms["sequential"] = run_arm(args, "sequential", SerialExecutor(threads=args.sequential_threads))
    parallel = build_executor(args.parallel_executor, workers=args.workers, threads=args.threads_per_worker,
                              out=Path(args.out) / "parallel", slurm=dict(time_min=24 * 60))
    arms["parallel"] = run_arm(args, "parallel", parallel)
    print(f"machine: load average {os.getloadavg()[0]:.1f} at the end")
    for name, (seconds, results) in arms.items():
        failed = sum(c.get("status") != "ok" for c in results["cells"])
        print(f"{name:>10}: {seconds:8.1f} s wall, {len(results['cells'])} cells ({failed} failed), "
              f"{json.dumps(results['execution'])}")
    if "sequential" in arms:
        seq, par = arms["sequential"], arms["parallel"]
        print(f"speed-up (sequential / parallel wall): {seq[0] / par[0]:.2f}x")
        a, b = scores(seq[1]), scores(par[1])
        differ = [k for k in a if a[k] != b.get(k)]
        print("scores: identical in every cell" if a == b else
              f"scores: {len(differ)} of {len(a)} cells differ (first: {differ[0]}: {a[differ[0]]} vs "
              f"{b.get(differ[0])})")


if __name__ == "__main__":
    main()
