"""`compsft languages`: list the language catalogue and the MLM text shipped for each language."""
from __future__ import annotations

from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("languages")
    def languages_command(
        codes: Optional[List[str]] = typer.Argument(
            None, help="Only these languages (ISO 639-3 or 639-1 codes, or names)."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
        files: bool = typer.Option(False, "--files", help="List the shipped text files with their sizes."),
    ) -> None:
        """List the language catalogue: codes, names, scripts, shipped MLM text and evaluation sets."""
        import json

        from compsft.languages import get_language, languages

        entries = [get_language(c) for c in codes] if codes else list(languages())
        if as_json:
            typer.echo(json.dumps([lang.as_dict() for lang in entries], indent=1, ensure_ascii=False))
            return

        from rich.console import Console
        from rich.table import Table

        console = Console()
        if files:
            from compsft.languages.catalogue import DATA_DIR

            table = Table(title=f"shipped MLM text in {DATA_DIR}")
            for column in ("code", "file", "size", "licence", "source"):
                table.add_column(column, overflow="fold")
            for lang in entries:
                for c in lang.corpora:
                    table.add_row(lang.code, c.path, _size(c.file), c.licence, c.description)
            console.print(table)
            return
        table = Table(title="compsft language catalogue")
        for column in ("code", "639-1", "name", "script", "family", "role", "MLM text", "evaluation sets"):
            table.add_column(column, overflow="fold")
        for lang in entries:
            text = ", ".join(c.name + (" (NC)" if "NC" in c.licence else "") for c in lang.corpora)
            table.add_row(
                lang.code, lang.iso1 or "-", lang.name, lang.script, lang.family, lang.role,
                text or "-", ", ".join(lang.eval_sets) or "-",
            )
        console.print(table)
        console.print("NC: non-commercial licence (CC BY-NC 4.0); `--files` lists the files.")


def _size(path) -> str:
    try:
        return f"{path.stat().st_size / 1e3:,.0f} kB"
    except OSError:
        return "missing"
