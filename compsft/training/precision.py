"""Mixed precision for every training run: ``fp32`` (the default), ``bf16`` or ``fp16`` autocast.

The weights stay fp32 "master" values throughout; only the forward and backward passes run in the
half type, through `transformers.TrainingArguments(bf16=/fp16=)` (accelerate's autocast, and for
fp16 its gradient scaler). Because the parameters themselves stay fp32, everything LT-SFT computes
from them is fp32 as before: θ0, the selection scores |θ1 − θ0|, the L1 term, the phase-2 values
and the reset to θ0. A saved SFT's values are fp32 unless a save dtype is asked for.

Where torch supports it:

- ``bf16`` on CPU: yes (`torch.autocast("cpu", torch.bfloat16)`); on CUDA: Ampere or newer.
- ``fp16`` on CUDA only: on CPU accelerate would silently train in fp32 with no scaler (transformers
  5.23), so it is refused here instead.

The precision reaches a Trainer in one of two ways: the recipes' `precision=` argument (the CLI's
``--bf16`` / ``--fp16``), or, for code that calls the recipes without it (the methods of
`compsft compare`), `use_precision`::

    with use_precision("bf16"):
        spec.train_task(ctx, data, source, seed, out)   # every Trainer inside trains under bf16 autocast
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch

from ..errors import CompsftError

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

_CURRENT: contextvars.ContextVar[str] = contextvars.ContextVar("compsft_precision", default="fp32")


def current_precision() -> str:
    """The precision set by the innermost `use_precision` (``fp32`` outside any)."""
    return _CURRENT.get()


@contextlib.contextmanager
def use_precision(precision: str) -> Iterator[str]:
    """Train every recipe called inside the block in `precision` unless it is given one explicitly."""
    token = _CURRENT.set(check_precision(precision))
    try:
        yield precision
    finally:
        _CURRENT.reset(token)


def check_precision(precision: str, device: str | None = None) -> str:
    """`precision` if known (and, given `device`, usable there), else a `CompsftError` saying what to use."""
    if precision not in PRECISIONS:
        raise CompsftError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if device is None or precision == "fp32":
        return precision
    kind = torch.device(device).type
    if precision == "fp16" and kind != "cuda":
        raise CompsftError(f"fp16 mixed precision needs a CUDA device (asked on {kind}); use bf16 on the CPU")
    if precision == "bf16" and kind == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise CompsftError(f"bf16 is not supported by {torch.cuda.get_device_name()}; use fp16 (with its "
                           "gradient scaler) on this GPU")
    return precision


def resolve_precision(precision: str | None = None, *, bf16: bool = False, fp16: bool = False) -> str:
    """One precision from the CLI's flags or an explicit value; none given: the `use_precision` in force."""
    if bf16 and fp16:
        raise CompsftError("--bf16 and --fp16 exclude each other")
    flag = "bf16" if bf16 else "fp16" if fp16 else None
    if precision is not None and flag is not None and precision != flag:
        raise CompsftError(f"precision {precision!r} contradicts --{flag}")
    return check_precision(precision or flag or current_precision())


def trainer_flags(precision: str, device: str) -> dict[str, bool]:
    """`TrainingArguments` keywords for `precision` on `device` (checked)."""
    check_precision(precision, device)
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def autocast(precision: str, device: str | torch.device) -> contextlib.AbstractContextManager:
    """The autocast context that evaluation under `precision` runs in (a no-op for fp32)."""
    kind = torch.device(device).type
    if precision == "fp32":
        return contextlib.nullcontext()
    check_precision(precision, kind)
    return torch.autocast(device_type=kind, dtype=DTYPES[precision])


def save_dtype(name: str | None) -> torch.dtype | None:
    """The dtype of saved SFT values for `name` (fp32, bf16, fp16; None: as trained, fp32)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise CompsftError(f"unknown save dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]
