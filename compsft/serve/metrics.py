"""Prometheus metrics of `compsft serve` (`GET /metrics`): requests, sentences, swaps, latencies, queue.

Each server gets its own registry (several apps in one test process never share counters); the process
collector adds `process_resident_memory_bytes`, which the load bench reads to check memory stays flat.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from .worker import Events, Pair

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SWAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics(Events):
    """The counters and histograms, and the worker's hooks that feed them."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter("compsft_requests", "Prediction requests answered, by task and HTTP status",
                                ["task", "status"], registry=r)
        self.latency = Histogram("compsft_request_seconds", "Time from request to answer, by task", ["task"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.sentences = Counter("compsft_sentences", "Sentences predicted, by task", ["task"], registry=r)
        self.swaps = Counter("compsft_swaps", "Pairs applied and reverted (language SFT + task SFT)", registry=r)
        self.swap_seconds = Histogram("compsft_swap_seconds", "apply + revert time of one pair",
                                      buckets=SWAP_BUCKETS, registry=r)
        self.batch_seconds = Histogram("compsft_batch_seconds", "Model time of one round of a pair's queued requests",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Gauge("compsft_queue_depth", "Requests waiting for the model", registry=r)
        self.store_sfts = Gauge("compsft_store_sfts", "Usable SFTs in the store, by kind", ["kind"], registry=r)

    # -- worker hooks -----------------------------------------------------------------------------
    def swap(self, seconds: float) -> None:
        self.swaps.inc()
        self.swap_seconds.observe(seconds)

    def batch(self, pair: Pair, sentences: int, seconds: float) -> None:
        self.sentences.labels(task=pair[1]).inc(sentences)
        self.batch_seconds.observe(seconds)

    def queue_depth(self, depth: int) -> None:
        self.queue.set(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)
