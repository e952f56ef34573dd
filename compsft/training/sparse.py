"""Phase 2 pays for K, not N: a trainable values vector per tensor, scattered into frozen θ0.

Each masked parameter becomes, through `torch.nn.utils.parametrize`, ``θ0 + scatter(indices,
values)``: the original weight is frozen (no gradient buffer), and the only trainable tensor is
``values`` of length k_t. The optimizer therefore keeps state for K entries only; weight decay and
an L1 pull act on ``values`` (the difference from θ0), so an entry outside the mask can never move:
it is θ0 bit for bit. The dense gradient of a weight exists only transiently inside backward, as it
does for any linear layer, and is gathered down to the k_t entries.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize


class SparseValues(nn.Module):
    """Parametrization ``weight -> weight + scatter(indices, values)`` (row-major flat indices)."""

    def __init__(self, indices: Tensor, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("indices", indices.to(device=device, dtype=torch.long))
        self.values = nn.Parameter(torch.zeros(indices.numel(), dtype=dtype, device=device))

    def forward(self, weight: Tensor) -> Tensor:
        return torch.index_add(weight.reshape(-1), 0, self.indices, self.values).view_as(weight)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


def attach_sparse(model: nn.Module, masks: Mapping[str, Tensor]) -> dict[str, SparseValues]:
    """Make `model`'s masked parameters θ0 + scatter(values); returns the parametrizations by name.

    The original weights are frozen. Tensors with an empty mask are only frozen.
    """
    out = {}
    for name, idx in masks.items():
        module, attr = _owner(model, name)
        param = getattr(module, attr)
        param.requires_grad_(False)
        if idx.numel() == 0:
            continue
        sv = SparseValues(idx, param.dtype, param.device)
        parametrize.register_parametrization(module, attr, sv)
        module.parametrizations[attr].original.requires_grad_(False)
        out[name] = sv
    return out


def detach_sparse(model: nn.Module, sparse: Mapping[str, SparseValues]) -> dict[str, Tensor]:
    """Remove the parametrizations, leaving θ0 in place; returns the trained values (detached copies)."""
    values = {}
    for name, sv in sparse.items():
        module, attr = _owner(model, name)
        values[name] = sv.values.detach().clone()
        parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
    return values


def sparse_parameter_names(model: nn.Module) -> list[str]:
    """Names (in `named_parameters`) of the trainable values vectors."""
    return [n for n, _ in model.named_parameters() if n.endswith(".values") and ".parametrizations." in n]
