"""The page of `compsft serve` in a real browser: Debian's headless Chromium loads it from a server on
127.0.0.1, the page submits a sentence (its query string says so), and the rendered DOM is checked: the
parse drawn as arcs above the words, entities highlighted. A screenshot is kept (in the test's tmp_path,
and in $COMPSFT_SCREENSHOTS if set)."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from compsft.serve import Service, create_app  # noqa: E402
from test_serve_helpers import make_base, make_store  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="no Chromium: install Debian's package (apt-get install -y chromium)")
SENTENCE = "Maria went to Paris with John."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-browser")
    base = make_base(root / "base")
    service = Service(base, make_store(base, root / "store"), reload_interval=0)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # a free port, held from here on (no race with other tests)
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    sock.close()


def chromium(tmp_path: Path, url: str, *flags: str) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000", *flags, url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def page_url(base: str, **params: str) -> str:
    return f"{base}/?{urlencode({**params, 'submit': '1'})}"


def test_the_page_draws_a_parse(server, tmp_path):
    dom = chromium(tmp_path, page_url(server, language="wol", task="dep", text=SENTENCE), "--dump-dom")
    assert 'data-state="done"' in dom, dom[-3000:]
    svg = re.search(r'<svg class="tree".*?</svg>', dom, re.S).group(0)
    words = re.findall(r'<text [^>]*class="word"[^>]*>([^<]*)</text>', svg)
    assert words == ["Maria", "went", "to", "Paris", "with", "John", "."]
    arcs = re.findall(r'<g class="arc" data-start="(\d+)" data-end="(\d+)" data-label="([^"]+)" data-dir="(left|right)"',
                      svg)
    assert len(arcs) == len(words) - 1  # every word but the root hangs from an arc
    assert all(int(s) < int(e) for s, e, _, _ in arcs)
    rows = re.findall(r'<td class="head">(\d+)</td><td class="deprel">([^<]+)</td>', dom)
    assert len(rows) == len(words) and [h for h, _ in rows].count("0") == 1
    # The arcs are the table's tree: each non-root word's arc joins it to its head.
    drawn = {(int(s), int(e), label) for s, e, label, _ in arcs}
    table = {(min(i, int(h) - 1), max(i, int(h) - 1), rel) for i, (h, rel) in enumerate(rows) if h != "0"}
    assert drawn == table


def test_the_page_highlights_entities(server, tmp_path):
    import httpx

    text = SENTENCE + " The dog sees a cat."
    expected = httpx.post(f"{server}/v1/predict", json={"task": "ner", "language": "mlt", "text": text}).json()
    spans = [(e["type"], e["text"]) for s in expected["sentences"] for e in s["entities"]]
    dom = chromium(tmp_path, page_url(server, language="mlt", task="ner", text=text), "--dump-dom")
    assert 'data-state="done"' in dom
    marks = re.findall(r'<mark class="entity" data-label="([^"]+)">([^<]*)<span class="label">', dom)
    assert marks == spans and spans  # the tiny model's random head does find some


def test_the_page_screenshot(server, tmp_path):
    shot = tmp_path / "serve-dep.png"
    chromium(tmp_path, page_url(server, language="wol", task="dep", text=SENTENCE), "--window-size=1100,800",
             f"--screenshot={shot}")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a drawn page, not a blank one
    keep = os.environ.get("COMPSFT_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
