"""The HTTP side of `compsft serve` (FastAPI): routes, request limits, error bodies, the page.

    POST /v1/predict  {"task": "pos", "language": "wol", "text": "..."}    (or "sentences": [[words]])
                      {"sentences": [{"text", "words": [...], "arcs": [...], "entities": [...]}]}
                      with "format": "conllu": {"format": "conllu", "result": "<CoNLL-U>"}
    GET  /v1/models   what the store offers: languages × tasks, each SFT's kind, K and base fingerprint
    GET  /healthz     200 while the model worker runs, 503 otherwise
    GET  /metrics     Prometheus text
    GET  /            the page (page/index.html, app.js, style.css)

Every error is `{"error": message, "error_type": kind}`: 400 invalid_json, 404 not_found, 413 too_large,
422 validation (unknown language or task included), 429 overloaded, 500 sft_error / internal, 503
unavailable. Handlers never run model code: they hand a job to the worker thread and await it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from compsft.tasks import TASKS

from .service import Service, answer
from .store import SftUnavailable
from .worker import Job, Overloaded, Unavailable

logger = logging.getLogger(__name__)

PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
              "/app.js": ("app.js", "text/javascript; charset=utf-8"),
              "/style.css": ("style.css", "text/css; charset=utf-8")}


class PredictRequest(BaseModel):
    """The body of `POST /v1/predict`: `text` (raw, any number of sentences) or `sentences` (word lists)."""

    model_config = ConfigDict(extra="forbid")
    task: str = Field(min_length=1, max_length=32)
    language: str = Field(min_length=1, max_length=64)
    text: str | None = None
    sentences: list[list[str]] | None = None
    format: Literal["json", "conllu"] = "json"


def error(status: int, error_type: str, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status)


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes gets 413 before the app reads it (by Content-Length, or
    while it streams in when there is none)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_large = error(413, "too_large", f"request body over {self.limit} bytes (--max-body-bytes)")
        try:
            if length is not None and int(length) > self.limit:
                return await too_large(scope, receive, send)
        except ValueError:
            return await error(400, "invalid_request", "bad Content-Length header")(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracking_send)
        except _TooLarge:
            if not started:
                await too_large(scope, receive, send)


class _TooLarge(Exception):
    pass


def create_app(service: Service) -> FastAPI:
    """The ASGI app over `service`; its lifespan starts and stops the worker."""

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(title="compsft serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    limits = service.limits

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error(exc.status_code, kind, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return error(422, "validation", _describe(exc.errors()))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        logger.exception("unhandled error")
        return error(500, "internal", f"{type(exc).__name__}: {exc}")

    @app.get("/healthz")
    async def healthz():
        alive = service.worker.alive
        body = {"status": "ok" if alive else "unavailable", "queued": service.worker.pending,
                "swaps": service.worker.swaps, "store_generation": service.store.generation}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return service.models()

    @app.post("/v1/predict")
    async def predict(request: Request):
        started = time.perf_counter()
        response = await _predict(request)
        task = getattr(request.state, "task", "unknown")
        service.metrics.requests.labels(task=task, status=str(response.status_code)).inc()
        service.metrics.latency.labels(task=task).observe(time.perf_counter() - started)
        return response

    async def _predict(request: Request) -> JSONResponse:
        body = await request.body()
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            return error(400, "invalid_json", f"the body is not JSON ({str(err)[:200]})")
        if not isinstance(data, dict):
            return error(422, "validation", "the body must be a JSON object with task, language and text or sentences")
        try:
            req = PredictRequest.model_validate(data)
        except ValidationError as err:
            return error(422, "validation", _describe(err.errors()))
        if (req.text is None) == (req.sentences is None):
            return error(422, "validation", "give exactly one of 'text' (a string) and 'sentences' (lists of words)")
        if req.task not in TASKS:
            return error(422, "validation", f"unknown task {req.task!r}; tasks: {', '.join(TASKS)}")
        request.state.task = req.task
        index = service.store.index
        if not index.offers(req.language, req.task):
            have = "language" if req.language not in index.languages else "task"
            what = req.language if have == "language" else req.task
            offered = sorted(index.languages if have == "language" else index.tasks) or ["none"]
            return error(422, "validation", f"the store has no {have} SFT for {what!r}; it offers {', '.join(offered)}")
        if req.sentences is not None and any(not w or not all(isinstance(x, str) and x.strip() for x in w)
                                             for w in req.sentences):
            return error(422, "validation", "every sentence needs at least one word, and words cannot be blank")
        records = service.records(req.text, req.sentences)
        if not records:
            return error(422, "validation", "the text holds no words")
        if len(records) > limits.max_sentences:
            return error(413, "too_large", f"{len(records)} sentences; at most {limits.max_sentences} per request "
                                           "(--max-sentences)")
        longest = max(len(r.words) for r in records)
        if longest > limits.max_words:
            return error(413, "too_large", f"a sentence of {longest} words; at most {limits.max_words} per sentence "
                                           "(--max-words)")
        job = Job(req.language, req.task, [r.words for r in records])
        try:
            future = service.worker.submit(job)
        except Overloaded as err:
            return error(429, "overloaded", str(err))
        except Unavailable as err:
            return error(503, "unavailable", str(err))
        try:
            predictions = await asyncio.wait_for(asyncio.wrap_future(future), limits.timeout)
        except asyncio.TimeoutError:
            future.cancel()
            return error(503, "unavailable", f"no answer within {limits.timeout:g} s (--timeout); the server is busy")
        except SftUnavailable as err:
            return error(500, "sft_error", str(err))
        except Unavailable as err:
            return error(503, "unavailable", str(err))
        body = {"language": req.language, "task": req.task, **answer(req.task, records, predictions, req.format)}
        return JSONResponse(body)

    for route, (name, media) in PAGE_FILES.items():
        app.add_api_route(route, _page(name, media), methods=["GET"], include_in_schema=False)

    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    return app


def _page(name: str, media: str):
    content = resources.files("compsft.serve").joinpath("page", name).read_bytes()

    async def page():
        return Response(content, media_type=media, headers={"Cache-Control": "no-cache"})

    return page


def _describe(errors) -> str:
    parts = []
    for e in errors[:5]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "; ".join(parts)
