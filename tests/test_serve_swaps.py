"""`compsft serve`'s swaps: θ0 bit-identical between pairs after 2,000 swaps, every request served
by its own pair (the same predictions as a model composed from scratch), queued requests share a swap."""
from __future__ import annotations

import copy
import random
import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")

import compsft  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from compsft.predict import Predictor  # noqa: E402
from compsft.serve import Service, create_app  # noqa: E402
from compsft.serve.worker import Job  # noqa: E402
from test_serve_helpers import make_base, make_store, state_digest  # noqa: E402

LANGUAGES, TASKS = ("wol", "mlt"), ("pos", "dep", "ner")
PAIRS = [(lang, task) for lang in LANGUAGES for task in TASKS]
SENTENCES = [["the", "dog", "sees", "a", "cat", "."], ["Maria", "went", "to", "Paris", "with", "John", "yesterday"],
             ["ndox", "mi", "neex", "na", "."]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-swaps")
    base = make_base(root / "base")
    return base, make_store(base, root / "store", LANGUAGES, TASKS)


def _model_digest(model) -> str:
    return state_digest(dict(model.named_parameters()))


def test_theta0_is_bit_identical_after_thousands_of_swaps(setup):
    """Each job's model is exactly θ0 + φ_L + φ_T of its own pair, and θ0 comes back exactly in between."""
    base, store = setup
    service = Service(base, store, reload_interval=0, linger=0.0)
    resident, index = service.resident, service.store.index
    expected = {}
    for lang, task in PAIRS:  # θ0 + φ_L + φ_T, composed on a copy, outside the server
        lang_sft, task_sft = service.store.load(index.language(lang)), service.store.load(index.task(task))
        model = copy.deepcopy(resident.task_model(task, task_sft)[0])
        compsft.apply(model, lang_sft, task_sft, with_dense=[False, True])
        expected[(lang, task)] = _model_digest(model)
        # Entries both SFTs touch (added onto the language's values, not onto θ0) must be covered too.
        assert sum(compsft.compose(lang_sft, task_sft).overlap.values()) > 0
    assert len(set(expected.values())) == len(PAIRS)
    theta0 = state_digest(resident.parameters())

    seen = []

    def probe(task, model, tokenizer, labels, sentences, batch_size):
        seen.append(_model_digest(model))
        return [None] * len(sentences)

    service.worker.predict = probe
    service.start()
    try:
        rng = random.Random(0)
        order = [rng.choice(PAIRS) for _ in range(2000)]
        for lang, task in order:
            service.worker.submit(Job(lang, task, [["a"]])).result(timeout=10)
        assert service.worker.wait_idle(10)
    finally:
        service.stop()
    assert seen == [expected[pair] for pair in order]
    # linger=0: the next request arrives only after the answer, so every request is a swap
    assert service.worker.swaps == len(order) == 2000
    assert not compsft.applied(resident.task_model("pos", service.store.load(index.task("pos")))[0])
    assert state_digest(resident.parameters()) == theta0


def test_every_request_gets_its_own_pair(setup):
    """Interleaved requests over HTTP predict exactly what a Predictor composed for that pair predicts."""
    base, store = setup
    reference = {}
    for lang, task in PAIRS:
        predictor = Predictor(base, sfts=[store / "lang" / lang, store / "task" / task], task=task, device="cpu")
        reference[(lang, task)] = _labels(task, predictor.predict_words(SENTENCES))
    for task in TASKS:  # the languages must be told apart by their predictions, or this test proves nothing
        assert reference[("wol", task)] != reference[("mlt", task)]
    with TestClient(create_app(Service(base, store, reload_interval=0))) as client:
        for lang, task in PAIRS * 2 + PAIRS[::-1]:
            r = client.post("/v1/predict", json={"task": task, "language": lang, "sentences": SENTENCES})
            assert _labels(task, r.json()["sentences"]) == reference[(lang, task)], (lang, task)


def _labels(task: str, sentences: list[dict]) -> list:
    keys = {"pos": ("upos",), "ner": ("ner",), "dep": ("head", "deprel")}[task]
    return [[tuple(w[k] for k in keys) for w in s["words"]] for s in sentences]


def test_queued_requests_of_a_pair_share_one_swap(setup):
    base, store = setup
    service = Service(base, store, reload_interval=0, linger=0.0)
    release, started = threading.Event(), threading.Event()
    real = service.worker.predict
    calls = []

    def gated(task, model, tokenizer, labels, sentences, batch_size):
        calls.append((task, len(sentences)))
        if len(calls) == 1:
            started.set()
            release.wait(10)
        return real(task, model, tokenizer, labels, sentences, batch_size)

    service.worker.predict = gated
    service.start()
    try:
        first = service.worker.submit(Job("wol", "pos", [["a"]]))
        assert started.wait(10)
        futures = []
        for _ in range(10):  # arrive interleaved while the model is busy with the first
            futures.append(service.worker.submit(Job("mlt", "dep", [["the", "dog"]])))
            futures.append(service.worker.submit(Job("wol", "ner", [["Maria", "went"]])))
        release.set()
        first.result(10)
        results = [f.result(10) for f in futures]
        assert service.worker.wait_idle(10)
    finally:
        service.stop()
    assert service.worker.swaps == 3  # wol/pos, then each waiting pair once
    assert calls[1:] == [("dep", 10), ("ner", 10)]  # every queued request of a pair in one round
    assert all(len(r) == 1 and r[0].words for r in results)
