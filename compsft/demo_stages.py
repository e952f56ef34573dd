"""The stages of `compsft demo` (see `compsft.demo`): each one trains or evaluates, reports its
progress a step at a time and records its time, K, losses and data sizes in the shared `Context`."""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CompsftError

logger = logging.getLogger(__name__)

PRIMARY_METRIC = {"pos": "accuracy", "dep": "las", "ner": "f1"}


@dataclass
class Context:
    """What the stages share: settings, where to write, and what they measured."""

    config: Any
    budget: Any
    device: str
    out: Path
    work: Path
    reporter: Any
    source: str
    target: str
    test_name: str
    times: dict[str, float] = field(default_factory=dict)
    model_info: dict[str, Any] = field(default_factory=dict)
    sft_info: dict[str, Any] = field(default_factory=dict)
    data_info: dict[str, Any] = field(default_factory=dict)
    task_steps: int = 0

    def timed(self, stage: str, started: float) -> None:
        self.times[stage] = round(self.times.get(stage, 0.0) + time.perf_counter() - started, 1)


def _progress_callback(ctx: Context, stage: str):
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ctx.reporter.advance(stage)

    return _Progress()


def _quiet(trainer):
    """No per-log print lines: the stage's progress bar is the report."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def _training_args(ctx: Context, work: Path, lr: float, batch: int):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(work), learning_rate=lr, per_device_train_batch_size=batch, seed=ctx.config.seed,
        save_strategy="no", report_to=[], use_cpu=ctx.device == "cpu", disable_tqdm=True,
        logging_strategy="no", remove_unused_columns=False, dataloader_num_workers=0, warmup_steps=0,
    )


def _phase_steps(sft_args, n_examples: int, batch: int) -> tuple[int, int]:
    per_epoch = max(1, math.ceil(n_examples / batch))
    return sft_args.phase_steps(1, per_epoch), sft_args.phase_steps(2, per_epoch)


def _sft_arguments(kind: str, steps: int, epochs: tuple[float | None, float | None], max_steps: int | None,
                   density: float | None):
    from .training import SftArguments

    if steps:
        return SftArguments(sft_kind=kind, density=density, full_ft_max_epochs=None, full_ft_max_steps=steps,
                            sparse_ft_max_epochs=None, sparse_ft_max_steps=steps)
    return SftArguments(sft_kind=kind, density=density, full_ft_max_epochs=epochs[0], full_ft_max_steps=max_steps,
                        sparse_ft_max_epochs=epochs[1], sparse_ft_max_steps=max_steps)


def _record_sft(ctx: Context, key: str, tuner, path: Path, extra: dict[str, Any]) -> None:
    s = tuner.summary()
    ctx.sft_info[key] = {
        "path": str(path.relative_to(ctx.out)), "k": s["k"], "num_eligible": s["num_eligible"],
        "density": s["density"], "mask_strategy": s["mask_strategy"],
        "density_by_layer_type": {t: round(r["density"], 6) for t, r in s["by_layer_type"].items()},
        "phases": s["phases"], **extra,
    }


# -- stage 1 ---------------------------------------------------------------------------------------
def prepare_model(ctx: Context) -> Path:
    """The model directory: `--model` if given, else the default model (built and cached on first use)."""
    from .models.convert import INFO_FILE

    stage = "prepare model"
    ctx.reporter.start(stage, 1)
    t0 = time.perf_counter()
    if ctx.config.model:
        path = Path(ctx.config.model)
        if not (path / "config.json").is_file():
            raise CompsftError(f"{path}: not a model directory (no config.json)")
    else:
        from .models import default_model_dir

        path = default_model_dir(trimmed=True)
    ctx.reporter.advance(stage)
    ctx.timed(stage, t0)
    info_file = path / INFO_FILE
    info = json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else {}
    ctx.model_info = {"path": str(path), **{k: info[k] for k in ("source_model", "parameters", "parameters_full",
                                                                 "pieces_full", "vocab") if k in info}}
    ctx.reporter.finish(stage, f"{path.name} ({ctx.times[stage]:.0f} s)")
    return path


# -- stage 2 ---------------------------------------------------------------------------------------
def train_language_sft(ctx: Context, model_dir: Path, code: str):
    """A language SFT for `code` from its shipped MLM text (its evaluation sentences filtered out)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling

    from .languages import language_corpus, tokenize_for_mlm
    from .sft import SftConfig
    from .training import SparseFineTuner
    from .vocab import vocab_fingerprint

    b = ctx.budget
    stage = f"language SFT {code}"
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    corpus = language_corpus(code, max_lines=b.lang_lines)
    ds = tokenize_for_mlm(corpus.lines, tok, max_length=b.lang_max_length)
    sft_args = _sft_arguments("language", b.lang_steps, (b.lang_epochs, b.lang_epochs), b.lang_max_steps,
                              b.lang_density)
    p1, p2 = _phase_steps(sft_args, len(ds), b.lang_batch)
    ctx.reporter.start(stage, p1 + p2)
    model = AutoModelForMaskedLM.from_pretrained(model_dir).to(ctx.device)
    config = SftConfig(kind="language", language=code, base_model=str(model_dir), vocab=vocab_fingerprint(tok),
                       training={"mlm_text": [str(p.name) for p in corpus.sources],
                                 "corpus": corpus.stats.as_dict()})
    tuner = _quiet(SparseFineTuner(
        model=model, args=_training_args(ctx, ctx.work / f"lang-{code}", b.lang_lr, b.lang_batch),
        train_dataset=ds, data_collator=DataCollatorForLanguageModeling(tok, mlm_probability=0.15),
        sft_args=sft_args, sft_config=config, callbacks=[_progress_callback(ctx, stage)],
    ))
    tuner.train()
    path = ctx.out / "sfts" / f"{code}-language"
    tuner.save_sft(path)
    ctx.timed(stage, t0)
    _record_sft(ctx, f"language:{code}", tuner, path,
                {"mlm_lines": len(corpus), "mlm_examples": len(ds), "corpus": corpus.stats.as_dict()})
    losses = [tuner.phase_info[p]["train_loss"] for p in ("phase1", "phase2") if p in tuner.phase_info]
    ctx.reporter.finish(stage, f"MLM loss {' / '.join(f'{x:.2f}' for x in losses)}, {ctx.times[stage]:.0f} s")
    sft = tuner.sft
    del tuner, model
    return sft


# -- stage 3 ---------------------------------------------------------------------------------------
def _task_data(ctx: Context):
    from .demo import TASK_DATA
    from .tasks import data_path, get_task

    spec = get_task(ctx.config.task)
    train_name = TASK_DATA[ctx.config.task][0]
    train = spec.read(data_path(train_name))
    if ctx.budget.train_sentences:
        train = train[:ctx.budget.train_sentences]
    ctx.data_info["train"] = {"data": train_name, "sentences": len(train)}
    return spec, train


def _build_task_model(ctx: Context, spec, model_dir: Path, labels):
    return spec.build_model(model_dir, labels).to(ctx.device)


def train_task_sft(ctx: Context, model_dir: Path, source_sft):
    """The task SFT, trained with the source language SFT applied; returns (sft, model, labels).

    The returned model holds base + source language SFT + task SFT (the tuner leaves it so).
    """
    from transformers import AutoTokenizer

    from . import apply
    from .sft import SftConfig
    from .training import SparseFineTuner
    from .vocab import vocab_fingerprint

    b = ctx.budget
    task = ctx.config.task
    stage = f"task SFT {task} ({ctx.source})"
    t0 = time.perf_counter()
    spec, train = _task_data(ctx)
    labels = spec.label_list(train)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ds = spec.encode(train, tok, labels, max_length=b.task_max_length)
    epochs = b.task_epochs or (None, None)
    sft_args = _sft_arguments("task", b.task_steps, epochs, None, b.task_density)
    p1, p2 = _phase_steps(sft_args, len(ds), b.task_batch)
    ctx.task_steps = p1 + p2
    ctx.reporter.start(stage, p1 + p2)
    model = _build_task_model(ctx, spec, model_dir, labels)
    # Language SFT on, MLM head off: the task SFT learns on top of the source language.
    apply(model, source_sft, with_dense=False)
    config = SftConfig(kind="task", task=task, language=ctx.source, base_model=str(model_dir),
                       vocab=vocab_fingerprint(tok), training={"labels": list(labels),
                                                               "trained_with": [f"language:{ctx.source}"]})
    tuner = _quiet(SparseFineTuner(
        model=model, args=_training_args(ctx, ctx.work / f"task-{task}", b.task_lr, b.task_batch),
        train_dataset=ds, data_collator=spec.collator(tok), sft_args=sft_args, sft_config=config,
        callbacks=[_progress_callback(ctx, stage)],
    ))
    tuner.train()
    path = ctx.out / "sfts" / f"{task}-task"
    tuner.save_sft(path)
    ctx.timed(stage, t0)
    _record_sft(ctx, f"task:{task}", tuner, path, {"train_windows": len(ds)})
    losses = [tuner.phase_info[p]["train_loss"] for p in ("phase1", "phase2") if p in tuner.phase_info]
    ctx.reporter.finish(stage, f"loss {' / '.join(f'{x:.2f}' for x in losses)}, {ctx.times[stage]:.0f} s")
    sft = tuner.sft
    del tuner
    return sft, model, labels


# -- stage 4 ---------------------------------------------------------------------------------------
def _eval_sets(ctx: Context):
    from .demo import TASK_DATA
    from .tasks import data_path, get_task

    spec = get_task(ctx.config.task)
    test = spec.read(data_path(ctx.test_name))
    if ctx.budget.eval_sentences:
        test = test[:ctx.budget.eval_sentences]
    dev_name = TASK_DATA[ctx.config.task][1]
    dev = []
    if ctx.budget.dev_sentences != 0:
        dev = spec.read(data_path(dev_name))
        if ctx.budget.dev_sentences:
            dev = dev[:ctx.budget.dev_sentences]
    ctx.data_info["test"] = {"data": ctx.test_name, "sentences": len(test), "language": ctx.target}
    ctx.data_info["source_dev"] = {"data": dev_name, "sentences": len(dev), "language": ctx.source}
    return spec, test, dev


def _evaluate(ctx: Context, spec, model, tok, sentences, labels, name: str) -> dict[str, float]:
    from .atomic import atomic_path

    gold = spec.prepare_gold(sentences, labels)
    metrics, predictions = spec.evaluate(model, tok, gold, labels, batch_size=32)
    with atomic_path(ctx.out / "predictions" / f"{name}{spec.prediction_suffix}") as tmp:
        spec.write_predictions(tmp, gold, predictions)
    return {k: float(v) for k, v in metrics.items()}


def evaluate_sfts(ctx: Context, model_dir: Path, model, labels, lang_sfts, task_sft) -> dict[str, Any]:
    """Zero-shot: composed target language SFT + task SFT, and the task SFT alone; source dev too."""
    from transformers import AutoTokenizer

    from . import apply, compose, revert

    stage = "evaluate SFTs"
    t0 = time.perf_counter()
    spec, test, dev = _eval_sets(ctx)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ctx.reporter.start(stage, 2 + 2 * bool(dev))
    results: dict[str, Any] = {"target": {}, "source_dev": {}}
    if dev:  # the model still holds base + source language SFT + task SFT
        results["source_dev"]["lt-sft"] = _evaluate(ctx, spec, model, tok, dev, labels, f"{ctx.source}-dev.lt-sft")
        ctx.reporter.advance(stage)
    revert(model)  # the task SFT
    revert(model)  # the source language SFT
    apply(model, task_sft, with_dense=True)
    results["target"]["task-sft-only"] = _evaluate(ctx, spec, model, tok, test, labels,
                                                   f"{ctx.target}-test.task-sft-only")
    ctx.reporter.advance(stage)
    if dev:
        results["source_dev"]["task-sft-only"] = _evaluate(ctx, spec, model, tok, dev, labels,
                                                           f"{ctx.source}-dev.task-sft-only")
        ctx.reporter.advance(stage)
    revert(model)
    target_sft = lang_sfts[ctx.target]
    # A language SFT's dense part is its MLM head, which has no place on a task model.
    composed = compose(target_sft, task_sft, with_dense=[False, True])
    composed.save(ctx.out / "sfts" / f"{ctx.target}-{ctx.config.task}-composed")
    apply(model, composed, with_dense=True)
    results["target"]["lt-sft"] = _evaluate(ctx, spec, model, tok, test, labels, f"{ctx.target}-test.lt-sft")
    revert(model)
    ctx.reporter.advance(stage)
    ctx.sft_info["composed"] = {"path": f"sfts/{ctx.target}-{ctx.config.task}-composed", "k": composed.k,
                                "overlap": int(sum(getattr(composed, "overlap", {}).values()))}
    ctx.timed(stage, t0)
    key = PRIMARY_METRIC[ctx.config.task]
    ctx.reporter.finish(stage, f"{key}: LT-SFT {results['target']['lt-sft'][key]:.3f}, "
                               f"task SFT alone {results['target']['task-sft-only'][key]:.3f}")
    return results


# -- the baseline ----------------------------------------------------------------------------------
def train_full_ft(ctx: Context, model_dir: Path, labels):
    """Plain full fine-tuning of the whole model on the same task data, as many steps as the task SFT."""
    from transformers import AutoTokenizer, Trainer

    b = ctx.budget
    stage = f"full fine-tuning {ctx.config.task} ({ctx.source})"
    t0 = time.perf_counter()
    spec, train = _task_data(ctx)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ds = spec.encode(train, tok, labels, max_length=b.task_max_length)
    steps = b.full_ft_steps or ctx.task_steps
    ctx.reporter.start(stage, steps)
    model = _build_task_model(ctx, spec, model_dir, labels)
    args = _training_args(ctx, ctx.work / "full-ft", b.task_lr, b.task_batch)
    args.max_steps = steps
    trainer = _quiet(Trainer(model=model, args=args, train_dataset=ds, data_collator=spec.collator(tok),
                             callbacks=[_progress_callback(ctx, stage)]))
    out = trainer.train()
    ctx.timed(stage, t0)
    ctx.sft_info["full-ft"] = {"steps": steps, "train_loss": round(float(out.training_loss), 5),
                               "seconds": ctx.times[stage], "trainable": sum(p.numel() for p in model.parameters())}
    ctx.reporter.finish(stage, f"loss {out.training_loss:.2f}, {ctx.times[stage]:.0f} s")
    del trainer
    return model


def evaluate_full_ft(ctx: Context, model, labels) -> dict[str, Any]:
    from transformers import AutoTokenizer

    stage = "evaluate full fine-tuning"
    t0 = time.perf_counter()
    spec, test, dev = _eval_sets(ctx)
    tok = AutoTokenizer.from_pretrained(ctx.model_info["path"])
    ctx.reporter.start(stage, 1 + bool(dev))
    target = _evaluate(ctx, spec, model, tok, test, labels, f"{ctx.target}-test.full-ft")
    ctx.reporter.advance(stage)
    out = {"target": {"full-ft": target}, "source_dev": {}}
    if dev:
        out["source_dev"]["full-ft"] = _evaluate(ctx, spec, model, tok, dev, labels, f"{ctx.source}-dev.full-ft")
        ctx.reporter.advance(stage)
    ctx.timed(stage, t0)
    ctx.reporter.finish(stage, f"{PRIMARY_METRIC[ctx.config.task]} {target[PRIMARY_METRIC[ctx.config.task]]:.3f}")
    return out


# -- the plot --------------------------------------------------------------------------------------
def write_plot(path: Path, report: dict[str, Any]) -> None:
    """A bar chart of the primary metric per method, target test set and source dev side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic import atomic_path
    from .demo import METHODS

    task = report["settings"]["task"]
    key = PRIMARY_METRIC[task]
    res = report["results"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    xs = range(len(METHODS))
    tgt = [res["target"].get(m, {}).get(key, float("nan")) for m in METHODS]
    bars = ax.bar([x - width / 2 for x in xs], tgt, width, label=f"{report['settings']['target']} test (zero-shot)")
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    if res.get("source_dev"):
        dev = [res["source_dev"].get(m, {}).get(key, float("nan")) for m in METHODS]
        bars = ax.bar([x + width / 2 for x in xs], dev, width, label=f"{report['settings']['source']} dev")
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(list(xs), ["LT-SFT\n(lang + task SFT)", "task SFT\nalone", "full\nfine-tuning"])
    ax.set_ylim(0, 1.18)  # headroom above 1.0 for the legend
    ax.set_ylabel(key)
    ax.set_title(f"compsft demo: {task}, {report['settings']['source']} -> {report['settings']['target']} "
                 f"({report['settings']['preset']})")
    ax.legend(loc="upper center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
