"""Reading the reference implementation's `pytorch_diff.bin` (cambridgeltl/composable-sft) safely.

Those files are pickles (`torch.save` of a dict). They are read with torch's weights-only unpickler,
which admits tensors, containers and primitive types only; we add exactly the numpy types such files
hold (numpy scalars in `index_steps`), so no other object can be built and no code can run.

Its layout (see docs/FORMAT.md, "Converting"): ``{"diffs": {name: {"size", "index_steps",
"values"}}, "abs": {name: tensor}}``, with *column-major* flat indices stored as a first index
followed by the steps between consecutive indices.
"""
from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from .errors import CompsftError
from .sft import SftConfig, SparseDelta, SparseFineTuning, index_dtype

logger = logging.getLogger(__name__)

LEGACY_NAME = "pytorch_diff.bin"


def _multiarray():
    """numpy's multiarray module: `numpy._core` from numpy 2 on, `numpy.core` before (pyproject admits 1.24)."""
    try:
        from numpy._core import multiarray
    except ImportError:
        from numpy.core import multiarray
    return multiarray


def _numpy_globals() -> list:
    """The numpy objects a legacy file may reference: the scalar constructor and plain dtypes."""
    multiarray = _multiarray()
    # Files name the scalar constructor by the module of the numpy that wrote them: numpy.core in
    # numpy 1, numpy._core in numpy 2. Admit both names, whichever numpy reads them.
    allowed: list = [np.dtype, multiarray.scalar, (multiarray.scalar, "numpy.core.multiarray.scalar"),
                     (multiarray.scalar, "numpy._core.multiarray.scalar")]
    for kind in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
                 np.float16, np.float32, np.float64, np.bool_):
        allowed.append(type(np.dtype(kind)))
    return allowed


def read_legacy(path: str | os.PathLike) -> dict:
    """Unpickle a reference `pytorch_diff.bin` with the restricted (weights-only) unpickler."""
    path = Path(path)
    if path.is_dir():
        path = path / LEGACY_NAME
    if not path.is_file():
        raise CompsftError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as err:
        first = str(err).strip().splitlines()
        reason = next((line for line in first if "Unsupported" in line or "global" in line), first[0] if first else "")
        raise CompsftError(f"{path}: refused or unreadable legacy SFT (only tensors, lists and numpy "
                           f"scalars are admitted): {reason[:300]}") from None
    if not isinstance(data, dict) or "diffs" not in data:
        raise CompsftError(f"{path}: not a composable-sft diff file (no 'diffs' entry)")
    return data


def fortran_to_row_major(flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Map column-major flat indices of a tensor of `shape` to row-major ones."""
    if len(shape) <= 1:
        return flat
    coords = np.unravel_index(flat, shape, order="F")
    return np.ravel_multi_index(coords, shape, order="C")


def convert_legacy(path: str | os.PathLike) -> SparseFineTuning:
    """Build a SparseFineTuning from a reference-implementation file (indices re-ordered row-major)."""
    data = read_legacy(path)
    diffs: dict[str, SparseDelta] = {}
    for name, enc in data["diffs"].items():
        where = f"{path}, tensor {name!r}"
        try:
            shape = tuple(int(s) for s in enc["size"])
            steps = np.asarray([int(s) for s in enc["index_steps"]], dtype=np.int64)
            values = enc["values"]
        except (KeyError, TypeError, ValueError):
            raise CompsftError(f"{where}: malformed entry (expected size, index_steps, values)") from None
        if not isinstance(values, torch.Tensor) or values.dim() != 1 or values.numel() != steps.size:
            raise CompsftError(f"{where}: {steps.size} indices but values of shape {getattr(values, 'shape', None)}")
        numel = int(np.prod(shape)) if shape else 1
        # int64 accumulation: the reference's own decoder accumulates in int32 and overflows past 2^31.
        col_major = np.cumsum(steps)
        if col_major.size and (col_major.min() < 0 or col_major.max() >= numel or (np.diff(col_major) <= 0).any()):
            raise CompsftError(f"{where}: indices out of range or not increasing")
        row_major = fortran_to_row_major(col_major, shape)
        order = np.argsort(row_major, kind="stable")
        idx = torch.from_numpy(row_major[order]).to(index_dtype(numel))
        diffs[name] = SparseDelta(shape, idx, values[torch.from_numpy(order)].clone())
    dense = {}
    for name, t in (data.get("abs") or {}).items():
        if not isinstance(t, torch.Tensor):
            raise CompsftError(f"{path}, dense tensor {name!r}: not a tensor")
        dense[name] = t
    config = SftConfig(kind="other", training={"converted_from": str(path), "converter": "compsft.legacy"})
    sft = SparseFineTuning(diffs, dense, config)
    sft.validate(source=str(path))
    logger.info("converted %s: %d tensors, k=%s, %d dense", path, len(diffs), f"{sft.k:,}", len(dense))
    return sft
