"""`compsft demo`: the whole LT-SFT pipeline (Ansell et al. 2022) on the shipped data, end to end.

1. the default model (multilingual-e5-small with its shipped MLM head, vocabulary trimmed), cached;
2. language SFTs for the source language (English) and the target language, from the shipped MLM
   text with the evaluation sentences filtered out;
3. a task SFT on the source task data with the source language SFT applied while training;
4. target language SFT + task SFT composed, evaluated zero-shot on the target test set, next to
   (a) the task SFT alone and (b) plain full fine-tuning of the whole model on the same data.

`run_demo(DemoConfig(...), reporter)` does it all and returns the report (also written to
``report.json`` in `out`). The numbers are whatever the run gives. Presets (`PRESETS`) set the
budget: ``quick`` (a smoke run of a few minutes), ``default`` (about a quarter of an hour on 2 CPU
cores) and ``paper`` (the paper's step counts, K and lengths: meant for a GPU).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .errors import CompsftError

logger = logging.getLogger(__name__)

#: task -> (source training data, source dev data, target test data per target code, default target)
TASK_DATA = {
    "pos": ("ud:en_ewt:train", "ud:en_ewt:dev", "ud:{tb}:test", "wol"),
    "dep": ("ud:en_ewt:train", "ud:en_ewt:dev", "ud:{tb}:test", "wol"),
    "ner": ("ner:uner:en_ewt:train", "ner:uner:en_ewt:dev", "ner:masakhaner:{code}:test", "hau"),
}
SOURCE_LANGUAGE = "eng"
METHODS = ("lt-sft", "task-sft-only", "full-ft")
METHOD_TITLES = {
    "lt-sft": "LT-SFT: target language SFT + task SFT",
    "task-sft-only": "task SFT alone (no language SFT)",
    "full-ft": "full fine-tuning of the whole model",
}


@dataclass
class Budget:
    """How much training and evaluation one preset does."""

    lang_steps: int = field(metadata={"help": "MLM steps per LT-SFT phase of a language SFT (0 = by epochs)"})
    lang_epochs: float | None = field(metadata={"help": "epochs per language SFT phase (capped by lang_max_steps)"})
    lang_max_steps: int | None = field(metadata={"help": "cap on steps per language SFT phase"})
    lang_batch: int = field(metadata={"help": "MLM batch size"})
    lang_max_length: int = field(metadata={"help": "sub-words per MLM example"})
    lang_lines: int | None = field(metadata={"help": "MLM text lines used per language (None: all)"})
    task_steps: int = field(metadata={"help": "task steps per LT-SFT phase (0 = by epochs)"})
    task_epochs: tuple[float, float] | None = field(metadata={"help": "epochs of task phases 1 and 2"})
    task_batch: int = field(metadata={"help": "task batch size"})
    task_max_length: int = field(metadata={"help": "sub-words per task training window"})
    train_sentences: int | None = field(metadata={"help": "source training sentences (None: all shipped)"})
    full_ft_steps: int | None = field(metadata={"help": "full fine-tuning steps (None: the task SFT's phase 1 + 2)"})
    eval_sentences: int | None = field(metadata={"help": "target test sentences evaluated (None: all)"})
    dev_sentences: int | None = field(metadata={"help": "source dev sentences evaluated (0: skip)"})
    lang_density: float | None = field(metadata={"help": "language SFT K / eligible (None: the paper's K, scaled)"})
    task_density: float | None = field(metadata={"help": "task SFT K / eligible (None: the paper's K, scaled)"})
    lang_lr: float = field(default=1e-4, metadata={"help": "language SFT learning rate"})
    task_lr: float = field(default=1e-4, metadata={"help": "task SFT and full fine-tuning learning rate"})


PRESETS: dict[str, Budget] = {
    "quick": Budget(lang_steps=2, lang_epochs=None, lang_max_steps=None, lang_batch=4, lang_max_length=32,
                    lang_lines=200, task_steps=3, task_epochs=None, task_batch=8, task_max_length=48,
                    train_sentences=100, full_ft_steps=None, eval_sentences=30, dev_sentences=10,
                    lang_density=None, task_density=None),
    "default": Budget(lang_steps=40, lang_epochs=None, lang_max_steps=None, lang_batch=8, lang_max_length=128,
                      lang_lines=None, task_steps=80, task_epochs=None, task_batch=16, task_max_length=128,
                      train_sentences=4000, full_ft_steps=None, eval_sentences=400, dev_sentences=200,
                      lang_density=None, task_density=None),
    # The paper's recipe (Ansell et al. 2022, as its reference code runs it): language phases of
    # 100 epochs capped at 100k steps, task phases of 3 and 10 epochs, batch 8, length 256, lr 5e-5.
    "paper": Budget(lang_steps=0, lang_epochs=100.0, lang_max_steps=100_000, lang_batch=8, lang_max_length=256,
                    lang_lines=None, task_steps=0, task_epochs=(3.0, 10.0), task_batch=8, task_max_length=256,
                    train_sentences=None, full_ft_steps=None, eval_sentences=None, dev_sentences=None,
                    lang_density=None, task_density=None, lang_lr=5e-5, task_lr=5e-5),
}


@dataclass
class DemoConfig:
    """Settings of one demo run (all recorded in report.json)."""

    out: str = field(default="compsft-demo", metadata={"help": "output directory"})
    task: str = field(default="pos", metadata={"help": "pos, dep or ner"})
    target: str | None = field(default=None, metadata={"help": "target language (default per task)"})
    preset: str = field(default="default", metadata={"help": "quick, default or paper"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda if available)"})
    seed: int = field(default=42, metadata={"help": "seed of every stage"})
    model: str | None = field(default=None, metadata={"help": "model directory (default: the prepared default model)"})
    budget: Budget | None = field(default=None, metadata={"help": "overrides the preset's budget"})

    def resolved_budget(self) -> Budget:
        if self.budget is not None:
            return self.budget
        if self.preset not in PRESETS:
            raise CompsftError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[self.preset]


class Reporter(Protocol):
    """Where the pipeline reports progress: one stage at a time, a step at a time."""

    def start(self, stage: str, total: int) -> None: ...
    def advance(self, stage: str, n: int = 1) -> None: ...
    def finish(self, stage: str, summary: str) -> None: ...


class TqdmReporter:
    """The library's default reporter: a tqdm bar per stage."""

    def __init__(self) -> None:
        self._bars: dict[str, Any] = {}

    def start(self, stage: str, total: int) -> None:
        from tqdm.auto import tqdm

        self._bars[stage] = tqdm(total=total, desc=stage, leave=True)

    def advance(self, stage: str, n: int = 1) -> None:
        if stage in self._bars:
            self._bars[stage].update(n)

    def finish(self, stage: str, summary: str) -> None:
        bar = self._bars.pop(stage, None)
        if bar is not None:
            bar.set_postfix_str(summary)
            bar.close()


def resolve_target(task: str, target: str | None) -> tuple[str, str]:
    """(ISO 639-3 code of the target, shipped data name of its test set)."""
    from .languages import get_language
    from .tasks import DATASETS
    from .tasks.catalogue import UD_TARGETS

    if task not in TASK_DATA:
        raise CompsftError(f"unknown task {task!r}; the demo runs pos, dep or ner")
    lang = get_language(target or TASK_DATA[task][3])
    pattern = TASK_DATA[task][2]
    if task == "ner":
        name = pattern.format(code=lang.code)
    else:
        treebank = UD_TARGETS.get(lang.iso1 or "") or UD_TARGETS.get(lang.code)
        name = pattern.format(tb=treebank) if treebank else ""
    if name not in DATASETS:
        ok = sorted({d.split(":")[2] for d in DATASETS if d.startswith("ner:masakhaner:")}) if task == "ner" \
            else sorted(UD_TARGETS)
        raise CompsftError(f"no shipped {task} test set for {lang.name} ({lang.code}); targets for {task}: "
                           f"{', '.join(ok)}")
    return lang.code, name


def machine_info(device: str) -> dict[str, Any]:
    import torch
    import transformers

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": device}
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_demo(config: DemoConfig, reporter: Reporter | None = None) -> dict[str, Any]:
    """Run the pipeline; writes SFTs, predictions, report.json and plot.png into `config.out`."""
    import torch

    from . import demo_stages as st

    reporter = reporter or TqdmReporter()
    budget = config.resolved_budget()
    target, test_name = resolve_target(config.task, config.target)
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        # The Trainer places the model itself; pick a GPU with CUDA_VISIBLE_DEVICES instead.
        raise CompsftError(f"--device {device}: use cpu or cuda (choose the GPU with CUDA_VISIBLE_DEVICES)")
    if device == "cuda" and not torch.cuda.is_available():
        raise CompsftError(f"--device {device}: CUDA is not available here")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    started = time.perf_counter()
    ctx = st.Context(config=config, budget=budget, device=device, out=out, work=work, reporter=reporter,
                     source=SOURCE_LANGUAGE, target=target, test_name=test_name)
    report: dict[str, Any] = {
        "compsft_demo": 1,
        "settings": {**{k: v for k, v in dataclasses.asdict(config).items() if k != "budget"},
                     "target": target, "source": SOURCE_LANGUAGE, "budget": dataclasses.asdict(budget)},
        "machine": machine_info(device),
        "stages": ctx.times,
    }
    model_dir = st.prepare_model(ctx)
    report["model"] = ctx.model_info
    lang_sfts = {code: st.train_language_sft(ctx, model_dir, code) for code in (SOURCE_LANGUAGE, target)}
    task_sft, task_model, labels = st.train_task_sft(ctx, model_dir, lang_sfts[SOURCE_LANGUAGE])
    report["sfts"] = ctx.sft_info
    metrics = st.evaluate_sfts(ctx, model_dir, task_model, labels, lang_sfts, task_sft)
    full_model = st.train_full_ft(ctx, model_dir, labels)
    for split, by_method in st.evaluate_full_ft(ctx, full_model, labels).items():
        metrics.setdefault(split, {}).update(by_method)
    report["data"] = ctx.data_info
    report["results"] = metrics
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    report["plot"] = "plot.png"
    st.write_plot(out / "plot.png", report)
    from .atomic import write_text

    write_text(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report
