"""The sparse fine-tuning: what a trained SFT *is*, independent of files and models.

An SFT maps parameter names to sparse differences (sorted unique row-major flat indices plus
values) and, separately, to *dense* parameters: heads that were trained in full. Dense parameters
are applied only when asked, so a language SFT's MLM head never lands on a tagger.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from .errors import CompsftError
from .version import __version__

FORMAT_VERSION = 1
KINDS = ("language", "task", "composed", "other")


def index_dtype(numel: int) -> torch.dtype:
    """int32 while every flat index fits, int64 beyond (tensors of 2^31 entries or more)."""
    return torch.int32 if numel < 2**31 else torch.int64


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value is finite, in one vectorised pass in the common case.

    A NaN or an infinity makes the sum NaN or infinite, so a finite sum proves every value finite;
    a sum that overflowed (huge but finite values) falls back to the exact elementwise check. The
    sum runs in the values' own precision (at least fp32): a float64 sum costs 30 times more here.
    """
    if not t.is_floating_point() or t.numel() == 0:
        return True
    work = t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32
    if t.device.type == "cpu" and t.dtype in (torch.float16, torch.float32, torch.float64):
        # numpy's single-threaded sum: no thread-pool hand-off per tensor, which costs more than
        # the sum itself when the loader checks many tensors at once.
        a = t.detach().numpy()
        with np.errstate(over="ignore", invalid="ignore"):  # a non-finite sum is the expected signal
            total = a.sum(dtype=np.float32 if a.dtype == np.float16 else a.dtype)
        return bool(np.isfinite(total)) or bool(np.isfinite(a).all())
    if bool(torch.isfinite(t.sum(dtype=work))):
        return True
    return bool(torch.isfinite(t).all())


def _strictly_increasing(idx: torch.Tensor) -> bool:
    if idx.device.type == "cpu":
        # numpy's comparison is several times faster than torch's here (one pass, no thread pool).
        a = idx.numpy()
        return bool(np.all(a[1:] > a[:-1]))
    return bool((idx[1:] > idx[:-1]).all())


@dataclass
class SparseDelta:
    """The difference on one parameter: `values[i]` is added at flat row-major index `indices[i]`."""

    shape: tuple[int, ...]
    indices: torch.Tensor
    values: torch.Tensor

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    def validate(self, name: str, source: str = "the SFT", check_order: bool = True) -> None:
        """Raise CompsftError unless indices are sorted, unique, in range and values finite.

        `check_order=False` skips the order and range checks, for indices whose decoder has checked them.
        """
        where = f"{source}, tensor {name!r}"
        if self.indices.dim() != 1 or self.values.dim() != 1:
            raise CompsftError(f"{where}: indices and values must be 1-D")
        if self.indices.numel() != self.values.numel():
            raise CompsftError(
                f"{where}: {self.indices.numel()} indices but {self.values.numel()} values"
            )
        if self.indices.dtype not in (torch.int32, torch.int64):
            raise CompsftError(f"{where}: indices must be int32 or int64, got {self.indices.dtype}")
        if not self.values.is_floating_point():
            raise CompsftError(f"{where}: values must be floating point, got {self.values.dtype}")
        if self.nnz and check_order:
            idx = self.indices
            if int(idx[0]) < 0 or int(idx[-1]) >= self.numel:
                raise CompsftError(
                    f"{where}: index out of range for shape {list(self.shape)} "
                    f"(min {int(idx.min())}, max {int(idx.max())}, numel {self.numel})"
                )
            if self.nnz > 1 and not _strictly_increasing(idx):
                raise CompsftError(f"{where}: indices are not sorted and unique")
        if self.nnz and not all_finite(self.values):
            raise CompsftError(f"{where}: values contain NaN or Inf")

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SparseDelta":
        return SparseDelta(self.shape, self.indices.to(device), self.values.to(device=device, dtype=dtype))

    def dense(self) -> torch.Tensor:
        """A dense copy of this difference (for tests and small tensors only)."""
        out = torch.zeros(self.numel, dtype=self.values.dtype, device=self.values.device)
        out[self.indices.long()] = self.values
        return out.view(self.shape)


@dataclass
class SftConfig:
    """Everything about an SFT except its tensors; saved as `sft_config.json`."""

    kind: str = field(default="other", metadata={"help": "language, task, composed or other"})
    language: str | None = field(default=None, metadata={"help": "ISO 639-3 code (language SFTs)"})
    task: str | None = field(default=None, metadata={"help": "task name (task SFTs)"})
    base_model: str | None = field(default=None, metadata={"help": "name or path of the base model"})
    base_fingerprint: dict[str, Any] | None = field(
        default=None, metadata={"help": "cheap fingerprint of the base weights (compsft.fingerprint)"}
    )
    vocab: dict[str, Any] | None = field(
        default=None, metadata={"help": "vocabulary the SFT was trained with: {'size', 'sha256'}"}
    )
    num_eligible: int | None = field(
        default=None, metadata={"help": "number of maskable parameters; density = k / num_eligible"}
    )
    training: dict[str, Any] = field(default_factory=dict, metadata={"help": "how it was trained"})
    # Filled in from the tensors when saving; read back for `compsft info` without decoding.
    k: int = 0
    density: float | None = None
    dense_params: list[str] = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    compsft_version: str = __version__
    # xxh3-64 of the exact bytes of sft.safetensors, set when saving and verified when loading: it
    # catches corruption and binds the config to its tensors (docs/FORMAT.md, "Integrity").
    weights_checksum: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "sft_config.json") -> "SftConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            # A newer minor version may add fields: keep reading, but keep them visible.
            data = {k: v for k, v in data.items() if k in known}
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CompsftError(
                f"{source}: unknown format_version {version!r} (this compsft reads {FORMAT_VERSION})"
            )
        if data.get("kind", "other") not in KINDS:
            raise CompsftError(f"{source}: kind must be one of {KINDS}, got {data.get('kind')!r}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


class SparseFineTuning:
    """A sparse fine-tuning φ: per-parameter sparse differences plus dense (head) parameters.

    Example::

        sft = SparseFineTuning.from_models(base_model, tuned_model, masks)
        sft.save("out/sft-mt")
        sft = SparseFineTuning.load("out/sft-mt")
        handle = compsft.apply(model, sft)
        compsft.revert(model)
    """

    def __init__(
        self,
        diffs: Mapping[str, SparseDelta] | None = None,
        dense: Mapping[str, torch.Tensor] | None = None,
        config: SftConfig | None = None,
    ) -> None:
        self.diffs: dict[str, SparseDelta] = dict(diffs or {})
        self.dense: dict[str, torch.Tensor] = dict(dense or {})
        self.config = config or SftConfig()
        # Where it was loaded from, for error messages; set by `load`.
        self.source: str | None = None
        overlap = set(self.diffs) & set(self.dense)
        if overlap:
            raise CompsftError(f"parameters both sparse and dense: {sorted(overlap)[:3]}")
        self.config.k = self.k
        self.config.dense_params = sorted(self.dense)
        if self.config.num_eligible:
            self.config.density = self.k / self.config.num_eligible

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_models(
        cls,
        base: torch.nn.Module | Mapping[str, torch.Tensor],
        tuned: torch.nn.Module | Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor] | None = None,
        dense_params: Iterable[str] = (),
        config: SftConfig | None = None,
    ) -> "SparseFineTuning":
        """Build φ = tuned − base on `masks` (name → bool mask or flat indices) plus dense params.

        Without masks every changed entry is kept (`tuned != base`). Parameters named in
        `dense_params` are stored whole from `tuned`.
        """
        from .fingerprint import fingerprint

        base_sd = _state(base)
        tuned_sd = _state(tuned)
        dense_params = set(dense_params)
        diffs: dict[str, SparseDelta] = {}
        for name, t in tuned_sd.items():
            if name in dense_params:
                continue
            if name not in base_sd:
                raise CompsftError(f"parameter {name!r} is in the tuned model but not in the base")
            b = base_sd[name]
            if b.shape != t.shape:
                raise CompsftError(f"parameter {name!r}: shape {list(t.shape)} vs base {list(b.shape)}")
            if masks is not None:
                if name not in masks:
                    continue
                m = masks[name]
                idx = m.reshape(-1).nonzero().squeeze(1) if m.dtype == torch.bool else m.reshape(-1).long()
            else:
                idx = (t.reshape(-1) != b.reshape(-1)).nonzero().squeeze(1)
                if idx.numel() == 0:
                    continue
            idx, _ = torch.sort(idx.unique())
            vals = t.reshape(-1)[idx] - b.reshape(-1)[idx]
            diffs[name] = SparseDelta(tuple(t.shape), idx.to(index_dtype(t.numel())).cpu(), vals.detach().cpu())
        dense = {n: tuned_sd[n].detach().cpu().clone() for n in dense_params if n in tuned_sd}
        missing = dense_params - set(tuned_sd)
        if missing:
            raise CompsftError(f"dense parameters not in the tuned model: {sorted(missing)[:3]}")
        config = config or SftConfig()
        if config.base_fingerprint is None:
            config.base_fingerprint = fingerprint(base_sd, diffs.keys())
        sft = cls(diffs, dense, config)
        sft.validate()
        return sft

    # -- facts -------------------------------------------------------------------------------
    @property
    def k(self) -> int:
        """Number of sparse entries (dense parameters not counted)."""
        return sum(d.nnz for d in self.diffs.values())

    def validate(self, source: str = "the SFT") -> None:
        for name, d in self.diffs.items():
            d.validate(name, source)
        self.validate_dense(source)

    def validate_dense(self, source: str = "the SFT") -> None:
        for name, t in self.dense.items():
            if not all_finite(t):
                raise CompsftError(f"{source}, dense tensor {name!r}: contains NaN or Inf")

    def scaled(self, scale: float) -> "SparseFineTuning":
        """A copy with every sparse value multiplied by `scale` (dense parameters unchanged)."""
        diffs = {n: SparseDelta(d.shape, d.indices, d.values * scale) for n, d in self.diffs.items()}
        return SparseFineTuning(diffs, self.dense, dataclasses.replace(self.config))

    def restricted(self, keep: Callable[[str], bool]) -> "SparseFineTuning":
        """A copy with the sparse differences of the parameters `keep` accepts and no dense parameters: part
        of a language SFT composed on part of the model (`lt-sft-upper`)."""
        diffs = {n: d for n, d in self.diffs.items() if keep(n)}
        return SparseFineTuning(diffs, {}, dataclasses.replace(self.config))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SparseFineTuning":
        diffs = {n: d.to(device, dtype) for n, d in self.diffs.items()}
        dense = {n: t.to(device=device, dtype=dtype if t.is_floating_point() else None) for n, t in self.dense.items()}
        return SparseFineTuning(diffs, dense, dataclasses.replace(self.config))

    def __repr__(self) -> str:
        c = self.config
        return (
            f"SparseFineTuning(kind={c.kind!r}, language={c.language!r}, task={c.task!r}, "
            f"k={self.k:,}, tensors={len(self.diffs)}, dense={len(self.dense)})"
        )

    # -- files -------------------------------------------------------------------------------
    def save(self, directory: str | Path, dtype: torch.dtype | None = None, index_encoding: str = "elias-fano") -> Path:
        """Write `sft.safetensors` + `sft_config.json` atomically. `dtype` casts values (e.g. fp16)."""
        from .serialization import save_sft

        return save_sft(self, directory, dtype=dtype, index_encoding=index_encoding)

    save_pretrained = save

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu") -> "SparseFineTuning":
        """Read and validate an SFT directory (header first, then the tensors)."""
        from .serialization import load_sft

        return load_sft(directory, device=device)

    from_pretrained = load


def _state(obj: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        # named_parameters de-duplicates tied weights: a tied embedding is one entry, not two.
        return {n: p.detach() for n, p in obj.named_parameters()}
    return dict(obj)
