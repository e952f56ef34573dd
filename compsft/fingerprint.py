"""A cheap, robust fingerprint of the base weights an SFT was trained from.

Per touched tensor: its shape and the base values at a few pseudo-random but deterministic flat
positions. Values rather than a hash, so that the same base in fp16, bf16 or on another device
still matches (compared with a tolerance), while another checkpoint of the same architecture does
not: its weights differ by far more than rounding.
"""
from __future__ import annotations

import hashlib
import json
from typing import Iterable, Mapping

import torch

METHOD = "sample-v1"
SAMPLES = 8
# bf16 keeps 8 bits of mantissa (relative error <= 2^-8); allow a few times that.
RTOL = 2e-2
ATOL = 1e-5


def sample_positions(numel: int, count: int = SAMPLES) -> torch.Tensor:
    """Deterministic flat positions spread over the tensor (Knuth's multiplicative hash)."""
    n = min(count, numel)
    return (torch.arange(n, dtype=torch.int64) * 2654435761 + 97) % max(numel, 1)


def fingerprint(state: Mapping[str, torch.Tensor], names: Iterable[str]) -> dict:
    """Fingerprint of `state` restricted to `names` (the tensors an SFT touches)."""
    samples = {}
    for name in names:
        t = state[name].detach()
        samples[name] = (tuple(t.shape), t.reshape(-1)[sample_positions(t.numel()).to(t.device)])
    return from_samples(samples)


def from_samples(samples: Mapping[str, tuple[tuple[int, ...], torch.Tensor]]) -> dict:
    """Fingerprint from (shape, values at `sample_positions`) per tensor."""
    tensors = {
        name: {"shape": list(shape), "sample": sample.float().cpu().tolist()} for name, (shape, sample) in samples.items()
    }
    shapes = json.dumps({n: v["shape"] for n, v in sorted(tensors.items())}).encode()
    return {"method": METHOD, "shapes_sha256": hashlib.sha256(shapes).hexdigest()[:16], "tensors": tensors}


def compare(expected: dict, name: str, shape: tuple[int, ...], sample: torch.Tensor) -> str | None:
    """None when `sample` (the model's base values at `sample_positions`) matches; else the reason."""
    entry = expected.get("tensors", {}).get(name)
    if entry is None:
        return None
    if list(shape) != list(entry["shape"]):
        return f"shape {list(shape)} differs from the base's {entry['shape']}"
    want = torch.tensor(entry["sample"], dtype=torch.float32)
    got = sample.float().cpu()
    if want.shape != got.shape or not torch.allclose(got, want, rtol=RTOL, atol=ATOL):
        return f"base values differ (sampled {got[:3].tolist()} vs recorded {want[:3].tolist()})"
    return None
