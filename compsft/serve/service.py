"""The pieces of `compsft serve` put together: store, resident model, worker, metrics, limits.

`Service` is what the HTTP app talks to; it holds no HTTP code, so the benches and tests can drive it
directly. Reading requests and writing answers reuse `compsft.predict` (the raw-text tokenizer, the
prediction step on an already-composed model, the sentence records and the CoNLL-U writer).

    service = Service("models/e5", "sfts/")
    service.start()
    ...
    service.stop()
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Sequence

import torch

from compsft import fingerprint as fp
from compsft.errors import CompsftError
from compsft.predict import InputSentence, predict_words, sentence_record
from compsft.predict.inputs import make_tokenlist, read_text
from compsft.predict.outputs import format_conllu
from compsft.tasks import TASKS, get_task
from compsft.tasks.base import Sentence
from compsft.vocab import require_same_vocab

from .metrics import Metrics
from .resident import ResidentModel
from .store import SftStore
from .worker import Worker

logger = logging.getLogger(__name__)


@dataclass
class Limits:
    """What one request may ask and how much may wait (all configurable on the command line)."""

    max_body_bytes: int = 1_000_000
    max_sentences: int = 200
    max_words: int = 250  # per sentence
    queue_size: int = 32  # requests waiting per (language, task)
    max_jobs: int = 256  # requests waiting in all
    timeout: float = 60.0  # seconds a request may wait for its answer


class Service:
    """A base model resident, a store of SFTs, and the worker between them."""

    def __init__(self, model_dir: str | os.PathLike, store_dir: str | os.PathLike, *,
                 tokenizer_dir: str | os.PathLike | None = None, device: str = "cpu", limits: Limits | None = None,
                 batch_size: int = 32, max_batch_sentences: int = 256, reload_interval: float = 2.0,
                 linger: float = 0.05, cache_size: int = 32) -> None:
        self.limits = limits or Limits()
        self.resident = ResidentModel(model_dir, tokenizer_dir, device)
        self._theta0 = _theta0_samples(self.resident)
        self.store = SftStore(store_dir, cache_size=cache_size, check=self.check_entry)
        self.store.refresh()
        self.metrics = Metrics()
        self.worker = Worker(self.resident, self.store, _predict, queue_size=self.limits.queue_size,
                             max_jobs=self.limits.max_jobs, max_batch_sentences=max_batch_sentences,
                             batch_size=batch_size, linger=linger, events=self.metrics)
        self.reload_interval = reload_interval
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        self._count_sfts()

    # -- life -------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.worker.alive:
            return
        self._stop.clear()
        self.worker.start()
        if self.reload_interval > 0:
            self._refresher = threading.Thread(target=self._refresh_loop, name="compsft-serve-store", daemon=True)
            self._refresher.start()

    def stop(self) -> None:
        self._stop.set()
        self.worker.stop()
        if self._refresher is not None:
            self._refresher.join(5)

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.reload_interval):
            try:
                if self.store.refresh():
                    self._count_sfts()
            except Exception:  # noqa: BLE001 - a store that cannot be read now may be readable next time
                logger.exception("store refresh failed")

    def _count_sfts(self) -> None:
        index = self.store.index
        self.metrics.store_sfts.labels(kind="language").set(sum(not e.error for e in index.languages.values()))
        self.metrics.store_sfts.labels(kind="task").set(sum(not e.error for e in index.tasks.values()))

    # -- the store against this base --------------------------------------------------------------
    def check_entry(self, config) -> str | None:
        """Why an SFT (its config) cannot serve on this base model, or None: the recorded base fingerprint
        and vocabulary are compared with θ0's, taken at start (no model access, so any thread may call)."""
        try:
            require_same_vocab(config.vocab, self.resident.vocab, "this SFT")
        except CompsftError as err:
            return str(err)
        recorded = config.base_fingerprint or {}
        for name in (recorded.get("tensors") or {}):
            found = self._theta0.get(name)
            if found is None:
                return f"tensor {name!r} is not a parameter of the served model"
            reason = fp.compare(recorded, name, found[0], found[1])
            if reason:
                return f"trained from another base model (tensor {name!r}: {reason})"
        return None

    def models(self) -> dict:
        """`GET /v1/models`: the base, every SFT with its kind, language, task, K and base fingerprint, the pairs."""
        index = self.store.index
        usable_l = sorted(n for n, e in index.languages.items() if not e.error)
        usable_t = sorted(n for n, e in index.tasks.items() if not e.error and n in TASKS)
        return {
            "model": self.resident.model_dir.name,
            "parameters": sum(p.numel() for p in self.resident.encoder.parameters()),
            "languages": usable_l,
            "tasks": usable_t,
            "pairs": [{"language": lang, "task": task} for lang in usable_l for task in usable_t],
            "sfts": [e.describe() for e in index.entries()],
        }

    # -- requests ---------------------------------------------------------------------------------
    def records(self, text: str | None, sentences: Sequence[Sequence[str]] | None) -> list[InputSentence]:
        """The request's sentences: raw text through compsft.predict's tokenizer, or the given words."""
        if text is not None:
            return read_text(text, "<request>")
        out = []
        for i, words in enumerate(sentences or []):
            words = list(words)
            offsets, at = [], 0
            for w in words:
                offsets.append((at, at + len(w)))
                at += len(w) + 1
            out.append(InputSentence(words, make_tokenlist(words, str(i + 1), " ".join(words)), "<request>", offsets))
        return out


def answer(task: str, records: Sequence[InputSentence], predictions: Sequence[Sentence], fmt: str) -> dict:
    """The body of a prediction's answer: sentence records (with displaCy arcs for dep), or CoNLL-U."""
    if fmt == "conllu":
        return {"format": "conllu", "result": "".join(format_conllu(r, p, task) for r, p in zip(records, predictions))}
    out = []
    for record, pred in zip(records, predictions):
        item = sentence_record(record, pred, task)
        if task == "dep":
            item["arcs"] = arcs(pred.heads, pred.deprels)
        out.append(item)
    return {"sentences": out}


def arcs(heads: Sequence[int], deprels: Sequence[str]) -> list[dict]:
    """displaCy's arcs: `start` < `end` (0-based word indices), `dir` says which end the dependent is."""
    out = []
    for i, (head, rel) in enumerate(zip(heads, deprels)):
        if head <= 0:
            continue
        h = head - 1
        out.append({"start": min(i, h), "end": max(i, h), "label": rel, "dir": "left" if i < h else "right"})
    return out


def _predict(task: str, model, tokenizer, labels, sentences_words, batch_size: int) -> list[Sentence]:
    return predict_words(get_task(task), model, tokenizer, labels, sentences_words, batch_size=batch_size)


def _theta0_samples(resident: ResidentModel) -> dict[str, tuple[tuple[int, ...], torch.Tensor]]:
    """θ0 at the fingerprint's positions for every encoder tensor, under its name with and without the
    base-model prefix (SFTs trained on a masked LM name `bert.encoder...`, the bare encoder `encoder...`)."""
    prefix = getattr(resident.encoder, "base_model_prefix", "") or ""
    out = {}
    with torch.no_grad():
        for name, p in resident.encoder.named_parameters():
            sample = p.detach().reshape(-1).index_select(0, fp.sample_positions(p.numel()).to(p.device)).cpu()
            out[name] = (tuple(p.shape), sample)
            if prefix:
                out[f"{prefix}.{name}"] = out[name]
    return out
