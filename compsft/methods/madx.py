"""MAD-X (Pfeiffer et al. 2020), the paper's main baseline: language and task bottleneck adapters.

Composition rule: for a target language T, the task model is θ0 with `Stack(lang_T, task)`: in every
layer the hidden states go through T's language adapter and then the task adapter (both `seq_bn`
bottlenecks after the feed-forward block), and T's invertible NICE adapter transforms the embeddings.
The task adapter was trained on the same stack with the *source* language adapter underneath, frozen;
at test time the target language adapter is swapped in. θ0 itself is never changed.

* language adapter: `seq_bn`, reduction factor 2, plus NICE (reduction factor 2) on the embeddings whose
  inverse runs before the MLM decoder; trained by MLM on the language's text, everything else frozen;
* task adapter: `seq_bn`, reduction factor 1 (`mad-x`, the LT-SFT paper's budget match) or 16
  (`mad-x-rf16`, MAD-X's own), trained with its task head;
* `mad-x-2.0`: as `mad-x`, but the language adapter of the last layer is left out of the stack, in task
  training and at test time (Pfeiffer et al. 2021, "UNKs everywhere"); it shares `mad-x`'s language adapters.

The adapter layers match AdapterHub `adapters` 1.3.0 (`tests/test_madx_parity.py` checks outputs to 1e-5).
Modules are adapter directories (`compsft.methods.adapters.files`); the module defining each method:
this one (`METHOD` = "mad-x", `METHOD_RF16` = "mad-x-rf16", `METHOD_2` = "mad-x-2.0").
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .adapters.recipes import (MadxSettings, adapter_sizes, assemble_task_model, train_language_adapter,
                               train_task_adapter)
from .base import LanguageData, MethodContext, MethodSpec, ModuleInfo, TaskData
from .common import adapter_totals


def parameter_counts(ctx: MethodContext, task: str, settings: MadxSettings | None = None) -> dict[str, int]:
    """Trainable and stored parameters of a language adapter and of a task adapter with its task head."""
    from transformers import AutoConfig

    settings = settings or MadxSettings()
    config = AutoConfig.from_pretrained(ctx.model_dir)
    h, n = config.hidden_size, config.num_hidden_layers
    inv = settings.inv_adapter_reduction_factor if settings.inv_adapter else None
    language = adapter_sizes(h, n, settings.lang_reduction_factor, inv)
    used = adapter_sizes(h, n, settings.lang_reduction_factor, inv, leave_out=int(settings.drop_last_language_layer))
    task_params = adapter_sizes(h, n, settings.task_reduction_factor, None)
    return adapter_totals(ctx, task, {"language_trainable": language, "language_stored": language,
                                      "language_used": used, "task_trainable": task_params,
                                      "task_stored": task_params})


def make_method(name: str, settings: MadxSettings, description: str, **keys: str) -> MethodSpec:
    def train_language(ctx: MethodContext, data: LanguageData, seed: int, out: Path) -> ModuleInfo:
        return train_language_adapter(ctx, data, seed, Path(out), settings)

    def train_task(ctx: MethodContext, data: TaskData, source: Path | None, seed: int, out: Path) -> ModuleInfo:
        return train_task_adapter(ctx, data, source, seed, Path(out), settings)

    def assemble(ctx: MethodContext, task_dir: Path, language_dir: Path | None):
        return assemble_task_model(ctx, task_dir, language_dir, settings)

    def counts(ctx: MethodContext, task: str) -> dict[str, int]:
        return parameter_counts(ctx, task, settings)

    return MethodSpec(
        name=name, description=description,
        composition="Stack(target language adapter, task adapter) after every feed-forward block, "
                    "the target's NICE adapter on the embeddings; base weights unchanged",
        train_language=train_language, train_task=train_task, assemble=assemble, parameter_counts=counts, **keys,
    )


SETTINGS = MadxSettings()
METHOD = make_method("mad-x", SETTINGS, "MAD-X: language adapters (rf 2 + NICE) by MLM, task adapter rf 1 "
                                        "stacked on the source language adapter")
METHOD_RF16 = make_method("mad-x-rf16", replace(SETTINGS, task_reduction_factor=16.0),
                          "MAD-X with its own task adapter size (rf 16)", language_key="mad-x")
METHOD_2 = make_method("mad-x-2.0", replace(SETTINGS, drop_last_language_layer=True),
                       "MAD-X 2.0: no language adapter in the last layer", language_key="mad-x")
