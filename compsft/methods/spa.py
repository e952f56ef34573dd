"""Structured Pruning Adapters (Hedegaard et al. 2022, arXiv 2211.10155), the SPLoRA variant: a low-rank
adapter fused with every linear layer of the encoder's transformer layers (hydra's layer set), and structured
pruning of whole output channels of base weight and adapter together,

    y = m_out ⊙ ((W0 + B·A) x + b),      A: r × in (Kaiming-uniform, as LoRA), B: out × r (zeros),

with m_out a 0/1 mask over output channels. Units pruned: attention heads (head_dim rows of query, key and
value at once) and FFN channels (rows of intermediate.dense); the residual-writing layers are adapted, not
pruned (`spa_layers`).

Masking the output channels computes the pruned model exactly: a pruned head's query and key rows are zero,
so are its values, so its context is exactly zero and the attention output's input columns for it only ever
see zeros; a pruned FFN channel is zero before the activation and stays zero after it (f(0) = 0 for GELU and
ReLU; `attach` refuses others), so the following output.dense's input columns for it are dead. Merging
zeroes those rows, biases and dead columns, consistent with a model they are sliced out of.

Importance: first-order Taylor (Molchanov et al. 2019), per unit I = (Σ_tokens Σ_{c ∈ unit} g_c z_c)² per
batch, summed between pruning events, with z = (W0 + B·A) x + b and g = ∂L/∂z. Σ g_c z_c over a row is
Σ_j W_cj ∂L/∂W_cj + b_c ∂L/∂b_c, the Taylor term of the fused weight row and bias. Heads are scored on
their value rows: a head's output is linear in its values, so that is exactly the first-order loss change
of switching the head off (Michel et al. 2019). Why not magnitude: the task adapter starts at B = 0 and has
rank r, so the fused weight's magnitude is nearly W0's and magnitude pruning would be blind to the task;
Taylor uses the task loss's gradient, which training computes anyway.

Schedule: cubic (Zhu & Gupta 2017), from density 1 to the target over the first 2/3 of the task steps in 4
events, re-scored between events; each group (a layer's heads, a layer's FFN channels) keeps
round(density · units) units, at least one, so the density holds per layer to unit granularity. Masks only
ever remove units; the last third of the steps recovers at fixed masks. Dev selection checks only those.

Language module: an SPLoRA trained by MLM on the language's raw text at density 1 (no pruning: pruning
compresses the deployed task model). Task module: trained on θ0 with the *source* language adapter merged
in, pruned to the method's density.

Composition rule (merged, then masked): for a target language T the task model is θ0 + B_T·A_T (T's
language adapter, merged) + B_task·A_task (merged), then the task module's masks applied: rows and biases of
pruned units zeroed, and the input columns they fed.

Rank: matched to the budget's K like hydra's, r = round(K / Σ(in + out)), at least 1. Files: `spa.safetensors`
(`{layer}.A`, `{layer}.B` per adapted layer; `{group}.keep` bool masks in a task module) + `spa_config.json`
(+ `head.safetensors`). Counts: trainable = r · Σ(in + out) (+ the head); stored = those values plus one byte
per mask unit (pruned rows of B are stored too, though a deployment could drop them).

The module defining the methods: this one (`METHOD` = "spa", density 0.5; `METHOD_D75` = "spa-d75";
`METHOD_D25` = "spa-d25"); the layers are in `spa_layers.py`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compsft.errors import CompsftError

from .base import LanguageData, MethodContext, MethodSpec, ModuleInfo, TaskData
from .common import adapter_totals
from .spa_layers import (CONFIG_NAME, PruneSchedule, SpaConfig, attach, keep_count, load, merge, prunable_groups,
                         pruning_callback, save, target_linears)


@dataclass
class SpaSettings:
    """What distinguishes the SPA variants, and the hyper-parameters the budget does not set."""

    density: float = 0.5
    events: int = 4
    end_fraction: float = 2 / 3
    lang_lr: float = 2e-4  # hydra's and LoRA's: low-rank adapters alike
    task_lr: float = 2e-4


def rank_for_k(model: nn.Module, kind: str, density: float | None) -> tuple[int, int, dict]:
    """(rank, K, adapted layers): the rank whose r · Σ(in + out) comes closest to K."""
    from compsft.training.params import eligible_parameters, resolve_k

    k = resolve_k(sum(p.numel() for p in eligible_parameters(model).values()), density=density, kind=kind,
                  config=model.config)
    layers = {n: [m.in_features, m.out_features] for n, m in target_linears(model).items()}
    return max(1, round(k / sum(i + o for i, o in layers.values()))), k, layers


def merge_from(model: nn.Module, directory: Path, vocab: dict | None, kind: str) -> SpaConfig:
    """Merge the SPA module in `directory` (adapters, and masks if it has any) into `model`'s weights."""
    from compsft.vocab import require_same_vocab

    config, tensors, _ = load(directory)
    if config.kind != kind:
        raise CompsftError(f"{Path(directory) / CONFIG_NAME}: field 'kind' is {config.kind!r}, expected {kind!r}")
    require_same_vocab(config.vocab, vocab, f"SPA module {directory}")
    attach(model, config, tensors)
    merge(model)
    return config


def _info(out: Path, trainable: int, started: float, extra: dict) -> ModuleInfo:
    from .common import module_bytes

    return ModuleInfo(trainable=trainable, stored_bytes=module_bytes(out), seconds=time.perf_counter() - started,
                      extra=extra)


def train_language(ctx: MethodContext, data: LanguageData, seed: int, out: Path,
                   settings: SpaSettings = SpaSettings()) -> ModuleInfo:
    """A language SPLoRA trained by MLM on `data`'s text at density 1; written to `out`."""
    from transformers import AutoModelForMaskedLM, Trainer, set_seed

    from compsft.training.collators import ResumableMlmCollator
    from compsft.training.mlm import MaskedPositionsOnly

    from .adapters.recipes import final_loss, language_steps, mlm_data, run_trainer, training_args, work_dir_for

    started, out = time.perf_counter(), Path(out)
    set_seed(seed)
    mlm = mlm_data(ctx, data)
    model = AutoModelForMaskedLM.from_pretrained(ctx.model_dir)
    masked_only = MaskedPositionsOnly(model)  # before the bank joins the model's children
    rank, k, layers = rank_for_k(model, "language", ctx.budget.lang_density)
    config = SpaConfig(kind="language", rank=rank, layers=layers, language=data.code, base_model=str(ctx.model_dir),
                       vocab=mlm.vocab)
    for p in model.parameters():
        p.requires_grad_(False)
    bank = attach(model, config)
    trainable = sum(p.numel() for p in bank.parameters())
    steps = language_steps(ctx.budget, len(mlm.dataset))
    work = work_dir_for(ctx, out)
    args = training_args(ctx, work, lr=settings.lang_lr, batch=ctx.budget.lang_batch, seed=seed, steps=steps)
    trainer = Trainer(model=model, args=args, train_dataset=mlm.dataset, callbacks=list(ctx.callbacks),
                      data_collator=ResumableMlmCollator(mlm.tokenizer, mlm_probability=0.15, seed=seed))
    run_trainer(trainer, ctx, work)
    masked_only.remove()
    config.training = {"steps": steps, "examples": len(mlm.dataset), "corpus": mlm.corpus_stats,
                       "lr": settings.lang_lr, "seed": seed, "k": k, "final_loss": final_loss(trainer)}
    save(out, config, bank)
    return _info(out, trainable, started, {"rank": rank, "k": k, "steps": steps,
                                           "final_loss": config.training["final_loss"]})


def train_task(ctx: MethodContext, data: TaskData, source_language: Path | None, seed: int, out: Path,
               settings: SpaSettings = SpaSettings()) -> ModuleInfo:
    """A task SPLoRA (and head) on θ0 + the merged source language adapter, pruned gradually to
    `settings.density`; written to `out`."""
    from transformers import Trainer, set_seed

    from .adapters.recipes import (DevSelection, final_loss, run_trainer, task_data, task_steps, training_args,
                                   work_dir_for)

    started, out = time.perf_counter(), Path(out)
    set_seed(seed)
    sup = task_data(ctx, data)
    model = sup.spec.build_model(ctx.model_dir, sup.labels)
    head_names = sup.spec.head_param_names(model)
    if source_language is not None:
        merge_from(model, Path(source_language), sup.vocab, "language")
    rank, k, layers = rank_for_k(model, "task", ctx.budget.task_density)
    config = SpaConfig(kind="task", rank=rank, layers=layers, density=settings.density, groups=prunable_groups(model),
                       task=sup.spec.name, labels=sup.labels, base_model=str(ctx.model_dir), vocab=sup.vocab)
    params = dict(model.named_parameters())
    for name, p in params.items():
        p.requires_grad_(name in head_names)
    bank = attach(model, config)
    trainable = sum(p.numel() for p in bank.parameters()) + sum(params[n].numel() for n in head_names)
    dataset = sup.spec.encode(sup.sentences, sup.tokenizer, sup.labels, max_length=ctx.budget.task_max_length)
    steps = task_steps(ctx.budget, len(dataset))
    work = work_dir_for(ctx, out)
    args = training_args(ctx, work, lr=settings.task_lr, batch=ctx.budget.task_batch, seed=seed, steps=steps)
    schedule, history = PruneSchedule(settings.density, settings.events, settings.end_fraction), []
    callbacks = [*ctx.callbacks, pruning_callback(bank, schedule, steps, history)]  # before dev selection's
    trainable_params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # Only modules at the final density are comparable: the checks are spread over the recovery steps.
    checks = ctx.budget.dev_checks

    def recovery_checks(total: int) -> list[int]:
        end = schedule.end(total)
        return sorted({end + max(0, round((total - end) * (i + 1) / checks)) for i in range(checks)})

    selection = DevSelection.create(ctx, data, sup, steps, model, trainable_params, callbacks, at=recovery_checks)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks,
                      data_collator=sup.spec.collator(sup.tokenizer))
    run_trainer(trainer, ctx, work)
    config.training = {"steps": steps, "examples": len(dataset), "train": str(data.train), "lr": settings.task_lr,
                       "seed": seed, "k": k, "source_language": str(source_language) if source_language else None,
                       "criterion": "taylor-fo", "schedule": {"events": schedule.at(steps), "pruned": history},
                       "final_loss": final_loss(trainer)}
    write = lambda d: save(d, config, bank, head={n: params[n] for n in head_names})  # noqa: E731
    write(out)
    extra = {"rank": rank, "k": k, "steps": steps, "density": bank.density(),
             "final_loss": config.training["final_loss"]}
    if selection is not None and (chosen := selection.save(out, write)):
        extra["dev_selected"] = chosen
    return _info(out, trainable, started, extra)


def assemble(ctx: MethodContext, task_dir: Path, language_dir: Path | None) -> tuple[Any, list[str]]:
    """θ0 + the target language adapter + the task adapter, merged, then the task's masks (module docstring)."""
    from .module_files import open_task_module

    config, tensors, head = load(Path(task_dir))
    model, vocab = open_task_module(ctx, task_dir, config, head, CONFIG_NAME, "SPA")
    if language_dir is not None:
        merge_from(model, Path(language_dir), vocab, "language")
    attach(model, config, tensors)
    merge(model)
    model.to(ctx.device).eval()
    return model, list(config.labels)


def parameter_counts(ctx: MethodContext, task: str, settings: SpaSettings = SpaSettings()) -> dict[str, int]:
    """Trainable adapter parameters per module at the budget's K, the task module's with its task head;
    stored bytes add the task module's masks, one byte per unit."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    with torch.device("meta"):
        model = AutoModelForMaskedLM.from_config(AutoConfig.from_pretrained(ctx.model_dir))
    out = {}
    for kind, density in (("language", ctx.budget.lang_density), ("task", ctx.budget.task_density)):
        rank, _, layers = rank_for_k(model, kind, density)
        out[f"{kind}_trainable"] = out[f"{kind}_stored"] = rank * sum(i + o for i, o in layers.values())
        out[f"{kind}_rank"] = rank
    groups = prunable_groups(model).values()
    out["task_units"] = sum(u for u, _ in groups)
    out["task_kept_units"] = sum(keep_count(settings.density, u) for u, _ in groups)
    out["task_mask_bytes"] = out["task_units"]
    return adapter_totals(ctx, task, out, extra_bytes=out["task_mask_bytes"])


def make_method(name: str, settings: SpaSettings) -> MethodSpec:
    def language(ctx: MethodContext, data: LanguageData, seed: int, out: Path) -> ModuleInfo:
        return train_language(ctx, data, seed, out, settings)

    def task(ctx: MethodContext, data: TaskData, source: Path | None, seed: int, out: Path) -> ModuleInfo:
        return train_task(ctx, data, source, seed, out, settings)

    def counts(ctx: MethodContext, task_name: str) -> dict[str, int]:
        return parameter_counts(ctx, task_name, settings)

    pct = round(100 * settings.density)
    return MethodSpec(
        name=name, description=f"Structured Pruning Adapters (SPLoRA): rank matched to K, task model pruned to "
                               f"{pct}% of heads and FFN channels by Taylor score, cubic schedule",
        composition="θ0 + target language SPLoRA + task SPLoRA, merged, then the task's head/channel masks",
        train_language=language, train_task=task, assemble=assemble, parameter_counts=counts,
        language_key="spa")  # language modules are unpruned: every density shares them


METHOD = make_method("spa", SpaSettings(density=0.5))
METHOD_D75 = make_method("spa-d75", SpaSettings(density=0.75))
METHOD_D25 = make_method("spa-d25", SpaSettings(density=0.25))
