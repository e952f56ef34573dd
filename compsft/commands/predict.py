"""`compsft predict`: tag, parse or find entities in raw text, pre-tokenized text or CoNLL-U."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("predict")
    def predict(
        task: str = typer.Option(..., "--task", help="Task: pos, dep or ner."),
        model: Path = typer.Option(..., "--model", help="Model directory: the pretrained base (with --sft), a trained "
                                                        "task model, or a directory written by `compsft compose`."),
        sft: List[Path] = typer.Option([], "--sft", help="SFT directory to apply, repeatable (a language SFT, then a "
                                                         "task SFT); none for a composed model."),
        input: str = typer.Option("-", "--input", "-i", help="Input file (.gz ok), or - for stdin."),
        out: str = typer.Option("-", "--out", "-o", help="Output file (written atomically), or - for stdout."),
        pretokenized: bool = typer.Option(False, "--pretokenized", help="One sentence per line, words separated "
                                                                        "by spaces (same as --input-format pretokenized)."),
        input_format: Optional[str] = typer.Option(None, "--input-format", help="raw (a paragraph per line), "
                                                   "pretokenized or conllu (default: conllu for *.conllu, else raw)."),
        fmt: Optional[str] = typer.Option(None, "--format", help="conllu (default) or jsonl; ner also iob2."),
        force: bool = typer.Option(False, "--force", help="Overwrite an existing --out."),
        tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer directory (default: --model)."),
        batch_size: int = typer.Option(32, "--batch-size", min=1, help="Sentences (windows) per forward pass."),
        chunk_size: int = typer.Option(1000, "--chunk-size", min=1, help="Sentences read, predicted and written at "
                                                                         "a time (memory does not grow with the input)."),
        max_length: Optional[int] = typer.Option(None, "--max-length", min=8,
                                                 help="Sub-words per window (default: the model's maximum)."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
        log_every: int = typer.Option(1000, "--log-every", min=1, help="Without a terminal: a progress line every N "
                                                                       "sentences."),
        check_base: bool = typer.Option(True, "--check-base/--no-check-base",
                                        help="Check that the SFTs were trained from this model's weights."),
    ) -> None:
        """Predict with a composed model on your text and write CoNLL-U (or IOB2 / JSON lines).

        Examples:
          compsft predict --task pos --model M --sft sfts/mlt --sft sfts/pos --input text.txt --out text.conllu
          compsft predict --task dep --model merged/ --input in.conllu --out parsed.conllu
          echo "Il-kelb qiegħed jorqod." | compsft predict --task pos --model merged/
        """
        import sys
        import time

        from rich.console import Console

        from compsft.errors import CompsftError
        from compsft.predict import Predictor, format_sentence, open_output, read_input
        from compsft.predict.outputs import check_format
        from compsft.tasks import TASKS

        console = Console(stderr=True, soft_wrap=True)
        if task not in TASKS:
            raise CompsftError(f"--task: unknown task {task!r}; known tasks: {', '.join(TASKS)}")
        fmt = check_format(task, fmt)
        if pretokenized:
            if input_format not in (None, "pretokenized"):
                raise CompsftError(f"--pretokenized contradicts --input-format {input_format}")
            input_format = "pretokenized"
        # Refuse before the model loads: these take a second to check and a minute to discover later.
        if input != "-" and not Path(input).is_file():
            raise CompsftError(f"--input: {input}: no such file")
        if out != "-":
            if Path(out).exists() and not force:
                raise CompsftError(f"--out: {out} exists; pass --force to overwrite it")
            if input != "-" and Path(out).resolve() == Path(input).resolve():
                raise CompsftError(f"--out: {out} is the input file")

        predictor = Predictor(model, sfts=list(sft), task=task, device=device, batch_size=batch_size,
                              max_length=max_length, tokenizer=tokenizer, check_base=check_base)
        records = read_input(input, input_format)
        started = time.perf_counter()
        sentences = words = 0
        with open_output(out, force=force) as f, _Progress(console, log_every) as progress:
            for record, pred in predictor.stream(records, chunk_size=chunk_size):
                f.write(format_sentence(record, pred, task, fmt))
                sentences += 1
                words += len(record.words)
                progress.advance(sentences)
                if sentences % chunk_size == 0:  # a chunk done: on disk (or down the pipe) before the next is read
                    f.flush()
        seconds = time.perf_counter() - started
        where = "stdout" if out == "-" else out
        name = "<stdin>" if input == "-" else input
        if predictor.long_sentences:
            console.print(f"{predictor.long_sentences} sentences were longer than the model's window "
                          f"({predictor.max_length} sub-words) and were predicted in windows")
        if not sentences:
            console.print(f"[bold yellow]warning[/]: {name}: no sentences (empty input); wrote an empty output to {where}")
            return
        console.print(f"{task}: {sentences} sentences, {words} words from {name} to {where} in {seconds:.1f} s "
                      f"({sentences / max(seconds, 1e-9):.1f} sentences/s on {predictor.device})")
        sys.stderr.flush()


class _Progress:
    """A rich progress display on a terminal; otherwise a timestamped line every `every` sentences."""

    def __init__(self, console, every: int) -> None:
        self.console, self.every = console, every
        self.bar = None

    def __enter__(self) -> "_Progress":
        import time

        self.started = time.perf_counter()
        if self.console.is_terminal:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.bar = Progress(SpinnerColumn(), TextColumn("{task.completed} sentences"),
                                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=self.console,
                                transient=True)
            self.bar.start()
            self.task = self.bar.add_task("predict", total=None, rate="")
        return self

    def advance(self, count: int) -> None:
        import time

        if self.bar is not None:
            if count % 50 == 0 or count < 50:
                rate = count / max(time.perf_counter() - self.started, 1e-9)
                self.bar.update(self.task, completed=count, rate=f"{rate:.1f}/s")
        elif count % self.every == 0:
            from datetime import datetime

            rate = count / max(time.perf_counter() - self.started, 1e-9)
            print(f"{datetime.now():%Y-%m-%d %H:%M:%S} predicted {count} sentences ({rate:.1f}/s)",
                  file=self.console.file, flush=True)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
