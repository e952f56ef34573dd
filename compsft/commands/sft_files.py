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


def _load_model(model_dir: Path):
    """Load a model directory with the class its config names (falls back to AutoModel)."""
    import transformers
    from transformers import AutoConfig, AutoModel

    from ..errors import CompsftError

    if not (model_dir / "config.json").is_file():
        raise CompsftError(f"{model_dir}: not a model directory (no config.json)")
    config = AutoConfig.from_pretrained(model_dir)
    for arch in config.architectures or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls.from_pretrained(model_dir)
    return AutoModel.from_pretrained(model_dir)


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
        with_dense: Annotated[bool, typer.Option(help="Also copy the SFTs' dense parameters (heads) in")] = False,
        check_base: Annotated[bool, typer.Option(help="Check the base-model fingerprint")] = True,
    ) -> None:
        """Add SFTs onto a base model and write the merged model (safetensors).

        Example: compsft compose --base models/e5 --sft runs/mt-language --sft runs/pos-task --out merged/
        """
        import compsft

        from ..atomic import atomic_path

        sfts = [compsft.load(p) for p in sft]
        model = _load_model(base)
        from transformers import AutoTokenizer

        from ..vocab import vocab_fingerprint

        try:
            tokenizer = AutoTokenizer.from_pretrained(base)
        except Exception:  # a model directory without a tokenizer is fine: no vocabulary check then
            tokenizer = None
        vocab = vocab_fingerprint(tokenizer) if tokenizer is not None else None
        compsft.apply(model, *sfts, scales=scale, with_dense=with_dense, check_base=check_base, vocab=vocab)
        with atomic_path(out) as tmp:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        typer.echo(f"wrote {out} ({len(sfts)} SFT(s), k={sum(s.k for s in sfts):,})")

    @app.command()
    def convert(
        old_dir: Annotated[Path, typer.Argument(help="Reference-implementation SFT directory (pytorch_diff.bin)")],
        new_dir: Annotated[Path, typer.Argument(help="Where to write the compsft SFT")],
    ) -> None:
        """Convert a composable-sft `pytorch_diff.bin` without executing any code from it.

        Example: compsft convert old/mt-sft runs/mt-language
        """
        from ..legacy import convert_legacy

        converted = convert_legacy(old_dir)
        converted.save(new_dir)
        typer.echo(f"wrote {new_dir}: {len(converted.diffs)} tensors, k={converted.k:,}, {len(converted.dense)} dense")
