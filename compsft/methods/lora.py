"""LoRA (Hu et al. 2022) through `peft`: a language LoRA by MLM, a task LoRA on top of the merged source one.

Composition rule (merged sum): for a target language T the task model's weights are
W = W0 + ΔW_T + ΔW_task, with ΔW = (alpha / r) · B A for every adapted linear layer: the target
language LoRA is merged into θ0 first, then the task LoRA (`peft`'s `merge_and_unload`, twice). That is
the same function as both LoRAs active side by side (each adds its ΔW to the layer's output), merged so
inference costs nothing extra. The task LoRA was trained the same way, on θ0 + ΔW_source merged.

* target modules: every linear layer of every transformer layer (query, key, value, attention output,
  intermediate, output), none of the heads;
* rank: chosen so trainable parameters match the paper's K (`compsft.training.params.resolve_k` with the
  budget's density, the paper's language / task K scaled to the model by default): r = round(K / Σ(in + out))
  over the adapted layers; alpha = r (scale 1);
* files: `peft`'s own `adapter_model.safetensors` + `adapter_config.json`, written atomically, plus
  `lora_config.json` (kind, labels, vocabulary, training) and `head.safetensors` for a task LoRA.

The module defining the methods: this one (`METHOD` = "lora", `METHOD_SHIRA` = "shira": peft's SHiRA, the
same recipe with r·(in + out) trainable entries of each adapted W at random positions instead of B A).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compsft.errors import CompsftError
from compsft.jsonfile import read_json_object

from .adapters.recipes import load_vocab
from .base import LanguageData, MethodContext, MethodSpec, ModuleInfo, TaskData
from .common import adapter_totals, module_bytes

#: every linear layer inside the transformer layers of a BERT-family encoder (a full-match regex for peft)
TARGET_MODULES = (r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                  r"|intermediate\.dense|output\.dense)")
SIDE_CONFIG = "lora_config.json"
HEAD_NAME = "head.safetensors"


@dataclass
class LoraSettings:
    """LoRA hyper-parameters that are not set by the budget."""

    dropout: float = 0.0
    lang_lr: float | None = 2e-4
    task_lr: float | None = 2e-4
    #: "lora", or "shira": peft's SHiRA, r·(in + out) trainable entries of W itself at random positions
    #: (a sparse, random-support baseline at the same K; merged the same way)
    tuner: str = "lora"


SETTINGS = LoraSettings()


# -- rank ----------------------------------------------------------------------------------------

def _target_linears(model) -> dict[str, torch.nn.Linear]:
    import re

    pattern = re.compile(TARGET_MODULES)
    found = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and pattern.fullmatch(n)}
    if not found:
        raise CompsftError(f"{type(model).__name__}: no linear layers under encoder.layer.* for LoRA")
    return found


def rank_for_k(model, kind: str, density: float | None) -> tuple[int, int]:
    """(rank, K): the LoRA rank whose trainable parameters come closest to K (at least 1)."""
    from compsft.training.params import eligible_parameters, resolve_k

    k = resolve_k(sum(p.numel() for p in eligible_parameters(model).values()), density=density, kind=kind,
                  config=model.config)
    per_rank = sum(m.in_features + m.out_features for m in _target_linears(model).values())
    return max(1, round(k / per_rank)), k


def _lora_config(rank: int, settings: LoraSettings, seed: int = 0):
    if settings.tuner == "shira":
        from peft import ShiraConfig

        return ShiraConfig(r=rank, mask_type="random", random_seed=seed, target_modules=TARGET_MODULES)
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, lora_dropout=settings.dropout, target_modules=TARGET_MODULES,
                      bias="none")


# -- files ---------------------------------------------------------------------------------------

def _save(out: Path, peft_model, side: dict, head: dict | None = None) -> None:
    from safetensors.torch import save_file

    from compsft.atomic import atomic_path

    with atomic_path(out) as tmp:
        peft_model.save_pretrained(str(tmp))
        if head:
            save_file({k: v.detach().cpu().contiguous() for k, v in head.items()}, str(tmp / HEAD_NAME))
        (tmp / SIDE_CONFIG).write_text(json.dumps(side, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_side_config(directory: Path, kind: str) -> dict:
    path = Path(directory) / SIDE_CONFIG
    side = read_json_object(path, f"{path}: not found (is {directory} a LoRA module?)")
    if side.get("kind") != kind:
        raise CompsftError(f"{path}: field 'kind' is {side.get('kind')!r}, expected {kind!r}")
    if kind == "task" and (not isinstance(side.get("labels"), list) or not side["labels"]
                           or not all(isinstance(x, str) for x in side["labels"])):
        raise CompsftError(f"{path}: field 'labels' must be a non-empty list of strings")
    if kind == "task" and not isinstance(side.get("task"), str):
        raise CompsftError(f"{path}: field 'task' is missing")
    return side


def merge_lora(model, directory: Path):
    """θ ← θ + (alpha / r) · B A for the LoRA in `directory`; returns the plain model (no peft wrapper)."""
    from peft import PeftModel

    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise CompsftError(f"{directory / 'adapter_config.json'}: not found (is {directory} a LoRA module?)")
    try:
        peft_model = PeftModel.from_pretrained(model, str(directory))
    except (ValueError, KeyError, TypeError, RuntimeError, OSError) as e:
        raise CompsftError(f"{directory}: cannot load this LoRA ({e})") from None
    return peft_model.merge_and_unload()


# -- the method ----------------------------------------------------------------------------------

def train_language(ctx: MethodContext, data: LanguageData, seed: int, out: Path,
                   settings: LoraSettings = SETTINGS) -> ModuleInfo:
    """A language LoRA trained by MLM on `data`'s text (compsft's MLM pipeline), written to `out`."""
    from peft import get_peft_model
    from transformers import AutoModelForMaskedLM, Trainer, set_seed

    from compsft.training.collators import ResumableMlmCollator
    from compsft.training.mlm import MaskedPositionsOnly

    from .adapters.recipes import final_loss, run_trainer, work_dir_for, language_steps, mlm_data, training_args

    started = time.perf_counter()
    out, budget = Path(out), ctx.budget
    set_seed(seed)
    mlm = mlm_data(ctx, data)
    dataset, tokenizer, vocab = mlm.dataset, mlm.tokenizer, mlm.vocab
    model = AutoModelForMaskedLM.from_pretrained(ctx.model_dir)
    rank, k = rank_for_k(model, "language", budget.lang_density)
    masked_only = MaskedPositionsOnly(model)  # on the bare model, before peft wraps it
    peft_model = get_peft_model(model, _lora_config(rank, settings, seed))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    steps = language_steps(budget, len(dataset))
    work = work_dir_for(ctx, out)
    args = training_args(ctx, work, lr=settings.lang_lr or budget.lang_lr, batch=budget.lang_batch, seed=seed,
                         steps=steps)
    trainer = Trainer(model=peft_model, args=args, train_dataset=dataset,
                      data_collator=ResumableMlmCollator(tokenizer, mlm_probability=0.15, seed=seed),
                      callbacks=list(ctx.callbacks))
    run_trainer(trainer, ctx, work)
    masked_only.remove()
    side = {"format": "compsft.lora", "tuner": settings.tuner, "kind": "language", "language": data.code, "rank": rank, "k": k,
            "base_model": str(ctx.model_dir), "vocab": vocab,
            "training": {"steps": steps, "examples": len(dataset), "corpus": mlm.corpus_stats,
                         "lr": args.learning_rate, "seed": seed, "final_loss": final_loss(trainer)}}
    _save(out, peft_model, side)
    return ModuleInfo(trainable=trainable, stored_bytes=module_bytes(out), seconds=time.perf_counter() - started,
                      extra={"rank": rank, "k": k, "steps": steps, "final_loss": side["training"]["final_loss"]})


def train_task(ctx: MethodContext, data: TaskData, source_language: Path | None, seed: int, out: Path,
               settings: LoraSettings = SETTINGS) -> ModuleInfo:
    """A task LoRA (and head) trained on θ0 with the source language LoRA merged in; written to `out`."""
    from peft import get_peft_model
    from transformers import Trainer, set_seed

    from compsft.vocab import require_same_vocab

    from .adapters.recipes import (DevSelection, final_loss, run_trainer, work_dir_for, task_data, task_steps,
                                   training_args)

    started = time.perf_counter()
    out, budget = Path(out), ctx.budget
    set_seed(seed)
    sup = task_data(ctx, data)
    spec, sentences, labels, tokenizer, vocab = sup.spec, sup.sentences, sup.labels, sup.tokenizer, sup.vocab
    model = spec.build_model(ctx.model_dir, labels)
    head_names = spec.head_param_names(model)
    if source_language is not None:
        side = read_side_config(Path(source_language), "language")
        require_same_vocab(side.get("vocab"), vocab, f"language LoRA {source_language}")
        model = merge_lora(model, Path(source_language))
    rank, k = rank_for_k(model, "task", budget.task_density)
    peft_model = get_peft_model(model, _lora_config(rank, settings, seed))
    params = dict(model.named_parameters())
    for name in head_names:  # peft froze everything but the LoRA matrices: the task head trains too
        params[name].requires_grad_(True)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    dataset = spec.encode(sentences, tokenizer, labels, max_length=budget.task_max_length)
    steps = task_steps(budget, len(dataset))
    work = work_dir_for(ctx, out)
    args = training_args(ctx, work, lr=settings.task_lr or budget.task_lr, batch=budget.task_batch, seed=seed,
                         steps=steps)
    callbacks = list(ctx.callbacks)
    trainable_params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    selection = DevSelection.create(ctx, data, sup, steps, model, trainable_params, callbacks)
    trainer = Trainer(model=peft_model, args=args, train_dataset=dataset, data_collator=spec.collator(tokenizer),
                      callbacks=callbacks)
    run_trainer(trainer, ctx, work)
    side = {"format": "compsft.lora", "tuner": settings.tuner, "kind": "task", "task": spec.name, "labels": list(labels), "rank": rank,
            "k": k, "base_model": str(ctx.model_dir), "vocab": vocab,
            "training": {"steps": steps, "examples": len(dataset), "train": str(data.train),
                         "source_language": str(source_language) if source_language else None,
                         "lr": args.learning_rate, "seed": seed, "final_loss": final_loss(trainer)}}
    write = lambda d: _save(d, peft_model, side, head={n: params[n] for n in head_names})  # noqa: E731
    write(out)
    extra = {"rank": rank, "k": k, "steps": steps, "final_loss": side["training"]["final_loss"]}
    if selection is not None and (chosen := selection.save(out, write)):
        extra["dev_selected"] = chosen
    return ModuleInfo(trainable=trainable, stored_bytes=module_bytes(out), seconds=time.perf_counter() - started,
                      extra=extra)


def assemble(ctx: MethodContext, task_dir: Path, language_dir: Path | None) -> tuple[Any, list[str]]:
    """θ0 + ΔW_target + ΔW_task, both merged (see the module docstring), with the task head."""
    from safetensors.torch import load_file

    from compsft.tasks import get_task
    from compsft.vocab import require_same_vocab

    task_dir = Path(task_dir)
    side = read_side_config(task_dir, "task")
    _, vocab = load_vocab(ctx.model_dir)
    require_same_vocab(side.get("vocab"), vocab, f"task LoRA {task_dir}")
    spec = get_task(side["task"])
    model = spec.build_model(ctx.model_dir, side["labels"])
    head_file = task_dir / HEAD_NAME
    try:
        head = load_file(str(head_file))
    except Exception as e:  # noqa: BLE001 - safetensors' own error types
        raise CompsftError(f"{head_file}: not a readable safetensors file ({e})") from None
    params = dict(model.named_parameters())
    for name, value in head.items():
        if name not in params or params[name].shape != value.shape:
            raise CompsftError(f"{head_file}: tensor {name!r} does not fit the task model")
        if not torch.isfinite(value).all():
            raise CompsftError(f"{head_file}: tensor {name!r} has non-finite values")
        with torch.no_grad():
            params[name].copy_(value)
    if language_dir is not None:
        lang_side = read_side_config(Path(language_dir), "language")
        require_same_vocab(lang_side.get("vocab"), vocab, f"language LoRA {language_dir}")
        model = merge_lora(model, Path(language_dir))
    model = merge_lora(model, task_dir)
    model.to(ctx.device).eval()
    return model, list(side["labels"])


def parameter_counts(ctx: MethodContext, task: str) -> dict[str, int]:
    """Trainable (= stored) LoRA parameters of a language and a task LoRA at the budget's K, the task LoRA's
    with its task head.
    SHiRA trains the same number of entries, r·(in + out) per layer."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    config = AutoConfig.from_pretrained(ctx.model_dir)
    with torch.device("meta"):  # shapes only: no memory, no weights read
        model = AutoModelForMaskedLM.from_config(config)
    per_rank = sum(m.in_features + m.out_features for m in _target_linears(model).values())
    out = {}
    for kind, density in (("language", ctx.budget.lang_density), ("task", ctx.budget.task_density)):
        rank, _ = rank_for_k(model, kind, density)
        out[f"{kind}_trainable"] = out[f"{kind}_stored"] = rank * per_rank
        out[f"{kind}_rank"] = rank
    return adapter_totals(ctx, task, out)


def make_method(name: str, settings: LoraSettings, description: str, composition: str) -> MethodSpec:
    def language(ctx: MethodContext, data: LanguageData, seed: int, out: Path) -> ModuleInfo:
        return train_language(ctx, data, seed, out, settings)

    def task(ctx: MethodContext, data: TaskData, source: Path | None, seed: int, out: Path) -> ModuleInfo:
        return train_task(ctx, data, source, seed, out, settings)

    return MethodSpec(name=name, description=description, composition=composition, train_language=language,
                      train_task=task, assemble=assemble, parameter_counts=parameter_counts)


METHOD = make_method(
    "lora", SETTINGS, "LoRA via peft: language LoRA by MLM, task LoRA on the merged source LoRA; rank matched to K",
    "θ0 + ΔW(target language LoRA) + ΔW(task LoRA), both merged into the weights")
METHOD_SHIRA = make_method(
    "shira", LoraSettings(tuner="shira"),
    "SHiRA via peft: K entries of the weights at random positions, language by MLM, task on the merged source",
    "θ0 + ΔW(target language SHiRA) + ΔW(task SHiRA), both merged into the weights (sparse sums)")
