"""`compsft serve`: the API on a tiny model — round trips, error bodies, limits, overload, faults, hot reload."""
from __future__ import annotations

import re
import shutil
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")

from fastapi.testclient import TestClient  # noqa: E402

from compsft.serve import Limits, Service, create_app  # noqa: E402
from compsft.sft import SparseDelta  # noqa: E402
from compsft.serve.store import SftChanged, SftStore  # noqa: E402
from test_serve_helpers import make_base, make_store, random_sft, state_digest  # noqa: E402

TEXT = "the dog sees a cat. Maria went to Paris with John."


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("serve-base") / "base")


@pytest.fixture(scope="module")
def template(base, tmp_path_factory):
    return make_store(base, tmp_path_factory.mktemp("serve-store") / "store")


@pytest.fixture
def store(template, tmp_path):
    """A store of one's own, for the tests that change it."""
    return shutil.copytree(template, tmp_path / "store")


@pytest.fixture
def service(base, store):
    return Service(base, store, reload_interval=0)


@pytest.fixture(scope="module")
def client(base, template):
    """One server over the template store, for the tests that only read."""
    with TestClient(create_app(Service(base, template, reload_interval=0))) as c:
        yield c


def test_predict_round_trips_every_task(client):
    pos = client.post("/v1/predict", json={"task": "pos", "language": "wol", "text": TEXT}).json()
    assert pos["language"] == "wol" and pos["task"] == "pos"
    assert [s["text"] for s in pos["sentences"]] == ["the dog sees a cat.", "Maria went to Paris with John."]
    first = pos["sentences"][0]["words"]
    assert [w["form"] for w in first] == ["the", "dog", "sees", "a", "cat", "."]
    assert all(w["upos"] for w in first) and first[1]["start_char"] == 4

    dep = client.post("/v1/predict", json={"task": "dep", "language": "mlt", "sentences": [["the", "dog", "sees"]]})
    sentence = dep.json()["sentences"][0]
    heads = [w["head"] for w in sentence["words"]]
    assert heads.count(0) == 1 and all(0 <= h <= 3 for h in heads)
    arcs = sentence["arcs"]
    assert len(arcs) == 2  # every word but the root
    for arc in arcs:
        assert arc["start"] < arc["end"] and arc["dir"] in ("left", "right") and arc["label"]
        dependent = arc["start"] if arc["dir"] == "left" else arc["end"]
        head = arc["end"] if arc["dir"] == "left" else arc["start"]
        assert sentence["words"][dependent]["head"] == head + 1

    ner = client.post("/v1/predict", json={"task": "ner", "language": "wol", "text": TEXT}).json()
    for s in ner["sentences"]:
        for e in s["entities"]:
            assert s["text"][e["start_char"]:e["end_char"]] == e["text"]
            assert s["words"][e["start"]]["ner"] == f"B-{e['type']}" or s["words"][e["start"]]["ner"].endswith(e["type"])

    conllu = client.post("/v1/predict", json={"task": "dep", "language": "wol", "text": "the dog.", "format": "conllu"})
    body = conllu.json()
    assert body["format"] == "conllu" and "# text = the dog." in body["result"]
    rows = [line.split("\t") for line in body["result"].splitlines() if line and not line.startswith("#")]
    assert [r[1] for r in rows] == ["the", "dog", "."] and all(len(r) == 10 for r in rows)


def test_models_health_metrics_and_page(client):
    models = client.get("/v1/models").json()
    assert models["languages"] == ["mlt", "wol"] and models["tasks"] == ["dep", "ner", "pos"]
    assert len(models["pairs"]) == 6
    by_name = {s["name"]: s for s in models["sfts"]}
    assert by_name["lang/wol"]["kind"] == "language" and by_name["lang/wol"]["k"] > 0
    assert by_name["task/pos"]["base_fingerprint"].startswith("sample-v1:")
    assert client.get("/healthz").json()["status"] == "ok"
    client.post("/v1/predict", json={"task": "pos", "language": "wol", "text": "the dog."})
    text = client.get("/metrics").text
    counted = re.search(r'compsft_requests_total\{status="200",task="pos"\} ([0-9.]+)', text)
    assert counted and float(counted.group(1)) >= 1
    assert "compsft_swaps_total" in text and "compsft_request_seconds_bucket" in text
    assert "process_resident_memory_bytes" in text
    page = client.get("/")
    assert page.status_code == 200 and "app.js" in page.text and "http" not in page.text.split("<body")[1].lower()


@pytest.mark.parametrize("body, status, kind", [
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 422, "validation"),
    (b'{"task": "pos", "language": "wol"}', 422, "validation"),  # neither text nor sentences
    (b'{"task": "pos", "language": "wol", "text": "a", "sentences": [["a"]]}', 422, "validation"),
    (b'{"task": "srl", "language": "wol", "text": "a"}', 422, "validation"),
    (b'{"task": "pos", "language": "../lang/wol", "text": "a"}', 422, "validation"),  # a name, never a path
    (b'{"task": "pos", "language": "xho", "text": "a"}', 422, "validation"),
    (b'{"task": "pos", "language": "wol", "text": "a", "extra": 1}', 422, "validation"),
    (b'{"task": "pos", "language": "wol", "sentences": [["a", " "]]}', 422, "validation"),
    (b'{"task": "pos", "language": "wol", "text": "a", "format": "xml"}', 422, "validation"),
    (b'{"task": "pos", "language": "wol", "text": "   "}', 422, "validation"),
])
def test_bad_requests_get_4xx_with_a_message(client, body, status, kind):
    r = client.post("/v1/predict", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error_type"] == kind and r.json()["error"]


def test_unknown_language_names_what_the_store_offers(client):
    r = client.post("/v1/predict", json={"task": "pos", "language": "xho", "text": "a"})
    assert "xho" in r.json()["error"] and "mlt, wol" in r.json()["error"]
    assert client.get("/nowhere").json()["error_type"] == "not_found"


def test_limits(base, store):
    limits = Limits(max_body_bytes=400, max_sentences=2, max_words=5)
    with TestClient(create_app(Service(base, store, limits=limits, reload_interval=0))) as c:
        # One long word: within the sentence and word limits, over the byte limit only.
        big = c.post("/v1/predict", json={"task": "pos", "language": "wol", "text": "a" * 600})
        assert big.status_code == 413 and big.json()["error_type"] == "too_large" and "bytes" in big.json()["error"]

        def chunks():  # no Content-Length: counted while it streams in
            yield b'{"task": "pos", "language": "wol", "text": "'
            for _ in range(50):
                yield b"aaaaaaaaaa"
            yield b'"}'

        streamed = c.post("/v1/predict", content=chunks(), headers={"Content-Type": "application/json"})
        assert streamed.status_code == 413 and "bytes" in streamed.json()["error"]
        many = c.post("/v1/predict", json={"task": "pos", "language": "wol", "sentences": [["a"], ["b"], ["c"]]})
        assert many.status_code == 413 and "3 sentences" in many.json()["error"]
        long = c.post("/v1/predict", json={"task": "pos", "language": "wol", "sentences": [["a"] * 6]})
        assert long.status_code == 413 and "6 words" in long.json()["error"]
        ok = c.post("/v1/predict", json={"task": "pos", "language": "wol", "sentences": [["a"] * 5, ["b"]]})
        assert ok.status_code == 200


def test_overload_is_refused_and_a_stuck_request_times_out(base, store):
    service = Service(base, store, limits=Limits(queue_size=1, max_jobs=2, timeout=0.5), reload_interval=0)
    release = threading.Event()
    real = service.worker.predict

    def stuck(*args):
        release.wait(10)
        return real(*args)

    service.worker.predict = stuck
    with TestClient(create_app(service)) as c:
        body = {"task": "pos", "language": "wol", "text": "a"}
        results = []
        threads = [threading.Thread(target=lambda: results.append(c.post("/v1/predict", json=body)))]
        threads[0].start()
        deadline = time.monotonic() + 5
        while service.worker.pending or not service.worker._busy:  # the first job is on the model
            assert time.monotonic() < deadline
            time.sleep(0.01)
        threads.append(threading.Thread(target=lambda: results.append(c.post("/v1/predict", json=body))))
        threads[1].start()
        while service.worker.pending < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = c.post("/v1/predict", json=body)  # the pair's queue (1) is full
        assert refused.status_code == 429 and refused.json()["error_type"] == "overloaded"
        for t in threads:
            t.join(5)
        assert sorted(r.status_code for r in results) == [503, 503]  # both waited past --timeout
        assert all(r.json()["error_type"] == "unavailable" for r in results)
        release.set()
        assert service.worker.wait_idle(5)
        assert c.post("/v1/predict", json=body).status_code == 200  # and the server goes on


def test_a_corrupt_sft_answers_its_requests_and_leaves_the_model_untouched(base, store, service):
    weights = store / "lang" / "mlt" / "sft.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-10] ^= 0xFF
    weights.write_bytes(bytes(blob))
    service.store.refresh()
    theta0 = _theta0_with_head(service, "pos")
    with TestClient(create_app(service)) as c:
        bad = c.post("/v1/predict", json={"task": "pos", "language": "mlt", "text": "the dog."})
        assert bad.status_code == 500 and bad.json()["error_type"] == "sft_error"
        assert "lang/mlt" in bad.json()["error"] and "checksum" in bad.json()["error"]
        assert str(store) not in bad.json()["error"]  # no server paths in answers
        assert c.post("/v1/predict", json={"task": "pos", "language": "wol", "text": "the dog."}).status_code == 200
        assert c.get("/healthz").status_code == 200
    assert state_digest(service.resident.parameters()) == theta0


def _theta0_with_head(service, task: str) -> str:
    """The digest of θ0 once `task`'s head exists (it is built on first use)."""
    service.resident.task_model(task, service.store.load(service.store.index.task(task)))
    return state_digest(service.resident.parameters())


def test_an_sft_that_fails_halfway_through_apply_changes_nothing(base, store, service):
    # No fingerprint (so nothing is checked at indexing) and a last tensor the model does not have: apply
    # must refuse before writing the tensors that do fit.
    bad = random_sft(base, "language", "fra", seed=5)
    bad.config.base_fingerprint = None
    first = next(iter(bad.diffs.values()))
    bad.diffs["bert.encoder.layer.9.output.dense.weight"] = SparseDelta(first.shape, first.indices.clone(),
                                                                       first.values.clone())
    bad.save(store / "lang" / "fra")
    service.store.refresh()
    theta0 = _theta0_with_head(service, "pos")
    with TestClient(create_app(service)) as c:
        r = c.post("/v1/predict", json={"task": "pos", "language": "fra", "text": "the dog."})
        assert r.status_code == 500 and "layer.9" in r.json()["error"]
    assert state_digest(service.resident.parameters()) == theta0


def test_a_mismatched_sft_is_flagged_in_the_index(base, store, service):
    sft = random_sft(base, "language", "hau", seed=6)
    # Recorded from other weights: every sample off by far more than rounding.
    for entry in sft.config.base_fingerprint["tensors"].values():
        entry["sample"] = [v + 1.0 for v in entry["sample"]]
    sft.save(store / "lang" / "hau")
    service.store.refresh()
    listed = {s["name"]: s for s in service.models()["sfts"]}
    assert "another base model" in listed["lang/hau"]["error"]
    assert "hau" not in service.models()["languages"]
    with TestClient(create_app(service)) as c:
        r = c.post("/v1/predict", json={"task": "pos", "language": "hau", "text": "the dog."})
        assert r.status_code == 500 and "another base model" in r.json()["error"]


def test_two_sfts_for_one_language_are_a_clear_conflict(base, store, service):
    shutil.copytree(store / "lang" / "wol", store / "lang" / "wol-copy")
    service.store.refresh()
    with TestClient(create_app(service)) as c:
        r = c.post("/v1/predict", json={"task": "pos", "language": "wol", "text": "the dog."})
        assert r.status_code == 500 and "lang/wol, lang/wol-copy" in r.json()["error"]


def test_new_and_replaced_sfts_are_picked_up_without_a_restart(base, store):
    service = Service(base, store, reload_interval=0.05)
    body = {"task": "pos", "language": "fra", "sentences": [["the", "dog", "sees", "a", "cat", "."]]}
    with TestClient(create_app(service)) as c:
        assert c.post("/v1/predict", json=body).status_code == 422
        random_sft(base, "language", "fra", seed=21).save(store / "new" / "fra")
        deadline = time.monotonic() + 5
        while "fra" not in c.get("/v1/models").json()["languages"]:
            assert time.monotonic() < deadline, "the new SFT was not picked up"
            time.sleep(0.02)
        before = c.post("/v1/predict", json=body).json()["sentences"][0]["words"]
        generation = service.store.generation
        random_sft(base, "language", "fra", seed=22, scale=3.0).save(store / "new" / "fra")  # replaced in place
        while service.store.generation == generation:
            assert time.monotonic() < deadline, "the replaced SFT was not picked up"
            time.sleep(0.02)
        after = c.post("/v1/predict", json=body).json()["sentences"][0]["words"]
        assert [w["upos"] for w in after] != [w["upos"] for w in before]


def test_store_load_notices_a_directory_replaced_since_indexing(base, store):
    s = SftStore(store)
    s.refresh()
    entry = s.index.language("wol")
    random_sft(base, "language", "wol", seed=30).save(store / "lang" / "wol")
    with pytest.raises(SftChanged):
        s.load(entry)
    s.refresh()
    assert s.load(s.index.language("wol")).config.language == "wol"


def test_cli_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from compsft.cli import app

    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "none"), "--store", str(tmp_path)])
    assert result.exit_code != 0
    assert "--model" in str(result.exception) or "--model" in result.output
