"""Schemas of the JSON in an SFT directory (docs/FORMAT.md), checked with pydantic before any use.

Three documents: `sft_config.json`, the safetensors header of `sft.safetensors` (tensor table and
`__metadata__`), and the `index` JSON string inside that metadata. A field of the wrong JSON type,
a negative size or an unknown dtype becomes a `CompsftError` naming the file and the field (e.g.
``index.'w'.shape.0``), never a TypeError further down. Validation is strict (no "3" for 3, no
true for 1); unknown fields are ignored, as the format asks of readers.
"""
from __future__ import annotations

import math
from typing import Any, Literal, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import CompsftError

# Sizes stay far below 2^63 so that every product and offset fits an int64.
MAX_NUMEL = 2**62
Size = Field(ge=0, lt=MAX_NUMEL)
# The safetensors dtypes a compsft file may hold, and the torch names they map to (see serialization).
VALUE_DTYPES = ("F64", "F32", "F16", "BF16")
INDEX_DTYPES = ("I32", "I64")
PART_DTYPES = ("U8",)
CHECKSUM_PATTERN = r"^xxh3-64:[0-9a-f]{16}$"


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class FingerprintTensor(_Strict):
    shape: list[int] = Field(max_length=64)
    sample: list[float] = Field(max_length=1024)


class Fingerprint(_Strict):
    method: str
    shapes_sha256: str | None = None
    tensors: dict[str, FingerprintTensor]


class Vocab(_Strict):
    size: int = Field(ge=0)
    sha256: str


class ConfigDocument(_Strict):
    """`sft_config.json`; `format_version` is checked before this (its own, clearer message)."""

    format_version: int
    kind: Literal["language", "task", "composed", "other"] = "other"
    language: str | None = None
    task: str | None = None
    base_model: str | None = None
    base_fingerprint: Fingerprint | None = None
    vocab: Vocab | None = None
    num_eligible: int | None = Field(default=None, ge=0)
    training: dict[str, Any] = {}
    k: int = Field(default=0, ge=0)
    density: float | None = None
    dense_params: list[str] = []
    compsft_version: str | None = None
    weights_checksum: str | None = Field(default=None, pattern=CHECKSUM_PATTERN)


class IndexEntry(_Strict):
    """One sparse tensor in the header's `index`."""

    shape: list[int] = Field(max_length=64)
    nnz: int = Size
    encoding: Literal["elias-fano", "raw"]
    low_bits: int | None = Field(default=None, ge=0, le=62)

    @model_validator(mode="after")
    def _consistent(self) -> "IndexEntry":
        if any(not 0 <= s < MAX_NUMEL for s in self.shape) or math.prod(self.shape) >= MAX_NUMEL:
            raise ValueError(f"shape {self.shape} is negative or too large")
        if self.nnz > math.prod(self.shape):
            raise ValueError(f"nnz {self.nnz} exceeds the {math.prod(self.shape)} entries of shape {self.shape}")
        if self.encoding == "elias-fano" and self.low_bits is None:
            raise ValueError("low_bits is required for encoding 'elias-fano'")
        return self

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class TensorInfo(_Strict):
    """One entry of the safetensors header's tensor table."""

    dtype: str
    shape: list[int] = Field(max_length=64)
    data_offsets: list[int] = Field(min_length=2, max_length=2)


class Metadata(_Strict):
    """The safetensors `__metadata__` of a compsft file (values are strings, as safetensors requires)."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)
    format: str
    format_version: str
    index: str


_M = TypeVar("_M", bound=BaseModel)


def check(model: type[_M], data: Any, where: str, prefix: str = "") -> _M:
    """Validate `data` against `model`; on failure a CompsftError naming `where` and the first bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise CompsftError(f"{where}: {describe(err, prefix)}") from None


def check_mapping(model: type[_M], data: Any, where: str, prefix: str) -> dict[str, _M]:
    """Validate a JSON object of `model` values (e.g. the index: name -> entry)."""
    if not isinstance(data, Mapping):
        raise CompsftError(f"{where}: field {prefix}: expected a JSON object, got {_kind(data)}")
    out = {}
    for name, value in data.items():
        out[name] = check(model, value, where, f"{prefix}.{name!r}" if prefix else repr(name))
    return out


def describe(err: ValidationError, prefix: str = "") -> str:
    first = err.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in first["loc"])
    field = ".".join(p for p in (prefix, loc) if p) or "(document)"
    got = repr(first.get("input"))
    if len(got) > 60:
        got = got[:57] + "..."
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"field {field}: {first['msg']} (got {got}){more}"


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__)
