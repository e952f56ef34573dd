"""apply / revert / compose: adding sparse fine-tunings onto a model and taking them off again.

`apply` keeps the original values of every entry it touches, so `revert` restores the weights
bit-identically (subtracting the difference again, as the reference implementation does, drifts
in the last bits). Everything is checked before the first weight changes: a bad SFT leaves the
model untouched.
"""
from __future__ import annotations

import logging
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import torch

from . import fingerprint as fp
from .errors import CompsftError, FingerprintMismatch, VocabularyMismatch
from .sft import SftConfig, SparseDelta, SparseFineTuning, index_dtype
from .vocab import require_same_vocab

logger = logging.getLogger(__name__)


@dataclass
class _Touched:
    param: torch.nn.Parameter
    indices: torch.Tensor | None  # int64 on the param's device; None for a dense (whole-tensor) copy
    original: torch.Tensor


@dataclass
class AppliedSft:
    """What `apply` did: enough to undo it exactly. Returned by `apply`, consumed by `revert`."""

    sfts: tuple[SparseFineTuning, ...]
    touched: list[_Touched] = field(default_factory=list)


# Applied SFTs per model, oldest first. Kept outside the module so state_dict and save_pretrained
# never see it.
_STACKS: "weakref.WeakKeyDictionary[torch.nn.Module, list[AppliedSft]]" = weakref.WeakKeyDictionary()


def applied(model: torch.nn.Module) -> list[AppliedSft]:
    """The SFTs currently applied to `model`, oldest first."""
    return list(_STACKS.get(model, []))


def _source(sft: SparseFineTuning) -> str:
    return getattr(sft, "source", None) or repr(sft)


# -- the one rule for dense parameters ----------------------------------------------------------
# A task SFT's dense part is its trained head (a tagger's classifier, the parser's scorers): without
# it the task model predicts at random, so it is applied by default. A language SFT's dense part is
# its MLM head, which has no place on a task model: applied only when asked. `apply`, `compose`,
# `compsft compose` and `compsft evaluate` all resolve `with_dense` here.


def _parts(sft: SparseFineTuning) -> list[dict]:
    training = sft.config.training if isinstance(sft.config.training, dict) else {}
    return [p for p in training.get("composed_from") or () if isinstance(p, dict)]


def _task_part(part: dict) -> bool:
    return part.get("kind") == "task" or bool(part.get("task"))


def carries_task(sft: SparseFineTuning) -> bool:
    """True for a task SFT and for a composition that took in a task SFT (at any depth)."""
    config = sft.config
    if config.kind == "task":
        return True
    return config.kind == "composed" and (bool(config.task) or any(_task_part(p) for p in _parts(sft)))


def dense_by_kind(sft: SparseFineTuning) -> bool:
    """Whether `sft`'s dense parameters are applied when the caller does not say: heads of task SFTs
    (and of compositions that kept a task SFT's head) yes, heads of language SFTs (the MLM head) no."""
    if sft.config.kind == "composed":
        # Files composed before the flag was recorded kept every input's head ("dense" missing).
        return any(_task_part(p) and p.get("dense", True) for p in _parts(sft))
    return carries_task(sft)


def resolve_with_dense(sfts: Sequence[SparseFineTuning], with_dense: bool | None | Sequence[bool | None]) -> list[bool]:
    """One flag per SFT: `with_dense` for all or one by one; None (the default) means by kind.

    Example::

        resolve_with_dense([lang_sft, task_sft], None)          # [False, True]
        resolve_with_dense([lang_sft, task_sft], [True, None])  # [True, True]: MLM head asked for
    """
    count = len(sfts)
    if with_dense is None or isinstance(with_dense, bool):
        flags = [with_dense] * count
    else:
        flags = list(with_dense)
    if len(flags) != count:
        raise CompsftError(f"{count} SFTs but {len(flags)} with_dense flags")
    return [dense_by_kind(s) if f is None else bool(f) for s, f in zip(sfts, flags)]


def task_labels(sfts: Sequence[SparseFineTuning]) -> tuple[str | None, list[str] | None]:
    """(task, labels) of the task head among `sfts` (task SFTs and compositions of one), or (None, None)."""
    for s in sfts:
        if carries_task(s):
            labels = s.config.training.get("labels") if isinstance(s.config.training, dict) else None
            return s.config.task, (list(labels) if labels else None)
    return None, None


class UnverifiedBaseWarning(UserWarning):
    """An SFT records no base-model fingerprint for some tensors, so its base cannot be checked."""


# SFTs already warned about, so the warning comes once per SFT object, not once per apply or tensor.
_WARNED: "weakref.WeakSet[SparseFineTuning]" = weakref.WeakSet()


def _warn_unverified(sft: SparseFineTuning, src: str, unchecked: int, total: int) -> None:
    if sft in _WARNED:
        return
    _WARNED.add(sft)
    what = "records no base-model fingerprint" if unchecked == total else \
        f"records no base-model fingerprint for {unchecked} of its {total} tensors"
    message = (f"{src}: this SFT {what}, so compsft cannot check that it was trained from this model "
               f"(a file converted without --base?). Re-convert it with `compsft convert OLD NEW --base MODEL`.")
    logger.warning(message)
    warnings.warn(message, UnverifiedBaseWarning, stacklevel=3)


def _resolve(model: torch.nn.Module, table: dict[str, torch.nn.Parameter], name: str) -> str | None:
    """Find `name` in the model, allowing for the base-model prefix (`bert.` on task models, none on
    a bare `BertModel`), so an SFT trained on a `*ForMaskedLM` applies to a tagger and vice versa."""
    if name in table:
        return name
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix:
        if name.startswith(prefix + ".") and name[len(prefix) + 1:] in table:
            return name[len(prefix) + 1:]
        if f"{prefix}.{name}" in table:
            return f"{prefix}.{name}"
    return None


def _target(model: torch.nn.Module, table: dict[str, torch.nn.Parameter], src: str, what: str,
            name: str, shape) -> torch.nn.Parameter:
    """The model's parameter for an SFT entry, or a CompsftError naming the file and the tensor."""
    target = _resolve(model, table, name)
    if target is None:
        raise CompsftError(f"{src}: {what} {name!r} is not a parameter of the model")
    param = table[target]
    if tuple(param.shape) != tuple(shape):
        raise CompsftError(
            f"{src}: {what} {name!r} has shape {list(shape)}, the model's {target!r} has {list(param.shape)}"
        )
    return param


def _base_sample(model: torch.nn.Module, param: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """θ0 at `positions` of `param`: its current values, except where an applied SFT changed them."""
    positions = positions.to(param.device)
    values = param.detach().reshape(-1).index_select(0, positions).clone()
    found = torch.zeros_like(positions, dtype=torch.bool)
    for handle in _STACKS.get(model, []):
        for t in handle.touched:
            if t.param is not param:
                continue
            if t.indices is None:
                hit = ~found
                values[hit] = t.original.reshape(-1).index_select(0, positions)[hit]
            else:
                loc = torch.searchsorted(t.indices, positions).clamp(max=max(t.indices.numel() - 1, 0))
                hit = ~found & (t.indices.numel() > 0) & (t.indices[loc] == positions)
                values[hit] = t.original[loc[hit]]
            found |= hit
    return values


def apply(
    model: torch.nn.Module,
    *sfts: SparseFineTuning,
    scales: Sequence[float] | None = None,
    with_dense: bool | None | Sequence[bool | None] = None,
    check_base: bool = True,
    vocab: dict | None = None,
) -> AppliedSft:
    """Add `sfts` (each times its scale) onto `model` in place, on the model's device.

    `with_dense` says, for all SFTs or one by one, whether their dense parameters (trained heads)
    are copied in; None (the default) decides by kind (`dense_by_kind`): a task SFT's head is, a
    language SFT's MLM head is not. `check_base=False` skips the base fingerprint check (an SFT
    without a fingerprint is applied with a warning, once); `vocab` (from
    `compsft.vocab.vocab_fingerprint`) enables the vocabulary check. Returns a handle;
    `revert(model)` undoes the most recent apply.

    Example::

        handle = apply(model, lang_sft, task_sft)   # the task head, not the MLM head
        ...
        revert(model, handle)
    """
    if scales is None:
        scales = [1.0] * len(sfts)
    if len(scales) != len(sfts):
        raise CompsftError(f"{len(sfts)} SFTs but {len(scales)} scales")
    dense_flags = resolve_with_dense(sfts, with_dense)

    table = dict(model.named_parameters(remove_duplicate=False))
    plan: list[tuple[torch.nn.Parameter, SparseDelta | None, torch.Tensor | None, float]] = []
    # Validate everything first: no weight changes until every SFT is known to fit.
    for sft, scale, dense in zip(sfts, scales, dense_flags):
        src = _source(sft)
        require_same_vocab(sft.config.vocab, vocab, _source(sft))
        seen: dict[int, str] = {}
        expected = sft.config.base_fingerprint or {}
        recorded = expected.get("tensors", {}) if isinstance(expected, dict) else {}
        unchecked = 0
        for name, delta in sft.diffs.items():
            param = _target(model, table, src, "tensor", name, delta.shape)
            if id(param) in seen:
                # Tied weights (input and output embeddings): one tensor, so one update.
                logger.warning("%s: %r and %r are tied in the model; applying only the first", src, seen[id(param)], name)
                continue
            seen[id(param)] = name
            if name not in recorded:
                unchecked += 1
            if check_base and expected:
                pos = fp.sample_positions(param.numel())
                reason = fp.compare(expected, name, tuple(param.shape), _base_sample(model, param, pos))
                if reason:
                    raise FingerprintMismatch(
                        f"{src}: tensor {name!r}: {reason}. This SFT was trained from another base model "
                        f"({sft.config.base_model!r}); pass check_base=False (--no-check-base) to apply anyway"
                    )
            plan.append((param, delta, None, scale))
        if check_base and unchecked:
            _warn_unverified(sft, src, unchecked, len(seen))
        if dense:
            for name, tensor in sft.dense.items():
                param = _target(model, table, src, "dense tensor", name, tensor.shape)
                plan.append((param, None, tensor, 1.0))

    handle = AppliedSft(tuple(sfts))
    # One group per parameter, in plan order: SFTs touching the same tensor must be added one after
    # the other (each keeps the originals it saw), different tensors are independent. On the CPU the
    # groups run on all cores (torch releases the GIL); a failure undoes every group that ran.
    groups: dict[int, list] = {}
    for item in plan:
        groups.setdefault(id(item[0]), []).append(item)
    on_cpu = all(item[0].device.type == "cpu" for item in plan)
    workers = max(1, torch.get_num_threads()) if on_cpu else 1
    results: list[list[_Touched] | BaseException] = []
    with torch.no_grad():
        if workers > 1 and len(groups) > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(_apply_group, groups.values()))
        else:
            for items in groups.values():
                results.append(_apply_group(items))
                if isinstance(results[-1], BaseException):
                    break
    for r in results:
        if not isinstance(r, BaseException):
            handle.touched.extend(r)
    failed = next((r for r in results if isinstance(r, BaseException)), None)
    if failed is not None:
        _undo(handle)
        raise failed
    _STACKS.setdefault(model, []).append(handle)
    return handle


def _apply_group(items: list) -> list[_Touched] | BaseException:
    """Apply the plan items of one parameter in order; on failure undo them and return the error."""
    touched: list[_Touched] = []
    try:
        for param, delta, dense_value, scale in items:
            if delta is None:
                touched.append(_Touched(param, None, param.detach().clone()))
                param.data.copy_(dense_value.to(param.device, param.dtype))
                continue
            if delta.nnz == 0:
                continue
            flat = param.data.view(-1)
            idx = delta.indices.to(param.device, torch.int64, non_blocking=True)
            original = flat.index_select(0, idx)
            touched.append(_Touched(param, idx, original))
            # Add in at least fp32 so fp16/bf16 weights get one rounding, not two.
            work = torch.promote_types(param.dtype, torch.float32)
            values = delta.values.to(param.device, work, non_blocking=True)
            if scale != 1.0:
                values = values * scale
            flat.index_copy_(0, idx, (original.to(work) + values).to(param.dtype))
    except BaseException as err:  # handed to the caller, which undoes every group and re-raises
        _undo(AppliedSft((), touched))
        return err
    return touched


def _undo(handle: AppliedSft) -> None:
    with torch.no_grad():
        for t in reversed(handle.touched):
            if t.indices is None:
                t.param.data.copy_(t.original)
            else:
                t.param.data.view(-1).index_copy_(0, t.indices, t.original)


def revert(model: torch.nn.Module, handle: AppliedSft | None = None) -> None:
    """Undo the most recent `apply` on `model` (or check that `handle` is that one), bit-identically."""
    stack = _STACKS.get(model)
    if not stack:
        raise CompsftError("revert: no SFT is applied to this model")
    if handle is not None and stack[-1] is not handle:
        raise CompsftError("revert: SFTs must be reverted in the reverse order of apply")
    _undo(stack.pop())


def compose(
    *sfts: SparseFineTuning,
    scales: Sequence[float] | None = None,
    with_dense: bool | None | Sequence[bool | None] = None,
) -> SparseFineTuning:
    """One SFT equal to the sum of `sfts` (each times its scale): union of indices, summed values.

    The result's `overlap` attribute maps each tensor to the number of entries present in more
    than one input; it is logged too. Dense parameters are kept from the SFTs whose `with_dense`
    flag is set; None (the default) decides by kind, as `apply` does: a task SFT's head is kept, a
    language SFT's MLM head is not. The same dense parameter kept from two inputs is an error unless
    the tensors are equal. A composition that took in a task SFT records that task and its labels,
    so its head is applied by default too.

    Example::

        tagger_sft = compose(lang_sft, task_sft)    # the task head, not the MLM head
    """
    if not sfts:
        return SparseFineTuning()
    if scales is None:
        scales = [1.0] * len(sfts)
    if len(scales) != len(sfts):
        raise CompsftError(f"{len(sfts)} SFTs but {len(scales)} scales")
    dense_flags = resolve_with_dense(sfts, with_dense)
    vocabs = {str(s.config.vocab) for s in sfts if s.config.vocab}
    if len(vocabs) > 1:
        raise VocabularyMismatch("compose: the SFTs were trained with different vocabularies")

    diffs: dict[str, SparseDelta] = {}
    overlap: dict[str, int] = {}
    names = list(dict.fromkeys(n for s in sfts for n in s.diffs))
    for name in names:
        parts = [(s.diffs[name], sc) for s, sc in zip(sfts, scales) if name in s.diffs]
        shapes = {p.shape for p, _ in parts}
        if len(shapes) > 1:
            raise CompsftError(f"compose: tensor {name!r} has different shapes {sorted(shapes)}")
        shape = parts[0][0].shape
        work = torch.promote_types(parts[0][0].values.dtype, torch.float32)
        idx = torch.cat([p.indices.long() for p, _ in parts])
        vals = torch.cat([p.values.to(work) * sc for p, sc in parts])
        if len(parts) > 1:
            uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
            summed = torch.zeros(uniq.numel(), dtype=work, device=vals.device).index_add_(0, inverse, vals)
            overlap[name] = idx.numel() - uniq.numel()
            idx, vals = uniq, summed
        else:
            overlap[name] = 0
        numel = 1
        for d in shape:
            numel *= d
        diffs[name] = SparseDelta(shape, idx.to(index_dtype(numel)), vals.to(parts[0][0].values.dtype))

    dense: dict[str, torch.Tensor] = {}
    for s, keep in zip(sfts, dense_flags):
        if not keep:
            continue
        for name, t in s.dense.items():
            if name in dense and not torch.equal(dense[name], t):
                raise CompsftError(f"compose: dense parameter {name!r} differs between the inputs")
            dense[name] = t
    prints = [s.config.base_fingerprint for s in sfts if s.config.base_fingerprint]
    merged_print = None
    if prints:
        merged_print = {"method": prints[0]["method"], "tensors": {}}
        for p in prints:
            merged_print["tensors"].update(p.get("tensors", {}))
    task, labels = task_labels(sfts)
    training: dict = {
        "composed_from": [
            {"kind": s.config.kind, "language": s.config.language, "task": s.config.task, "k": s.k, "scale": sc,
             "dense": keep}
            for s, sc, keep in zip(sfts, scales, dense_flags)
        ]
    }
    if labels:
        training["labels"] = labels  # the head's label map travels with the composition
    config = SftConfig(
        kind="composed",
        task=task,
        base_model=sfts[0].config.base_model,
        base_fingerprint=merged_print,
        vocab=sfts[0].config.vocab,
        num_eligible=sfts[0].config.num_eligible,
        training=training,
    )
    out = SparseFineTuning(diffs, dense, config)
    out.overlap = overlap
    total = sum(overlap.values())
    logger.info("compose: %d SFTs, k=%s, %s entries overlap", len(sfts), f"{out.k:,}", f"{total:,}")
    return out


def check_fits(model: torch.nn.Module, sft: SparseFineTuning, source: str | None = None) -> None:
    """A CompsftError naming the tensor unless every sparse tensor of `sft` is a parameter of `model`
    with the same shape; dense tensors are checked where the model has them (a task head is new on a
    masked-LM base model)."""
    src = source or _source(sft)
    table = dict(model.named_parameters(remove_duplicate=False))
    for name, delta in sft.diffs.items():
        _target(model, table, src, "tensor", name, delta.shape)
    for name, tensor in sft.dense.items():
        if _resolve(model, table, name) is not None:
            _target(model, table, src, "dense tensor", name, tensor.shape)


def base_fingerprint(model: torch.nn.Module, names) -> dict:
    """The fingerprint of θ0 for `names`, seen through any SFTs applied to `model`: a task SFT
    trained with the source language SFT applied records θ0, not θ0 + φ_source."""
    table = dict(model.named_parameters(remove_duplicate=False))
    samples: dict[str, tuple[tuple[int, ...], torch.Tensor]] = {}
    for name in names:
        target = _resolve(model, table, name)
        if target is None:
            raise CompsftError(f"fingerprint: {name!r} is not a parameter of the model")
        param = table[target]
        samples[name] = (tuple(param.shape), _base_sample(model, param, fp.sample_positions(param.numel())))
    return fp.from_samples(samples)
