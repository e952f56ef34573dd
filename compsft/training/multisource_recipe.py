"""`train_multisource_task_sft`: a task SFT learnt from several source languages, each batch under its
own source's language SFT (`compsft.training.multisource` explains how that stays exact).

    from compsft.training.multisource import TaskSource
    from compsft.training.multisource_recipe import train_multisource_task_sft
    train_multisource_task_sft("pos", "models/e5", [
        TaskSource("gle", "ud:ga_idt:train", dev="ud:ga_idt:dev", sft="sfts/gle"),
        TaskSource("fin", "ud:fi_tdt:train", dev="ud:fi_tdt:dev", sft="sfts/fin"),
        TaskSource("eng", "ud:en_ewt:train", dev="ud:en_ewt:dev"),      # no language SFT: θ0 for its batches
    ], "sfts/pos-multi", phase1=(None, 80, 80), phase2=(None, 80, 80))

The budget is counted in task steps as for one source: the sources change the data, not the compute.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from .multisource import TaskSource
from .recipes import Phase

logger = logging.getLogger(__name__)


def _load_sources(spec, sources: Sequence[TaskSource], max_sentences: int | None):
    from ..errors import CompsftError
    from ..serialization import load_sft
    from ..tasks import resolve_data

    sentences, sfts = [], {}
    for s in sources:
        rows = spec.read(resolve_data(s.train))
        if max_sentences:
            rows = rows[:max_sentences]
        if not rows:
            raise CompsftError(f"source {s.name}: {s.train}: no sentences")
        sentences.append(rows)
        sfts[s.name] = load_sft(s.sft) if isinstance(s.sft, (str, Path)) else s.sft
    return sentences, sfts


def _fallback(tokenizer, source: TaskSource, rows) -> dict | None:
    """The source's vocabulary fallback (`compsft.languages.coverage`), warned about above the threshold."""
    from ..languages import measure_vocabulary_fallback

    stats = measure_vocabulary_fallback(tokenizer, [" ".join(r.words) for r in rows])
    if stats is None:
        return None
    if stats.too_high:
        logger.warning("source %s: %.0f%% of the words of %s tokenise into single characters only with this "
                       "model's %s-piece vocabulary (above %.0f%%): the model hardly sees this language. Use "
                       "`compsft prepare-model --full`, or `compsft trim-vocab` with this language's text.",
                       source.name, 100 * stats.rate, source.train, f"{len(tokenizer):,}", 100 * stats.threshold)
    return stats.as_dict()


def train_multisource_task_sft(
    task: str,
    model: str | Path,
    sources: Sequence[TaskSource],
    out: str | Path,
    *,
    order: str = "random",
    dev_checks: int = 0,
    dev_sentences: int | None = None,
    k: int | None = None,
    density: float | None = None,
    mask_strategy: str = "lottery-ticket",
    phase1: Phase = (3.0, None, None),
    phase2: Phase = (10.0, None, None),
    l1: float = 0.0,
    lr: float = 5e-5,
    batch_size: int = 8,
    grad_accum: int = 1,
    max_length: int | None = None,
    max_sentences: int | None = None,
    seed: int = 42,
    save_steps: int = 500,
    logging_steps: int = 50,
    weight_decay: float = 0.0,
    work_dir: str | Path | None = None,
    resume: bool = False,
    cpu: bool = False,
    callbacks: list | None = None,
    quiet: bool = False,
    precision: str | None = None,
    save_dtype: str | None = None,
):
    """Train a task SFT on several sources (`TaskSource`), each batch from one source with its language
    SFT in the forward; returns the `MultiSourceFineTuner` (its `.sft` is the result).

    `order`: ``random`` (seeded) or ``sequential`` batches of the sources; `max_sentences`: per source;
    an epoch is one pass over every source's upsampled examples. `dev_checks` > 0 scores the mean over
    the sources' dev sets (each with its own source SFT; `dev_sentences` per source, spread evenly)
    that many times in the last phase and writes the best state as a second SFT into ``OUT/dev-selected``.
    After training, each source's dev set is scored once more (``training["dev"]``).
    """
    from transformers import AutoTokenizer, set_seed

    from ..sft import SftConfig
    from ..tasks import get_task, resolve_data
    from .dev_selection import DevSelection, dev_scorer, dev_subset, has_sparse_values, primary_metric, selected_sft
    from .multisource import (MultiSourceBatchSampler, MultiSourceDataset, MultiSourceFineTuner, SourceShift,
                              check_sources, mean_dev_scorer)
    from .recipes import _check_model_dir, _eval_autocast, _save_kwargs, _sft_args, _silence, _training_args, _vocab

    model, out = Path(model), Path(out)
    check_sources(sources)
    _check_model_dir(model)
    spec = get_task(task)
    set_seed(seed)
    sentences, sfts = _load_sources(spec, sources, max_sentences)
    labels = spec.label_list([r for rows in sentences for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(model)
    task_model = spec.build_model(model, labels)
    shift = SourceShift(sfts)
    shift.check(task_model)
    datasets = [spec.encode(rows, tokenizer, labels, max_length=max_length) for rows in sentences]
    sampler = MultiSourceBatchSampler([len(d) for d in datasets], batch_size, order=order, seed=seed,
                                      upsample=[s.upsample for s in sources])
    records = []
    for s, rows, per_epoch in zip(sources, sentences, sampler.batches_per_source()):
        sft = sfts[s.name]
        if sft is None:
            logger.info("source %s has no language SFT: its batches train on θ0 alone", s.name)
        records.append({"name": s.name, "train": str(s.train), "dev": str(s.dev) if s.dev else None,
                        "sentences": len(rows), "upsample": s.upsample, "batches_per_epoch": per_epoch,
                        "source_sft": str(s.sft) if isinstance(s.sft, (str, Path)) else None,
                        "language_sft": sft is not None,
                        "source_language": sft.config.language if sft is not None else None,
                        "vocabulary_fallback": _fallback(tokenizer, s, rows)})
    logger.info("multi-source %s: %s; %s order", task, ", ".join(
        f"{r['name']} ({r['sentences']} sentences x{r['upsample']}, "
        f"{'with its SFT' if sfts[r['name']] is not None else 'on θ0'})" for r in records),
        order)
    work = Path(work_dir) if work_dir else out.with_name(out.name + ".work")
    args = _training_args(work, lr=lr, batch_size=batch_size, grad_accum=grad_accum, seed=seed,
                          save_steps=save_steps, logging_steps=logging_steps, weight_decay=weight_decay,
                          cpu=cpu, quiet=quiet, precision=precision)
    training = {"labels": list(labels), "train": ",".join(str(s.train) for s in sources),
                "sentences": sum(len(rows) for rows in sentences), "source_sft": None, "source_language": None,
                "multi_source": {"sources": records, "order": order}}
    config = SftConfig(kind="task", task=task, base_model=str(model), vocab=_vocab(tokenizer), training=training)
    callbacks = list(callbacks or [])
    metric = primary_metric(task)
    devs = {s.name: dev_subset(spec.read(resolve_data(s.dev)), dev_sentences) for s in sources if s.dev}
    selection = None
    if dev_checks and devs:
        scorers = {n: dev_scorer(spec, tokenizer, rows, labels, metric=metric, max_length=max_length)
                   for n, rows in devs.items()}
        selection = DevSelection(mean_dev_scorer(shift, scorers), dev_checks, active=has_sparse_values,
                                 state_file=work / "dev-selection.safetensors", metric=f"mean {metric}")
        callbacks.append(selection)
    tuner = MultiSourceFineTuner(model=task_model, args=args, train_dataset=MultiSourceDataset(datasets),
                                 data_collator=spec.collator(tokenizer), shift=shift,
                                 source_names=[s.name for s in sources], batch_sampler=sampler,
                                 sft_args=_sft_args("task", k, density, mask_strategy, seed, (phase1, phase2), l1),
                                 sft_config=config, mlm=False, callbacks=callbacks)
    if quiet:
        _silence(tuner)
    tuner.train(resume_from_checkpoint=resume)
    multi = tuner.sft.config.training["multi_source"]
    # What each phase trained on, from the batch order (the same for a resumed run).
    accum = args.gradient_accumulation_steps
    multi["batches"] = {phase: dict(zip([s.name for s in sources], sampler.source_counts(info["steps"] * accum)))
                        for phase, info in tuner.phase_info.items() if phase in ("phase1", "phase2")}
    if devs and tuner.is_world_process_zero():
        # The model holds θ0 + φ_task; each dev set is scored with its own source SFT in the forward.
        scores = {}
        for name, rows in devs.items():
            with shift.applied(task_model, name), _eval_autocast(precision, task_model):
                scores[name], _ = spec.evaluate(task_model, tokenizer, spec.prepare_gold(rows, labels), labels,
                                                max_length=max_length)
        mean = sum(float(m[metric]) for m in scores.values()) / len(scores)
        tuner.sft.config.training["dev"] = {"files": {n: str(next(s.dev for s in sources if s.name == n))
                                                      for n in scores}, "metrics": {metric: mean},
                                            "per_source": scores}
        logger.info("dev (mean over %d sources): %s=%.4f", len(scores), metric, mean)
    tuner.save_sft(out, **_save_kwargs(save_dtype))
    if selection is not None and selection.best is not None and tuner.is_world_process_zero():
        selected = selected_sft(tuner.sft, selection.best, selection.summary())
        selected.save(out / "dev-selected", **_save_kwargs(save_dtype))
    return tuner


# -- sources from command-line values ---------------------------------------------------------------
def _split(value: str, what: str) -> tuple[str | None, str]:
    """``LANG=VALUE`` -> (LANG, VALUE); a value without a language prefix -> (None, value)."""
    import re

    from ..errors import CompsftError

    m = re.fullmatch(r"([a-z][a-z0-9_-]*)=(.+)", value.strip())
    if m:
        return m.group(1), m.group(2)
    if "=" in value.split(":")[0] and not Path(value).exists():
        raise CompsftError(f"{what} {value!r}: expected LANG=VALUE with a lowercase language code")
    return None, value


def is_multi_source(train: Sequence[str], source_sft: Sequence[str]) -> bool:
    """Whether `train-task` values ask for multi-source training: several --train, or a LANG= prefix."""
    return len(train) > 1 or any(_split(v, "value")[0] for v in [*train, *source_sft])


def sources_from_cli(train: Sequence[str], dev: Sequence[str] = (), source_sft: Sequence[str] = (),
                     upsample: Sequence[str] = ()) -> list[TaskSource]:
    """`TaskSource`s from `train-task`'s repeatable values: ``--train [LANG=]DATA`` (a shipped UD name
    knows its language: ``ud:ga_idt:train`` is gle), ``--dev [LANG=]DATA``, ``--source-sft [LANG=]DIR``
    (a bare directory names the language its SFT records) and ``--upsample LANG=N``."""
    from ..errors import CompsftError
    from ..serialization import load_sft
    from ..tasks.catalogue import data_language
    from .multisource import check_sources

    def lang_of(value: str, what: str) -> tuple[str, str]:
        lang, data = _split(value, what)
        lang = lang or data_language(data)
        if lang is None:
            raise CompsftError(f"{what} {value!r}: say which language it is, as LANG={value}")
        return lang, data

    sources: dict[str, TaskSource] = {}
    for value in train:
        lang, data = lang_of(value, "--train")
        if lang in sources:
            raise CompsftError(f"--train {value!r}: source {lang} is given twice")
        sources[lang] = TaskSource(lang, data)
    for value in dev:
        lang, data = lang_of(value, "--dev")
        if lang not in sources:
            raise CompsftError(f"--dev {value!r}: {lang} is not one of the sources ({', '.join(sources)})")
        sources[lang].dev = data
    for value in source_sft:
        lang, path = _split(value, "--source-sft")
        lang = lang or load_sft(path).config.language
        if lang not in sources:
            raise CompsftError(f"--source-sft {value!r}: {lang or 'its language'} is not one of the sources "
                               f"({', '.join(sources)}); write LANG={path}")
        if sources[lang].sft is not None:
            raise CompsftError(f"--source-sft {value!r}: source {lang} has a language SFT already")
        sources[lang].sft = path
    for value in upsample:
        lang, n = _split(value, "--upsample")
        if lang not in sources or not n.isdigit() or int(n) < 1:
            raise CompsftError(f"--upsample {value!r}: expected LANG=N with N >= 1 and LANG one of "
                               f"{', '.join(sources)}")
        sources[lang].upsample = int(n)
    check_sources(list(sources.values()))
    return list(sources.values())
