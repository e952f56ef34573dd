"""`compsft serve`: one resident base model serving every language × task of a store of SFTs over HTTP."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        model: Path = typer.Option(..., "--model", help="The base model directory the SFTs were trained from."),
        store: Path = typer.Option(..., "--store", help="Directory of language and task SFTs (any layout, depth <= 3); "
                                                        "new or replaced SFTs are picked up without a restart."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (other machines can reach anything "
                                                             "but 127.0.0.1 / localhost)."),
        port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (0: any free port)."),
        tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer directory (default: --model)."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
        batch_size: int = typer.Option(32, "--batch-size", min=1, help="Sentences (windows) per forward pass."),
        max_body_bytes: int = typer.Option(1_000_000, "--max-body-bytes", min=1, help="Largest request body (413 above)."),
        max_sentences: int = typer.Option(200, "--max-sentences", min=1, help="Sentences per request (413 above)."),
        max_words: int = typer.Option(250, "--max-words", min=1, help="Words per sentence (413 above)."),
        queue_size: int = typer.Option(32, "--queue-size", min=1, help="Requests waiting per language × task (429 above)."),
        max_queued: int = typer.Option(256, "--max-queued", min=1, help="Requests waiting in all (429 above)."),
        timeout: float = typer.Option(60.0, "--timeout", min=0.1, help="Seconds a request may wait for its answer (503)."),
        reload_interval: float = typer.Option(2.0, "--reload-interval", min=0.0,
                                              help="Seconds between looks at the store for new or replaced SFTs (0: never)."),
        threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: torch's)."),
    ) -> None:
        """Serve POS tagging, parsing and NER for every language of a store of SFTs, from one resident model.

        The page is at http://HOST:PORT/, the API at /v1/predict, /v1/models, /healthz and /metrics.

        Example:
          compsft serve --model M --store sfts/ --port 8000
          curl -s localhost:8000/v1/predict -d '{"task": "pos", "language": "wol", "text": "Ndox mi neex na."}'
        """
        import logging

        import torch
        import uvicorn

        from compsft.predict.loading import default_device
        from compsft.serve import Limits, Service, create_app

        if threads:
            torch.set_num_threads(threads)
        if host not in LOCAL_HOSTS:
            logging.getLogger("compsft.serve").warning(
                "binding %s: the server is reachable from other machines and has no authentication", host)
        limits = Limits(max_body_bytes=max_body_bytes, max_sentences=max_sentences, max_words=max_words,
                        queue_size=queue_size, max_jobs=max_queued, timeout=timeout)
        service = Service(model, store, tokenizer_dir=tokenizer, device=str(default_device(device)), limits=limits,
                          batch_size=batch_size, reload_interval=reload_interval)
        offered = service.models()
        typer.echo(f"compsft serve: {len(offered['languages'])} languages × {len(offered['tasks'])} tasks from "
                   f"{store}; page at http://{host}:{port}/", err=True)
        uvicorn.run(create_app(service), host=host, port=port, log_level="info", access_log=False)
