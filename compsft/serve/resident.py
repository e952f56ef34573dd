"""One resident base model for every language × task: one encoder, one small head per task.

The tagger (`pos`), the NER model (`ner`) and the parser (`dep`) are built around the *same* encoder
module object, so the encoder's weights are in memory once and applying a language SFT to it serves all
three. Each task's head is built once for the task SFT's labels and head sizes; its trained values come
from the task SFT's dense parameters, copied in by `apply` and restored by `revert`.

Between pairs the weights are θ0, bit for bit: each SFT is checked and prepared once with `compsft.apply`
(which refuses an SFT that does not fit before any weight changes, so a bad SFT never leaves the model
half-applied), keeping θ0 at its positions; a swap then writes the applied values in and θ0 back
(`compsft.serve.swap`).

    resident = ResidentModel("models/e5")
    model, labels = resident.apply(lang_sft, task_sft)   # θ0 + φ_L + φ_T, the task head
    ...                                                  # predict
    resident.revert()                                    # θ0 again
"""
from __future__ import annotations

import logging
import weakref
from pathlib import Path

import torch

from compsft import merge
from compsft.errors import CompsftError
from compsft.predict.loading import quiet_transformers
from compsft.sft import SparseFineTuning

from . import swap
from .store import SftUnavailable

logger = logging.getLogger(__name__)


class ResidentModel:
    """The base encoder, its tokenizer and the per-task heads around it, on one device."""

    def __init__(self, model_dir: str | Path, tokenizer_dir: str | Path | None = None,
                 device: str | torch.device = "cpu") -> None:
        from compsft.paths import load_tokenizer, local_dir
        from compsft.tasks.biaffine import load_encoder
        from compsft.vocab import vocab_fingerprint

        self.model_dir = local_dir(model_dir, "--model")
        self.device = torch.device(device)
        with quiet_transformers():  # its load report lists the MLM head a bare encoder leaves out, at length
            self.encoder = load_encoder(self.model_dir).to(self.device).eval().requires_grad_(False)
        self.tokenizer = load_tokenizer(tokenizer_dir or self.model_dir,
                                        "--tokenizer" if tokenizer_dir else "--model")
        self.vocab = vocab_fingerprint(self.tokenizer)
        self._heads: dict[str, tuple[tuple, torch.nn.Module]] = {}
        # SFT objects checked against θ0 and prepared for swaps, by (additive, with_dense).
        self._prepared: "weakref.WeakKeyDictionary[SparseFineTuning, dict]" = weakref.WeakKeyDictionary()
        self._active: tuple | None = None
        self._encoder_ids = {id(p) for p in self.encoder.parameters()}

    # -- heads ------------------------------------------------------------------------------------
    def task_model(self, task: str, task_sft: SparseFineTuning) -> tuple[torch.nn.Module, list[str]]:
        """The model of `task` around the shared encoder, its head shaped for `task_sft`."""
        labels = list(task_sft.config.training.get("labels") or [])
        key = (tuple(labels), tuple(sorted((n, tuple(t.shape)) for n, t in task_sft.dense.items())))
        cached = self._heads.get(task)
        if cached is not None and cached[0] == key:
            return cached[1], labels
        model = self._build(task, labels, task_sft)
        _require_head(model, task_sft)
        self._heads[task] = (key, model)
        return model, labels

    def _build(self, task: str, labels: list[str], task_sft: SparseFineTuning) -> torch.nn.Module:
        if task == "dep":
            from compsft.tasks.biaffine import BiaffineParser, ParserConfig

            dims = {}
            for field, name in (("arc_dim", "arc_dep.0.weight"), ("rel_dim", "rel_dep.0.weight")):
                if name in task_sft.dense:
                    dims[field] = int(task_sft.dense[name].shape[0])
            model = BiaffineParser(self.encoder, ParserConfig(labels=labels, **dims))
        elif task in ("pos", "ner"):
            model = self._token_classifier(labels)
        else:
            raise SftUnavailable(f"{task_sft.source}: task {task!r} is not one the server can run")
        return model.to(self.device).eval().requires_grad_(False)

    def _token_classifier(self, labels: list[str]) -> torch.nn.Module:
        """`AutoModelForTokenClassification` whose encoder is the shared one: built on the meta device (no
        second encoder is ever allocated), then only the head is materialised, zeroed (the task SFT's dense
        parameters overwrite it on apply)."""
        from transformers import AutoConfig, AutoModelForTokenClassification

        config = AutoConfig.from_pretrained(self.model_dir, local_files_only=True, num_labels=len(labels),
                                            id2label=dict(enumerate(labels)),
                                            label2id={label: i for i, label in enumerate(labels)})
        with torch.device("meta"):
            model = AutoModelForTokenClassification.from_config(config)
        prefix = model.base_model_prefix
        setattr(model, prefix, self.encoder)
        for name, child in model.named_children():
            if name != prefix:
                child.to_empty(device=self.device)
                with torch.no_grad():
                    for p in child.parameters():
                        p.zero_()
        left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if left:
            raise CompsftError(f"{self.model_dir}: the token-classification head has tensors outside the encoder "
                               f"that cannot be built here ({left[:3]})")
        return model

    # -- apply / revert ---------------------------------------------------------------------------
    def apply(self, task: str, lang_sft: SparseFineTuning, task_sft: SparseFineTuning) -> tuple[torch.nn.Module, list[str]]:
        """θ0 + φ_L + φ_T on the encoder and the task SFT's head on the task model; (model, labels).

        The first time an SFT is used it is checked (`compsft.apply`: shapes, base fingerprint, vocabulary)
        and prepared for swaps (`compsft.serve.swap`); later swaps are plain scatters.
        """
        if self._active is not None:
            raise RuntimeError("apply while a pair is applied: revert first")
        model, labels = self.task_model(task, task_sft)
        try:
            first = self._prepare(lang_sft, model, additive=False, with_dense=False)
            second = self._prepare(task_sft, model, additive=True, with_dense=True)
            if first is None or second is None:  # weights the fast path cannot reproduce exactly
                handle = merge.apply(model, lang_sft, task_sft, with_dense=[False, True], vocab=self.vocab)
                self._active = ("merge", model, handle)
                return model, labels
        except CompsftError as err:
            raise SftUnavailable(str(err)) from None
        swap.apply_pair(first, second)
        self._active = ("swap", first, second)
        return model, labels

    def _prepare(self, sft: SparseFineTuning, model: torch.nn.Module, *, additive: bool, with_dense: bool):
        key = (additive, with_dense)
        cached = self._prepared.get(sft, {}).get(key)
        # Entries in the shared encoder serve every task model; a head lives in its own task model (rebuilt
        # when the labels change).
        if cached is not None and (cached.model is model or cached.touched <= self._encoder_ids):
            return cached
        prepared = swap.prepare(model, sft, additive=additive, with_dense=with_dense, vocab=self.vocab)
        self._prepared.setdefault(sft, {})[key] = prepared
        return prepared

    def revert(self) -> None:
        """Back to θ0 (a no-op when nothing is applied)."""
        if self._active is None:
            return
        how, a, b = self._active
        self._active = None
        if how == "swap":
            swap.revert_pair(a, b)
        else:
            merge.revert(a, b)

    @property
    def is_applied(self) -> bool:
        return self._active is not None

    def parameters(self) -> dict[str, torch.Tensor]:
        """Every resident tensor by a unique name (the encoder once, then each head): for checks."""
        out = {f"encoder.{n}": p for n, p in self.encoder.named_parameters()}
        for task, (_, model) in sorted(self._heads.items()):
            prefix = getattr(model, "base_model_prefix", "")
            for n, p in model.named_parameters():
                if not n.startswith(prefix + "."):
                    out[f"{task}.{n}"] = p
        return out


def _require_head(model: torch.nn.Module, task_sft: SparseFineTuning) -> None:
    """Every head parameter must come from the task SFT: a head left at its zero init predicts nothing."""
    prefix = getattr(model, "base_model_prefix", "")
    for name, param in model.named_parameters():
        if name.startswith(prefix + "."):
            continue
        tensor = task_sft.dense.get(name)
        if tensor is None:
            raise SftUnavailable(f"{task_sft.source}: the task SFT has no trained head parameter {name!r}")
        if tuple(tensor.shape) != tuple(param.shape):
            raise SftUnavailable(f"{task_sft.source}: head parameter {name!r} has shape {list(tensor.shape)}, "
                                 f"the model's has {list(param.shape)}")
