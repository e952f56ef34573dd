"""Elias-Fano coding of sorted unique flat indices.

A sparse fine-tuning touching n of u entries of a tensor needs, per index, at most
2 + ceil(log2(u / n)) bits: under one byte at 5% density (where a plain int32 costs four). The
scheme is the textbook one, laid out so that numpy's packbits/unpackbits do all the work:

* ``low_bits`` l = floor(log2(u / n)) (0 when n >= u / 2).
* The low l bits of each index are stored as l *bit planes*: plane j holds bit j of every index,
  n bits packed little-endian into ceil(n / 8) bytes. Planes follow each other.
* The high part ``idx >> l`` is stored in unary: bit ``(idx_i >> l) + i`` is set in a bitmap of
  ``n + (u >> l) + 1`` bits, packed little-endian.

Decoding: the positions of the set bits minus 0..n-1 give the high parts; OR in the planes.
docs/FORMAT.md is the normative description.
"""
from __future__ import annotations

import numpy as np


def low_bits_for(n: int, universe: int) -> int:
    """The number of low bits Elias-Fano uses for n indices below `universe`."""
    if n == 0 or universe <= 2 * n:
        return 0
    return int(np.floor(np.log2(universe / n)))


def high_bitmap_length(n: int, universe: int, low_bits: int) -> int:
    return n + (universe >> low_bits) + 1


def encode(indices: np.ndarray, universe: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Encode sorted unique non-negative `indices` (< universe). Returns (low, high, low_bits) as uint8 arrays."""
    indices = np.asarray(indices, dtype=np.int64)
    n = int(indices.size)
    low_bits = low_bits_for(n, universe)
    if n == 0:
        return np.zeros(0, np.uint8), np.zeros(0, np.uint8), 0
    planes = []
    for j in range(low_bits):
        bits = ((indices >> j) & 1).astype(np.uint8)
        planes.append(np.packbits(bits, bitorder="little"))
    low = np.concatenate(planes) if planes else np.zeros(0, np.uint8)
    bitmap = np.zeros(high_bitmap_length(n, universe, low_bits), dtype=np.uint8)
    bitmap[(indices >> low_bits) + np.arange(n, dtype=np.int64)] = 1
    high = np.packbits(bitmap, bitorder="little")
    return low, high, low_bits


# Decoding works through the positions in chunks of this many (a multiple of 8, so each chunk
# starts on a byte of every low plane): each chunk's arithmetic and checks then run in the CPU cache.
CHUNK = 1 << 16


def decode(low: np.ndarray, high: np.ndarray, n: int, universe: int, low_bits: int) -> np.ndarray:
    """Inverse of :func:`encode`, straight into int64. Raises ValueError on any inconsistency (a corrupt
    file), including positions that are not strictly increasing or not below `universe`."""
    if n == 0:
        if low.size or high.size:
            raise ValueError("empty index set with a non-empty payload")
        return np.zeros(0, np.int64)
    if low_bits != low_bits_for(n, universe):
        raise ValueError(f"low_bits {low_bits} does not match n={n}, universe={universe}")
    plane_bytes = (n + 7) // 8
    if low.size != plane_bytes * low_bits:
        raise ValueError(f"low part has {low.size} bytes, expected {plane_bytes * low_bits}")
    nbits = high_bitmap_length(n, universe, low_bits)
    if high.size != (nbits + 7) // 8:
        raise ValueError(f"high part has {high.size} bytes, expected {(nbits + 7) // 8}")
    # Set-bit positions q_i. numpy's nonzero is several times faster on bool than on uint8, and
    # unpackbits yields exactly 0 and 1, which is what a bool view needs.
    out = np.flatnonzero(np.unpackbits(high, count=nbits, bitorder="little").view(np.bool_))
    if out.size != n:
        raise ValueError(f"high part encodes {out.size} indices, expected {n}")
    ramp = np.arange(min(n, CHUNK), dtype=np.int64)
    acc_type = np.min_scalar_type((1 << low_bits) - 1) if low_bits else None
    last = -1
    for start in range(0, n, CHUNK):
        part = out[start:start + CHUNK]
        m = part.size
        part -= ramp[:m]  # x_i >> l = q_i - i
        part -= start
        if low_bits:
            part <<= low_bits
            acc = np.zeros(m, dtype=acc_type)
            first, stop = start // 8, (start + m + 7) // 8
            for j in range(low_bits):
                plane = np.unpackbits(low[j * plane_bytes + first:j * plane_bytes + stop], count=m, bitorder="little")
                if j:
                    plane = plane.astype(acc_type, copy=False)
                    plane <<= j
                acc |= plane
            part |= acc
        # Within a bucket the low bits decide the order: a corrupt file can break it, so check here,
        # while the chunk is still in cache.
        if part[0] <= last or (m > 1 and not bool(np.all(part[1:] > part[:-1]))):
            raise ValueError("positions are not strictly increasing")
        last = int(part[-1])
    if last >= universe:
        raise ValueError(f"position {last} out of range for {universe} entries")
    return out
