"""Reading the JSON side files of compsft's modules (SFT configs, adapter and LoRA configs) with one set
of errors: every malformed file is a `CompsftError` naming it, never a traceback."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import CompsftError


def read_json_object(path: str | os.PathLike, missing: str | None = None) -> dict[str, Any]:
    """The JSON object in `path`. `missing` is the message when the file does not exist (default: the
    path and "not found")."""
    path = Path(path)
    if not path.is_file():
        raise CompsftError(missing or f"{path}: not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    # RecursionError: a file of deeply nested brackets exhausts json's recursion before any check runs.
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise CompsftError(f"{path}: not valid JSON ({str(err)[:200]})") from None
    if not isinstance(data, dict):
        raise CompsftError(f"{path}: expected a JSON object")
    return data
