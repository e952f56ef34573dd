"""SpIEL (Ansell et al. 2024): sparse fine-tuning whose support moves during training.

Phase-free: K entries are active from the first step (chosen at random, seeded). Every
``reselection_steps`` optimizer steps, the active entries with the smallest |Δ| are dropped and
as many inactive entries with the largest accumulated gradient |Σ g| are grown (SpIEL-AG); the
gradient is accumulated over the ``accumulation_steps`` optimizer steps just before a reselection.
The number moved is ``rate · K`` with the rate decaying from ``reselection_rate`` to 0 (cosine,
as RigL's drop fraction). The result is an ordinary `SparseFineTuning`: K entries plus heads.

How it is held (why one shared vector): the optimizer keeps state per parameter *object*, and a
global reselection moves entries between tensors, so per-tensor values vectors would change size.
Instead all K values live in one parameter ``SpielStore.values`` of constant shape; each eligible
tensor is parametrised, as in `compsft.training.sparse`, as ``θ0 + scatter(indices, values[slots])``
with θ0 frozen. A reselection only rewrites the `indices`/`slots` buffers and, in place, the
dropped slots of ``values`` and of Adam's moments, so neither the optimizer nor DDP sees a new
parameter. A dropped entry's slot is given to a grown entry, so the dropped entry is θ0 again,
bit for bit.

Memory outside the accumulation steps: θ0 (frozen, no gradient), K values + K gradient + 2K Adam
moments (fp32), K int64 indices + K int64 slots. During the accumulation steps it also holds one
dense fp32 accumulator per eligible tensor (4 bytes per eligible entry), freed after the
reselection. As in LT-SFT phase 2, each forward materialises θ0 + Δ per tensor, and autograd keeps
those weights until backward.

New entries start at Δ = 0. Adam's moments of a grown entry are seeded from its mean accumulated
gradient ḡ = Σ g / A (A accumulation steps) as the moments an entry would have after t steps
(t = the optimizer's step count) of constant gradient ḡ: ``exp_avg = (1 − β1^t) ḡ`` and
``exp_avg_sq = (1 − β2^t) ḡ²``; after Adam's bias correction its next update is ``lr · sign(ḡ)``,
the size of Adam's very first step. Other optimizer state of the slot is zeroed.

Checkpoints and resume: the values vector and Adam's moments have the constant shape (K,) and are
indexed by slot, so the Trainer's own checkpoint files hold them (``model.safetensors``,
``optimizer.pt``), with the heads, the step, the schedule and the RNG states. What moves is the
support: ``spiel.safetensors`` in the same ``phase2/checkpoint-N`` folder holds each tensor's active
positions and their slots (int64, 16 bytes per active entry) and, in its JSON metadata, K, the
settings and the reselections so far. On resume it is read, checked and put in place before the
Trainer loads values and moments into the slots. The reselection schedule is a function of the step
and draws no random numbers, so nothing else is needed: a resumed run ends bit for bit where an
uninterrupted one does. The dense accumulators are never checkpointed: a checkpoint due inside an
accumulation window is written at the window's end, right after the reselection that empties them
(at most ``accumulation_steps − 1`` steps later).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy

from ..errors import CompsftError
from ..sft import SparseDelta, SparseFineTuning, index_dtype
from .masks import random_mask
from .selection import select_top_k
from .trainer import HEADS_FILE, MODEL_FILES, SparseFineTuner, check_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class SpielArguments:
    """Settings of SpIEL's reselection (defaults: the paper's)."""

    reselection_steps: int = field(default=20, metadata={"help": "optimizer steps between reselections (R)"})
    accumulation_steps: int = field(default=5, metadata={
        "help": "optimizer steps before each reselection whose gradients are accumulated for growing"})
    reselection_rate: float = field(default=0.2, metadata={
        "help": "fraction of K dropped and regrown at the first reselection; decays to 0 (cosine)"})

    def __post_init__(self) -> None:
        if self.reselection_steps < 1:
            raise CompsftError(f"reselection_steps must be >= 1, got {self.reselection_steps}")
        if not 1 <= self.accumulation_steps <= self.reselection_steps:
            raise CompsftError(f"accumulation_steps must be in [1, reselection_steps], got {self.accumulation_steps}")
        if not 0 <= self.reselection_rate <= 1:
            raise CompsftError(f"reselection_rate must be in [0, 1], got {self.reselection_rate}")

    def rate(self, step: int, total_steps: int) -> float:
        """Fraction of K moved at `step` (cosine decay from `reselection_rate` to 0 at `total_steps`)."""
        return self.reselection_rate * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))

    def accumulates(self, step: int, total_steps: int) -> bool:
        """Whether optimizer step `step` (1-based) accumulates gradients for the next reselection."""
        nxt = -(-step // self.reselection_steps) * self.reselection_steps
        return nxt < total_steps and nxt - step < self.accumulation_steps

    def reselects(self, step: int, total_steps: int) -> bool:
        """Whether the support changes after optimizer step `step` (never after the last one)."""
        return step % self.reselection_steps == 0 and step < total_steps


class SharedSparseValues(nn.Module):
    """Parametrization ``weight -> weight + scatter(indices, store.values[slots])``."""

    def __init__(self, store: "SpielStore", name: str, indices: Tensor, slots: Tensor) -> None:
        super().__init__()
        object.__setattr__(self, "store", store)  # not a submodule: `values` is registered once, on the model
        self.name = name
        self.register_buffer("indices", indices, persistent=False)
        self.register_buffer("slots", slots, persistent=False)

    def forward(self, weight: Tensor) -> Tensor:
        out = torch.index_add(weight.reshape(-1), 0, self.indices, self.store.values[self.slots]).view_as(weight)
        acc = self.store.accumulators.get(self.name)
        if acc is not None and out.requires_grad:
            # The dense gradient of the whole tensor, which the sparse values never see.
            out.register_hook(partial(_accumulate, acc))
        return out


class SpielStore(nn.Module):
    """The K trainable values of all tensors, their placement, and the reselection."""

    ATTR = "spiel_store"

    def __init__(self, model: nn.Module, masks: Mapping[str, Tensor], dtype: torch.dtype) -> None:
        super().__init__()
        device = next(model.parameters()).device
        self.k = sum(int(m.numel()) for m in masks.values())
        self.values = nn.Parameter(torch.zeros(self.k, dtype=dtype, device=device))
        self.numels: dict[str, int] = {}
        self.accumulators: dict[str, Tensor] = {}
        self.accumulated = 0
        self.parts: dict[str, SharedSparseValues] = {}
        start = 0
        for name, idx in masks.items():
            module, attr = _owner(model, name)
            param = getattr(module, attr)
            param.requires_grad_(False)
            self.numels[name] = param.numel()
            slots = torch.arange(start, start + idx.numel(), device=device)
            start += idx.numel()
            # Every eligible tensor is parametrised, even with no active entry, so it can grow some.
            part = SharedSparseValues(self, name, idx.to(device=device, dtype=torch.long), slots)
            parametrize.register_parametrization(module, attr, part)
            module.parametrizations[attr].original.requires_grad_(False)
            self.parts[name] = part
        model.add_module(self.ATTR, self)  # so that the Trainer's optimizer finds `values`

    # -- accumulation ---------------------------------------------------------------------------
    def start_accumulating(self) -> None:
        if not self.accumulators:
            self.accumulators = {n: torch.zeros(numel, dtype=torch.float32, device=self.values.device)
                                 for n, numel in self.numels.items()}
            self.accumulated = 0

    def count_step(self) -> None:
        if self.accumulators:
            self.accumulated += 1

    # -- reselection ----------------------------------------------------------------------------
    @torch.no_grad()
    def reselect(self, n: int, optimizer=None) -> dict:
        """Drop the `n` active entries of smallest |Δ| and grow the `n` inactive ones of largest |Σ g|."""
        names = list(self.parts)
        total = sum(self.numels.values())
        n = max(0, min(int(n), self.k, total - self.k))
        if not self.accumulators:
            raise CompsftError("SpIEL reselection without accumulated gradients")
        _all_reduce_mean(self.accumulators.values())
        if n == 0:
            self.accumulators, self.accumulated = {}, 0
            return {"moved": 0}
        # Drop: the n active entries that moved least; ties by slot.
        mag = self.values.detach().abs().float()
        dropped = select_top_k([self.k], lambda i, pos: -mag[pos], n)[0].to(self.values.device)
        # Grow: among the entries inactive before the drop (a dropped entry is not regrown at once).
        # Active entries are marked NaN in the accumulator (scored -1, below every |Σ g|).
        for name in names:
            acc = self.accumulators[name]
            if bool(torch.isnan(acc).any()):
                raise CompsftError(f"NaN among the accumulated gradients of {name}: the training diverged")
            acc[self.parts[name].indices] = math.nan
        accs = [self.accumulators[nm] for nm in names]
        grown = select_top_k([self.numels[nm] for nm in names],
                             lambda i, pos: torch.nan_to_num(accs[i][pos].abs(), nan=-1.0), n,
                             names=names, device=self.values.device)
        is_dropped = torch.zeros(self.k, dtype=torch.bool, device=self.values.device)
        is_dropped[dropped] = True
        seeds, start = [], 0
        for name, idx in zip(names, grown):
            part = self.parts[name]
            keep = ~is_dropped[part.slots]
            idx = idx.to(self.values.device)
            new_slots = dropped[start:start + idx.numel()]
            start += idx.numel()
            seeds.append(self.accumulators[name][idx])  # signed Σ g (they were inactive)
            indices = torch.cat([part.indices[keep], idx])
            slots = torch.cat([part.slots[keep], new_slots])
            order = torch.argsort(indices)
            part.indices, part.slots = indices[order], slots[order]
        mean_grad = torch.cat(seeds) / max(1, self.accumulated)  # in the order of `dropped`
        self.values[dropped] = 0
        self._seed_optimizer(optimizer, dropped, mean_grad)
        self.accumulators, self.accumulated = {}, 0
        return {"moved": n}

    def _seed_optimizer(self, optimizer, slots: Tensor, mean_grad: Tensor) -> None:
        opt = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        if opt is None:
            return
        state = opt.state.get(self.values)
        if not state:
            return
        betas = next((g.get("betas") for g in opt.param_groups if any(p is self.values for p in g["params"])), None)
        step = float(state["step"]) if "step" in state else 0.0
        for key, buf in state.items():
            if not torch.is_tensor(buf) or buf.shape != self.values.shape:
                continue
            if key == "exp_avg" and betas is not None:
                buf[slots] = ((1 - betas[0] ** step) * mean_grad).to(buf.dtype)
            elif key == "exp_avg_sq" and betas is not None:
                buf[slots] = ((1 - betas[1] ** step) * mean_grad.square()).to(buf.dtype)
            else:
                buf[slots] = 0

    # -- the result -----------------------------------------------------------------------------
    def masks_and_values(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Sorted indices and their Δ per tensor (CPU indices, values on their device)."""
        masks, values = {}, {}
        for name, part in self.parts.items():
            masks[name] = part.indices.detach().cpu().clone()
            values[name] = self.values.detach()[part.slots].clone()
        return masks, values

    def detach(self, model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Remove the parametrizations (θ0 stays in place); returns `masks_and_values()`."""
        out = self.masks_and_values()
        for name in self.parts:
            module, attr = _owner(model, name)
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        if getattr(model, self.ATTR, None) is self:
            delattr(model, self.ATTR)
        return out

    def active_counts(self) -> dict[str, int]:
        return {n: int(p.indices.numel()) for n, p in self.parts.items()}


def _accumulate(acc: Tensor, grad: Tensor) -> None:
    acc.add_(grad.reshape(-1).to(acc.dtype))


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


def _all_reduce_mean(tensors) -> None:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    for t in tensors:
        torch.distributed.all_reduce(t)
        t.div_(world)


#: key prefixes of a SpIEL snapshot (`spiel_snapshot`): each tensor's active positions and their Δ
INDICES, VALUES = "indices:", "values:"


def spiel_snapshot(model: nn.Module) -> dict[str, Tensor]:
    """What source-dev selection keeps of a SpIEL model: each tensor's active positions and Δ values (the
    support moves, so the values vector alone could not be put back where it was) and the trainable heads."""
    store = getattr(model, SpielStore.ATTR, None)
    if not isinstance(store, SpielStore):
        raise CompsftError("not a model in SpIEL training (no SpIEL store attached)")
    masks, values = store.masks_and_values()
    out = {f"{INDICES}{n}": m for n, m in masks.items()}
    out.update({f"{VALUES}{n}": v.detach().to("cpu", copy=True) for n, v in values.items()})
    out.update({n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
                if p.requires_grad and not n.startswith(SpielStore.ATTR + ".")})
    return out


#: SpIEL's part of a checkpoint, next to the Trainer's files in ``phase2/checkpoint-N``
SPIEL_STATE_FILE = "spiel.safetensors"
_STATE_FORMAT = "compsft-spiel-state"


def save_spiel_state(path: Path, store: SpielStore, spiel_args: SpielArguments, reselections: list[dict],
                     step: int) -> None:
    """Write the support of `store` (per tensor: sorted active positions and their slots in the shared
    values vector; 16 bytes per active entry) and the reselection record, atomically, as safetensors
    with JSON metadata. The values and Adam's moments are slot-indexed, so the Trainer's own model
    and optimizer files hold them; with the slots they give each tensor's Δ and moments back."""
    from safetensors.torch import save_file

    from ..atomic import atomic_path

    tensors = {}
    for name, part in store.parts.items():
        tensors[f"indices/{name}"] = part.indices.detach().to("cpu", torch.int64).contiguous()
        tensors[f"slots/{name}"] = part.slots.detach().to("cpu", torch.int64).contiguous()
    meta = {"format": _STATE_FORMAT, "version": "1", "k": str(store.k), "step": str(step),
            "spiel": json.dumps(asdict(spiel_args)), "numels": json.dumps(store.numels),
            "reselections": json.dumps(reselections)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_spiel_state(path: Path, store: SpielStore, spiel_args: SpielArguments
                     ) -> tuple[dict[str, tuple[Tensor, Tensor]], list[dict]]:
    """Read and check a `save_spiel_state` file against this run: returns ``{name: (indices, slots)}``
    for every tensor of `store` and the reselections so far. Any problem is a `CompsftError` naming
    the file (a checkpoint is the run's own output, but disks fill up and runs get mixed up)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {n: f.get_tensor(n) for n in f.keys()}
        if meta.get("format") != _STATE_FORMAT or meta.get("version") != "1":
            raise ValueError(f"not a SpIEL checkpoint state (format {meta.get('format')!r}, "
                             f"version {meta.get('version')!r})")
        k, saved_args = int(meta["k"]), json.loads(meta["spiel"])
        numels, reselections = json.loads(meta["numels"]), json.loads(meta["reselections"])
        if not isinstance(reselections, list) or not isinstance(numels, dict):
            raise ValueError("malformed metadata (reselections, numels)")
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise CompsftError(f"{path}: unreadable SpIEL checkpoint state ({type(err).__name__}: {err}); "
                           f"delete {path.parent} to resume from the checkpoint before it") from err
    if k != store.k or saved_args != asdict(spiel_args) or numels != store.numels:
        raise CompsftError(f"{path}: from a SpIEL run with K={k}, {saved_args} on other tensors or settings than "
                           f"this one (K={store.k}, {asdict(spiel_args)}); use another --out or drop --resume")
    support, all_slots = {}, []
    for name, numel in store.numels.items():
        idx, slots = tensors.get(f"indices/{name}"), tensors.get(f"slots/{name}")
        ok = (idx is not None and slots is not None and idx.dtype == slots.dtype == torch.int64
              and idx.dim() == slots.dim() == 1 and idx.numel() == slots.numel())
        ok = ok and (idx.numel() == 0 or (int(idx.min()) >= 0 and int(idx.max()) < numel
                                          and idx.unique().numel() == idx.numel()))
        if not ok:
            raise CompsftError(f"{path}: bad or missing indices/slots of tensor {name!r}")
        support[name] = (idx, slots)
        all_slots.append(slots)
    if not torch.equal(torch.sort(torch.cat(all_slots)).values, torch.arange(store.k)):
        raise CompsftError(f"{path}: the slots are not each of the K={store.k} values exactly once")
    _check_values_saved(path.parent, store.k)
    return support, reselections


def _check_values_saved(checkpoint: Path, k: int) -> None:
    # The Trainer loads the model non-strictly: without this, a checkpoint lacking the values would
    # resume with Δ = 0 on the restored support, silently.
    from safetensors import safe_open

    weights = checkpoint / MODEL_FILES[0]
    if not weights.is_file():
        return  # another layout (sharded, .bin): the Trainer's own checks apply
    key = f"{SpielStore.ATTR}.values"
    with safe_open(str(weights), framework="pt") as f:
        shape = f.get_slice(key).get_shape() if key in f.keys() else None
    if shape != [k]:
        raise CompsftError(f"{weights}: no SpIEL values {key} of shape [{k}] (found {shape})")


class _SpielCallback(TrainerCallback):
    """Turns accumulation on before the steps that feed a reselection, reselects after step R·j, and
    moves a checkpoint due inside an accumulation window to the window's end (the reselection)."""

    def __init__(self, tuner: "SpielTuner") -> None:
        self.tuner = tuner

    def on_step_begin(self, args, state, control, **kwargs):
        store = self.tuner.store
        if store is not None and self.tuner.spiel_args.accumulates(state.global_step + 1, state.max_steps):
            store.start_accumulating()

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        store = self.tuner.store
        if store is None:
            return
        store.count_step()
        if self.tuner.spiel_args.reselects(state.global_step, state.max_steps):
            self.tuner.reselect(state.global_step, state.max_steps, optimizer)
        self._defer_save(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.tuner.store is not None:
            self._defer_save(control)

    def _defer_save(self, control) -> None:
        # Runs after DefaultFlowCallback has decided whether to save at this step.
        if self.tuner.store.accumulators:
            if control.should_save:
                control.should_save = False
                self.tuner._save_pending = True
        elif self.tuner._save_pending:
            control.should_save = True


class SpielTuner(SparseFineTuner):
    """A `SparseFineTuner` that trains SpIEL instead of LT-SFT's two phases.

    It takes the same arguments plus `spiel_args` (`SpielArguments`); K comes from `sft_args` as
    for LT-SFT, and the number of steps from its phase-2 fields (`sparse_ft_*`); the initial
    support is `sft_args.mask_seed`'s random mask. Heads are trained dense, as in LT-SFT.

    Example::

        tuner = SpielTuner(model=model, args=training_args, train_dataset=ds, data_collator=collator,
                           sft_args=SftArguments(sft_kind="task", k=10_000, sparse_ft_max_steps=200))
        tuner.train()
        tuner.save_sft("out/sft")      # an ordinary SFT: compsft.apply / revert / compose
    """

    def __init__(self, model=None, args=None, *, spiel_args: SpielArguments | None = None, **kwargs) -> None:
        super().__init__(model, args, **kwargs)
        # Recorded in the SFT and the summary (a copy: the caller's arguments stay as they were).
        self.sft_args = copy.copy(self.sft_args)
        self.sft_args.mask_strategy = "spiel"
        self.spiel_args = spiel_args or SpielArguments()
        self.store: SpielStore | None = None
        self.reselections: list[dict] = []
        self._save_pending = False  # a checkpoint was due inside an accumulation window
        self.add_callback(_SpielCallback(self))

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Train the K moving entries and the heads; afterwards `self.sft` holds the result, applied.

        `resume_from_checkpoint=True` continues an interrupted run from the last complete checkpoint in
        `args.output_dir` (``phase2/checkpoint-N``); without one it starts from the beginning.
        """
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            raise CompsftError("SpielTuner resumes from its work directory (args.output_dir): pass True")
        if self.args.save_strategy == SaveStrategy.BEST:
            # A checkpoint must not fall inside an accumulation window (see _save_checkpoint).
            raise CompsftError("SpIEL checkpoints by steps or epochs, not save_strategy='best'")
        resume = bool(resume_from_checkpoint)
        work = Path(self.args.output_dir)
        self._init_heads(work / HEADS_FILE, resume)
        masks = random_mask(self._theta0, None, self.k, seed=self.sft_args.mask_seed)
        dtype = next(iter(self._theta0.values())).dtype
        self.store = SpielStore(self.model, masks, dtype)
        self.reselections, self._save_pending = [], False
        try:
            # On resume, _prepare_resume puts the checkpoint's support in place of the initial one.
            out = self._run_phase(2, work, resume, trial, ignore_keys_for_eval)
            heads = {n: p.detach().clone() for n, p in self._named(self._head_names).items()}
        finally:
            masks, values = self.store.detach(self.model)
            self.store = None
            for p in self._named(self._eligible_names).values():
                p.requires_grad_(True)
        self.masks = masks
        self._reset_to_theta0()
        self._finish(masks, values, heads)
        self.sft.config.training.update({
            "method": "spiel", "mask_strategy": "spiel", "spiel": asdict(self.spiel_args),
            "reselections": self.reselections,
        })
        return out

    # -- checkpoints ------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint (step, θ0 and the K values, the heads, Adam's moments of both, the
        schedule, the RNG states) plus `SPIEL_STATE_FILE`, written before the Trainer's
        ``trainer_state.json`` so that a checkpoint counted complete has it."""
        store = self.store
        if store is not None and store.accumulators:
            # The dense accumulators are not checkpointed (they would double a checkpoint's size):
            # the callback saves at the window's end instead. Only a save forced past it lands here.
            logger.info("SpIEL: checkpoint at step %d moved to the end of the accumulation window",
                        self.state.global_step)
            self._save_pending = True
            return
        if store is not None and self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            save_spiel_state(folder / SPIEL_STATE_FILE, store, self.spiel_args, self.reselections,
                             self.state.global_step)
        self._save_pending = False
        super()._save_checkpoint(model, trial)

    def _prepare_resume(self, checkpoint: Path) -> None:
        """Check the checkpoint's files, then put its support (each tensor's indices and slots) in
        place, before the Trainer loads the values and Adam's moments into the slots."""
        required = [SPIEL_STATE_FILE] + ([] if self.args.save_only_model else ["optimizer.pt", "scheduler.pt"])
        check_checkpoint(checkpoint, required)
        support, self.reselections = load_spiel_state(checkpoint / SPIEL_STATE_FILE, self.store, self.spiel_args)
        for name, (indices, slots) in support.items():
            part = self.store.parts[name]
            part.indices, part.slots = indices.to(part.indices.device), slots.to(part.slots.device)
        logger.info("SpIEL: resuming with the support of %s (%d reselections so far)", checkpoint,
                    len(self.reselections))

    def sft_from_snapshot(self, snapshot: Mapping[str, Tensor], summary: dict | None = None):
        """The SFT of a `spiel_snapshot` taken during training (source-dev selection), with this run's
        settings and base fingerprint; call after `train()`."""
        import dataclasses

        if self.sft is None:
            raise CompsftError("no SFT yet: call train() first")
        diffs = {}
        for key, idx in snapshot.items():
            if not key.startswith(INDICES) or idx.numel() == 0:
                continue
            name = key[len(INDICES):]
            if name not in self._theta0 or VALUES + name not in snapshot:
                raise CompsftError(f"SpIEL snapshot: no eligible tensor or values for {name!r}")
            shape = tuple(self._theta0[name].shape)
            diffs[name] = SparseDelta(shape, idx.to(index_dtype(math.prod(shape))).cpu(),
                                      snapshot[VALUES + name].detach().float().cpu())
        dense = {n: snapshot[n].detach().cpu() if n in snapshot else t for n, t in self.sft.dense.items()}
        tensors = self._base_fingerprint["tensors"]
        config = dataclasses.replace(
            self.sft.config,
            base_fingerprint={**self._base_fingerprint, "tensors": {n: v for n, v in tensors.items() if n in diffs}},
            training={**self.sft.config.training, "dev_selected": summary or {}})
        sft = SparseFineTuning(diffs, dense, config)
        sft.validate()
        return sft

    def reselect(self, step: int, total_steps: int, optimizer=None) -> dict:
        """One drop-and-grow at `step` (called by the callback); returns what moved."""
        n = round(self.spiel_args.rate(step, total_steps) * self.k)
        accumulated = self.store.accumulated
        info = {"step": step, **self.store.reselect(n, optimizer), "accumulated_steps": accumulated}
        self.reselections.append(info)
        logger.debug("SpIEL step %d: moved %d of K=%d entries", step, info["moved"], self.k)
        return info


def train_spiel_sft(kind: str, *args, steps: tuple = (None, 200, 200), spiel_args: SpielArguments | None = None,
                    **kwargs):
    """Train a language or task SFT by SpIEL; the arguments are those of `train_language_sft` /
    `train_task_sft` (kind "language" / "task"), except `phase1`/`phase2`/`l1`: SpIEL has one phase,
    `steps` = (max_epochs, min_steps, max_steps), and no L1 pull. Returns the `SpielTuner`.

    Example::

        train_spiel_sft("language", "models/e5", "mlt", "sfts/mlt-spiel", steps=(None, 200, 200))
        train_spiel_sft("task", "pos", "models/e5", "ud:en_ewt:train", "sfts/pos-spiel",
                        source_sft="sfts/eng-spiel", steps=(None, 200, 200))
    """
    from .recipes import train_language_sft, train_task_sft

    recipes = {"language": train_language_sft, "task": train_task_sft}
    if kind not in recipes:
        raise CompsftError(f"SpIEL trains a language or a task SFT, not {kind!r}")
    for name in ("phase1", "phase2", "l1"):
        if name in kwargs:
            raise CompsftError(f"train_spiel_sft takes `steps`, not {name!r} (SpIEL has one phase, no L1)")
    tuner = partial(SpielTuner, spiel_args=spiel_args or SpielArguments())
    return recipes[kind](*args, phase1=(None, None, None), phase2=steps, l1=0.0, tuner=tuner, **kwargs)
