"""`compsft serve`: one resident base model serving every language × task of a store of SFTs.

Modules: `store` (the index of an SFT directory, hot reload), `resident` (one encoder, a head per task,
apply/revert), `worker` (the one model thread, bounded queues per pair), `service` (the pieces wired
together, limits), `metrics` (Prometheus), `app` (FastAPI routes) and `page/` (the web page).

    from compsft.serve import Service, create_app
    app = create_app(Service("models/e5", "sfts/"))     # uvicorn.run(app, host="127.0.0.1", port=8000)
"""
from __future__ import annotations

from .service import Limits, Service

__all__ = ["Limits", "Service", "create_app"]


def __getattr__(name: str):
    if name == "create_app":  # FastAPI is imported only by those who serve over HTTP
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'compsft.serve' has no attribute {name!r}")
