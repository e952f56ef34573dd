"""Reading and writing SFT directories: `sft.safetensors` + `sft_config.json` (docs/FORMAT.md).

Writing builds the whole directory under a temporary sibling name and swaps it into place, so a
reader sees the old SFT or the new one, never new tensors beside an old config; the config also
records an xxh3-64 checksum of the exact bytes of `sft.safetensors`, which binds the two files and
catches flipped bits (safetensors has no checksum of its own).

Loading reads the file in one sequential read, verifies the checksum, validates the config, the
safetensors header and the index against their schemas (`compsft.schema`) and checks that they
agree before any tensor is decoded; tensors are views into the buffer read (no copy), indices are
decoded straight into int64, and each tensor is validated (range, order, finiteness) on all cores.
"""
from __future__ import annotations

import json
import logging
import math
import os
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as save_bytes

from . import encoding, schema
from .atomic import atomic_path
from .errors import CompsftError
from .jsonfile import read_json_object
from .sft import FORMAT_VERSION, SftConfig, SparseDelta, SparseFineTuning, index_dtype

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "sft.safetensors"
CONFIG_NAME = "sft_config.json"
FORMAT_TAG = "compsft.sft"
ENCODINGS = ("elias-fano", "raw")
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8}
VALUE_DTYPES = {k: TORCH_DTYPES[k] for k in schema.VALUE_DTYPES}
CHECKSUM_ALGORITHM = "xxh3-64"
# safetensors' own limit on the header; a larger one is a corrupt or hostile file.
MAX_HEADER_BYTES = 100 * 2**20


def _sparse_key(name: str, part: str) -> str:
    return f"sparse/{name}/{part}"


def file_checksum(data: bytes | bytearray | memoryview) -> str:
    """The checksum recorded as `weights_checksum`: xxh3-64 of the file's bytes, ``xxh3-64:<16 hex>``.

    xxh3 runs at memory speed (about 11 ms per 100 MiB here, against 68 ms for zlib.crc32 and 354 ms
    for blake2b); it guards against corruption, not against a forger, who can recompute it.
    """
    import xxhash

    return f"{CHECKSUM_ALGORITHM}:{xxhash.xxh3_64_hexdigest(data)}"


# -- writing ------------------------------------------------------------------------------------
def save_sft(
    sft: SparseFineTuning,
    directory: str | os.PathLike,
    dtype: torch.dtype | None = None,
    index_encoding: str = "elias-fano",
) -> Path:
    """Write `sft` as the directory `directory`, replacing an SFT already there atomically.

    Both files are written into a temporary sibling directory, which then takes the place of
    `directory` in one rename (an exchange on Linux), so an interrupted save leaves the previous SFT
    whole. A directory holding anything but an SFT's two files is refused rather than replaced.
    """
    if index_encoding not in ENCODINGS:
        raise CompsftError(f"index_encoding must be one of {ENCODINGS}, got {index_encoding!r}")
    directory = Path(directory)
    _check_replaceable(directory)
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
    blob = save_bytes(tensors, metadata=metadata)
    del tensors
    sft.config.k = sft.k
    sft.config.dense_params = sorted(sft.dense)
    sft.config.weights_checksum = file_checksum(blob)
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        _write_synced(tmp / WEIGHTS_NAME, blob)
        _write_synced(tmp / CONFIG_NAME, sft.config.to_json().encode("utf-8"))
    return directory


def _check_replaceable(directory: Path) -> None:
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise CompsftError(f"{directory}: exists and is not a directory; refusing to replace it with an SFT")
    if directory.is_dir():
        others = sorted(set(os.listdir(directory)) - {WEIGHTS_NAME, CONFIG_NAME})
        if others:
            raise CompsftError(
                f"{directory}: holds other files than an SFT ({others[0]!r}, ...); saving replaces the whole "
                f"directory, so choose a new or empty one"
            )


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# -- reading ------------------------------------------------------------------------------------
def read_config(directory: str | os.PathLike) -> SftConfig:
    """Read and validate `sft_config.json` alone (cheap: `compsft info` uses it)."""
    path = Path(directory) / CONFIG_NAME
    data = read_json_object(path, f"{directory}: not an SFT directory (no {CONFIG_NAME})")
    if data.get("format_version") != FORMAT_VERSION:
        raise CompsftError(
            f"{path}: unknown format_version {data.get('format_version')!r} (this compsft reads {FORMAT_VERSION})"
        )
    schema.check(schema.ConfigDocument, data, str(path))
    return SftConfig.from_dict(data, source=str(path))


def read_header(directory: str | os.PathLike) -> tuple[dict[str, dict], list[str]]:
    """The sparse index (name → shape, nnz, encoding) and the dense names, from the header alone."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise CompsftError(f"{directory}: no {WEIGHTS_NAME}")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= MAX_HEADER_BYTES:
                raise CompsftError(f"{path}: corrupt or truncated safetensors file (header length {n})")
            head += f.read(n)
            size = os.fstat(f.fileno()).st_size
    except OSError as err:
        raise CompsftError(f"{path}: cannot read ({err})") from None
    table, meta, _ = _parse_safetensors(path, head, size)
    index, dense = _check_header(path, meta, table)
    return {name: e.model_dump() for name, e in index.items()}, dense


def _parse_safetensors(path: Path, buf, size: int) -> tuple[dict[str, schema.TensorInfo], dict, int]:
    """The tensor table, the metadata and where the data starts, all checked as safetensors does:
    offsets in bounds, each tensor's byte length equal to its shape times its dtype's size, and the
    tensors covering the data exactly, without gaps or overlaps."""
    if len(buf) < 8:
        raise CompsftError(f"{path}: corrupt or truncated safetensors file ({len(buf)} bytes)")
    n = struct.unpack_from("<Q", buf, 0)[0]
    if not 0 < n <= MAX_HEADER_BYTES or 8 + n > len(buf):
        raise CompsftError(f"{path}: corrupt or truncated safetensors file (header length {n})")
    try:
        header = json.loads(bytes(buf[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CompsftError(f"{path}: corrupt safetensors header ({str(err)[:200]})") from None
    if not isinstance(header, dict):
        raise CompsftError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None)
    if meta is not None and not isinstance(meta, dict):
        raise CompsftError(f"{path}: field __metadata__: expected a JSON object")
    table = schema.check_mapping(schema.TensorInfo, header, str(path), "")
    data_start, data_len = 8 + n, size - 8 - n
    spans = []
    for name, t in table.items():
        item = TORCH_DTYPES[t.dtype].itemsize if t.dtype in TORCH_DTYPES else None
        if item is None:
            raise CompsftError(f"{path}, tensor {name!r}: dtype {t.dtype!r} is not one a compsft file holds "
                               f"({', '.join(TORCH_DTYPES)})")
        if any(s < 0 for s in t.shape) or math.prod(t.shape) >= schema.MAX_NUMEL:
            raise CompsftError(f"{path}, tensor {name!r}: impossible shape {t.shape}")
        start, end = t.data_offsets
        if not 0 <= start <= end <= data_len or end - start != math.prod(t.shape) * item:
            raise CompsftError(f"{path}, tensor {name!r}: data_offsets {[start, end]} do not fit shape "
                               f"{t.shape} of {t.dtype} in {data_len} data bytes (corrupt or truncated file)")
        spans.append((start, end))
    spans.sort()
    covered = 0
    for start, end in spans:
        if start != covered:
            raise CompsftError(f"{path}: tensor data has gaps or overlaps at byte {covered} (corrupt file)")
        covered = end
    if covered != data_len:
        raise CompsftError(f"{path}: {data_len - covered} bytes of data belong to no tensor (corrupt file)")
    return table, meta or {}, data_start


def _check_header(path: Path, meta: dict, table: dict[str, schema.TensorInfo]
                  ) -> tuple[dict[str, schema.IndexEntry], list[str]]:
    if meta.get("format") != FORMAT_TAG:
        raise CompsftError(f"{path}: not a compsft SFT file (metadata format={meta.get('format')!r})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise CompsftError(
            f"{path}: unknown format_version {meta.get('format_version')!r} (this compsft reads {FORMAT_VERSION})"
        )
    schema.check(schema.Metadata, meta, str(path), "__metadata__")
    try:
        raw_index = json.loads(meta["index"])
    except (json.JSONDecodeError, RecursionError):
        raise CompsftError(f"{path}: field __metadata__.index: not valid JSON") from None
    index = schema.check_mapping(schema.IndexEntry, raw_index, str(path), "index")
    expected: dict[str, tuple[str, ...]] = {}
    for name, e in index.items():
        parts = {"elias-fano": (("ef_low", schema.PART_DTYPES), ("ef_high", schema.PART_DTYPES)),
                 "raw": (("indices", schema.INDEX_DTYPES),)}[e.encoding] + (("values", schema.VALUE_DTYPES),)
        for part, dtypes in parts:
            expected[_sparse_key(name, part)] = dtypes
    sparse_keys = {k for k in table if k.startswith("sparse/")}
    if sparse_keys != set(expected):
        odd = sorted(sparse_keys ^ set(expected))
        raise CompsftError(f"{path}: header and tensors disagree (e.g. {odd[0]!r})")
    stray = [k for k in table if not k.startswith(("sparse/", "dense/"))]
    if stray:
        raise CompsftError(f"{path}: unexpected tensor {stray[0]!r}")
    for key, t in table.items():
        allowed = expected.get(key, schema.VALUE_DTYPES)  # dense tensors are heads: floating point
        if t.dtype not in allowed:
            raise CompsftError(f"{path}, tensor {key!r}: dtype {t.dtype} where {' or '.join(allowed)} belongs")
        if key.startswith("sparse/") and len(t.shape) != 1:
            raise CompsftError(f"{path}, tensor {key!r}: must be 1-D, has shape {t.shape}")
    dense = [k[len("dense/"):] for k in table if k.startswith("dense/")]
    return index, dense


def _read_file(path: Path) -> np.ndarray:
    """The whole file in one sequential read into a writable buffer (tensors become views of it).

    An uninitialised numpy buffer, not a bytearray: bytearray(n) writes n zeros first, which cost
    as much as the read itself."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            buf = np.empty(size, dtype=np.uint8)
            got = f.readinto(memoryview(buf))
    except OSError as err:
        raise CompsftError(f"{path}: cannot read ({err})") from None
    if got != size:
        raise CompsftError(f"{path}: changed while being read")
    return buf


def _view(buf: np.ndarray, start: int, end: int, dtype: str, shape: list[int]) -> torch.Tensor:
    tdtype = TORCH_DTYPES[dtype]
    count = (end - start) // tdtype.itemsize
    if count == 0:
        return torch.empty(shape, dtype=tdtype)
    if start % tdtype.itemsize:
        # Misaligned (files written by safetensors never are): copy rather than view.
        return torch.frombuffer(bytearray(buf[start:end].tobytes()), dtype=tdtype).reshape(shape)
    t = torch.frombuffer(buf, dtype=tdtype, count=count, offset=start).reshape(shape)
    if sys.byteorder == "big":  # the format is little-endian
        t = torch.from_numpy(t.numpy().byteswap())
    return t


def load_sft(directory: str | os.PathLike, device: torch.device | str = "cpu") -> SparseFineTuning:
    """Read an SFT directory written by `save_sft`, validating everything before returning."""
    directory = Path(directory)
    config = read_config(directory)
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise CompsftError(f"{directory}: no {WEIGHTS_NAME}")
    buf = _read_file(path)
    if config.weights_checksum is not None:
        actual = file_checksum(buf)
        if actual != config.weights_checksum:
            raise CompsftError(
                f"{path}: checksum mismatch ({actual}, but {CONFIG_NAME} records {config.weights_checksum}): "
                f"the file is corrupt, or it and {CONFIG_NAME} come from different saves"
            )
    table, meta, data_start = _parse_safetensors(path, buf, len(buf))
    index, dense_names = _check_header(path, meta, table)
    k = sum(e.nnz for e in index.values())
    if k != config.k:
        raise CompsftError(f"{directory}: {CONFIG_NAME} says k={config.k} but {WEIGHTS_NAME} holds {k}")
    if sorted(dense_names) != sorted(config.dense_params):
        raise CompsftError(f"{directory}: dense parameters differ between {CONFIG_NAME} and {WEIGHTS_NAME}")

    def tensor(key: str) -> torch.Tensor:
        t = table[key]
        return _view(buf, data_start + t.data_offsets[0], data_start + t.data_offsets[1], t.dtype, t.shape)

    def read(item: tuple[str, schema.IndexEntry]) -> SparseDelta:
        name, e = item
        delta = _read_delta(tensor, path, name, e)
        # The Elias-Fano decoder has checked order and range already, chunk by chunk in cache.
        delta.validate(name, str(path), check_order=e.encoding != "elias-fano")
        return delta

    # numpy and torch release the GIL while decoding and checking: tensors on all cores, largest first.
    order = sorted(index.items(), key=lambda item: -item[1].nnz)
    with ThreadPoolExecutor(max_workers=max(1, min(len(order), torch.get_num_threads()))) as pool:
        decoded = dict(zip((name for name, _ in order), pool.map(read, order)))
    diffs = {name: decoded[name] for name in index}
    dense = {name: tensor(f"dense/{name}") for name in dense_names}
    sft = SparseFineTuning(diffs, dense, config)
    sft.validate_dense(source=str(path))
    sft.source = str(directory)
    if str(device) != "cpu":
        sft = sft.to(device)
        sft.source = str(directory)
    return sft


def _read_delta(tensor, path: Path, name: str, e: schema.IndexEntry) -> SparseDelta:
    where = f"{path}, tensor {name!r}"
    numel = e.numel
    values = tensor(_sparse_key(name, "values"))
    if values.numel() != e.nnz:
        raise CompsftError(f"{where}: {values.numel()} values, the header says {e.nnz}")
    if e.encoding == "elias-fano":
        low = tensor(_sparse_key(name, "ef_low")).numpy()
        high = tensor(_sparse_key(name, "ef_high")).numpy()
        try:
            idx = encoding.decode(low, high, e.nnz, numel, e.low_bits)
        except ValueError as err:
            raise CompsftError(f"{where}: corrupt index ({err})") from None
        # Decoded straight into int64, the dtype apply indexes with: no conversion on either side.
        indices = torch.from_numpy(idx)
    else:
        indices = tensor(_sparse_key(name, "indices"))
        if indices.numel() != e.nnz:
            raise CompsftError(f"{where}: {indices.numel()} indices, the header says {e.nnz}")
    return SparseDelta(tuple(e.shape), indices, values)
