"""Reading the reference implementation's `pytorch_diff.bin` (cambridgeltl/composable-sft) safely.

Those files are pickles (`torch.save` of a dict). They are read with torch's weights-only unpickler,
which admits tensors, containers and primitive types only; we add exactly the numpy types such files
hold (numpy scalars in `index_steps`), so no other object can be built and no code can run.

Its layout (see docs/FORMAT.md, "Converting"): ``{"diffs": {name: {"size", "index_steps",
"values"}}, "abs": {name: tensor}}``, with *column-major* flat indices stored as a first index
followed by the steps between consecutive indices.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import CompsftError
from .sft import KINDS, SftConfig, SparseDelta, SparseFineTuning, index_dtype

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


def convert_legacy(
    path: str | os.PathLike,
    base: str | os.PathLike | torch.nn.Module | None = None,
    *,
    kind: str | None = None,
    task: str | None = None,
    language: str | None = None,
    labels: Sequence[str] | None = None,
) -> SparseFineTuning:
    """Build a SparseFineTuning from a reference-implementation file (indices re-ordered row-major).

    With `base` (the model directory the SFT was trained from, or the model itself) every tensor's
    shape is checked against it and its fingerprint is recorded, so that applying the result to
    another model is refused as for any compsft SFT; without it the result has no fingerprint and
    applying it warns. `kind` defaults from the dense part (`abs`): a `classifier` head makes a task
    SFT, an MLM head (`cls.`, `lm_head`) a language SFT. A task SFT's label list (id order) comes
    from `labels`, else from a `config.json` next to the file (`id2label`).

    Example::

        sft = convert_legacy("old/pos-sft", base="models/mbert", task="pos", labels=upos_labels)
    """
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
    kind = kind or ("task" if task else _kind_from_heads(dense))
    if kind not in KINDS:
        raise CompsftError(f"kind must be one of {KINDS}, got {kind!r}")
    training: dict = {"converted_from": str(path), "converter": "compsft.legacy"}
    if kind == "task":
        labels = list(labels) if labels else _labels_next_to(path)
        if labels:
            _check_label_count(path, dense, labels)
            training["labels"] = labels
        else:
            logger.warning("%s: a task SFT without a label list; pass labels (--labels) so that a model composed "
                           "from it can name its predictions", path)
    config = SftConfig(kind=kind, task=task, language=language, training=training)
    sft = SparseFineTuning(diffs, dense, config)
    sft.validate(source=str(path))
    if base is not None:
        _bind_to_base(sft, base, str(path))
    logger.info("converted %s: %d tensors, k=%s, %d dense, %s", path, len(diffs), f"{sft.k:,}", len(dense),
                f"fingerprint of {sft.config.base_model}" if base is not None else "no base fingerprint (no base given)")
    return sft


def _kind_from_heads(dense: dict) -> str:
    """The reference stores the trained head in `abs`: a classifier for a task, the MLM head for a language."""
    if any(name.split(".")[0] == "classifier" for name in dense):
        return "task"
    if any(name.startswith(("cls.", "lm_head.")) for name in dense):
        return "language"
    return "other"


def _labels_next_to(path: str | os.PathLike) -> list[str] | None:
    """The label list of a `config.json` (`id2label`) saved next to the reference file, if there is one."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    try:
        id2label = json.loads(config_file.read_text(encoding="utf-8")).get("id2label") or {}
        labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
    except (ValueError, AttributeError, TypeError, KeyError, RecursionError) as err:
        raise CompsftError(f"{config_file}: unreadable id2label ({err})") from None
    if not labels or all(label.startswith("LABEL_") for label in labels):
        return None
    return labels


def _check_label_count(path, dense: dict, labels: list[str]) -> None:
    head = next((t for n, t in dense.items() if n.split(".")[0] == "classifier" and n.endswith("weight")), None)
    if head is not None and head.dim() == 2 and head.shape[0] != len(labels):
        raise CompsftError(f"{path}: the classifier head has {head.shape[0]} outputs but {len(labels)} labels were given")


def _bind_to_base(sft: SparseFineTuning, base, source: str) -> None:
    """Check every tensor's shape against `base` and record its fingerprint (and vocabulary, if it has a tokenizer)."""
    from .merge import base_fingerprint, check_fits

    model, vocab = base, None
    if not isinstance(base, torch.nn.Module):
        from .paths import load_model_by_architecture, load_tokenizer
        from .vocab import vocab_fingerprint

        model = load_model_by_architecture(base, "--base")
        tokenizer = load_tokenizer(base, "--base", required=False)
        vocab = vocab_fingerprint(tokenizer) if tokenizer is not None else None
        sft.config.base_model = str(base)
    else:
        sft.config.base_model = getattr(getattr(base, "config", None), "_name_or_path", None) or type(base).__name__
    check_fits(model, sft, source)
    sft.config.base_fingerprint = base_fingerprint(model, sft.diffs.keys())
    sft.config.vocab = vocab
