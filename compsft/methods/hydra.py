"""Hydra (Kim et al. 2024, "Hydra: Multi-head Low-rank Adaptation for Parameter Efficient Fine-tuning"):
a parallel and a sequential low-rank branch on every linear layer of the encoder's transformer layers,

    y = W0 x + b0 + s·Bp Ap x + s·Bs As (W0 x + b0),

which merges into the layer: W ← W0 + s·Bp Ap + s·Bs As W0 and b ← b0 + s·Bs As b0.

Composition rule (merged, in order): for a target language T the task model is θ0 with T's language
Hydra merged into every adapted layer and then the task Hydra merged on top of that; the task Hydra was
trained the same way, on θ0 with the *source* language Hydra merged. (The sequential branch of the task
module therefore acts on the language-adapted layer output, in training as at test time.)

During training the branches run in a forward hook on each `nn.Linear` (its input and output are all the
formula needs), so no model class is patched. Rank: chosen so trainable parameters match the paper's K,
r = round(K / Σ(in + 3·out)); s = 1; A is initialised like LoRA's (Kaiming-uniform), B at zero.
Files: `hydra.safetensors` (`{layer}.Ap` ... per adapted layer) + `hydra_config.json` (+ `head.safetensors`).

The module defining the method: this one (`METHOD` = "hydra").
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from compsft.errors import CompsftError
from compsft.jsonfile import read_json_object

from .module_files import check_names, read_head, read_tensors, write_module
from .base import LanguageData, MethodContext, MethodSpec, ModuleInfo, TaskData
from .common import adapter_totals

WEIGHTS_NAME = "hydra.safetensors"
CONFIG_NAME = "hydra_config.json"
BANK_ATTR = "compsft_hydra"
#: every linear layer inside the transformer layers of a BERT-family encoder
TARGETS = re.compile(r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                     r"|intermediate\.dense|output\.dense)")
PARTS = ("Ap", "Bp", "As", "Bs")


@dataclass
class HydraConfig:
    kind: str = field(metadata={"help": "'language' or 'task'"})
    rank: int = field(metadata={"help": "rank of both branches"})
    scale: float = field(default=1.0, metadata={"help": "s in the formula"})
    layers: dict = field(default_factory=dict, metadata={"help": "adapted layer name -> [in, out]"})
    language: str | None = None
    task: str | None = None
    labels: list = field(default_factory=list)
    base_model: str = ""
    vocab: dict | None = None
    training: dict = field(default_factory=dict)
    format: str = "compsft.hydra"

    def shapes(self) -> dict[str, tuple[int, int]]:
        out = {}
        for name, (n_in, n_out) in self.layers.items():
            out.update({f"{name}.Ap": (self.rank, n_in), f"{name}.Bp": (n_out, self.rank),
                        f"{name}.As": (self.rank, n_out), f"{name}.Bs": (n_out, self.rank)})
        return out

    @classmethod
    def from_file(cls, path: Path) -> "HydraConfig":
        data = read_json_object(path, f"{path}: not found (is {path.parent} a Hydra module?)")
        names = {f.name for f in dataclasses.fields(cls)}
        for key in ("kind", "rank", "layers"):
            if key not in data:
                raise CompsftError(f"{path}: field {key!r} is missing")
        if set(data) - names:
            raise CompsftError(f"{path}: unknown field(s) {sorted(set(data) - names)}")
        config = cls(**data)
        if config.format != "compsft.hydra":
            raise CompsftError(f"{path}: field 'format' is {config.format!r}, expected 'compsft.hydra'")
        if config.kind not in ("language", "task"):
            raise CompsftError(f"{path}: field 'kind' is {config.kind!r}, expected 'language' or 'task'")
        if not isinstance(config.rank, int) or isinstance(config.rank, bool) or config.rank < 1:
            raise CompsftError(f"{path}: field 'rank' must be a positive integer, got {config.rank!r}")
        if not isinstance(config.scale, (int, float)) or not math.isfinite(config.scale):
            raise CompsftError(f"{path}: field 'scale' must be a finite number, got {config.scale!r}")
        if not isinstance(config.layers, dict) or not config.layers or not all(
                isinstance(v, list) and len(v) == 2 and all(isinstance(d, int) and d > 0 for d in v)
                for v in config.layers.values()):
            raise CompsftError(f"{path}: field 'layers' must map layer names to [in, out] sizes")
        if config.kind == "task" and (not config.task or not config.labels):
            raise CompsftError(f"{path}: field 'task' and 'labels' are required for a task module")
        return config


class HydraBranches(nn.Module):
    """The four low-rank matrices of one linear layer."""

    def __init__(self, n_in: int, n_out: int, rank: int) -> None:
        super().__init__()
        self.Ap = nn.Parameter(torch.empty(rank, n_in))
        self.Bp = nn.Parameter(torch.zeros(n_out, rank))
        self.As = nn.Parameter(torch.empty(rank, n_out))
        self.Bs = nn.Parameter(torch.zeros(n_out, rank))
        nn.init.kaiming_uniform_(self.Ap, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.As, a=math.sqrt(5))


class HydraBank(nn.Module):
    """The branches of every adapted layer (keys: layer names with '.' as '/'), plus the hooks' handles."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.branches = nn.ModuleDict()
        self.handles: list = []


def target_linears(model: nn.Module) -> dict[str, nn.Linear]:
    found = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and TARGETS.fullmatch(n)}
    if not found:
        raise CompsftError(f"{type(model).__name__}: no linear layers under encoder.layer.* for Hydra")
    return found


def attach(model: nn.Module, config: HydraConfig, tensors: Mapping[str, torch.Tensor] | None = None) -> HydraBank:
    """Add Hydra branches (fresh, or `tensors` from a file) to every layer in `config.layers`, as hooks."""
    if hasattr(model, BANK_ATTR):
        raise CompsftError("the model already has Hydra branches attached; merge them first")
    linears = target_linears(model)
    bank = HydraBank(config.scale)
    for name, (n_in, n_out) in config.layers.items():
        layer = linears.get(name)
        if layer is None or (layer.in_features, layer.out_features) != (n_in, n_out):
            raise CompsftError(f"Hydra layer {name!r} ({n_in}->{n_out}) does not fit the model")
        bank.branches[name.replace(".", "/")] = HydraBranches(n_in, n_out, config.rank)
    if tensors is not None:
        with torch.no_grad():
            for key, value in tensors.items():
                layer_name, part = key.rsplit(".", 1)
                getattr(bank.branches[layer_name.replace(".", "/")], part).copy_(value)
    bank.to(next(model.parameters()).device)
    model.add_module(BANK_ATTR, bank)
    for name in config.layers:
        bank.handles.append(linears[name].register_forward_hook(_branches_hook(bank, name.replace(".", "/"))))
    return bank


def _branches_hook(bank: HydraBank, key: str):
    def hook(module, args, output):
        b = bank.branches[key]
        x = args[0]
        parallel = (x @ b.Ap.T) @ b.Bp.T
        sequential = (output @ b.As.T) @ b.Bs.T
        return output + bank.scale * (parallel + sequential)
    return hook


def _delta(layer: nn.Linear, b: HydraBranches, scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ΔW, Δb) in float64: s·Bp Ap + s·Bs As W0 and s·Bs As b0."""
    bs_as = b.Bs.double() @ b.As.double()
    dw = scale * (b.Bp.double() @ b.Ap.double() + bs_as @ layer.weight.double())
    db = scale * (bs_as @ layer.bias.double()) if layer.bias is not None else None
    return dw, db


def merge(model: nn.Module) -> nn.Module:
    """Fold the attached branches into the weights and biases (computed in float64) and detach them."""
    bank = getattr(model, BANK_ATTR, None)
    if bank is None:
        return model
    linears = target_linears(model)
    with torch.no_grad():
        for key, b in bank.branches.items():
            layer = linears[key.replace("/", ".")]
            dw, db = _delta(layer, b, bank.scale)
            layer.weight.copy_((layer.weight.double() + dw).to(layer.weight.dtype))
            if db is not None:
                layer.bias.copy_((layer.bias.double() + db).to(layer.bias.dtype))
    for h in bank.handles:
        h.remove()
    delattr(model, BANK_ATTR)
    return model


def unmerge(model: nn.Module, config: HydraConfig, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """Undo `merge` of these branches: W0 = (I + s·Bs As)⁻¹ (W − s·Bp Ap), b0 = (I + s·Bs As)⁻¹ b (float64)."""
    linears = target_linears(model)
    with torch.no_grad():
        for name in config.layers:
            layer = linears[name]
            t = {p: tensors[f"{name}.{p}"].double() for p in PARTS}
            m = torch.eye(layer.out_features, dtype=torch.float64) + config.scale * t["Bs"] @ t["As"]
            w = layer.weight.double() - config.scale * t["Bp"] @ t["Ap"]
            layer.weight.copy_(torch.linalg.solve(m, w).to(layer.weight.dtype))
            if layer.bias is not None:
                layer.bias.copy_(torch.linalg.solve(m, layer.bias.double()).to(layer.bias.dtype))
    return model


# -- files ---------------------------------------------------------------------------------------

def save(out: Path, config: HydraConfig, bank: HydraBank, head: Mapping[str, torch.Tensor] | None = None) -> None:
    tensors = {f"{key.replace('/', '.')}.{p}": getattr(b, p) for key, b in bank.branches.items() for p in PARTS}
    write_module(out, WEIGHTS_NAME, tensors, CONFIG_NAME, config, head)


def load(directory: Path) -> tuple[HydraConfig, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(config, branch tensors, head tensors), validated: a malformed file is a CompsftError naming it."""
    directory = Path(directory)
    config = HydraConfig.from_file(directory / CONFIG_NAME)
    path = directory / WEIGHTS_NAME
    tensors, shapes = read_tensors(path), config.shapes()
    check_names(path, tensors, shapes)
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape or not torch.isfinite(tensors[name]).all():
            raise CompsftError(f"{path}: tensor {name!r} has the wrong shape or non-finite values")
    return config, tensors, read_head(directory)


def merge_from(model: nn.Module, directory: Path, vocab: dict | None = None) -> HydraConfig:
    """Merge the Hydra module in `directory` into `model`'s weights."""
    from compsft.vocab import require_same_vocab

    config, tensors, _ = load(directory)
    require_same_vocab(config.vocab, vocab, f"Hydra module {directory}")
    attach(model, config, tensors)
    merge(model)
    return config


# -- the method ----------------------------------------------------------------------------------

def rank_for_k(model: nn.Module, kind: str, density: float | None) -> tuple[int, int, dict]:
    from compsft.training.params import eligible_parameters, resolve_k

    k = resolve_k(sum(p.numel() for p in eligible_parameters(model).values()), density=density, kind=kind,
                  config=model.config)
    layers = {n: [m.in_features, m.out_features] for n, m in target_linears(model).items()}
    per_rank = sum(i + 3 * o for i, o in layers.values())
    return max(1, round(k / per_rank)), k, layers


def _info(out: Path, trainable: int, started: float, extra: dict) -> ModuleInfo:
    from .common import module_bytes

    return ModuleInfo(trainable=trainable, stored_bytes=module_bytes(out), seconds=time.perf_counter() - started,
                      extra=extra)


def train_language(ctx: MethodContext, data: LanguageData, seed: int, out: Path, lr: float = 2e-4) -> ModuleInfo:
    from transformers import AutoModelForMaskedLM, Trainer, set_seed

    from compsft.training.collators import ResumableMlmCollator
    from compsft.training.mlm import MaskedPositionsOnly

    from .adapters.recipes import final_loss, run_trainer, work_dir_for, language_steps, mlm_data, training_args

    started, out = time.perf_counter(), Path(out)
    set_seed(seed)
    mlm = mlm_data(ctx, data)
    model = AutoModelForMaskedLM.from_pretrained(ctx.model_dir)
    masked_only = MaskedPositionsOnly(model)  # before the bank joins the model's children
    rank, k, layers = rank_for_k(model, "language", ctx.budget.lang_density)
    config = HydraConfig(kind="language", rank=rank, layers=layers, language=data.code,
                         base_model=str(ctx.model_dir), vocab=mlm.vocab)
    for p in model.parameters():
        p.requires_grad_(False)
    bank = attach(model, config)
    trainable = sum(p.numel() for p in bank.parameters())
    steps = language_steps(ctx.budget, len(mlm.dataset))
    work = work_dir_for(ctx, out)
    args = training_args(ctx, work, lr=lr, batch=ctx.budget.lang_batch, seed=seed, steps=steps)
    trainer = Trainer(model=model, args=args, train_dataset=mlm.dataset, callbacks=list(ctx.callbacks),
                      data_collator=ResumableMlmCollator(mlm.tokenizer, mlm_probability=0.15, seed=seed))
    run_trainer(trainer, ctx, work)
    masked_only.remove()
    config.training = {"steps": steps, "examples": len(mlm.dataset), "corpus": mlm.corpus_stats, "lr": lr,
                       "seed": seed, "k": k, "final_loss": final_loss(trainer)}
    save(out, config, bank)
    return _info(out, trainable, started, {"rank": rank, "k": k, "steps": steps,
                                           "final_loss": config.training["final_loss"]})


def train_task(ctx: MethodContext, data: TaskData, source_language: Path | None, seed: int, out: Path,
               lr: float = 2e-4) -> ModuleInfo:
    from transformers import Trainer, set_seed

    from .adapters.recipes import (DevSelection, final_loss, run_trainer, work_dir_for, task_data, task_steps,
                                   training_args)

    started, out = time.perf_counter(), Path(out)
    set_seed(seed)
    sup = task_data(ctx, data)
    model = sup.spec.build_model(ctx.model_dir, sup.labels)
    head_names = sup.spec.head_param_names(model)
    if source_language is not None:
        merge_from(model, Path(source_language), sup.vocab)
    rank, k, layers = rank_for_k(model, "task", ctx.budget.task_density)
    config = HydraConfig(kind="task", rank=rank, layers=layers, task=sup.spec.name, labels=sup.labels,
                         base_model=str(ctx.model_dir), vocab=sup.vocab)
    params = dict(model.named_parameters())
    for name, p in params.items():
        p.requires_grad_(name in head_names)
    bank = attach(model, config)
    trainable = sum(p.numel() for p in bank.parameters()) + sum(params[n].numel() for n in head_names)
    dataset = sup.spec.encode(sup.sentences, sup.tokenizer, sup.labels, max_length=ctx.budget.task_max_length)
    steps = task_steps(ctx.budget, len(dataset))
    work = work_dir_for(ctx, out)
    args = training_args(ctx, work, lr=lr, batch=ctx.budget.task_batch, seed=seed, steps=steps)
    callbacks = list(ctx.callbacks)
    trainable_params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    selection = DevSelection.create(ctx, data, sup, steps, model, trainable_params, callbacks)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks,
                      data_collator=sup.spec.collator(sup.tokenizer))
    run_trainer(trainer, ctx, work)
    config.training = {"steps": steps, "examples": len(dataset), "train": str(data.train), "lr": lr, "seed": seed,
                       "k": k, "source_language": str(source_language) if source_language else None,
                       "final_loss": final_loss(trainer)}
    write = lambda d: save(d, config, bank, head={n: params[n] for n in head_names})  # noqa: E731
    write(out)
    extra = {"rank": rank, "k": k, "steps": steps, "final_loss": config.training["final_loss"]}
    if selection is not None and (chosen := selection.save(out, write)):
        extra["dev_selected"] = chosen
    return _info(out, trainable, started, extra)


def assemble(ctx: MethodContext, task_dir: Path, language_dir: Path | None) -> tuple[Any, list[str]]:
    from .module_files import open_task_module

    config, tensors, head = load(Path(task_dir))
    model, vocab = open_task_module(ctx, task_dir, config, head, CONFIG_NAME, "Hydra")
    if language_dir is not None:
        lang = merge_from(model, Path(language_dir), vocab)
        if lang.kind != "language":
            raise CompsftError(f"{language_dir / CONFIG_NAME}: field 'kind' is {lang.kind!r}, expected 'language'")
    attach(model, config, tensors)
    merge(model)
    model.to(ctx.device).eval()
    return model, list(config.labels)


def parameter_counts(ctx: MethodContext, task: str) -> dict[str, int]:
    """Trainable (= stored) branch parameters of a language and a task module at the budget's K, the task
    module's with its task head."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    with torch.device("meta"):
        model = AutoModelForMaskedLM.from_config(AutoConfig.from_pretrained(ctx.model_dir))
    out = {}
    for kind, density in (("language", ctx.budget.lang_density), ("task", ctx.budget.task_density)):
        rank, _, layers = rank_for_k(model, kind, density)
        n = rank * sum(i + 3 * o for i, o in layers.values())
        out[f"{kind}_trainable"] = out[f"{kind}_stored"] = n
        out[f"{kind}_rank"] = rank
    return adapter_totals(ctx, task, out)


METHOD = MethodSpec(
    name="hydra", description="Hydra: parallel + sequential low-rank branches per linear layer, rank matched to K",
    composition="θ0 with the target language Hydra merged, then the task Hydra merged on top",
    train_language=train_language, train_task=train_task, assemble=assemble, parameter_counts=parameter_counts,
)
