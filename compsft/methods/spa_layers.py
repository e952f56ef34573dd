"""The pieces of Structured Pruning Adapters (SPLoRA) beside the method in `spa.py`: the low-rank adapters,
the unit masks and their Taylor scores, attaching as forward hooks, merging, the pruning schedule and the
files. See `spa.py` for the method and its composition rule.

Prunable groups, named by module: `{layer}.attention.self` (units: attention heads; a head gates
`head_dim` rows of query, key and value at once) and `{layer}.intermediate.dense` (units: FFN channels).
The residual-writing layers (`attention.output.dense`, `output.dense`) are adapted but never pruned: their
output channels are the hidden size that the residual stream and LayerNorm carry through every layer, so
removing one in a single layer would shrink nothing downstream.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch
from torch import nn

from compsft.errors import CompsftError
from compsft.jsonfile import read_json_object

from .hydra import TARGETS
from .module_files import check_names, read_head, read_tensors, write_module

if TYPE_CHECKING:
    from transformers import TrainerCallback

WEIGHTS_NAME = "spa.safetensors"
CONFIG_NAME = "spa_config.json"
BANK_ATTR = "compsft_spa"
FORMAT = "compsft.spa"
HEADS, FFN = ".attention.self", ".intermediate.dense"


def keep_count(density: float, units: int) -> int:
    """Units a group keeps at `density`: rounded half up, at least one (a layer never loses every head)."""
    return max(1, min(units, math.floor(density * units + 0.5)))


def group_linears(group: str) -> tuple[list[str], str, str]:
    """(the linears whose output rows a group's units gate, the one whose output is scored, the linear whose
    input columns die with the units)."""
    if group.endswith(HEADS):
        gated = [f"{group}.{p}" for p in ("query", "key", "value")]
        return gated, gated[2], group[:-len(".self")] + ".output.dense"
    return [group], group, group[:-len(FFN)] + ".output.dense"


@dataclass
class SpaConfig:
    kind: str = field(metadata={"help": "'language' or 'task'"})
    rank: int = field(metadata={"help": "rank r of every adapter"})
    layers: dict = field(metadata={"help": "adapted linear layer -> [in, out]"})
    density: float = field(default=1.0, metadata={"help": "fraction of units each group keeps"})
    groups: dict = field(default_factory=dict, metadata={"help": "prunable group -> [units, unit size]"})
    language: str | None = None
    task: str | None = None
    labels: list = field(default_factory=list)
    base_model: str = ""
    vocab: dict | None = None
    training: dict = field(default_factory=dict)
    format: str = FORMAT

    def shapes(self) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        for name, (n_in, n_out) in self.layers.items():
            out.update({f"{name}.A": (self.rank, n_in), f"{name}.B": (n_out, self.rank)})
        out.update({f"{g}.keep": (units,) for g, (units, _) in self.groups.items()})
        return out

    @classmethod
    def from_file(cls, path: Path) -> "SpaConfig":
        data = read_json_object(path, f"{path}: not found (is {path.parent} an SPA module?)")
        missing = [k for k in ("kind", "rank", "layers") if k not in data]
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if missing or unknown:
            raise CompsftError(f"{path}: field {missing[0]!r} is missing" if missing else
                               f"{path}: unknown field(s) {unknown}")
        config = cls(**data)

        def bad(name: str, why: str) -> CompsftError:
            return CompsftError(f"{path}: field {name!r} {why}, got {getattr(config, name)!r}")

        if config.format != FORMAT:
            raise bad("format", f"must be {FORMAT!r}")
        if config.kind not in ("language", "task"):
            raise bad("kind", "must be 'language' or 'task'")
        if not isinstance(config.rank, int) or isinstance(config.rank, bool) or config.rank < 1:
            raise bad("rank", "must be a positive integer")
        if not isinstance(config.density, (int, float)) or not 0 < config.density <= 1:
            raise bad("density", "must be a number in (0, 1]")
        layers = config.layers
        if not isinstance(layers, dict) or not layers or not all(_sizes(v) for v in layers.values()):
            raise CompsftError(f"{path}: field 'layers' must map layer names to [in, out] sizes")
        if not isinstance(config.groups, dict) or not all(_sizes(v) for v in config.groups.values()):
            raise CompsftError(f"{path}: field 'groups' must map group names to [units, unit size]")
        for group, (units, size) in config.groups.items():
            gated, _, _ = group_linears(group)
            if not group.endswith((HEADS, FFN)) or any(config.layers.get(n, [0, 0])[1] != units * size for n in gated):
                raise CompsftError(f"{path}: field 'groups': {group!r} does not match the sizes in 'layers'")
        if config.kind == "language" and (config.groups or config.density != 1):
            raise CompsftError(f"{path}: field 'groups' must be empty and 'density' 1 for a language module")
        if config.kind == "task" and (not config.task or not config.labels):
            raise CompsftError(f"{path}: field 'task' and 'labels' are required for a task module")
        return config


def _sizes(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                                       for d in v)


# -- modules -------------------------------------------------------------------------------------

class LowRank(nn.Module):
    """B·A of one linear layer: A like LoRA's (Kaiming-uniform), B at zero, so training starts from W0."""

    def __init__(self, n_in: int, n_out: int, rank: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, n_in))
        self.B = nn.Parameter(torch.zeros(n_out, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))


class UnitMask(nn.Module):
    """Which units of one group are kept, and their accumulated Taylor scores since the last pruning step."""

    def __init__(self, units: int, unit_size: int) -> None:
        super().__init__()
        self.unit_size = unit_size
        self.register_buffer("keep", torch.ones(units, dtype=torch.bool))
        # not persistent: a checkpoint restores the mask; scores restart (the next step re-scores)
        self.register_buffer("score", torch.zeros(units, dtype=torch.float64), persistent=False)

    def channels(self, dtype: torch.dtype) -> torch.Tensor:
        return self.keep.repeat_interleave(self.unit_size).to(dtype)

    @torch.no_grad()
    def add_score(self, grad: torch.Tensor, z: torch.Tensor) -> None:
        # Σ over tokens of g·z is ∂L/∂(gate of the unit), squared per batch (Molchanov et al. 2019)
        per_channel = (grad.double() * z.double()).reshape(-1, z.shape[-1]).sum(0)
        self.score += per_channel.view(-1, self.unit_size).sum(1) ** 2

    @torch.no_grad()
    def prune_to(self, density: float) -> None:
        """Drop the lowest-scoring kept units down to `keep_count(density)`; pruned units never return."""
        drop = int(self.keep.sum()) - keep_count(density, self.keep.numel())
        if drop > 0:
            ranked = torch.where(self.keep, self.score, torch.full_like(self.score, math.inf))
            self.keep[torch.sort(ranked, stable=True).indices[:drop]] = False
        self.score.zero_()


class SpaBank(nn.Module):
    """The adapters and masks of one model (keys: module names with '.' as '/'), plus the hooks' handles."""

    def __init__(self, config: SpaConfig) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict({n.replace(".", "/"): LowRank(i, o, config.rank)
                                       for n, (i, o) in config.layers.items()})
        self.masks = nn.ModuleDict({g.replace(".", "/"): UnitMask(u, s) for g, (u, s) in config.groups.items()})
        self.handles: list = []

    def prune_to(self, density: float) -> float:
        for mask in self.masks.values():
            mask.prune_to(density)
        return self.density()

    def density(self) -> float:
        kept = sum(int(m.keep.sum()) for m in self.masks.values())
        return kept / max(1, sum(m.keep.numel() for m in self.masks.values())) if self.masks else 1.0


def target_linears(model: nn.Module) -> dict[str, nn.Linear]:
    found = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and TARGETS.fullmatch(n)}
    if not found:
        raise CompsftError(f"{type(model).__name__}: no linear layers under encoder.layer.* for SPA")
    return found


def prunable_groups(model: nn.Module) -> dict[str, list[int]]:
    heads = model.config.num_attention_heads
    out = {}
    for name, m in target_linears(model).items():
        if name.endswith(HEADS + ".query"):
            out[name[:-len(".query")]] = [heads, m.out_features // heads]
        elif name.endswith(FFN):
            out[name] = [m.out_features, 1]
    return out


def attach(model: nn.Module, config: SpaConfig, tensors: Mapping[str, torch.Tensor] | None = None) -> SpaBank:
    """Add adapters (fresh, or `tensors` from a file, masks included) and masks as forward hooks."""
    if hasattr(model, BANK_ATTR):
        raise CompsftError("the model already has SPA adapters attached; merge them first")
    linears = target_linears(model)
    for name, (n_in, n_out) in config.layers.items():
        layer = linears.get(name)
        if layer is None or (layer.in_features, layer.out_features) != (n_in, n_out):
            raise CompsftError(f"SPA layer {name!r} ({n_in}->{n_out}) does not fit the model")
    if config.groups:
        from transformers.activations import ACT2FN

        act = model.config.hidden_act
        if float(ACT2FN[act](torch.zeros(1))) != 0.0:  # a pruned FFN channel must stay at zero after it
            raise CompsftError(f"SPA prunes FFN channels exactly only for activations with f(0) = 0, not {act!r}")
    bank = SpaBank(config)
    if tensors is not None:
        with torch.no_grad():
            for key, value in tensors.items():
                name, part = key.rsplit(".", 1)
                owner = bank.masks if part == "keep" else bank.adapters
                getattr(owner[name.replace(".", "/")], part).copy_(value)
    bank.to(next(model.parameters()).device)
    model.add_module(BANK_ATTR, bank)
    gate_of = {n: g for g in config.groups for n in group_linears(g)[0]}
    scored = {group_linears(g)[1] for g in config.groups}
    for name in config.layers:
        gate = gate_of.get(name)
        bank.handles.append(linears[name].register_forward_hook(
            _hook(bank, name.replace(".", "/"), gate and gate.replace(".", "/"), name in scored)))
    return bank


def _hook(bank: SpaBank, key: str, gate: str | None, scored: bool):
    def hook(module, args, output):
        a = bank.adapters[key]
        z = output + (args[0] @ a.A.T) @ a.B.T
        if gate is None:
            return z
        mask = bank.masks[gate]
        if scored and z.requires_grad:
            seen = z.detach()  # not z itself: the closure would keep the graph alive through a cycle
            z.register_hook(lambda g: mask.add_score(g, seen))
        return z * mask.channels(z.dtype)
    return hook


def merge(model: nn.Module) -> nn.Module:
    """Fold B·A into W (float64), zero the rows and biases of pruned units and the input columns they fed,
    and detach the bank: the plain model then computes exactly what the hooks did (up to rounding)."""
    bank = getattr(model, BANK_ATTR, None)
    if bank is None:
        return model
    linears = target_linears(model)
    with torch.no_grad():
        for key, a in bank.adapters.items():
            layer = linears[key.replace("/", ".")]
            layer.weight.copy_((layer.weight.double() + a.B.double() @ a.A.double()).to(layer.weight.dtype))
        for key, mask in bank.masks.items():
            gated, _, dead_input = group_linears(key.replace("/", "."))
            off = ~mask.keep.repeat_interleave(mask.unit_size)
            for name in gated:
                linears[name].weight[off] = 0
                if linears[name].bias is not None:
                    linears[name].bias[off] = 0
            if dead_input in linears:
                linears[dead_input].weight[:, off] = 0
    for h in bank.handles:
        h.remove()
    delattr(model, BANK_ATTR)
    return model


# -- the pruning schedule ------------------------------------------------------------------------

@dataclass
class PruneSchedule:
    """Cubic (Zhu & Gupta 2017): at event i of n, density d_i = d + (1 − d)(1 − i/n)³, events evenly spaced
    up to `end_fraction` of the steps; the last one reaches d, the steps after it recover at fixed masks."""

    density: float
    events: int = 4
    end_fraction: float = 2 / 3

    def end(self, steps: int) -> int:
        return max(1, round(self.end_fraction * steps))

    def at(self, steps: int) -> list[tuple[int, float]]:
        """(step, density) of each pruning event; events that round to one step keep the lowest density."""
        d, n, end = self.density, self.events, self.end(steps)
        out = {max(1, round(end * i / n)): d + (1 - d) * (1 - i / n) ** 3 for i in range(1, n + 1)}
        return sorted(out.items())


def pruning_callback(bank: SpaBank, schedule: PruneSchedule, steps: int, history: list) -> "TrainerCallback":
    """A TrainerCallback pruning `bank` at the schedule's steps; appends (step, asked, kept density) to `history`."""
    from transformers import TrainerCallback

    events = dict(schedule.at(steps))

    class Prune(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in events:
                asked = events[state.global_step]
                history.append([state.global_step, asked, bank.prune_to(asked)])

    return Prune()


# -- files ---------------------------------------------------------------------------------------

def save(out: Path, config: SpaConfig, bank: SpaBank, head: Mapping[str, torch.Tensor] | None = None) -> None:
    tensors = {f"{k.replace('/', '.')}.{p}": getattr(a, p) for k, a in bank.adapters.items() for p in ("A", "B")}
    tensors.update({f"{k.replace('/', '.')}.keep": m.keep for k, m in bank.masks.items()})
    write_module(out, WEIGHTS_NAME, tensors, CONFIG_NAME, config, head)


def load(directory: Path) -> tuple[SpaConfig, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(config, adapter and mask tensors, head tensors), validated: a malformed file is a CompsftError naming it."""
    directory = Path(directory)
    config = SpaConfig.from_file(directory / CONFIG_NAME)
    path = directory / WEIGHTS_NAME
    tensors, shapes = read_tensors(path), config.shapes()
    check_names(path, tensors, shapes)
    for name, shape in shapes.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise CompsftError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, {CONFIG_NAME} says {shape}")
        if name.endswith(".keep"):
            if t.dtype not in (torch.bool, torch.uint8) or t.to(torch.uint8).max() > 1:
                raise CompsftError(f"{path}: mask {name!r} must hold 0/1 (bool or uint8), got {t.dtype}")
            tensors[name] = t = t.bool()
            want = keep_count(config.density, t.numel())
            if int(t.sum()) != want:
                raise CompsftError(f"{path}: mask {name!r} keeps {int(t.sum())} units, field 'density' "
                                   f"{config.density} of {CONFIG_NAME} means {want}")
        elif not t.is_floating_point() or not torch.isfinite(t).all():
            raise CompsftError(f"{path}: tensor {name!r} must hold finite floating-point values")
    return config, tensors, read_head(directory)
