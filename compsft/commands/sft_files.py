"""Commands on SFT files: `info`, `compose`, `convert`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

LAYER_TYPES = (
    ("embeddings", ("embeddings",)),
    ("attention", ("attention",)),
    ("feed-forward", ("intermediate", "output.dense")),
    ("pooler/head", ("pooler", "cls.", "classifier", "lm_head", "predictions")),
)


def layer_type(name: str) -> str:
    """Coarse layer type of a parameter name, for the density table."""
    for label, keys in LAYER_TYPES:
        if any(k in name for k in keys):
            return label
    return "other"


def sft_info(path: Path) -> dict:
    """Facts about an SFT directory, from its config and the safetensors header only."""
    from safetensors import safe_open

    from ..serialization import WEIGHTS_NAME, read_config, read_header

    config = read_config(path)
    index, dense = read_header(path)
    dtypes: dict[str, int] = {}
    with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
        for name in index:
            dt = f.get_slice(f"sparse/{name}/values").get_dtype()
            dtypes[dt] = dtypes.get(dt, 0) + int(index[name]["nnz"])
    per_type: dict[str, dict[str, int]] = {}
    for name, e in index.items():
        numel = 1
        for s in e["shape"]:
            numel *= int(s)
        row = per_type.setdefault(layer_type(name), {"nnz": 0, "numel": 0, "tensors": 0})
        row["nnz"] += int(e["nnz"])
        row["numel"] += numel
        row["tensors"] += 1
    nbytes = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    k = sum(int(e["nnz"]) for e in index.values())
    return {
        "path": str(path),
        "kind": config.kind,
        "language": config.language,
        "task": config.task,
        "base_model": config.base_model,
        "k": k,
        "density": config.density,
        "num_eligible": config.num_eligible,
        "num_tensors": len(index),
        "dense_params": dense,
        "value_dtypes": dtypes,
        "per_layer_type": {
            t: {**r, "density": (r["nnz"] / r["numel"]) if r["numel"] else 0.0} for t, r in sorted(per_type.items())
        },
        "bytes": nbytes,
        "bytes_per_nonzero": (nbytes / k) if k else None,
        "vocab": config.vocab,
        "training": config.training,
        "format_version": config.format_version,
        "compsft_version": config.compsft_version,
    }


def compose_model(base: Path, sfts: list, scales=None, with_dense: Optional[bool] = None, check_base: bool = True,
                  device: str = "cpu"):
    """The base model with `sfts` applied, as the model to write: the task's model (head and label map)
    when a task SFT's head is applied, else the base's own class (a masked LM for language SFTs).
    `device`: where the SFTs are added (cpu, cuda or cuda:N); the result is the same on every device.

    Returns (model, tokenizer or None).
    """
    import compsft

    from ..errors import CompsftError
    from ..merge import carries_task, resolve_with_dense, task_labels
    from ..paths import load_model_by_architecture, load_tokenizer, local_dir
    from ..vocab import vocab_fingerprint

    local_dir(base, "--base")
    dev = _device(device)
    flags = resolve_with_dense(sfts, with_dense)
    heads = [s for s, keep in zip(sfts, flags) if keep and carries_task(s) and s.dense]
    # A model directory without a tokenizer is fine: no vocabulary check then.
    tokenizer = load_tokenizer(base, "--base", required=False)
    if heads:
        from ..tasks import get_task

        tasks = {s.config.task for s in heads}
        if len(tasks) > 1:
            raise CompsftError(f"--sft: heads of several tasks ({', '.join(sorted(map(str, tasks)))}) cannot make one model")
        task, labels = task_labels(heads)
        source = getattr(heads[0], "source", None) or "the task SFT"
        if not labels:
            raise CompsftError(f"{source}: a task SFT without a label list (training.labels); "
                               "re-convert it with `compsft convert ... --labels`")
        # pos and ner share one model class (token classification): a converted head without a task
        # name is built as one.
        try:
            model = get_task(task or "pos").build_model(base, labels)
        except RuntimeError as err:  # transformers refuses a head of another size in --base
            raise CompsftError(f"--base: {base} cannot take a head for {len(labels)} labels ({str(err)[:200]}); "
                               "compose onto the pretrained model the SFTs were trained from") from None
    else:
        model = load_model_by_architecture(base, "--base")
    vocab = vocab_fingerprint(tokenizer) if tokenizer is not None else None
    model.to(dev)
    compsft.apply(model, *sfts, scales=scales, with_dense=flags, check_base=check_base, vocab=vocab)
    return model, tokenizer


def _device(device: str):
    import torch

    from ..errors import CompsftError

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise CompsftError(f"--device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CompsftError(f"--device {device}: CUDA is not available here (torch {torch.__version__})")
    if dev.type not in ("cpu", "cuda"):
        raise CompsftError(f"--device {device!r}: use cpu, cuda or cuda:N")
    return dev


def register(app: typer.Typer) -> None:
    @app.command()
    def info(
        path: Annotated[Path, typer.Argument(help="SFT directory (sft.safetensors + sft_config.json)")],
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
    ) -> None:
        """Show what an SFT touches: K, density per layer type, dtypes, bytes, base model.

        Example: compsft info runs/mt-language
        """
        facts = sft_info(path)
        if as_json:
            typer.echo(json.dumps(facts, indent=2, sort_keys=True))
            return
        from rich.console import Console
        from rich.table import Table

        console = Console()
        console.print(f"[bold]{path}[/]: {facts['kind']} SFT"
                      + (f" ({facts['language']})" if facts["language"] else "")
                      + (f" ({facts['task']})" if facts["task"] else ""))
        console.print(f"base model: {facts['base_model']}   K = {facts['k']:,}"
                      + (f"   density {facts['density']:.4%}" if facts["density"] else "")
                      + f"   {facts['num_tensors']} tensors   {facts['bytes']:,} bytes"
                      + (f" ({facts['bytes_per_nonzero']:.2f} per non-zero)" if facts["bytes_per_nonzero"] else ""))
        table = Table("layer type", "tensors", "non-zeros", "entries", "density")
        for t, r in facts["per_layer_type"].items():
            table.add_row(t, str(r["tensors"]), f"{r['nnz']:,}", f"{r['numel']:,}", f"{r['density']:.4%}")
        console.print(table)
        console.print(f"value dtypes: {facts['value_dtypes']}   dense parameters: {len(facts['dense_params'])}"
                      + (f" ({', '.join(facts['dense_params'][:4])}{', ...' if len(facts['dense_params']) > 4 else ''})"
                         if facts["dense_params"] else ""))

    @app.command()
    def compose(
        base: Annotated[Path, typer.Option(help="Pretrained model directory (save_pretrained layout)")],
        sft: Annotated[list[Path], typer.Option(help="SFT directory; repeat to compose several")],
        out: Annotated[Path, typer.Option(help="Where to write the merged model")],
        scale: Annotated[Optional[list[float]], typer.Option(help="Scale per --sft (default 1.0 each)")] = None,
        with_dense: Annotated[Optional[bool], typer.Option(
            "--with-dense/--no-dense",
            help="Copy every SFT's dense parameters (heads) in, or none. Default: by kind — a task SFT's "
                 "head yes, a language SFT's MLM head no")] = None,
        check_base: Annotated[bool, typer.Option(help="Check the base-model fingerprint")] = True,
        device: Annotated[str, typer.Option(help="Add the SFTs on this device: cpu, cuda or cuda:N")] = "cpu",
    ) -> None:
        """Add SFTs onto a base model and write the merged model (safetensors, with the tokenizer).

        With a task SFT the result is the task's model, head and label map included (load it with
        AutoModelForTokenClassification for pos/ner, or compsft.tasks.get_task("dep").load_model);
        with language SFTs only, the base model's own class (a masked LM).

        Example: compsft compose --base models/e5 --sft runs/mt-language --sft runs/pos-task --out merged/
        """
        import compsft

        from ..atomic import atomic_path

        sfts = []
        for p in sft:
            loaded = compsft.load(p)
            loaded.source = str(p)
            sfts.append(loaded)
        model, tokenizer = compose_model(base, sfts, scales=scale, with_dense=with_dense, check_base=check_base,
                                         device=device)
        with atomic_path(out) as tmp:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        typer.echo(f"wrote {out}: {type(model).__name__} ({len(sfts)} SFT(s), k={sum(s.k for s in sfts):,})")

    @app.command()
    def convert(
        old_dir: Annotated[Path, typer.Argument(help="Reference-implementation SFT directory (pytorch_diff.bin)")],
        new_dir: Annotated[Path, typer.Argument(help="Where to write the compsft SFT")],
        base: Annotated[Optional[Path], typer.Option(
            help="The model directory the SFT was trained from: checks every tensor's shape and records its "
                 "fingerprint (without it the SFT cannot be checked when applied)")] = None,
        kind: Annotated[Optional[str], typer.Option(
            help="language, task or other (default: from the dense part: a classifier head is a task SFT, "
                 "an MLM head a language SFT)")] = None,
        task: Annotated[Optional[str], typer.Option(help="Task of a task SFT: pos, dep or ner")] = None,
        lang: Annotated[Optional[str], typer.Option("--lang", help="Language code of a language SFT")] = None,
        labels: Annotated[Optional[str], typer.Option(
            help="A task SFT's labels in id order, comma-separated (default: id2label of a config.json "
                 "next to pytorch_diff.bin)")] = None,
    ) -> None:
        """Convert a composable-sft `pytorch_diff.bin` without executing any code from it.

        Example: compsft convert old/pos-sft runs/pos-task --base models/mbert --task pos --labels NOUN,VERB,...
        """
        from ..legacy import convert_legacy

        if task is not None:
            from ..tasks import get_task

            get_task(task)  # an unknown task name is an error naming the known ones
        label_list = [x.strip() for x in labels.split(",")] if labels else None
        if label_list is not None and not all(label_list):
            raise typer.BadParameter("empty label in the list", param_hint="--labels")
        converted = convert_legacy(old_dir, base, kind=kind, task=task, language=lang, labels=label_list)
        converted.save(new_dir)
        typer.echo(f"wrote {new_dir}: {converted.config.kind} SFT, {len(converted.diffs)} tensors, k={converted.k:,}, "
                   f"{len(converted.dense)} dense, "
                   + (f"base fingerprint of {base}" if base is not None else "no base fingerprint (no --base)"))
