"""Adapter files: a directory with `adapter.safetensors`, `adapter_config.json` and, for a task
adapter, `head.safetensors` (the task head, stored dense, as an SFT stores it).

`adapter.safetensors` holds the bottleneck of layer i under `layers.{i}.` and the invertible adapter
under `invertible.`, with `adapters`' own sub-module names (`adapter_down.0.weight`, `F.2.bias`, ...).
`adapter_config.json` is :class:`AdapterConfig`. Every file is written atomically, the tensors first
and the config last, so a reader never sees a config without its tensors. Loading validates the
config field by field and every tensor (names, shapes, finiteness) against it: a malformed file is a
`CompsftError` naming the file and the field or tensor, never a traceback.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from compsft.atomic import atomic_path, write_text
from compsft.errors import CompsftError
from compsft.jsonfile import read_json_object

WEIGHTS_NAME = "adapter.safetensors"
HEAD_NAME = "head.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT_TAG = "compsft.adapter"
FORMAT_VERSION = 1
KINDS = ("language", "task")
INVERTIBLE = (None, "nice")


@dataclass
class AdapterConfig:
    """One bottleneck adapter (`seq_bn`: after each layer's feed-forward block), optionally with an
    invertible NICE adapter on the embeddings. Field names follow `adapters.BnConfig`."""

    kind: str = field(metadata={"help": "'language' (trained by MLM) or 'task'"})
    hidden_size: int = field(metadata={"help": "width of the model the adapter belongs to"})
    num_layers: int = field(metadata={"help": "transformer layers of that model"})
    reduction_factor: float = field(default=16.0, metadata={"help": "bottleneck = hidden_size // reduction_factor"})
    non_linearity: str = field(default="relu", metadata={"help": "activation inside the bottleneck"})
    leave_out: list[int] = field(default_factory=list, metadata={"help": "layers without a bottleneck"})
    inv_adapter: str | None = field(default=None, metadata={"help": "'nice' or null: invertible adapter"})
    inv_adapter_reduction_factor: float = field(default=2.0, metadata={"help": "NICE sub-network width factor"})
    language: str | None = field(default=None, metadata={"help": "language code of a language adapter"})
    task: str | None = field(default=None, metadata={"help": "task name of a task adapter"})
    labels: list[str] = field(default_factory=list, metadata={"help": "task labels, in id order"})
    base_model: str = field(default="", metadata={"help": "the model directory it was trained on"})
    vocab: dict | None = field(default=None, metadata={"help": "fingerprint of the tokenizer's vocabulary"})
    training: dict = field(default_factory=dict, metadata={"help": "what training did (steps, losses, data)"})
    format: str = FORMAT_TAG
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.validate()

    @property
    def layers(self) -> list[int]:
        """Indices of the layers that hold a bottleneck."""
        return [i for i in range(self.num_layers) if i not in set(self.leave_out)]

    def validate(self, source: str = "adapter config") -> None:
        def bad(name: str, why: str) -> CompsftError:
            return CompsftError(f"{source}: field {name!r} {why}")

        if self.format != FORMAT_TAG:
            raise bad("format", f"is {self.format!r}, expected {FORMAT_TAG!r}")
        if not isinstance(self.format_version, int) or self.format_version > FORMAT_VERSION:
            raise bad("format_version", f"is {self.format_version!r}; this compsft reads up to {FORMAT_VERSION}")
        if self.kind not in KINDS:
            raise bad("kind", f"is {self.kind!r}, expected one of {KINDS}")
        for name in ("hidden_size", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, f"must be a positive integer, got {value!r}")
        for name in ("reduction_factor", "inv_adapter_reduction_factor"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise bad(name, f"must be a positive number, got {value!r}")
        if not isinstance(self.non_linearity, str) or not self.non_linearity:
            raise bad("non_linearity", f"must be an activation name, got {self.non_linearity!r}")
        if not isinstance(self.leave_out, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.num_layers for i in self.leave_out):
            raise bad("leave_out", f"must be a list of layer indices below {self.num_layers}, got {self.leave_out!r}")
        if self.inv_adapter not in INVERTIBLE:
            raise bad("inv_adapter", f"is {self.inv_adapter!r}, expected one of {INVERTIBLE}")
        if not isinstance(self.labels, list) or not all(isinstance(x, str) for x in self.labels):
            raise bad("labels", "must be a list of strings")
        if self.kind == "task" and not self.task:
            raise bad("task", "is missing (a task adapter names its task)")
        if not isinstance(self.training, dict):
            raise bad("training", "must be an object")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any, source: str = CONFIG_NAME) -> "AdapterConfig":
        if not isinstance(data, Mapping):
            raise CompsftError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CompsftError(f"{source}: unknown field(s) {', '.join(map(repr, unknown))}")
        for f in dataclasses.fields(cls):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data:
                raise CompsftError(f"{source}: field {f.name!r} is missing")
        values = dict(data)
        for name in ("reduction_factor", "inv_adapter_reduction_factor"):
            if isinstance(values.get(name), int) and not isinstance(values.get(name), bool):
                values[name] = float(values[name])
        try:
            config = cls.__new__(cls)
            for f in dataclasses.fields(cls):
                if f.name in values:
                    setattr(config, f.name, values[f.name])
                elif f.default is not dataclasses.MISSING:
                    setattr(config, f.name, f.default)
                else:
                    setattr(config, f.name, f.default_factory())
        except TypeError as e:  # pragma: no cover - defensive
            raise CompsftError(f"{source}: {e}") from None
        config.validate(source)
        return config


def expected_shapes(config: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an adapter with `config` has, and its shape (what `load_adapter` checks)."""
    h = config.hidden_size
    b = max(int(h // config.reduction_factor), 1)
    shapes: dict[str, tuple[int, ...]] = {}
    for i in config.layers:
        shapes.update({f"layers.{i}.adapter_down.0.weight": (b, h), f"layers.{i}.adapter_down.0.bias": (b,),
                       f"layers.{i}.adapter_up.weight": (h, b), f"layers.{i}.adapter_up.bias": (h,)})
    if config.inv_adapter == "nice":
        s1, s2 = h // 2, h - h // 2
        f, g = int(s2 // config.inv_adapter_reduction_factor), int(s1 // config.inv_adapter_reduction_factor)
        shapes.update({"invertible.F.0.weight": (f, s2), "invertible.F.0.bias": (f,),
                       "invertible.F.2.weight": (s1, f), "invertible.F.2.bias": (s1,),
                       "invertible.G.0.weight": (g, s1), "invertible.G.0.bias": (g,),
                       "invertible.G.2.weight": (s2, g), "invertible.G.2.bias": (s2,)})
    return shapes


def save_adapter_files(directory: str | os.PathLike, config: AdapterConfig, tensors: Mapping[str, torch.Tensor],
                       head: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write an adapter directory; `tensors` must be exactly `expected_shapes(config)`."""
    from safetensors.torch import save_file

    directory = Path(directory)
    config.validate()
    _check_tensors(tensors, expected_shapes(config), "the adapter to save")
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": FORMAT_TAG})
    if head:
        with atomic_path(directory / HEAD_NAME) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in head.items()}, str(tmp),
                      metadata={"format": FORMAT_TAG})
    write_text(directory / CONFIG_NAME, config.to_json())
    return directory


def load_adapter_config(directory: str | os.PathLike) -> AdapterConfig:
    path = Path(directory) / CONFIG_NAME
    data = read_json_object(path, f"{path}: not found (is {directory} an adapter directory?)")
    return AdapterConfig.from_dict(data, source=str(path))


def load_adapter_files(directory: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor],
                                                                dict[str, torch.Tensor]]:
    """(config, adapter tensors, head tensors) of an adapter directory, all validated."""
    directory = Path(directory)
    config = load_adapter_config(directory)
    tensors = _read_safetensors(directory / WEIGHTS_NAME)
    _check_tensors(tensors, expected_shapes(config), str(directory / WEIGHTS_NAME))
    head: dict[str, torch.Tensor] = {}
    if (directory / HEAD_NAME).exists():
        head = _read_safetensors(directory / HEAD_NAME)
        for name, t in head.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise CompsftError(f"{directory / HEAD_NAME}: tensor {name!r} has non-finite values")
    return config, tensors, head


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CompsftError(f"{path}: not found")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a bad header or truncated data
        raise CompsftError(f"{path}: not a readable safetensors file ({e})") from None


def _check_tensors(tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes))
    if missing:
        raise CompsftError(f"{source}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    if extra:
        raise CompsftError(f"{source}: unexpected tensor {extra[0]!r} (the config does not describe it)")
    for name, shape in shapes.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(shape):
            raise CompsftError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, the config implies {shape}")
        if not t.is_floating_point():
            raise CompsftError(f"{source}: tensor {name!r} has dtype {t.dtype}, expected floating point")
        if not torch.isfinite(t).all():
            raise CompsftError(f"{source}: tensor {name!r} has non-finite values")
