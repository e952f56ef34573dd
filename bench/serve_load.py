"""Load test of `compsft serve` on 127.0.0.1: concurrent clients, mixed languages × tasks vs one pair.

Starts `compsft serve` (a subprocess, 127.0.0.1, a free port) on a store of random SFTs at the paper's K
for the default model (5 languages × 3 tasks, built in code by bench/serve_swap.py's `make_store`; or
`--store DIR`), warms every pair once, then runs two phases of `--seconds` each with `--clients`
concurrent httpx clients, each request 1-4 Wolof UD test sentences (pre-tokenized):

* mixed: every request a random (language, task) of the 15 pairs;
* single: every request wol/pos (no swaps).

Printed per phase: requests answered / refused (429, 503) / failed, sentences per second, p50 and p99
latency, swaps per second (from /metrics), and the server's resident memory at the start and end of the
phase and its maximum (sampled every second). Then mixed throughput as a share of single's.

    python bench/serve_load.py --seconds 20                # 8 clients, 20 s per phase
    python bench/serve_load.py --clients 8 --seconds 60    # the issue's 60 s
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_swap import LANGUAGES, TASKS, make_store  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) if found else float("nan")


def sentences() -> list[list[str]]:
    from compsft.tasks import data_path
    from compsft.tasks.readers import read_conllu

    return [s.words for s in read_conllu(data_path("ud:wo_wtb:test")) if len(s.words) <= 60]


async def phase(url: str, name: str, pairs: list, pool: list, clients: int, seconds: float, seed: int) -> dict:
    latencies, statuses, done_sentences = [], {}, 0
    rss = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        before = (await http.get("/metrics")).text
        deadline = time.monotonic() + seconds

        async def client(i: int) -> None:
            nonlocal done_sentences
            rng = random.Random(seed * 100 + i)
            while time.monotonic() < deadline:
                language, task = rng.choice(pairs)
                batch = rng.sample(pool, rng.randint(1, 4))
                t0 = time.perf_counter()
                r = await http.post("/v1/predict", json={"task": task, "language": language, "sentences": batch})
                latencies.append(time.perf_counter() - t0)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    done_sentences += len(r.json()["sentences"])
                elif r.status_code not in (429, 503):
                    raise RuntimeError(f"{r.status_code}: {r.text[:300]}")

        async def sampler() -> None:
            while time.monotonic() < deadline:
                rss.append(metric((await http.get("/metrics")).text, "process_resident_memory_bytes"))
                await asyncio.sleep(1.0)

        started = time.perf_counter()
        await asyncio.gather(sampler(), *(client(i) for i in range(clients)))
        wall = time.perf_counter() - started
        after = (await http.get("/metrics")).text
    swaps = metric(after, "compsft_swaps_total") - metric(before, "compsft_swaps_total")
    lat = sorted(latencies)
    out = {"name": name, "wall": wall, "statuses": statuses, "sentences": done_sentences,
           "throughput": done_sentences / wall, "p50": statistics.median(lat),
           "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))], "swaps_per_s": swaps / wall,
           "rss_start": metric(before, "process_resident_memory_bytes"),
           "rss_end": metric(after, "process_resident_memory_bytes"), "rss_max": max(rss or [float("nan")])}
    refused = statuses.get(429, 0) + statuses.get(503, 0)
    print(f"{name:7s} {wall:5.1f} s  requests {sum(statuses.values()):5d} (200: {statuses.get(200, 0)}, refused "
          f"{refused}, other 0)  {out['throughput']:6.1f} sentences/s  p50 {out['p50'] * 1e3:6.0f} ms  "
          f"p99 {out['p99'] * 1e3:6.0f} ms  swaps {out['swaps_per_s']:5.1f}/s  RSS {out['rss_start'] / 2**20:.0f} -> "
          f"{out['rss_end'] / 2**20:.0f} MiB (max {out['rss_max'] / 2**20:.0f})", flush=True)
    return out


async def run(url: str, clients: int, seconds: float, languages: list[str]) -> None:
    pool = sentences()
    mixed = [(lang, task) for lang in languages for task in TASKS]
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        for language, task in mixed:  # warm-up: every head built, every SFT loaded and checked once
            r = await http.post("/v1/predict", json={"task": task, "language": language, "sentences": pool[:2]})
            r.raise_for_status()
    print(f"{clients} clients, {seconds:g} s per phase, requests of 1-4 sentences from {len(pool)} Wolof UD test "
          f"sentences; {len(languages)} languages x {len(TASKS)} tasks")
    a = await phase(url, "mixed", mixed, pool, clients, seconds, seed=1)
    b = await phase(url, "single", [(languages[0], "pos")], pool, clients, seconds, seed=2)
    print(f"mixed throughput = {a['throughput'] / b['throughput']:.0%} of single (goal >= 70%)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="base model directory (default: the default model)")
    ap.add_argument("--store", type=Path, default=None, help="SFT store (default: random SFTs built in code)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each phase (at most 60)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the server")
    args = ap.parse_args()
    if not 0 < args.seconds <= 60:
        ap.error("--seconds must be in (0, 60]")
    if args.model is None:
        from compsft.models import default_model_dir

        args.model = default_model_dir()
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or make_store(args.model, Path(tmp) / "store")
        port = free_port()
        cmd = [sys.executable, "-m", "compsft.cli", "serve", "--model", str(args.model), "--store", str(store),
               "--host", "127.0.0.1", "--port", str(port), "--reload-interval", "0"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(Path(tmp) / "server.log", "w"),
                                  env={**os.environ, "COMPSFT_LOG_LEVEL": "WARNING"})
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start:\n{(Path(tmp) / 'server.log').read_text()[-3000:]}")
                time.sleep(0.5)
            asyncio.run(run(url, args.clients, args.seconds, list(LANGUAGES)))
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()
