"""One trainer per module: a claim file in the module's cache directory, created atomically.

Workers of one grid, two grids sharing a `--module-cache`, or SLURM jobs on several machines may all reach the
same module. Whoever creates ``<key_dir>/claim.json`` with ``O_CREAT | O_EXCL`` (atomic on local filesystems
and on NFSv3 and later) trains it; the others wait until the claim goes away, then find module.json written.
The claim records host, pid and time, and its holder touches it every `HEARTBEAT_SECONDS` while it trains, so
a claim left by a process that died (SIGKILL, a node lost) is recognised as stale: on the same host by its
pid being gone, elsewhere by a heartbeat older than `STALE_SECONDS`. A stale claim is taken over (renamed
aside first, so that of two processes taking it over one wins); the work it left in ``work/`` resumes.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from .grid import read_json

logger = logging.getLogger(__name__)

CLAIM_FILE = "claim.json"
#: how often a holder touches its claim while it trains
HEARTBEAT_SECONDS = 30.0
#: a claim from another host whose heartbeat is older than this is stale (its holder stopped)
STALE_SECONDS = 300.0
#: how often a waiting process looks at a claim held by another
POLL_SECONDS = 2.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    # A zombie (a child that died but was not reaped yet) still answers: it trains nothing.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def stale_reason(path: Path, now: float | None = None) -> str | None:
    """Why the claim at `path` is stale, or None while its holder may still be training."""
    try:
        age = (now or time.time()) - path.stat().st_mtime
    except FileNotFoundError:
        return None
    holder = read_json(path)
    if holder and holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        return None if _pid_alive(holder["pid"]) else f"process {holder['pid']} is gone"
    if age > STALE_SECONDS:
        return f"no heartbeat for {age:.0f} s"
    return None


def describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process"
    return f"{holder.get('host')}:{holder.get('pid')} (since {holder.get('time')})"


@contextlib.contextmanager
def claim_module(key_dir: Path, label: str = "", on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the claim on the module in `key_dir` while the block runs (waiting for another holder first)."""
    key_dir.mkdir(parents=True, exist_ok=True)
    path = key_dir / CLAIM_FILE
    token = uuid.uuid4().hex
    record = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "label": label, "token": token}
    waited = False
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            reason = stale_reason(path)
            if reason is not None:
                _take_over(path, reason, label)
                continue
            if not waited and on_wait is not None:
                on_wait(describe(read_json(path)))
            waited = True
            time.sleep(POLL_SECONDS)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, token, stop), daemon=True)
    # From here on the claim is ours: an interrupt anywhere below (Ctrl-C reaches workers too) releases it.
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
        beat.start()
        yield
    finally:
        stop.set()
        if beat.is_alive():
            beat.join()
        holder = read_json(path)
        if holder is None or holder.get("token") == token:  # ours, or interrupted before it was written
            path.unlink(missing_ok=True)


def _heartbeat(path: Path, token: str, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_SECONDS):
        with contextlib.suppress(OSError):
            os.utime(path)


def _take_over(path: Path, reason: str, label: str) -> None:
    aside = path.with_name(f"{CLAIM_FILE}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)  # atomic: of two processes taking over, one renames it, the other finds none
    except FileNotFoundError:
        return
    if stale_reason(aside) is None and read_json(aside) is not None:
        # We renamed a claim made after we judged the old one stale: put it back unless another was made.
        with contextlib.suppress(OSError):
            os.link(aside, path)
    else:
        logger.warning("%s: took over a stale claim (%s): %s", label or path.parent, reason,
                       describe(read_json(aside)))
    aside.unlink(missing_ok=True)
