"""Reading and writing SFT directories: `sft.safetensors` + `sft_config.json` (docs/FORMAT.md).

Loading reads the header and the config first and checks that they agree before any tensor data
is decoded; every tensor is then validated (range, order, finiteness) before the SFT is returned.
"""
from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
import math
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from . import encoding
from .atomic import atomic_path, write_text
from .errors import CompsftError
from .sft import FORMAT_VERSION, SftConfig, SparseDelta, SparseFineTuning, index_dtype

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "sft.safetensors"
CONFIG_NAME = "sft_config.json"
FORMAT_TAG = "compsft.sft"
ENCODINGS = ("elias-fano", "raw")
VALUE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _sparse_key(name: str, part: str) -> str:
    return f"sparse/{name}/{part}"


def save_sft(
    sft: SparseFineTuning,
    directory: str | os.PathLike,
    dtype: torch.dtype | None = None,
    index_encoding: str = "elias-fano",
) -> Path:
    """Write `sft` into `directory` (created if needed). Each file is replaced atomically, the
    tensors first and the config last, so a reader never sees a config without its tensors."""
    if index_encoding not in ENCODINGS:
        raise CompsftError(f"index_encoding must be one of {ENCODINGS}, got {index_encoding!r}")
    directory = Path(directory)
    sft.validate()
    tensors: dict[str, torch.Tensor] = {}
    index: dict[str, dict] = {}
    for name, d in sft.diffs.items():
        values = d.values.detach().to("cpu", dtype or d.values.dtype).contiguous()
        entry = {"shape": list(d.shape), "nnz": d.nnz, "encoding": index_encoding}
        if index_encoding == "elias-fano":
            low, high, low_bits = encoding.encode(d.indices.cpu().numpy(), d.numel)
            tensors[_sparse_key(name, "ef_low")] = torch.from_numpy(low)
            tensors[_sparse_key(name, "ef_high")] = torch.from_numpy(high)
            entry["low_bits"] = low_bits
        else:
            tensors[_sparse_key(name, "indices")] = d.indices.cpu().to(index_dtype(d.numel)).contiguous()
        tensors[_sparse_key(name, "values")] = values
        index[name] = entry
    for name, t in sft.dense.items():
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[f"dense/{name}"] = t.contiguous()
    metadata = {
        "format": FORMAT_TAG,
        "format_version": str(FORMAT_VERSION),
        "index": json.dumps(index, separators=(",", ":")),
    }
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    sft.config.k = sft.k
    sft.config.dense_params = sorted(sft.dense)
    write_text(directory / CONFIG_NAME, sft.config.to_json())
    return directory


def read_config(directory: str | os.PathLike) -> SftConfig:
    """Read and check `sft_config.json` alone (cheap: `compsft info` uses it)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CompsftError(f"{directory}: not an SFT directory (no {CONFIG_NAME})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CompsftError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CompsftError(f"{path}: expected a JSON object")
    try:
        return SftConfig.from_dict(data, source=str(path))
    except TypeError as err:
        raise CompsftError(f"{path}: {err}") from None


def read_header(directory: str | os.PathLike) -> tuple[dict[str, dict], list[str]]:
    """The sparse index (name → shape, nnz, encoding) and the dense names, from the header alone."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise CompsftError(f"{directory}: no {WEIGHTS_NAME}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
    except Exception as err:  # safetensors raises its own error type for corrupt headers
        raise CompsftError(f"{path}: corrupt or truncated safetensors file ({err})") from None
    return _check_header(path, meta, keys)


def _check_header(path: Path, meta: dict, keys: list[str]) -> tuple[dict[str, dict], list[str]]:
    if meta.get("format") != FORMAT_TAG:
        raise CompsftError(f"{path}: not a compsft SFT file (metadata format={meta.get('format')!r})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise CompsftError(
            f"{path}: unknown format_version {meta.get('format_version')!r} (this compsft reads {FORMAT_VERSION})"
        )
    try:
        index = json.loads(meta["index"])
    except (KeyError, json.JSONDecodeError):
        raise CompsftError(f"{path}: missing or corrupt index in the header") from None
    expected = set()
    for name, e in index.items():
        enc = e.get("encoding")
        if enc not in ENCODINGS:
            raise CompsftError(f"{path}, tensor {name!r}: unknown index encoding {enc!r}")
        parts = ("ef_low", "ef_high", "values") if enc == "elias-fano" else ("indices", "values")
        expected.update(_sparse_key(name, p) for p in parts)
    dense = [k[len("dense/"):] for k in keys if k.startswith("dense/")]
    sparse_keys = {k for k in keys if k.startswith("sparse/")}
    if sparse_keys != expected:
        odd = sorted(sparse_keys ^ expected)
        raise CompsftError(f"{path}: header and tensors disagree (e.g. {odd[0]!r})")
    stray = [k for k in keys if not k.startswith(("sparse/", "dense/"))]
    if stray:
        raise CompsftError(f"{path}: unexpected tensor {stray[0]!r}")
    return index, dense


def load_sft(directory: str | os.PathLike, device: torch.device | str = "cpu") -> SparseFineTuning:
    """Read an SFT directory written by `save_sft`, validating everything before returning."""
    directory = Path(directory)
    config = read_config(directory)
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise CompsftError(f"{directory}: no {WEIGHTS_NAME}")
    index, dense_names = read_header(directory)
    k = sum(int(e["nnz"]) for e in index.values())
    if k != config.k:
        raise CompsftError(f"{directory}: {CONFIG_NAME} says k={config.k} but {WEIGHTS_NAME} holds {k}")
    if sorted(dense_names) != sorted(config.dense_params):
        raise CompsftError(f"{directory}: dense parameters differ between {CONFIG_NAME} and {WEIGHTS_NAME}")
    # The header is consistent: now read the data in one sequential read (much faster than
    # faulting in a memory map page by page).
    try:
        tensors = load_bytes(path.read_bytes())
    except Exception as err:
        raise CompsftError(f"{path}: corrupt or truncated safetensors file ({err})") from None
    # numpy releases the GIL while decoding: decode tensors on all cores.
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        decoded = pool.map(lambda item: _read_delta(tensors, path, *item), index.items())
        diffs = dict(zip(index, decoded))
    dense = {name: tensors[f"dense/{name}"] for name in dense_names}
    sft = SparseFineTuning(diffs, dense, config)
    sft.validate(source=str(path))
    sft.source = str(directory)
    if str(device) != "cpu":
        sft = sft.to(device)
        sft.source = str(directory)
    return sft


def _read_delta(tensors: dict[str, torch.Tensor], path: Path, name: str, e: dict) -> SparseDelta:
    where = f"{path}, tensor {name!r}"
    try:
        shape = tuple(int(s) for s in e["shape"])
        nnz = int(e["nnz"])
    except (KeyError, TypeError, ValueError):
        raise CompsftError(f"{where}: malformed index entry {e!r}") from None
    numel = math.prod(shape)
    if nnz < 0 or nnz > numel:
        raise CompsftError(f"{where}: nnz {nnz} impossible for shape {list(shape)}")
    values = tensors[_sparse_key(name, "values")]
    if values.dim() != 1 or values.numel() != nnz:
        raise CompsftError(f"{where}: {values.numel()} values, the header says {nnz}")
    if e["encoding"] == "elias-fano":
        low = tensors[_sparse_key(name, "ef_low")].numpy()
        high = tensors[_sparse_key(name, "ef_high")].numpy()
        if low.dtype != np.uint8 or high.dtype != np.uint8:
            raise CompsftError(f"{where}: Elias-Fano parts must be uint8")
        try:
            idx = encoding.decode(low, high, nnz, numel, int(e.get("low_bits", -1)))
        except ValueError as err:
            raise CompsftError(f"{where}: corrupt index ({err})") from None
        indices = torch.from_numpy(idx).to(index_dtype(numel))
    else:
        indices = tensors[_sparse_key(name, "indices")]
        if indices.dtype not in (torch.int32, torch.int64) or indices.numel() != nnz:
            raise CompsftError(f"{where}: indices must be {nnz} int32/int64 values")
    return SparseDelta(shape, indices, values)
