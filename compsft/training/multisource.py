"""Multi-source task training: every batch from one source language, under that source's language SFT.

The reference implementation (`MultiSourcePlugin`) adds a source's SFT into the weights when the
batch's source changes and subtracts it again afterwards. Subtracting rounds, so thousands of
apply/revert pairs drift; and once the optimizer has moved the weights under an applied SFT, a revert
that restored the values gathered at apply time would wipe the task's update there. compsft keeps
the task's trained difference and the source SFT apart in time:

**A source SFT is applied for the forward and backward of its batch only, never across an optimizer
step** (`SourceShift.applied`, entered and left inside `MultiSourceFineTuner.training_step`). Entering
gathers the stored values at φ_S's positions and writes ``stored + φ_S`` there (added in fp32, one
rounding, as `compsft.apply` does); the forward and backward run on θ + φ_S, so the gradient is the
one the source's batch asks for; leaving writes the gathered values back, bit for bit, *before* the
Trainer's optimizer step. The optimizer and the weight decay therefore only ever see θ0 + Δ_task:

* phase 1 (dense): the stored tensors are the trained ones; θ1 − θ0 is the task's update alone, with
  no φ_S in it to wipe or to drift (the L1 pull is measured against θ0 + φ_S while φ_S is in);
* phase 2 (sparse): a masked tensor is θ0 + scatter(values) (`compsft.training.sparse`); φ_S goes into
  its frozen θ0 (``parametrizations.<name>.original``), the trained values stay apart;
* checkpoints, dev checks and the result never see a source SFT (dev scoring applies each source's
  SFT for its own dev set the same way), so after training the model is θ0 + φ_task exactly.

Per step this costs a gather and two scatters of the source's K entries, not a copy of the weights;
`bench/multisource_swap.py` measures it against the step time. A source's index and value tensors
are moved to the device once (when that source first comes) and kept; `SourceShift.changes` counts
the changes of source. Keeping φ_S in the weights over several steps of the same source would save
those K-entry writes but puts φ_S under the optimizer: exactly the trap above.

Batches: `MultiSourceBatchSampler` cuts each source's (upsampled) examples into batches of one
source, then orders the batches sequentially (source by source) or at random; the order is a
function of (seed, epoch) only, so a run resumed at step n sees the batches an uninterrupted run
sees. A source without a language SFT trains on θ0 alone for its batches.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from torch.nn.utils import parametrize

from ..errors import CompsftError
from ..sft import SparseFineTuning
from .trainer import SparseFineTuner

logger = logging.getLogger(__name__)

SOURCE_KEY = "_source"  # batch key with the batch's source index (taken out before the forward)
ORDERS = ("random", "sequential")


@dataclass
class TaskSource:
    """One source of a multi-source task SFT.

    `name`: the source's label (its language code, e.g. ``gle``); `train` / `dev`: a shipped data
    name (``ud:ga_idt:train``) or a file; `sft`: its language SFT (a directory or a loaded SFT),
    None to train its batches on θ0 alone; `upsample`: how many times its examples recur per epoch.

    Example::

        TaskSource("gle", "ud:ga_idt:train", dev="ud:ga_idt:dev", sft="sfts/gle", upsample=2)
    """

    name: str
    train: str | Path
    dev: str | Path | None = None
    sft: str | Path | SparseFineTuning | None = None
    upsample: int = 1

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise CompsftError(f"source {self.name!r}: a source needs a name (its language code)")
        if not isinstance(self.upsample, int) or self.upsample < 1:
            raise CompsftError(f"source {self.name}: upsample must be an integer >= 1, got {self.upsample!r}")


def check_sources(sources: Sequence[TaskSource]) -> None:
    """A CompsftError unless the sources are non-empty and their names unique."""
    if not sources:
        raise CompsftError("multi-source training needs at least one source")
    names = [s.name for s in sources]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise CompsftError(f"source {dup!r} is given twice; merge its files or name them apart")


# -- data ----------------------------------------------------------------------------------------
class MultiSourceDataset(Dataset):
    """The sources' encoded data sets end to end; each row carries its source index under SOURCE_KEY."""

    def __init__(self, datasets: Sequence) -> None:
        self.datasets = list(datasets)
        self.offsets = [0]
        for d in self.datasets:
            self.offsets.append(self.offsets[-1] + len(d))

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> dict:
        source = next(s for s in range(len(self.datasets)) if index < self.offsets[s + 1])
        row = dict(self.datasets[source][index - self.offsets[source]])
        row[SOURCE_KEY] = source
        return row


class MultiSourceBatchSampler:
    """Batches of one source each: source s's examples, repeated `upsample[s]` times and shuffled
    (seed, epoch, s), cut into batches of `batch_size` (the last one may be short); then the batches
    in source order (`sequential`) or shuffled (`random`, seeded by (seed, epoch)).

    Yields global indices into a `MultiSourceDataset` of the same sizes. `set_epoch` (the Trainer
    calls it) picks the epoch; nothing else changes the order, so it is a function of seed and step.
    """

    def __init__(self, sizes: Sequence[int], batch_size: int, *, upsample: Sequence[int] | None = None,
                 order: str = "random", seed: int = 42) -> None:
        if order not in ORDERS:
            raise CompsftError(f"unknown source order {order!r}; choose one of {', '.join(ORDERS)}")
        if batch_size < 1:
            raise CompsftError(f"batch size must be >= 1, got {batch_size}")
        self.sizes = list(sizes)
        self.upsample = list(upsample or [1] * len(self.sizes))
        if len(self.upsample) != len(self.sizes):
            raise CompsftError(f"{len(self.sizes)} sources but {len(self.upsample)} upsampling factors")
        self.batch_size, self.order, self.seed, self.epoch = batch_size, order, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def batches_per_source(self) -> list[int]:
        """Batches of each source in one epoch."""
        return [-(-n * u // self.batch_size) for n, u in zip(self.sizes, self.upsample)]

    def __len__(self) -> int:
        return sum(self.batches_per_source())

    def plan(self) -> list[tuple[int, list[int]]]:
        """This epoch's batches as (source, local indices)."""
        batches = []
        for s, (n, u) in enumerate(zip(self.sizes, self.upsample)):
            g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, s + 1))
            local = torch.arange(n).repeat(u)[torch.randperm(n * u, generator=g)].tolist()
            batches += [(s, local[i:i + self.batch_size]) for i in range(0, len(local), self.batch_size)]
        if self.order == "random":
            g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, 0))
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def source_counts(self, batches: int) -> list[int]:
        """Batches of each source among the first `batches` of a run that starts at epoch 0."""
        counts, epoch, saved = [0] * len(self.sizes), 0, self.epoch
        try:
            while batches > 0:
                self.epoch = epoch
                for s, _ in self.plan()[:batches]:
                    counts[s] += 1
                batches -= len(self)
                epoch += 1
        finally:
            self.epoch = saved
        return counts

    def __iter__(self) -> Iterator[list[int]]:
        offsets = [0]
        for n in self.sizes:
            offsets.append(offsets[-1] + n)
        for s, local in self.plan():
            yield [offsets[s] + i for i in local]


def _mix(seed: int, epoch: int, stream: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + stream * 104_729) % (2 ** 63 - 1)


class SourceCollator:
    """Wraps a task collator: takes SOURCE_KEY out of the rows and puts the batch's source back on top."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, features: list[dict]) -> dict:
        rows = [dict(f) for f in features]
        sources = {r.pop(SOURCE_KEY) for r in rows}
        if len(sources) != 1:
            raise CompsftError(f"a multi-source batch mixes sources {sorted(sources)}")
        batch = self.inner(rows)
        batch[SOURCE_KEY] = sources.pop()
        return batch


# -- the source SFT in the forward only ------------------------------------------------------------
def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str] | None:
    """The module and `_parameters` key holding the stored tensor of `name` (a parametrized tensor's
    frozen ``original``), allowing for the base-model prefix as `compsft.apply` does."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [name]
    if prefix and name.startswith(prefix + "."):
        candidates.append(name[len(prefix) + 1:])
    elif prefix:
        candidates.append(f"{prefix}.{name}")
    for cand in candidates:
        module_name, _, attr = cand.rpartition(".")
        try:
            module = model.get_submodule(module_name) if module_name else model
        except AttributeError:
            continue
        if parametrize.is_parametrized(module, attr):
            return module.parametrizations[attr], "original"
        if isinstance(module._parameters.get(attr), torch.Tensor):
            return module, attr
    return None


class SourceShift:
    """Each source's language SFT (or None), added to the forward's weights on demand (module docstring).

    Example::

        shift = SourceShift({"gle": compsft.load("sfts/gle"), "fin": None})
        with shift.applied(model, "gle"):
            loss = model(**batch).loss; loss.backward()     # saw θ + φ_gle; grads land on θ
    """

    def __init__(self, sfts: Mapping[str, SparseFineTuning | None]) -> None:
        self.sfts = dict(sfts)
        self.current: dict[int, tuple] = {}      # id(stored tensor) -> (indices, values) while applied
        self.active: str | None = None            # the source whose tensors are on the device
        self.changes = 0
        self._device_cache: dict[tuple, list] = {}
        self._pool = None

    def check(self, model: torch.nn.Module) -> None:
        """Every source SFT fits `model` and was trained from its weights (`compsft.apply`'s checks,
        applied and reverted once, exactly)."""
        from ..merge import apply, revert

        for sft in self.sfts.values():
            if sft is not None:
                revert(model, apply(model, sft, with_dense=False))

    def _tensors(self, model, source: str) -> list:
        """[(stored tensor, indices, values, buffer)] of `source` on the model's device (values in ≥ fp32; the
        buffer holds the gathered stored values while the source is applied)."""
        entries = []
        for name, delta in self.sfts[source].diffs.items():
            found = _owner(model, name)
            if found is None:
                raise CompsftError(f"source {source}: tensor {name!r} of its SFT is not a parameter of the model")
            stored = found[0]._parameters[found[1]]
            if not stored.is_contiguous():
                raise CompsftError(f"source {source}: the model's tensor {name!r} is not contiguous")
            cache_key = (source, name, stored.device, stored.dtype)
            if cache_key not in self._device_cache:
                work = torch.promote_types(stored.dtype, torch.float32)
                idx = delta.indices.to(stored.device, torch.int64)
                # The gathered values go into a buffer kept with the source: no allocation per step (freeing
                # one per step moved glibc's mmap threshold and made every step's big tensors page-fault).
                self._device_cache[cache_key] = [idx, delta.values.to(stored.device, work),
                                                 torch.empty(idx.numel(), dtype=stored.dtype, device=stored.device)]
            entries.append((stored, *self._device_cache[cache_key]))
        return entries

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module, source: str | None):
        """Within the block `model` holds θ + φ_source (nothing changes for a source without an SFT);
        afterwards the stored values are back, bit for bit. Leave the block before any optimizer step."""
        if source is not None and source not in self.sfts:
            raise CompsftError(f"unknown source {source!r}; sources: {', '.join(self.sfts)}")
        if source != self.active:
            self.changes += 1
            self.active = source
        if source is None or self.sfts[source] is None:
            yield
            return
        if self.current:
            raise CompsftError(f"source {source}: another source SFT is applied already (leave its block first)")
        entries = self._tensors(model, source)
        saved = [(stored.data.view(-1), idx, original) for stored, idx, vals, original in entries]
        self._each(entries, _gather)   # changes nothing: every buffer is full before the first write
        try:
            self._each(entries, _add)
            for stored, idx, vals, _ in entries:
                self.current[id(stored)] = (idx, vals)
            yield
        finally:
            self._each(saved, _restore)
            self.current.clear()

    def _each(self, items: list, fn) -> None:
        """`fn` on every item; on the CPU on all torch threads (the index ops of one tensor are mostly
        serial, and different tensors are independent; torch releases the GIL)."""
        threads = torch.get_num_threads()
        with torch.no_grad():
            if threads > 1 and len(items) > 1 and items[0][0].device.type == "cpu":
                if self._pool is None:
                    from concurrent.futures import ThreadPoolExecutor

                    self._pool = ThreadPoolExecutor(max_workers=threads)
                for _ in self._pool.map(fn, items):
                    pass
            else:
                for item in items:
                    fn(item)

    def reference(self, param: torch.Tensor, theta0: torch.Tensor) -> torch.Tensor:
        """θ0 + φ at `param`'s applied positions (θ0 where nothing is applied): what `param` is compared
        with while the source SFT is in, so that the L1 pull measures the task's difference alone."""
        found = self.current.get(id(param))
        if found is None:
            return theta0
        idx, vals = found
        return theta0.reshape(-1).index_add(0, idx, vals.to(theta0.dtype)).view_as(theta0)


def _gather(entry) -> None:
    """The stored values at φ's positions into the source's buffer."""
    stored, idx, _, original = entry
    torch.index_select(stored.data.view(-1), 0, idx, out=original)


def _add(entry) -> None:
    """θ + φ at φ's positions (the gathered values are in the buffer)."""
    stored, idx, vals, original = entry
    flat = stored.data.view(-1)
    if vals.dtype == flat.dtype:   # fp32 (or wider): θ + φ rounded once, in place
        flat.index_add_(0, idx, vals)
    else:                          # half types: added in fp32, rounded once, as compsft.apply
        flat.index_copy_(0, idx, (original.to(vals.dtype) + vals).to(flat.dtype))


def _restore(item) -> None:
    flat, idx, original = item
    flat.index_copy_(0, idx, original)


# -- the trainer -----------------------------------------------------------------------------------
class MultiSourceFineTuner(SparseFineTuner):
    """`SparseFineTuner` over a `MultiSourceDataset`: each training step applies its batch's source
    SFT in the forward only (`SourceShift`). Extra keyword arguments: `shift` (a `SourceShift`),
    `source_names` (by source index), `batch_sampler` (a `MultiSourceBatchSampler`). The data
    collator is wrapped in `SourceCollator`.
    """

    def __init__(self, model=None, args=None, *, shift: SourceShift, source_names: Sequence[str],
                 batch_sampler: MultiSourceBatchSampler, data_collator=None, **kwargs) -> None:
        self.shift = shift
        self.source_names = list(source_names)
        self.batch_sampler = batch_sampler
        self.source_batches = {n: 0 for n in self.source_names}  # batches trained per source (this process)
        super().__init__(model=model, args=args, data_collator=SourceCollator(data_collator), **kwargs)

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise CompsftError("multi-source training needs a train_dataset")
        loader = DataLoader(self.train_dataset, batch_sampler=self.batch_sampler, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    def training_step(self, model, inputs, num_items_in_batch=None):
        source = inputs.pop(SOURCE_KEY, None)
        if source is None:
            raise CompsftError(f"a multi-source batch without its {SOURCE_KEY!r} key")
        name = self.source_names[int(source)]
        self.source_batches[name] += 1
        with self.shift.applied(self.model, name):
            return super().training_step(model, inputs, num_items_in_batch)

    def _l1_pairs(self):
        # θ holds θ0 + Δ + φ_S during the step: the pull is on Δ, as with one source (whose θ0 has φ_S in).
        if self._phase != 1 or not self.shift.current:
            yield from super()._l1_pairs()
            return
        for n, p in self._named(self._eligible_names).items():
            yield p, self.shift.reference(p, self._theta0[n])
        for n, p in self._named(self._head_names).items():
            yield p, self._heads0[n]


def mean_dev_scorer(shift: SourceShift, scorers: Mapping[str, object]):
    """A `DevSelection` score function: the mean of each source's dev score, each scored with its own
    source SFT in the forward (`scorers`: source name -> score(model) -> float)."""
    def score(model) -> float:
        values = []
        for name, one in scorers.items():
            with shift.applied(model, name):
                values.append(float(one(model)))
        return sum(values) / len(values)

    return score

