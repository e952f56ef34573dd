"""NAS for parameter-efficient fine-tuning by pruning (Lawton et al. 2023), as a compsft trainer.

The search space: LoRA of rank r on every linear layer of the encoder, ``W0 + s · B A`` (A: r × in,
random; B: out × r, zero; s = alpha / r), plus a trainable difference Δb on every bias vector of
the encoder (BitFit). Both are `torch.nn.utils.parametrize` parametrizations of the frozen weights,
with 0/1 masks that pruning sets to 0. Heads (a tagger's classifier) are trained dense.

1. **Search**: train the whole space for `search_steps`; it is split into `rounds` segments and,
   at the end of each, every unit is scored by the first-order estimate of the loss change when it
   is removed, |θ · ḡ| with ḡ the mean gradient over the segment's last `score_steps` steps:
   the dot product over a rank-1 LoRA component (row j of A and column j of B) or over a bias
   vector (**structured**), or |θ_i ḡ_i| per entry of A, B and Δb (**unstructured**). The lowest
   units are pruned until the trainable count is at most the round's target, which falls
   geometrically from the full space to the budget at the last round.
2. **Retrain**: the surviving architecture is re-initialised (A random, B and Δb zero, the heads
   back to their initial values) and trained for `retrain_steps` with a fresh optimizer.

The found architecture (its masks and pruning history) is written to the work directory when the search
ends (`SEARCH_FILE`), so a run resumed after an interruption in the retraining skips the search; the
retraining then starts again from its beginning, which is where it started anyway (re-initialised, fixed
seed), so the resumed result equals an uninterrupted one. An interruption during the search loses the search.

The result is merged into the weights as a difference, ``ΔW = s · (B ⊙ M_B)(A ⊙ M_A)`` and Δb,
stored as an ordinary compsft SFT (the entries where the difference is not zero, plus dense heads),
so it composes with language SFTs by `compsft.apply`, as a LT-SFT task SFT does. ΔW of a matrix
with any surviving component is dense in that matrix, so its K counts all of them.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from transformers import TrainerCallback

from ..errors import CompsftError
from .selection import select_top_k

logger = logging.getLogger(__name__)

#: the search's result in the work directory: every mask, with the settings and history as metadata
SEARCH_FILE = "nas-pet-search.safetensors"
SEARCH_FORMAT = "compsft-nas-pet-search/1"


@dataclass
class NasPetArguments:
    """Settings of the NAS-for-PET search (structured or unstructured pruning)."""

    structured: bool = field(default=True, metadata={"help": "prune rank-1 components and bias vectors "
                                                             "(False: single entries)"})
    rank: int | None = field(default=None, metadata={
        "help": "LoRA rank r of the search space (None: the smallest power of two >= 8 whose space holds "
                "4 x the budget, at most full rank)"})
    alpha: float | None = field(default=None, metadata={"help": "LoRA scale alpha / r (None: alpha = r)"})
    rounds: int = field(default=3, metadata={"help": "pruning rounds during the search"})
    score_steps: int = field(default=4, metadata={"help": "steps whose mean gradient scores a round"})

    def __post_init__(self) -> None:
        if (self.rank is not None and self.rank < 1) or self.rounds < 1 or self.score_steps < 1:
            raise CompsftError("NAS-PET rank, rounds and score_steps must be >= 1")


class LoraDelta(nn.Module):
    """Parametrization ``W -> W + s · (B ⊙ M_B)(A ⊙ M_A)`` of a linear layer's weight."""

    def __init__(self, out_features: int, in_features: int, rank: int, scale: float, like: Tensor) -> None:
        super().__init__()
        kw = dict(dtype=like.dtype, device=like.device)
        self.scale = scale
        self.A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.B = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.register_buffer("mask_a", torch.ones(rank, in_features, **kw))
        self.register_buffer("mask_b", torch.ones(out_features, rank, **kw))
        self.reset()

    def reset(self) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as peft's LoRA
            self.A.mul_(self.mask_a)
            self.B.zero_()

    def delta(self) -> Tensor:
        return self.scale * (self.B * self.mask_b) @ (self.A * self.mask_a)

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.delta()


class BiasDelta(nn.Module):
    """Parametrization ``b -> b + Δb ⊙ M`` of a bias vector (BitFit)."""

    def __init__(self, like: Tensor) -> None:
        super().__init__()
        self.d = nn.Parameter(torch.zeros_like(like))
        self.register_buffer("mask", torch.ones_like(like))

    def reset(self) -> None:
        with torch.no_grad():
            self.d.zero_()

    def delta(self) -> Tensor:
        return self.d * self.mask

    def forward(self, bias: Tensor) -> Tensor:
        return bias + self.delta()


class PetSpace:
    """The LoRA + bias search space attached to a model's encoder, with its pruning state."""

    def __init__(self, model: nn.Module, args: NasPetArguments) -> None:
        if args.rank is None:
            raise CompsftError("PetSpace needs a rank (see auto_rank)")
        self.args = args
        scale = (args.alpha if args.alpha is not None else args.rank) / args.rank
        self.parts: dict[str, LoraDelta | BiasDelta] = {}
        base = model.base_model
        prefix = {id(m): n for n, m in model.named_modules()}
        for mod in list(base.modules()):
            name = prefix[id(mod)]
            if isinstance(mod, nn.Linear):
                self._attach(mod, "weight", f"{name}.weight",
                             LoraDelta(mod.out_features, mod.in_features, args.rank, scale, mod.weight))
            bias = getattr(mod, "bias", None)
            if isinstance(bias, nn.Parameter) and bias.dim() == 1:
                self._attach(mod, "bias", f"{name}.bias", BiasDelta(bias))
        if not self.parts:
            raise CompsftError(f"{type(model).__name__}: no linear layer or bias in the encoder")
        self.model = model
        self.history: list[dict] = []

    def _attach(self, module: nn.Module, attr: str, name: str, part: nn.Module) -> None:
        getattr(module, attr).requires_grad_(False)
        parametrize.register_parametrization(module, attr, part)
        module.parametrizations[attr].original.requires_grad_(False)
        self.parts[name] = part

    # -- units, costs and scores --------------------------------------------------------------
    def tensors(self, part) -> list[tuple[Tensor, Tensor]]:
        """(parameter, mask) pairs of a part."""
        if isinstance(part, LoraDelta):
            return [(part.A, part.mask_a), (part.B, part.mask_b)]
        return [(part.d, part.mask)]

    def trainable(self) -> int:
        return int(sum(float(m.sum()) for p in self.parts.values() for _, m in self.tensors(p)))

    def size(self) -> int:
        return sum(m.numel() for p in self.parts.values() for _, m in self.tensors(p))

    def unit_scores(self, grads: dict[int, Tensor]) -> tuple[list[tuple[str, int]], Tensor, Tensor]:
        """Structured units (name, component or -1 for a bias), their |θ · ḡ| and their costs; pruned
        units are left out."""
        units, scores, costs = [], [], []
        for name, part in self.parts.items():
            if isinstance(part, LoraDelta):
                prod_a = (part.A * grads[id(part.A)]).sum(1)
                prod_b = (part.B * grads[id(part.B)]).sum(0)
                alive = part.mask_a[:, 0] > 0
                for j in alive.nonzero().flatten().tolist():
                    units.append((name, j))
                    scores.append(float(prod_a[j] + prod_b[j]))
                    costs.append(part.A.shape[1] + part.B.shape[0])
            elif bool(part.mask.any()):
                units.append((name, -1))
                scores.append(float((part.d * grads[id(part.d)]).sum()))
                costs.append(part.d.numel())
        return units, torch.tensor(scores).abs(), torch.tensor(costs)

    @torch.no_grad()
    def prune(self, grads: dict[int, Tensor], target: int) -> dict:
        """Prune the lowest-scoring units until at most `target` entries are trainable."""
        before = self.trainable()
        if before <= target:
            return {"before": before, "after": before, "target": target}
        if self.args.structured:
            units, scores, costs = self.unit_scores(grads)
            order = torch.argsort(scores, stable=True)
            left = before
            for i in order.tolist():
                if left <= target:
                    break
                name, j = units[i]
                part = self.parts[name]
                if j < 0:
                    part.mask.zero_()
                else:
                    part.mask_a[j].zero_()
                    part.mask_b[:, j].zero_()
                left -= int(costs[i])
        else:
            pairs = [pm for p in self.parts.values() for pm in self.tensors(p)]
            # Pruned entries score -1 (below every |θ g|) so that they stay pruned.
            flat = [torch.where(m > 0, (t * grads[id(t)]).abs(), -1.0).reshape(-1).float() for t, m in pairs]
            keep = select_top_k([f.numel() for f in flat], lambda i, pos: flat[i][pos], target)
            for (t, m), idx in zip(pairs, keep):
                new = torch.zeros(m.numel(), dtype=m.dtype, device=m.device)
                new[idx.to(m.device)] = 1
                m.copy_(new.view_as(m) * m)
        for part in self.parts.values():
            for t, m in self.tensors(part):
                t.mul_(m)
        info = {"before": before, "after": self.trainable(), "target": target}
        self.history.append(info)
        return info

    def masks(self) -> dict[str, Tensor]:
        """Every mask by `<tensor name>:<mask>` (the architecture the search found)."""
        out = {}
        for name, part in self.parts.items():
            for mask_name, mask in part.named_buffers():
                out[f"{name}:{mask_name}"] = mask
        return out

    def save_search(self, path: Path, meta: dict, stage: dict) -> None:
        """The found architecture, written atomically: the masks as safetensors; `meta` (plain JSON data,
        what must match on resume), the pruning history and `stage` (the search's record) in its metadata."""
        import json

        from safetensors.torch import save_file

        from ..atomic import atomic_path

        tensors = {k: m.detach().to("cpu", torch.uint8).contiguous() for k, m in self.masks().items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": SEARCH_FORMAT, "meta": json.dumps(meta, sort_keys=True),
                                                   "history": json.dumps(self.history), "stage": json.dumps(stage)})

    def load_search(self, path: Path, meta: dict) -> dict:
        """Put back a saved architecture and return the search's record; a file from other settings or a
        damaged one is a `CompsftError`."""
        import json

        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                info = f.metadata() or {}
                saved = {k: f.get_tensor(k) for k in f.keys()}
            history = json.loads(info.get("history", "null"))
            saved_meta = json.loads(info.get("meta", "null"))
            stage = json.loads(info.get("stage", "null"))
        except (OSError, SafetensorError, ValueError, RecursionError) as err:
            raise CompsftError(f"{path}: unreadable NAS-PET search file ({err}); delete it to search again") from None
        if info.get("format") != SEARCH_FORMAT or not isinstance(history, list) or not isinstance(stage, dict):
            raise CompsftError(f"{path}: not a NAS-PET search file ({SEARCH_FORMAT})")
        now = json.loads(json.dumps(meta, sort_keys=True))
        if not isinstance(saved_meta, dict) or saved_meta != now:
            old = saved_meta if isinstance(saved_meta, dict) else {}
            fields = sorted(k for k in set(old) | set(now) if old.get(k) != now.get(k))
            raise CompsftError(f"{path}: searched with other settings (fields {', '.join(fields)}); delete it "
                               "to search again")
        masks = self.masks()
        if set(saved) != set(masks):
            raise CompsftError(f"{path}: its masks are not those of this model's search space")
        for key, mask in masks.items():
            value = saved[key]
            if value.shape != mask.shape or bool((value > 1).any()):
                raise CompsftError(f"{path}: mask {key!r} has shape {tuple(value.shape)} or values other than "
                                   f"0/1 (expected shape {tuple(mask.shape)})")
        with torch.no_grad():
            for key, mask in masks.items():
                mask.copy_(saved[key].to(mask.device, mask.dtype))
            for part in self.parts.values():
                for t, m in self.tensors(part):
                    t.mul_(m)
        self.history = history
        return stage

    def reset(self, seed: int) -> None:
        """Re-initialise the surviving architecture (for the retraining)."""
        torch.manual_seed(seed)
        for part in self.parts.values():
            part.reset()

    # -- the result ----------------------------------------------------------------------------
    @torch.no_grad()
    def deltas(self) -> dict[str, Tensor]:
        """The merged difference of every tensor with a surviving unit."""
        out = {}
        for name, part in self.parts.items():
            d = part.delta().detach()
            if bool((d != 0).any()):
                out[name] = d.clone()
        return out

    def survivors(self) -> dict[str, dict]:
        """Per tensor: surviving components (LoRA, of r) or entries (bias), for the plot."""
        out = {}
        for name, part in self.parts.items():
            if isinstance(part, LoraDelta):
                out[name] = {"kind": "lora", "components": int((part.mask_a.sum(1) > 0).sum()),
                             "rank": part.A.shape[0], "entries": int(part.mask_a.sum() + part.mask_b.sum()),
                             "size": part.A.numel() + part.B.numel()}
            else:
                out[name] = {"kind": "bias", "entries": int(part.mask.sum()), "size": part.d.numel()}
        return out

    def detach(self) -> None:
        """Remove the parametrizations, leaving the frozen weights in place."""
        for name in self.parts:
            module_name, _, attr = name.rpartition(".")
            parametrize.remove_parametrizations(self.model.get_submodule(module_name), attr,
                                                leave_parametrized=False)


def survivors_by_layer(survivors: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Share of entries surviving, by layer type (layer numbers replaced by '*') and layer number
    ('-' outside the numbered layers): the data of the "which components survive" plot."""
    import re

    out: dict[str, dict[str, list[int]]] = {}
    for name, s in survivors.items():
        m = re.search(r"\.(\d+)\.", name)
        row = out.setdefault(re.sub(r"\.\d+\.", ".*.", name), {}).setdefault(m.group(1) if m else "-", [0, 0])
        row[0] += s["entries"]
        row[1] += s["size"]
    return {t: {layer: round(a / b, 4) for layer, (a, b) in rows.items()} for t, rows in out.items()}


def auto_rank(model: nn.Module, budget: int, least: int = 8, factor: int = 4) -> int:
    """The smallest power of two >= `least` whose search space holds `factor` x `budget` entries
    (pruning needs room to choose), at most the largest full rank of the encoder's linear layers."""
    linears = [m for m in model.base_model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise CompsftError(f"{type(model).__name__}: no linear layer in the encoder")
    per_rank = sum(m.in_features + m.out_features for m in linears)
    biases = sum(m.bias.numel() for m in model.base_model.modules()
                 if isinstance(getattr(m, "bias", None), nn.Parameter) and m.bias.dim() == 1)
    full = max(min(m.in_features, m.out_features) for m in linears)
    rank = least
    while rank < full and rank * per_rank + biases < factor * budget:
        rank *= 2
    return min(rank, full)


def round_targets(size: int, budget: int, rounds: int) -> list[int]:
    """Trainable counts after each round: geometric from the full space down to the budget."""
    budget = min(budget, size)
    return [int(round(size * (budget / size) ** (i / rounds))) for i in range(1, rounds + 1)]


class PruneCallback(TrainerCallback):
    """Accumulates the gradients of the last `score_steps` steps of each segment and prunes after it."""

    def __init__(self, space: PetSpace, prune_at: dict[int, int], score_steps: int) -> None:
        self.space, self.prune_at, self.score_steps = space, prune_at, score_steps
        self.grads: dict[int, Tensor] = {}
        self.count = 0

    def _scoring(self, step: int) -> bool:
        nxt = min((s for s in self.prune_at if s >= step), default=None)
        return nxt is not None and nxt - step < self.score_steps

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self._scoring(state.global_step + 1):
            return
        for part in self.space.parts.values():
            for t, _ in self.space.tensors(part):
                if t.grad is not None:
                    self.grads.setdefault(id(t), torch.zeros_like(t)).add_(t.grad)
        self.count += 1

    def on_step_end(self, args, state, control, **kwargs):
        target = self.prune_at.get(state.global_step)
        if target is None:
            return
        grads = {}
        for part in self.space.parts.values():
            for t, _ in self.space.tensors(part):
                grads[id(t)] = self.grads.get(id(t), torch.zeros_like(t)) / max(1, self.count)
        info = self.space.prune(grads, target)
        info["step"] = state.global_step
        logger.info("NAS-PET step %d: %s -> %s trainable (target %s)", state.global_step, info["before"],
                    info["after"], target)
        self.grads, self.count = {}, 0


def prune_schedule(search_steps: int, size: int, budget: int, args: NasPetArguments) -> dict[int, int]:
    """Step -> trainable target after that step's pruning."""
    targets = round_targets(size, budget, args.rounds)
    steps = [max(1, round(search_steps * i / args.rounds)) for i in range(1, args.rounds + 1)]
    return dict(zip(steps, targets))


def train_nas_pet_sft(
    task: str,
    model: str | Path,
    train: str | Path,
    out: str | Path,
    *,
    source_sft: str | Path | None = None,
    k: int | None = None,
    density: float | None = None,
    nas_args: NasPetArguments | None = None,
    search: tuple = (None, 200, 200),
    retrain: tuple = (None, 200, 200),
    lr: float = 5e-4,
    batch_size: int = 8,
    max_length: int | None = None,
    max_sentences: int | None = None,
    seed: int = 42,
    logging_steps: int = 50,
    work_dir: str | Path | None = None,
    cpu: bool = False,
    callbacks: list | None = None,
    selection=None,
    resume: bool = False,
) -> "NasPetResult":
    """Search a PET architecture of at most K trainable entries on a task, retrain it, save it as an SFT.

    K is LT-SFT's task K (`k` / `density`, default the paper's, scaled), so the methods compare at the
    same number of trainable entries; the source language SFT is applied while training, as for a
    LT-SFT task SFT. Example::

        train_nas_pet_sft("pos", "models/e5", "ud:en_ewt:train", "out/pos-nas", source_sft="sfts/eng",
                                            nas_args=NasPetArguments(structured=False), search=(None, 200, 200))

    `search` and `retrain` are (max_epochs, min_steps, max_steps), as the LT-SFT recipes' phases.
    `selection`, a `DevSelection`, scores the retraining on source dev data; the PET at its best check
    is merged as well and returned as `NasPetResult.selected`. `resume`: take the search's result from
    `work_dir` if an earlier run finished its search there (see the module docstring).
    """
    from transformers import AutoTokenizer, Trainer, set_seed

    from ..merge import apply, base_fingerprint
    from ..serialization import load_sft
    from ..sft import SftConfig, SparseFineTuning
    from ..tasks import get_task, resolve_data
    from .arguments import SftArguments
    from .params import eligible_parameters, head_parameters, resolve_k
    from .recipes import _check_model_dir, _training_args, _vocab

    nas_args = nas_args or NasPetArguments()
    model, out = Path(model), Path(out)
    _check_model_dir(model)
    spec = get_task(task)
    set_seed(seed)
    sentences = spec.read(resolve_data(train))[:max_sentences or None]
    if not sentences:
        raise CompsftError(f"{train}: no sentences")
    labels = spec.label_list(sentences)
    tokenizer = AutoTokenizer.from_pretrained(model)
    task_model = spec.build_model(model, labels)
    if source_sft is not None:
        apply(task_model, load_sft(source_sft), with_dense=False)
    dataset = spec.encode(sentences, tokenizer, labels, max_length=max_length)
    budget = resolve_k(sum(p.numel() for p in eligible_parameters(task_model).values()), k, density, "task",
                       config=task_model.config)
    for p in task_model.base_model.parameters():
        p.requires_grad_(False)
    if nas_args.rank is None:
        nas_args = replace(nas_args, rank=auto_rank(task_model, budget))
    space = PetSpace(task_model, nas_args)
    heads = head_parameters(task_model)
    heads0 = {n: p.detach().clone() for n, p in heads.items()}
    size = space.size()
    per_epoch = max(1, math.ceil(len(dataset) / batch_size))
    lengths = SftArguments(full_ft_max_epochs=search[0], full_ft_min_steps=search[1], full_ft_max_steps=search[2],
                           sparse_ft_max_epochs=retrain[0], sparse_ft_min_steps=retrain[1],
                           sparse_ft_max_steps=retrain[2])
    search_steps, retrain_steps = lengths.phase_steps(1, per_epoch), lengths.phase_steps(2, per_epoch)
    if search_steps < nas_args.rounds:
        raise CompsftError(f"NAS-PET needs at least {nas_args.rounds} search steps (one per pruning round)")
    schedule = prune_schedule(search_steps, size, budget, nas_args)
    work = Path(work_dir) if work_dir else out.with_name(out.name + ".work")
    args = _training_args(work, lr=lr, batch_size=batch_size, grad_accum=1, seed=seed, save_steps=0,
                          logging_steps=logging_steps, weight_decay=0.0, cpu=cpu)
    collator = spec.collator(tokenizer)
    trained = {}
    search_file = work / SEARCH_FILE
    meta = {"nas_pet": asdict(nas_args), "budget": budget, "space": size, "search_steps": search_steps,
            "seed": seed, "lr": lr, "batch_size": batch_size, "sentences": len(sentences), "labels": list(labels),
            "model": str(model), "train": str(train), "source_sft": str(source_sft) if source_sft else None,
            "max_length": max_length}
    stages = [("search", search_steps), ("retrain", retrain_steps)]
    if resume and search_file.is_file():
        trained["search"] = space.load_search(search_file, meta)
        stages = stages[1:]
        logger.info("NAS-PET: the search's architecture from %s (%d trainable)", search_file, space.trainable())
    for stage, steps in stages:
        if stage == "retrain":
            space.reset(seed)
            with torch.no_grad():
                for n, p in heads.items():
                    p.copy_(heads0[n])
        args.max_steps = steps
        set_seed(seed + (stage == "retrain"))
        extra = [PruneCallback(space, schedule, nas_args.score_steps)] if stage == "search" else []
        if stage == "retrain" and selection is not None:
            extra.append(selection)  # the architecture is fixed from here on: select among its states
        trainer = Trainer(model=task_model, args=args, train_dataset=dataset, data_collator=collator,
                          callbacks=[*(callbacks or []), *extra])
        result = trainer.train()
        trained[stage] = {"steps": steps, "train_loss": round(float(result.training_loss), 5),
                          "trainable": space.trainable()}
        if stage == "search" and int(os.environ.get("RANK", "0")) == 0:
            work.mkdir(parents=True, exist_ok=True)
            space.save_search(search_file, meta, trained["search"])
    deltas = space.deltas()
    survivors = space.survivors()
    chosen = None
    if selection is not None and selection.best is not None:
        # The best check's PET and heads, merged the same way; then the final state back in place.
        previous = selection.restore_into(task_model)
        chosen = (space.deltas(), {n: p.detach().cpu().clone() for n, p in heads.items()})
        selection.restore_into(task_model, previous)
    space.detach()
    diffs = _sparse(deltas)
    fingerprint = base_fingerprint(task_model, list(diffs))
    method = "nas-pet-" + ("structured" if nas_args.structured else "unstructured")
    config = SftConfig(kind="task", task=task, base_model=str(model), vocab=_vocab(tokenizer),
                       base_fingerprint=fingerprint, num_eligible=sum(m.numel() for m in deltas.values()) or None,
                       training={"method": method, "labels": list(labels), "train": str(train),
                                 "sentences": len(sentences), "source_sft": str(source_sft) if source_sft else None,
                                 "nas_pet": asdict(nas_args), "budget": budget, "space": size,
                                 "trainable": space.trainable(), "prune_history": space.history,
                                 "stages": trained, "learning_rate": lr, "batch_size": batch_size, "seed": seed,
                                 "survivors": survivors})
    sft = SparseFineTuning(diffs, {n: p.detach().cpu().clone() for n, p in heads.items()}, config)
    sft.validate()
    selected = None
    if chosen is not None:
        picked = _sparse(chosen[0])
        selected = SparseFineTuning(picked, chosen[1], replace(
            config, base_fingerprint=base_fingerprint(task_model, list(picked)),
            training={**config.training, "dev_selected": selection.summary()}))
        selected.validate()
    if int(os.environ.get("RANK", "0")) == 0:
        sft.save(out)
    return NasPetResult(sft=sft, trainable=space.trainable(), budget=budget, space=size, survivors=survivors,
                        history=list(space.history), selected=selected)


def _sparse(deltas: dict[str, Tensor]) -> dict:
    """The non-zero entries of each merged difference, as SFT deltas."""
    from ..sft import SparseDelta, index_dtype

    diffs = {}
    for name, d in deltas.items():
        flat = d.reshape(-1)
        idx = (flat != 0).nonzero().squeeze(1)
        diffs[name] = SparseDelta(tuple(d.shape), idx.to(index_dtype(flat.numel())).cpu(), flat[idx].float().cpu())
    return diffs


@dataclass
class NasPetResult:
    """What a NAS-PET run produced: the merged SFT and the architecture it found."""

    sft: object
    trainable: int
    budget: int
    space: int
    survivors: dict
    history: list
    selected: object = None  # the SFT at the best source-dev check of the retraining, if one was asked for
