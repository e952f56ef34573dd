"""`SparseFineTuner`: LT-SFT as a `transformers.Trainer`.

`train()` runs the two phases as two ordinary `Trainer.train()` calls, each with a fresh optimizer
and schedule:

1. full fine-tuning of the eligible parameters and the heads (skipped by masks that do not need it);
2. the mask is chosen (`compsft.training.masks`), every parameter (heads included) is reset to θ0,
   the masked tensors become θ0 + scatter(values) (`compsft.training.sparse`) and only the values
   and the heads are trained.

With `full_l1_reg` / `sparse_l1_reg` = l1, each phase's objective is the model's loss plus
``l1 · Σ|θ − θ0| / N`` over the trainable tensors, N the number of parameters of the model as given
(`compsft.training.l1`): the rule of the reference implementation, so the same `--l1` has the same
strength. The term is added in `compute_loss`, so it goes through gradient accumulation (counted
once per optimizer step) and gradient clipping like the loss; `l1_reg_loss` is logged apart.

The result (`self.sft`) is θ2 − θ0 on the mask plus the heads, dense; afterwards the model holds
θ0 + φ, applied with `compsft.apply` (so `compsft.revert` takes it off again).

Work directory (`args.output_dir`): ``phase1/`` and ``phase2/`` hold the Trainer's checkpoints,
``heads0.safetensors`` the heads' initial values, ``mask.safetensors`` the mask once phase 1 is
done. `train(resume_from_checkpoint=True)` continues from there: in phase 1 from its last
checkpoint, or, once the mask exists, in phase 2 with the same mask. A checkpoint's files are
checked first (`check_checkpoint`): a missing or damaged one is an error naming it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Sequence

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, set_seed

from ..atomic import atomic_path
from ..errors import CompsftError
from ..merge import apply, base_fingerprint
from ..sft import SftConfig, SparseDelta, SparseFineTuning, index_dtype
from .arguments import SftArguments
from .l1 import l1_distance
from .masks import get_mask_strategy
from .mlm import MaskedPositionsOnly
from .params import density_by_layer_type, freeze_for_lt_sft, resolve_k, untie_output_embeddings
from .sparse import attach_sparse, detach_sparse

logger = logging.getLogger(__name__)

HEADS_FILE = "heads0.safetensors"
MASK_FILE = "mask.safetensors"
START_FILE = "phase2-start.safetensors"  # θ1 − θ0 on the mask and θ1's heads, for prune-retrain


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest `checkpoint-N` that was written to the end. The Trainer writes `trainer_state.json`
    last, so a checkpoint cut short by a kill or a full disk lacks it and is skipped, not resumed from."""
    done = []
    for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = path.name[len(PREFIX_CHECKPOINT_DIR) + 1:]
        if step.isdigit() and (path / "trainer_state.json").is_file():
            done.append((int(step), path))
    if not done:
        return None
    return str(max(done)[1])


#: the model's weights in a checkpoint, in any of the layouts `Trainer.save_model` writes
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")


def check_checkpoint(folder: str | os.PathLike, required: Sequence[str] = ()) -> None:
    """Raise a `CompsftError` naming the first file of checkpoint `folder` that is missing or unreadable.

    The Trainer would otherwise fail with a library traceback, or worse, resume quietly without a
    missing optimizer file. `required`: names that must be there besides the Trainer's state and the
    model's weights. Checked without unpickling anything: JSON is parsed, safetensors headers are
    read (a truncated file fails there; its tensor data has no checksum), and torch's zip files
    (``*.pt``, ``*.pth``, ``*.bin``) have every member's CRC verified, which torch.load does not do.
    """
    import zipfile

    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    hint = f"delete {folder} to resume from the checkpoint before it"
    if not any((folder / name).is_file() for name in MODEL_FILES):
        raise CompsftError(f"{folder}: no model weights ({MODEL_FILES[0]}); {hint}")
    for name in ("trainer_state.json", *required):
        if not (folder / name).is_file():
            raise CompsftError(f"{folder / name}: missing; {hint}")
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        try:
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    f.metadata()
            elif path.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(path) as z:
                    bad = z.testzip()
                if bad is not None:
                    raise ValueError(f"member {bad} fails its CRC check")
        except (OSError, ValueError, RecursionError, zipfile.BadZipFile, SafetensorError) as err:
            raise CompsftError(f"{path}: unreadable checkpoint file ({type(err).__name__}: {err}); {hint}") from err


def _check_master_weights(model: torch.nn.Module, args) -> None:
    """Mixed precision keeps fp32 master weights: θ0, the selection scores |θ1 − θ0|, the L1 term and the
    optimizer's updates are computed on them. A model loaded in a half type would quietly lose all that."""
    if not (getattr(args, "bf16", False) or getattr(args, "fp16", False)):
        return
    half = next((n for n, p in model.named_parameters() if p.dtype != torch.float32), None)
    if half is not None:
        raise CompsftError(f"mixed precision trains fp32 master weights, but {half} is "
                           f"{dict(model.named_parameters())[half].dtype}: load the model in fp32")


class SparseFineTuner(Trainer):
    """A `Trainer` that trains a sparse fine-tuning (LT-SFT) instead of a dense model.

    Extra keyword arguments: `sft_args` (`SftArguments`), `sft_config` (`SftConfig` with kind,
    language/task, base model, vocab filled in by the caller), `mlm` (default: the model class
    ends in ForMaskedLM; untie and freeze the output embeddings, logits at masked positions only).
    Everything else goes to `Trainer`.

    Example::

        tuner = SparseFineTuner(model=model, args=training_args, train_dataset=ds,
                                data_collator=collator, sft_args=SftArguments(sft_kind="task"))
        tuner.train()
        tuner.save_sft("out/sft")
    """

    def __init__(self, model=None, args=None, *, sft_args: SftArguments | None = None,
                 sft_config: SftConfig | None = None, mlm: bool | None = None, **kwargs) -> None:
        if model is None:
            raise CompsftError("SparseFineTuner needs a model (model_init is not supported)")
        self.sft_args = sft_args or SftArguments()
        self.mlm = type(model).__name__.endswith("ForMaskedLM") if mlm is None else mlm
        # The L1 term's N: the model's parameters as given, tied tensors once (the reference's count),
        # taken before the output embeddings are untied.
        self.l1_normaliser = sum(p.numel() for p in model.parameters())
        if self.mlm:
            untie_output_embeddings(model)
            # The MLM hooks turn the model's per-micro-batch mean into sum / num_items_in_batch, so
            # the Trainer must hand num_items_in_batch over, also where forward() takes no **kwargs
            # (transformers 4.57's BERT); the hook takes it out of the call again.
            model.accepts_loss_kwargs = True
        eligible, heads = freeze_for_lt_sft(model, self.sft_args.freeze_layer_norm)
        if not self.mlm and type(model).__module__.startswith("transformers.") \
                and not hasattr(model, "accepts_loss_kwargs"):
            # transformers' own classifiers take **kwargs but return a per-batch mean, ignoring
            # num_items_in_batch; told so, the Trainer divides by the accumulation steps itself.
            model.accepts_loss_kwargs = False
        super().__init__(model=model, args=args, **kwargs)
        _check_master_weights(self.model, self.args)
        self._eligible_names = list(eligible)
        self._head_names = list(heads)
        params = dict(self.model.named_parameters())
        self.num_eligible = sum(params[n].numel() for n in self._eligible_names)
        self.k = resolve_k(self.num_eligible, self.sft_args.k, self.sft_args.density, self.sft_args.sft_kind,
                           config=getattr(self.model, "config", None))
        logger.info("LT-SFT: K = %s of %s eligible parameters (density %.4f%%), %d head tensors",
                    f"{self.k:,}", f"{self.num_eligible:,}", 100 * self.k / self.num_eligible, len(heads))
        # θ0: the weights as given (for a task SFT, with the source language SFT applied).
        self._theta0 = {n: params[n].detach().clone() for n in self._eligible_names}
        self._heads0 = {n: params[n].detach().clone() for n in self._head_names}
        self.sft_config = sft_config or SftConfig(kind=self.sft_args.sft_kind)
        # The SFT's base is the pretrained model, not θ0 + φ_source: ask merge for the base values.
        self._base_fingerprint = self._fingerprint_base()
        self._phase = 0
        self._sparse: dict = {}
        self.phase_info: dict[str, dict] = {}
        self.sft: SparseFineTuning | None = None
        self.masks: dict[str, torch.Tensor] | None = None
        self.phase2_start: tuple[dict, dict] | None = None  # (values, heads) phase 2 started from, if not θ0
        self._mlm_hooks = MaskedPositionsOnly(self.model) if self.mlm else None
        self._l1_log = [0.0, 0]  # Σ of the L1 term over the micro-batches since the last log, and their count

    # -- the two phases -------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Run phase 1 (if the mask strategy needs it) and phase 2; returns the last phase's TrainOutput.

        `resume_from_checkpoint=True` continues an interrupted run from `args.output_dir`.
        """
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            raise CompsftError("SparseFineTuner resumes from its work directory (args.output_dir): pass True")
        resume = bool(resume_from_checkpoint)
        work = Path(self.args.output_dir)
        strategy = get_mask_strategy(self.sft_args.mask_strategy)
        self._init_heads(work / HEADS_FILE, resume)
        out, start = None, None
        mask_file = work / MASK_FILE
        if resume and mask_file.exists():
            masks = self._load_mask(mask_file)
            logger.info("resuming in phase 2 with the mask of %s", mask_file)
        else:
            if strategy.needs_phase1:
                out = self._run_phase(1, work, resume, trial, ignore_keys_for_eval)
                theta1 = {n: p.detach() for n, p in self._named(self._eligible_names).items()}
                t0 = time.perf_counter()
                masks = strategy.fn(self._theta0, theta1, self.k, seed=self.sft_args.mask_seed)
                self.phase_info["selection"] = {"seconds": round(time.perf_counter() - t0, 3)}
                if not strategy.runs_phase2 or strategy.phase2_from_theta1:
                    values = {n: theta1[n].reshape(-1)[idx.to(theta1[n].device)]
                              - self._theta0[n].reshape(-1)[idx.to(theta1[n].device)] for n, idx in masks.items()}
                    heads = {n: p.detach().clone() for n, p in self._named(self._head_names).items()}
                    start = (values, heads)
                if not strategy.runs_phase2:
                    self._check_same_on_all_ranks(masks)
                    self._reset_to_theta0()
                    self._finish(masks, values, heads)
                    return out
            else:
                t0 = time.perf_counter()
                masks = strategy.fn(self._theta0, None, self.k, seed=self.sft_args.mask_seed)
                self.phase_info["selection"] = {"seconds": round(time.perf_counter() - t0, 3)}
            self._check_same_on_all_ranks(masks)
            self._reset_to_theta0()
            if self.is_world_process_zero():
                if start is not None:  # before the mask: a mask on disk means phase 2 can start
                    self._save_start(work / START_FILE, *start)
                self._save_mask(mask_file, masks)
            self._barrier()
        self.masks = masks
        self._sparse = attach_sparse(self.model, masks)
        if strategy.phase2_from_theta1:  # prune, then retrain: phase 2 starts from θ1 on the mask
            self.phase2_start = start or self._load_start(work / START_FILE)
            self._set_phase2_start(*self.phase2_start)
        try:
            out = self._run_phase(2, work, resume, trial, ignore_keys_for_eval)
            heads = {n: p.detach().clone() for n, p in self._named(self._head_names).items()}
        finally:
            values = detach_sparse(self.model, self._sparse)
            self._sparse = {}
            for p in self._named(self._eligible_names).values():
                p.requires_grad_(True)
        self._reset_to_theta0()
        self._finish(masks, values, heads)
        return out

    def _run_phase(self, phase, work, resume, trial, ignore_keys_for_eval):
        args = self.args
        phase_dir = work / f"phase{phase}"
        try:
            steps_per_epoch = max(1, len(self.get_train_dataloader()) // args.gradient_accumulation_steps)
        except TypeError:  # an iterable data set: lengths in steps only
            steps_per_epoch = 0
        steps = self.sft_args.phase_steps(phase, steps_per_epoch)
        checkpoint = last_complete_checkpoint(phase_dir) if resume and phase_dir.is_dir() else None
        args.output_dir = str(phase_dir)
        args.max_steps = steps
        # A fresh optimizer and schedule per phase, and an unwrapped model: phase 2 has other parameters.
        self.optimizer, self.lr_scheduler = None, None
        self.model_wrapped = self.model
        self._phase = phase
        if checkpoint:
            self._prepare_resume(Path(checkpoint))
        # Each phase starts from a known RNG state, so a resumed phase 2 matches an uninterrupted one.
        set_seed(args.seed + phase)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        logger.info("phase %d: %d steps (%d per epoch), %s trainable parameters%s", phase, steps,
                    steps_per_epoch, f"{trainable:,}", f", resuming from {checkpoint}" if checkpoint else "")
        t0 = time.perf_counter()
        try:
            out = super().train(resume_from_checkpoint=checkpoint, trial=trial,
                                ignore_keys_for_eval=ignore_keys_for_eval)
        finally:
            args.output_dir = str(work)
        self.phase_info[f"phase{phase}"] = {
            "steps": steps, "seconds": round(time.perf_counter() - t0, 2),
            "train_loss": round(float(out.training_loss), 5), "resumed_from": checkpoint,
        }
        return out

    def _prepare_resume(self, checkpoint: Path) -> None:
        """Before the Trainer resumes from `checkpoint`: check its files (a subclass also puts back what
        the Trainer does not restore itself)."""
        required = [] if self.args.save_only_model else ["optimizer.pt", "scheduler.pt"]
        check_checkpoint(checkpoint, required)

    # -- L1 and logging ---------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's loss plus, while training, the L1 pull toward θ0 (`compsft.training.l1`):
        ``l1 · Σ|θ − θ0| / N`` once per optimizer step, N = `self.l1_normaliser`."""
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        l1 = self.sft_args.full_l1_reg if self._phase == 1 else self.sft_args.sparse_l1_reg
        if not l1 or not model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        term = l1 * l1_distance(self._l1_pairs()) / self.l1_normaliser
        self._l1_log[0] += float(term.detach())
        self._l1_log[1] += 1
        micro_batches = getattr(self, "current_gradient_accumulation_steps", None) or \
            self.args.gradient_accumulation_steps
        if self._loss_is_scaled_for_accumulation(num_items_in_batch):
            # The Trainer sums these losses over the step's micro-batches as they are: the term
            # must come in 1/micro_batches at a time to count once per optimizer step.
            term = term / micro_batches
        # Otherwise the Trainer divides the whole loss by micro_batches itself.
        loss = loss + term.to(loss.device, loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _loss_is_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Whether `Trainer.training_step` takes compute_loss's result as already divided over the
        accumulated micro-batches (it then does not divide it by their number); transformers' rule."""
        explicit = getattr(self, "loss_is_scaled_for_ga", None)
        if explicit is not None:
            return bool(explicit)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or getattr(self, "compute_loss_func", None) is not None)

    def _l1_pairs(self):
        """(θ, θ0) for every trainable tensor of the current phase; (values, None) for phase 2's masks."""
        if self._phase == 1:
            for n, p in self._named(self._eligible_names).items():
                yield p, self._theta0[n]
        else:
            for sv in self._sparse.values():
                yield sv.values, None
        for n, p in self._named(self._head_names).items():
            yield p, self._heads0[n]

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Tag every log entry with the phase it belongs to (each phase counts its own steps)."""
        logs = dict(logs)
        logs["phase"] = self._phase
        if "loss" in logs and self._l1_log[1]:
            # Part of "loss" (the objective); the reference logs it apart the same way.
            logs["l1_reg_loss"] = round(self._l1_log[0] / self._l1_log[1], 6)
            self._l1_log = [0.0, 0]
        super().log(logs, *args, **kwargs)

    # -- the result -------------------------------------------------------------------------------
    def _finish(self, masks, values, heads) -> None:
        params = self._named(self._eligible_names)
        diffs = {}
        for name, idx in masks.items():
            if idx.numel() == 0:
                continue
            shape = tuple(params[name].shape)
            n = math.prod(shape)
            diffs[name] = SparseDelta(shape, idx.to(index_dtype(n)).cpu(), values[name].detach().float().cpu())
        dense = {n: t.detach().cpu() for n, t in heads.items()}
        config = self.sft_config
        config.num_eligible = self.num_eligible
        config.base_fingerprint = {**self._base_fingerprint,
                                   "tensors": {n: v for n, v in self._base_fingerprint["tensors"].items() if n in diffs}}
        config.training = {
            **config.training,
            "method": "lt-sft",
            "mask_strategy": self.sft_args.mask_strategy,
            "k": self.k,
            "density": self.k / self.num_eligible,
            "learning_rate": self.args.learning_rate,
            "batch_size": self.args.per_device_train_batch_size,
            "gradient_accumulation_steps": self.args.gradient_accumulation_steps,
            "world_size": self.args.world_size,
            "seed": self.args.seed,
            "full_l1_reg": self.sft_args.full_l1_reg,
            "sparse_l1_reg": self.sft_args.sparse_l1_reg,
            "l1_normaliser": self.l1_normaliser,
            "freeze_layer_norm": self.sft_args.freeze_layer_norm,
            "phases": self.phase_info,
        }
        if self.args.bf16 or self.args.fp16:  # recorded only when mixed, so fp32 configs stay as they were
            config.training["precision"] = "bf16" if self.args.bf16 else "fp16"
        self.sft = SparseFineTuning(diffs, dense, config)
        self.sft.validate()
        apply(self.model, self.sft, with_dense=True, check_base=False)
        for line in self.summary_lines():
            (logger.debug if line.startswith("  ") else logger.info)(line)

    def save_sft(self, directory: str | os.PathLike, **kwargs) -> Path | None:
        """Save the trained SFT (on the main process only); returns the directory or None."""
        if self.sft is None:
            raise CompsftError("no SFT yet: call train() first")
        path = None
        if self.is_world_process_zero():
            path = self.sft.save(directory, **kwargs)
            self.phase_info["output"] = str(directory)
        self._barrier()
        return path

    def summary(self) -> dict:
        """K, density per layer type, time per phase."""
        shapes = {n: tuple(p.shape) for n, p in self._named(self._eligible_names).items()}
        counts = {n: int(v.numel()) for n, v in (self.masks or {}).items()}
        if self.sft is not None:
            counts = {n: d.nnz for n, d in self.sft.diffs.items()}
        return {
            "k": self.k, "num_eligible": self.num_eligible, "density": self.k / self.num_eligible,
            "mask_strategy": self.sft_args.mask_strategy,
            "by_layer_type": {t: {"selected": s, "total": n, "density": s / n if n else 0.0}
                              for t, (s, n) in density_by_layer_type(shapes, counts).items()},
            "dense_params": len(self._head_names),
            "phases": self.phase_info,
        }

    def summary_lines(self) -> list[str]:
        s = self.summary()
        lines = [f"K = {s['k']:,} of {s['num_eligible']:,} eligible ({100 * s['density']:.3f}%), "
                 f"mask {s['mask_strategy']}, {s['dense_params']} dense head tensors"]
        for name in ("phase1", "selection", "phase2"):
            if name in s["phases"]:
                info = s["phases"][name]
                extra = f", {info['steps']} steps, final mean loss {info['train_loss']}" if "steps" in info else ""
                lines.append(f"{name}: {info['seconds']} s{extra}")
        for t, row in s["by_layer_type"].items():
            lines.append(f"  {100 * row['density']:7.3f}%  {row['selected']:>12,} / {row['total']:>12,}  {t}")
        return lines

    # -- helpers ----------------------------------------------------------------------------------
    def _named(self, names) -> dict[str, torch.nn.Parameter]:
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in names}

    def _reset_to_theta0(self) -> None:
        with torch.no_grad():
            for n, p in self._named(self._eligible_names).items():
                p.copy_(self._theta0[n])
            for n, p in self._named(self._head_names).items():
                p.copy_(self._heads0[n])

    def _init_heads(self, path: Path, resume: bool) -> None:
        """Save the heads' θ0 (a fresh head is random), or load it back when resuming."""
        from safetensors.torch import load_file, save_file

        if resume and path.exists():
            saved = load_file(str(path))
            if set(saved) != set(self._head_names):
                raise CompsftError(f"{path}: head tensors {sorted(saved)[:3]} do not match the model's")
            with torch.no_grad():
                for n, p in self._named(self._head_names).items():
                    p.copy_(saved[n].to(p.device, p.dtype))
                    self._heads0[n] = p.detach().clone()
            return
        if self.is_world_process_zero():
            tensors = {n: t.detach().cpu().contiguous() for n, t in self._heads0.items()}
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp))
        self._barrier()

    def _save_mask(self, path: Path, masks) -> None:
        from safetensors.torch import save_file

        meta = {"k": str(self.k), "mask_strategy": self.sft_args.mask_strategy,
                "phase_info": json.dumps(self.phase_info)}
        tensors = {n: idx.contiguous() for n, idx in masks.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    def _load_mask(self, path: Path) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            masks = {n: f.get_tensor(n) for n in f.keys()}
        if int(meta.get("k", -1)) != self.k or meta.get("mask_strategy") != self.sft_args.mask_strategy:
            raise CompsftError(f"{path}: mask of K={meta.get('k')} ({meta.get('mask_strategy')}) does not match "
                               f"this run (K={self.k}, {self.sft_args.mask_strategy}); use another --out or drop --resume")
        missing = [n for n in self._eligible_names if n not in masks]
        if missing:
            raise CompsftError(f"{path}: no mask for tensor {missing[0]!r}")
        self.phase_info.update(json.loads(meta.get("phase_info", "{}")))
        return {n: masks[n] for n in self._eligible_names}

    def _save_start(self, path: Path, values, heads) -> None:
        from safetensors.torch import save_file

        tensors = {**{f"values/{n}": v.detach().cpu().contiguous() for n, v in values.items()},
                   **{f"heads/{n}": h.detach().cpu().contiguous() for n, h in heads.items()}}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))

    def _load_start(self, path: Path) -> tuple[dict, dict]:
        from safetensors.torch import load_file

        if not path.is_file():
            raise CompsftError(f"{path}: missing; phase 2 of {self.sft_args.mask_strategy} cannot resume without it")
        saved = load_file(str(path))
        return ({n[7:]: t for n, t in saved.items() if n.startswith("values/")},
                {n[6:]: t for n, t in saved.items() if n.startswith("heads/")})

    def _set_phase2_start(self, values, heads) -> None:
        with torch.no_grad():
            for n, sv in self._sparse.items():
                sv.values.copy_(values[n].to(sv.values.device, sv.values.dtype))
            for n, p in self._named(self._head_names).items():
                p.copy_(heads[n].to(p.device, p.dtype))

    def _fingerprint_base(self) -> dict:
        # θ0 seen through any applied SFT (a task SFT trains on θ0 + φ_source but records θ0).
        return base_fingerprint(self.model, self._eligible_names)

    def _barrier(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def _check_same_on_all_ranks(self, masks) -> None:
        """Every rank selects on its own; make sure they agree (they must: same θ, same rule)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        if world == 1:
            return
        digest = torch.zeros(2, dtype=torch.long)
        for i, idx in enumerate(masks.values()):
            digest[0] += idx.numel()
            digest[1] += ((idx % 1_000_003) * (i + 1)).sum()
        digest = digest.to(self.args.device)
        gathered = [torch.zeros_like(digest) for _ in range(world)]
        torch.distributed.all_gather(gathered, digest)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise CompsftError("the ranks selected different masks (parameters out of sync?)")
        logger.info("mask identical on all %d ranks", world)
