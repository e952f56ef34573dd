"""MoSA's sparse training of an adapter (Luo et al. 2024, "Split & Merge"): split, train one part per step, merge.

Every weight matrix of the adapter is split into N disjoint random sparse sub-modules (a random partition
of its entries: entry e belongs to sub-module `owner[e]`). At each optimizer step one sub-module index is
drawn at random (seeded by the seed and the step, so a resumed run draws the same ones) and the forward
pass uses W ⊙ [owner == i] for every split matrix: only that sub-module's entries act and receive gradient.
Biases stay dense. Merging is free: the N sub-modules are disjoint, so their sum is W itself; removing the
parametrization leaves the dense adapter, in the ordinary adapter file format.

The masking is a `torch.nn.utils.parametrize` parametrization, so the Trainer, checkpoints and the
optimizer see the same parameters as without it.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import TrainerCallback


class SplitController:
    """Which sub-module is active (shared by every split matrix of a model); None: all (merged)."""

    def __init__(self, n_splits: int, seed: int) -> None:
        if n_splits < 2:
            raise ValueError("MoSA needs at least 2 sub-modules")
        self.n_splits, self.seed = n_splits, seed
        self.active: int | None = None

    def draw(self, step: int) -> int:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        self.active = int(torch.randint(self.n_splits, (1,), generator=g))
        return self.active


class SubModuleMask(nn.Module):
    """W ↦ W ⊙ [owner == active] while a sub-module is active; W when none is (evaluation, merge)."""

    def __init__(self, owner: torch.Tensor, controller: SplitController) -> None:
        super().__init__()
        self.register_buffer("owner", owner, persistent=False)
        self.controller = controller

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.controller.active is None or not self.training:
            return weight
        return weight * (self.owner == self.controller.active).to(weight.dtype)


def split(adapter: nn.Module, controller: SplitController, seed: int) -> list[str]:
    """Parametrize every 2-D weight of the adapter's bottlenecks with a random disjoint partition; returns their names."""
    g = torch.Generator().manual_seed(seed)
    names = []
    for name, module in adapter.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("layers."):
            w = module.weight
            owner = torch.randint(controller.n_splits, w.shape, generator=g).to(w.device)
            parametrize.register_parametrization(module, "weight", SubModuleMask(owner, controller))
            names.append(f"{name}.weight")
    return names


def merge(adapter: nn.Module, controller: SplitController) -> None:
    """Drop the parametrizations, keeping the dense weights (the sum of the disjoint sub-modules)."""
    controller.active = None
    for module in adapter.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)


class DrawSubModule(TrainerCallback):
    """Draws the active sub-module before every optimizer step; none is active outside training."""

    def __init__(self, controller: SplitController) -> None:
        self.controller = controller

    def on_step_begin(self, args, state, control, **kwargs):
        self.controller.draw(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.controller.active = None
