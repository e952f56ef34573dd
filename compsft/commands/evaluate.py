"""`compsft evaluate`: compose SFTs onto a task model, evaluate on a file, write predictions and metrics."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

METRIC_NOTES = {
    "pos": "accuracy over all words",
    "dep": "UAS/LAS over all words, punctuation included; deprel subtypes stripped unless --keep-subtypes",
    "ner": "entity-level micro P/R/F1, seqeval default (conlleval) mode; gold types outside the model's labels scored as O",
}


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate(
        task: str = typer.Option(..., "--task", help="Task: pos, dep or ner."),
        model: Path = typer.Option(..., "--model", help="Task model directory (save_pretrained: encoder + task head)."),
        sft: List[Path] = typer.Option(
            [], "--sft",
            help="SFT directory to apply, repeatable (e.g. a language SFT, then a task SFT). Dense (head) "
                 "parameters are applied only from task SFTs, never from language SFTs.",
        ),
        data: str = typer.Option(..., "--data", help="Evaluation file (CoNLL-U, NER columns; .gz ok) or a shipped "
                                                     "data name such as ud:mt_mudt:test."),
        out: Optional[Path] = typer.Option(None, "--out", help="Directory for predictions and metrics.json."),
        tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer directory (default: --model)."),
        batch_size: int = typer.Option(32, "--batch-size", min=1, help="Sentences (windows) per forward pass."),
        max_length: Optional[int] = typer.Option(None, "--max-length", min=8,
                                                 help="Sub-words per window (default: the model's maximum)."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
        ner_format: Optional[str] = typer.Option(None, "--ner-format", help="NER file format: conll or iob2 "
                                                                            "(default: by extension)."),
        keep_subtypes: bool = typer.Option(False, "--keep-subtypes", help="Keep deprel subtypes (obl:tmod)."),
        check_base: bool = typer.Option(True, "--check-base/--no-check-base",
                                        help="Check that the SFTs were trained from this model's weights."),
    ) -> None:
        """Compose SFTs with a task model and evaluate it (zero-shot transfer)."""
        import json
        import time

        from rich.console import Console
        from rich.table import Table

        from compsft.atomic import write_text
        from compsft.errors import CompsftError
        from compsft.predict.loading import load_sfts, load_task_model
        from compsft.tasks import get_task, resolve_data

        console = Console(stderr=True)
        spec = get_task(task)
        data_file = resolve_data(data)
        if not data_file.is_file():
            raise CompsftError(f"{data_file}: no such file")
        sfts = load_sfts(sft, task)
        options = {"keep_subtypes": keep_subtypes} if task in ("pos", "dep") else {"format": ner_format}
        sentences = spec.read(data_file, **options)

        # One loading rule for evaluate, predict and compsft.Predictor (compsft.predict.loading): the
        # task SFTs' heads are applied, a language SFT's MLM head never; a bare model takes its labels
        # from the task SFT.
        loaded = load_task_model(spec, model, sfts, device=device, tokenizer_dir=tokenizer, check_base=check_base)
        task_model, labels, tok, dense_flags, dev = (loaded.model, loaded.labels, loaded.tokenizer,
                                                      loaded.dense_flags, loaded.device)
        gold = spec.prepare_gold(sentences, labels)
        started = time.perf_counter()
        metrics, predictions = spec.evaluate(task_model, tok, gold, labels, batch_size=batch_size, max_length=max_length)
        seconds = time.perf_counter() - started

        table = Table(title=f"{task} on {data}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for name, value in metrics.items():
            table.add_row(name, f"{value:.4f}" if 0 <= value <= 1 and name not in ("sentences", "words") else f"{value:g}")
        Console().print(table)
        console.print(f"{METRIC_NOTES.get(task, '')}. {len(gold)} sentences in {seconds:.1f} s on {dev}.")

        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            pred_path = out / f"predictions{spec.prediction_suffix}"
            spec.write_predictions(pred_path, gold, predictions)
            report = {
                "task": task,
                "data": str(data_file),
                "model": str(model),
                "sfts": [{"path": str(p), "kind": s.config.kind, "language": s.config.language,
                          "task": s.config.task, "dense_applied": d} for p, s, d in zip(sft, sfts, dense_flags)],
                "metrics": metrics,
                "metric_notes": METRIC_NOTES.get(task, ""),
                "predictions": pred_path.name,
                "seconds": round(seconds, 3),
                "device": str(dev),
            }
            write_text(out / "metrics.json", json.dumps(report, indent=2) + "\n")
            console.print(f"wrote {pred_path} and {out / 'metrics.json'}")

