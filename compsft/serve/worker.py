"""The one thread that touches the model: bounded queues per (language, task), apply → batches → revert.

HTTP handlers never run model code (it would stall the event loop): they `submit` a `Job` and await its
future. The worker picks the pair whose oldest job has waited longest, applies its language and task
SFTs once, runs every queued job of that pair (up to `max_batch_sentences` sentences per round, the
sentences of all jobs together, in length-sorted batches), and reverts before it moves to another
pair, so a swap is paid once per round rather than once per request. While the same pair keeps
arriving and nothing else waits, it stays applied (`linger` seconds at most), then goes back to θ0.

Queues are bounded (`queue_size` jobs per pair, `max_jobs` in all): `submit` raises `Overloaded`
instead of letting memory grow. A job whose SFTs cannot be used fails with `SftUnavailable`; the
model is untouched (apply checks everything first) and the other pairs go on.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from compsft.errors import CompsftError

from .resident import ResidentModel
from .store import SftChanged, SftStore, SftUnavailable

logger = logging.getLogger(__name__)

Pair = tuple[str, str]  # (language, task)


class Overloaded(Exception):
    """The queue for this pair (or all queues together) is full: refuse now rather than queue without bound."""


class Unavailable(Exception):
    """The worker is not running (starting, stopped, or died)."""


@dataclass
class Job:
    """One request: a pair and its sentences (lists of words); the future receives one result per sentence."""

    language: str
    task: str
    sentences: list[list[str]]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def pair(self) -> Pair:
        return (self.language, self.task)


# predict(task, model, tokenizer, labels, sentences_words, batch_size) -> one prediction per sentence
# (a compsft.tasks.Sentence with tags, or heads and deprels), in order.
PredictFn = Callable[[str, object, object, list, list, int], list]


class Events:
    """Hooks for metrics; the defaults do nothing."""

    def swap(self, seconds: float) -> None: ...
    def batch(self, pair: Pair, sentences: int, seconds: float) -> None: ...
    def queue_depth(self, depth: int) -> None: ...


class Worker:
    """The model's only thread. `start()`, `submit(job)`, `stop()`."""

    def __init__(self, resident: ResidentModel, store: SftStore, predict: PredictFn, *, queue_size: int = 32,
                 max_jobs: int = 256, max_batch_sentences: int = 256, batch_size: int = 32, linger: float = 0.05,
                 events: Events | None = None) -> None:
        self.resident = resident
        self.store = store
        self.predict = predict
        self.queue_size = queue_size
        self.max_jobs = max_jobs
        self.max_batch_sentences = max_batch_sentences
        self.batch_size = batch_size
        self.linger = linger
        self.events = events or Events()
        self.swaps = 0
        self._queues: dict[Pair, deque[Job]] = {}
        self._pending = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._busy = False

    # -- the handlers' side -----------------------------------------------------------------------
    def submit(self, job: Job) -> concurrent.futures.Future:
        with self._cond:
            if not self.alive:
                raise Unavailable("the model worker is not running")
            queue = self._queues.setdefault(job.pair, deque())
            if len(queue) >= self.queue_size or self._pending >= self.max_jobs:
                raise Overloaded(f"too many requests waiting ({self._pending} queued, {len(queue)} for "
                                 f"{job.language}/{job.task}); retry later")
            queue.append(job)
            self._pending += 1
            self.events.queue_depth(self._pending)
            self._cond.notify()
        return job.future

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def pending(self) -> int:
        return self._pending

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="compsft-serve-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            for queue in self._queues.values():
                while queue:
                    _fail(queue.popleft(), Unavailable("the server is shutting down"))
            self._pending = 0

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """True once nothing is queued, nothing runs and the model is back at θ0 (for tests and benches)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cond:
                if not self._pending and not self._busy and not self.resident.is_applied:
                    return True
            time.sleep(0.005)
        return False

    # -- the worker's side ------------------------------------------------------------------------
    def _next_pair(self) -> Pair | None:
        """The pair whose oldest job has waited longest (FIFO across pairs: none starves)."""
        best = None
        for pair, queue in self._queues.items():
            if queue and (best is None or queue[0].enqueued < self._queues[best][0].enqueued):
                best = pair
        return best

    def _take(self, pair: Pair) -> list[Job]:
        """Jobs of `pair` up to `max_batch_sentences` sentences (at least one job)."""
        queue = self._queues[pair]
        jobs, count = [], 0
        while queue and (not jobs or count + len(queue[0].sentences) <= self.max_batch_sentences):
            job = queue.popleft()
            self._pending -= 1
            if job.future.set_running_or_notify_cancel():
                jobs.append(job)
                count += len(job.sentences)
        self.events.queue_depth(self._pending)
        return jobs

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopping and self._next_pair() is None:
                        self._cond.wait()
                    if self._stopping:
                        return
                    pair = self._next_pair()
                    self._busy = True
                try:
                    self._serve_pair(pair)
                finally:
                    with self._cond:
                        self._busy = False
        except BaseException:  # noqa: BLE001 - logged; healthz reports the dead worker
            logger.exception("the model worker died")
            raise
        finally:
            self.resident.revert()

    def _serve_pair(self, pair: Pair) -> None:
        language, task = pair
        try:
            lang_sft, task_sft = self._load(language, task)
            started = time.perf_counter()
            model, labels = self.resident.apply(task, lang_sft, task_sft)
            self.swaps += 1
        except Exception as err:  # noqa: BLE001 - this pair's requests get the error, the worker goes on
            if not isinstance(err, CompsftError):
                logger.exception("applying %s/%s failed", language, task)
            if isinstance(err, KeyError):  # the language or task left the store since the request came
                err = SftUnavailable(str(err.args[0]))
            with self._cond:
                jobs = self._take(pair)
            for job in jobs:
                _fail(job, err)
            return
        swap_time = time.perf_counter() - started
        try:
            while True:
                with self._cond:
                    jobs = self._take(pair)
                if jobs:
                    self._run_jobs(task, model, labels, jobs)
                    continue
                # Nothing of this pair left: stay applied a moment only if nothing else waits.
                with self._cond:
                    if self._stopping or self._next_pair() is not None or not self._linger(pair):
                        break
        finally:
            started = time.perf_counter()
            self.resident.revert()
            self.events.swap(swap_time + time.perf_counter() - started)

    def _linger(self, pair: Pair) -> bool:
        """Wait up to `linger` s (lock held) for more of `pair`; False if something else arrives or none does."""
        deadline = time.monotonic() + self.linger
        while not self._stopping:
            queue = self._queues.get(pair)
            if queue:
                return True
            if self._next_pair() is not None:
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._cond.wait(left)
        return False

    def _load(self, language: str, task: str):
        """The two SFTs, from one index generation; a directory replaced mid-read is read again."""
        for attempt in range(3):
            index = self.store.index
            try:
                lang_entry, task_entry = index.language(language), index.task(task)
                return self.store.load(lang_entry), self.store.load(task_entry)
            except SftChanged:
                if attempt == 2:
                    raise
                time.sleep(0.05)
                self.store.refresh()
        raise AssertionError("unreachable")

    def _run_jobs(self, task: str, model, labels: list, jobs: list[Job]) -> None:
        sentences = [words for job in jobs for words in job.sentences]
        started = time.perf_counter()
        try:
            results = self.predict(task, model, self.resident.tokenizer, labels, sentences, self.batch_size)
        except Exception as err:  # noqa: BLE001 - handed to every waiting request, the worker goes on
            logger.exception("prediction failed for %s/%s", jobs[0].language, task)
            for job in jobs:
                _fail(job, err)
            return
        self.events.batch(jobs[0].pair, len(sentences), time.perf_counter() - started)
        begin = 0
        for job in jobs:
            end = begin + len(job.sentences)
            if not job.future.done():
                job.future.set_result(results[begin:end])
            begin = end


def _fail(job: Job, err: BaseException) -> None:
    if not job.future.done():
        try:
            job.future.set_exception(err)
        except concurrent.futures.InvalidStateError:  # cancelled meanwhile
            pass
