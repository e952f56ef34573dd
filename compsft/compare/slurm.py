"""The grid's nodes as SLURM jobs, through submitit (`pip install "compsft[slurm]"`).

Every module and every cell is one job running `executors.run_job_node` on the resolved grid: paths and
numbers are pickled, never a model. SLURM has the jobs, the driver (`compsft compare --executor slurm`, on
the login node) has the graph: a node is submitted when what it waits for has finished (language modules,
then the task modules trained on them, then the cells), ready nodes together as one job array. The output
directory, the module cache and submitit's folder (default OUT/slurm: the job scripts, pickles and logs)
must be on a filesystem every node sees. A job that is requeued, or a grid that is resumed, skips what is done
(module.json, the cell files) and continues a module from its checkpoints.

`cluster="local"` and `"debug"` are submitit's own stand-ins (jobs as processes here, or in this process):
the same path, testable without a cluster.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from compsft.errors import CompsftError

CLUSTERS = ("slurm", "local", "debug")


class SubmititExecutor:
    """Each node a submitit job; `max_jobs` in flight at most (None: as many as are ready)."""

    in_process = False

    def __init__(self, cluster: str, folder: str | Path, *, partition: str | None = None,
                 time_min: int = 60 * 24, gpus: int | None = None, mem_gb: float | None = None,
                 cpus: int | None = None, threads: int | None = None, max_jobs: int | None = None,
                 extra: dict[str, str] | None = None, setup: str | None = None) -> None:
        if cluster not in CLUSTERS:
            raise CompsftError(f"submitit cluster {cluster!r}: use one of {', '.join(CLUSTERS)}")
        self.cluster, self.folder = cluster, Path(folder)
        self.remote = cluster == "slurm"  # the jobs' devices are not this machine's
        self.slots = max_jobs
        self.threads = threads or cpus
        self.setup = setup
        self.parameters: dict[str, Any] = {"name": "compsft", "timeout_min": time_min, "gpus_per_node": gpus,
                                           "mem_gb": mem_gb, "cpus_per_task": cpus,
                                           "slurm_partition": partition,
                                           "slurm_additional_parameters": dict(extra) if extra else None}
        self._jobs: dict[Any, Any] = {}
        #: jobs submitted in this run
        self.submitted = 0

    def describe(self) -> dict[str, Any]:
        return {"executor": f"submitit-{self.cluster}", "folder": str(self.folder), "max_jobs": self.slots,
                "threads_per_worker": self.threads,
                "parameters": {k: v for k, v in self.parameters.items() if v is not None}}

    def executor(self):
        """The configured `submitit.AutoExecutor` (also what `bench/grid_workers.py --show-sbatch` uses)."""
        try:
            import submitit
        except ImportError:
            raise CompsftError("--executor slurm needs submitit: pip install 'compsft[slurm]'") from None
        try:
            ex = submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
        except RuntimeError as err:  # no srun here
            raise CompsftError(f"--executor slurm: {err}") from None
        ex.update_parameters(**{k: v for k, v in self.parameters.items() if v is not None})
        return ex

    def check(self, device: str) -> None:
        self.executor()  # submitit installed, srun found (slurm), the parameters valid

    def start(self, runner) -> None:
        from .executors import run_job_node

        self.grid, self.device, self._fn = runner.grid, runner.device, run_job_node
        self._ex = self.executor()

    def submit(self, node, failed: dict):
        from .grid import text_digests

        job = self._ex.submit(self._fn, self.grid, self.device, node, {str(k): v for k, v in failed.items()},
                              self.threads, self.setup, text_digests())
        self._jobs[job] = node
        self.submitted += 1
        return job

    def wait(self, handles: list, timeout: float, reporter=None) -> list:
        if self.cluster == "debug" and handles:
            handles[0].wait()  # the debug executor runs a job when asked for it, in this process
        deadline = time.monotonic() + timeout
        while True:
            done = [h for h in handles if h.done()]
            if done or time.monotonic() >= deadline:
                return done
            time.sleep(min(0.2, timeout))

    def outcome(self, job) -> dict[str, Any]:
        from submitit.core.utils import UncompletedJobError

        self._jobs.pop(job, None)
        try:
            return job.result()
        except UncompletedJobError as err:  # killed, timed out, preempted: left for --resume
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return {"status": "lost", "error": f"job {job.job_id} did not finish ({first[:200]}); "
                                               f"its log: {job.paths.stderr}"}

    def drain(self, reporter) -> None: ...

    def stop(self) -> None:
        for job in list(self._jobs):
            job.cancel(check=False)

    def close(self) -> None: ...
