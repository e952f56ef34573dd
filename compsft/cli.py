"""The `compsft` command. This file only builds the app; each command lives in `compsft/commands/`.

Command modules import torch and transformers inside their functions so that `compsft --help`
answers at once.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

import typer

app = typer.Typer(
    name="compsft",
    help="Composable sparse fine-tuning (LT-SFT) for cross-lingual transfer.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Each module defines `register(app)`. Add a module here to add its commands.
COMMAND_MODULES = (
    "compsft.commands.sft_files",
    "compsft.commands.evaluate",
    "compsft.commands.predict",
    "compsft.commands.serve",
    "compsft.commands.languages",
    "compsft.commands.models",
    "compsft.commands.train",
    "compsft.commands.full_ft",
    "compsft.commands.compare",
    "compsft.commands.demo",
)


def _register_all() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)


_register_all()


def main() -> None:
    """Entry point: expected failures print one line and exit 2; COMPSFT_DEBUG=1 shows the traceback."""
    from .errors import CompsftError

    logging.basicConfig(
        level=os.environ.get("COMPSFT_LOG_LEVEL", "INFO"),
        format="%(levelname)s %(name)s: %(message)s",
    )
    debug = os.environ.get("COMPSFT_DEBUG", "") not in ("", "0")
    try:
        # Standalone mode lets typer handle usage errors itself (exit 2 with a usage line); our own
        # exceptions pass through it and are shortened here.
        app()
    except (CompsftError, OSError) as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as err:
        if debug:
            raise
        print(f"error: {type(err).__name__}: {err} (set COMPSFT_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(1)

if __name__ == "__main__":
    main()
