"""MoSA's sparse training of an adapter (Zhang et al., arXiv 2312.02923, "MoSA: Mixture of Sparse Adapters for
Visual Efficient Tuning", later retitled "Split & Merge"): split, train one part per step, merge.

Every weight matrix of the adapter is split into N disjoint random sparse sub-modules (a random partition
of its entries: entry e belongs to sub-module `owner[e]`). At each optimizer step one sub-module index i is
drawn at random (seeded by the seed and the step, so a resumed run draws the same ones). The forward pass
uses the whole matrix W; only the entries of sub-module i receive gradient, for every split matrix. That
is the sparse *training* of the authors' trainer (`src/engine/trainer.py`: after `loss.backward()`,
`p.grad.data *= p.masks[idx]`, the forward untouched). Biases stay dense. Merging is free: the N
sub-modules are disjoint, so their sum is W itself; removing the parametrization leaves the dense adapter,
in the ordinary adapter file format.

Why not a forward through W ⊙ [owner == i] alone: this module did that at first, and on the default model
at the `cpu` budget it trained sub-modules that fit the training loss while the merged adapter (all N at
once, about N times the activation of each through both projections) predicted one tag for every token:
English dev UPOS 0.166 (the majority class) at every check of a 160-step POS task adapter, where MAD-X's
reaches 0.807. The model that is trained must be the model that is merged and evaluated.

The hierarchical sparse strategy (`split(..., shared="down")`, the method `mosa-hier`): one projection of
every bottleneck is *not* split but stays a single dense module shared by all N sub-modules, trained at
every step; only the other projection is split as above. So each sub-module is the shared dense projection
plus a disjoint sparse part of the other, a two-level (shared root, sparse leaves) structure. Sources, and
what had to be chosen:

* The paper's abstract says only "we propose a hierarchical sparse strategy to better leverage limited
  training data" (arXiv 2312.02923; the same sentence in the "MoSA" and the "Split & Merge" abstracts). Its
  method section could not be read here: the stored copies of the paper (hf.zsm.im/papers/2312.02923.md,
  arxiv.org/html/2312.02923v2, ar5iv) came back as their opening (title, abstract, start of the introduction).
* The mechanism is taken from the authors' released code (github.com/Theia-4869/MoSA, CC BY-NC; read, not
  copied): `MODEL.ADAPTER.SHARE` ("down", "up" or "none") keeps that projection one dense `nn.Linear` while
  the other is split into `EXPERT_NUM` random disjoint equal-size parts (`src/utils/pruner.py`, `divide`);
  their scripts use SHARE "down" with 4 parts for VTAB, GICD and four of the five FGVC tasks, "up" with 2
  parts for Stanford Cars and "none" for the multi-task run. It is the only option in that code that sets
  the projections apart, so it is read as the hierarchical strategy. This is an inference from the code;
  if the paper's section says otherwise, it wins.
* Chosen here: `mosa-hier` shares the down projection and splits the up projection into N = 4 (the
  authors' most used setting). Everything else is this module's flat strategy, which differs from their
  code in ways the readable part of the paper does not settle: one index per step for the whole
  model (their gradient masking draws one per parameter and step; their mixture-of-experts path one per
  layer and forward pass); each entry's owner drawn uniformly (theirs: exactly equal parts); one matrix
  whose gradient is masked, so merging is exact (their mixture-of-experts path: N full-size copies of the
  initial weights, averaged at the merge); dense biases (theirs: one per part). Their
  consistency loss between two forward passes (`ADDITIONAL`, `REG_WEIGHT`) is a separate option of their code
  and is in neither strategy here.

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
    """The value W always; while a sub-module is active, gradient only for its entries ([owner == active])."""

    def __init__(self, owner: torch.Tensor, controller: SplitController) -> None:
        super().__init__()
        self.register_buffer("owner", owner, persistent=False)
        self.controller = controller

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.controller.active is None or not self.training:
            return weight
        return torch.where(self.owner == self.controller.active, weight, weight.detach())


#: the projections of a bottleneck (`layers.Bottleneck`), by the name of their `nn.Linear` inside `layers.<i>`
PROJECTIONS = {"adapter_down.0": "down", "adapter_up": "up"}
#: the projections the hierarchical strategy can share (None: the flat strategy, every weight split)
SHARED = (None, "down", "up")


def projection(name: str) -> str | None:
    """The bottleneck projection a module name inside the adapter is (`layers.3.adapter_up` -> "up"); None: none."""
    parts = name.split(".", 2)
    return PROJECTIONS.get(parts[2]) if len(parts) == 3 and parts[0] == "layers" else None


def split(adapter: nn.Module, controller: SplitController, seed: int, shared: str | None = None) -> list[str]:
    """Parametrize every 2-D weight of the adapter's bottlenecks with a random disjoint partition; returns their names.

    `shared` ("down" or "up"): the hierarchical strategy, that projection of every bottleneck is left whole
    (dense, trained at every step) and only the others are split.
    """
    if shared not in SHARED:
        raise ValueError(f"MoSA can share the down or the up projection, not {shared!r}")
    g = torch.Generator().manual_seed(seed)
    names = []
    for name, module in adapter.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("layers."):
            if shared is not None and projection(name) == shared:
                continue  # no mask: the shared projection is one dense module, in every sub-module's step
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
