"""Vocabularies: a fingerprint that SFTs record, and trimming a model to the pieces some text uses.

Trimming keeps the pieces that the given corpora tokenise into, every single-character piece and
the special tokens, in their old order, and keeps each piece's score. For a Unigram tokenizer the
best segmentation of covered text is still available and still best, so it tokenises exactly as
before; WordPiece's greedy longest match likewise finds the same pieces.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

from .errors import CompsftError, VocabularyMismatch

logger = logging.getLogger(__name__)

SUPPORTED_MODELS = ("Unigram", "WordPiece")


def _pieces(tokenizer) -> list[str]:
    """Pieces in id order, from a transformers tokenizer, a `tokenizers.Tokenizer` or a model directory."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    return [tokenizer.id_to_token(i) for i in range(size)]


def vocab_fingerprint(tokenizer) -> dict:
    """``{"size": n, "sha256": hex}`` over the pieces in id order (JSON-encoded, so any piece is safe)."""
    pieces = _pieces(tokenizer)
    digest = hashlib.sha256(json.dumps(pieces, ensure_ascii=False).encode("utf-8")).hexdigest()
    return {"size": len(pieces), "sha256": digest}


def check_vocab(recorded: dict | None, tokenizer, what: str = "this SFT") -> None:
    """Raise `VocabularyMismatch` when `recorded` (a fingerprint) is not `tokenizer`'s vocabulary."""
    if recorded:
        require_same_vocab(recorded, vocab_fingerprint(tokenizer), what)


def require_same_vocab(recorded: dict | None, actual: dict | None, what: str = "this SFT") -> None:
    """Raise `VocabularyMismatch` unless two fingerprints agree (nothing to compare is no error)."""
    if not recorded or not actual:
        return
    if recorded.get("sha256") != actual.get("sha256") or int(recorded.get("size", -1)) != int(actual.get("size", -2)):
        raise VocabularyMismatch(
            f"{what} was trained with a vocabulary of {recorded.get('size')} pieces "
            f"(sha256 {str(recorded.get('sha256'))[:12]}), but the model's tokenizer has {actual.get('size')} pieces "
            f"(sha256 {str(actual.get('sha256'))[:12]}); use the model (or trimmed model) it was trained on"
        )


def read_text_lines(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Lines of plain-text files (`.gz` read transparently); CoNLL-U files give their `# text =` lines."""
    import gzip

    lines: list[str] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise CompsftError(f"{path}: text file not found")
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            content = f.read().splitlines()
        if ".conllu" in path.name:
            content = [l[len("# text = "):] for l in content if l.startswith("# text = ")]
        lines += [l for l in content if l.strip()]
    return lines


def used_piece_ids(tokenizer, texts: Sequence[str], batch: int = 2000) -> set[int]:
    """Ids of every piece the tokenizer produces on `texts` (special tokens not included)."""
    used: set[int] = set()
    for i in range(0, len(texts), batch):
        for ids in tokenizer(list(texts[i:i + batch]), add_special_tokens=False)["input_ids"]:
            used.update(ids)
    return used


def keep_ids_for(tokenizer, texts: Sequence[str]) -> list[int]:
    """Sorted ids to keep: pieces used by `texts`, single-character pieces, special tokens."""
    from tokenizers import Tokenizer

    backend: Tokenizer = tokenizer.backend_tokenizer
    kind = json.loads(backend.to_str())["model"]["type"]
    if kind not in SUPPORTED_MODELS:
        raise CompsftError(f"trim-vocab supports {', '.join(SUPPORTED_MODELS)} tokenizers, not {kind}")
    keep = used_piece_ids(tokenizer, texts)
    keep.update(tokenizer.all_special_ids)
    for piece, idx in tokenizer.get_vocab().items():
        core = piece[2:] if kind == "WordPiece" and piece.startswith("##") else piece
        if len(core) <= 1:
            keep.add(idx)
    return sorted(keep)


def _trimmed_backend(tokenizer, keep: Sequence[int]):
    """A new `tokenizers.Tokenizer` with only `keep` (old ids, sorted), renumbered 0..n-1."""
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    new_id = {old: new for new, old in enumerate(keep)}
    model = spec["model"]
    if model["type"] == "Unigram":
        model["vocab"] = [model["vocab"][old] for old in keep]
        if model.get("unk_id") is not None:
            model["unk_id"] = new_id[model["unk_id"]]
    elif model["type"] == "WordPiece":
        by_id = {idx: piece for piece, idx in model["vocab"].items()}
        model["vocab"] = {by_id[old]: new for new, old in enumerate(keep)}
    for token in spec.get("added_tokens") or []:
        if token["id"] not in new_id:
            raise CompsftError(f"added token {token['content']!r} (id {token['id']}) would be dropped")
        token["id"] = new_id[token["id"]]
    _remap_post_processor(spec.get("post_processor"), new_id)
    return Tokenizer.from_str(json.dumps(spec))


def _remap_post_processor(proc: dict | None, new_id: dict[int, int]) -> None:
    if not proc:
        return
    for sub in proc.get("processors") or []:
        _remap_post_processor(sub, new_id)
    for value in (proc.get("special_tokens") or {}).values():
        value["ids"] = [new_id[i] for i in value["ids"]]
    for key in ("sep", "cls"):
        if isinstance(proc.get(key), list) and len(proc[key]) == 2:
            proc[key][1] = new_id[proc[key][1]]


def trim_model_and_tokenizer(model, tokenizer, keep: Sequence[int]):
    """Trim in place: keep embedding rows (and any other vocabulary-sized rows, such as the MLM bias).

    Returns the new tokenizer. `keep` holds sorted old ids; rows past the tokenizer's size are dropped.
    """
    import torch
    from transformers import PreTrainedTokenizerFast

    keep = sorted(set(int(i) for i in keep))
    rows = model.get_input_embeddings().weight.shape[0]
    if keep[-1] >= len(tokenizer) or keep[-1] >= rows:
        raise CompsftError(f"piece id {keep[-1]} is outside the vocabulary ({len(tokenizer)} pieces, {rows} rows)")
    index = torch.tensor(keep, dtype=torch.long)
    # The vocabulary-sized tensors: input embeddings, output embeddings when untied, head biases.
    targets = {id(model.get_input_embeddings().weight): model.get_input_embeddings().weight}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        targets[id(output.weight)] = output.weight
        if getattr(output, "bias", None) is not None:
            targets[id(output.bias)] = output.bias
    base = {id(p) for p in model.base_model.parameters()}
    for param in model.parameters():
        if id(param) not in base and param.shape[0] == rows:
            targets[id(param)] = param
    with torch.no_grad():
        for param in targets.values():
            if param.shape[0] == rows:
                param.data = param.data.index_select(0, index.to(param.device)).clone()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and module.weight.shape[0] == len(keep):
            module.num_embeddings = len(keep)
        elif isinstance(module, torch.nn.Linear) and module.weight.shape[0] == len(keep):
            module.out_features = len(keep)
    model.config.vocab_size = len(keep)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    backend = _trimmed_backend(tokenizer, keep)
    specials = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    new_tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=tokenizer.model_max_length,
                                            **specials)
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):
        tid = getattr(tokenizer, attr, None)
        if tid is not None and getattr(model.config, attr, None) is not None:
            setattr(model.config, attr, getattr(new_tokenizer, attr))
    return new_tokenizer


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def trim_vocab(model_dir: str | os.PathLike, out_dir: str | os.PathLike, texts: Sequence[str] | None = None,
               keep: Sequence[int] | None = None) -> dict:
    """Trim the model directory `model_dir` to the pieces of `texts` (or the given `keep` ids).

    Writes a complete model directory to `out_dir` atomically; returns a summary with the
    vocabulary sizes and parameter counts before and after.
    """
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    from .atomic import atomic_path
    from .models.e5_tokenizer import save_portable_tokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise CompsftError(f"{model_dir}: not a model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if not getattr(tokenizer, "is_fast", False):
        raise CompsftError(f"{model_dir}: trim-vocab needs a fast tokenizer (tokenizer.json)")
    config = AutoConfig.from_pretrained(str(model_dir))
    arch = (config.architectures or ["AutoModel"])[0]
    model_cls = getattr(transformers, arch, None) or transformers.AutoModel
    model = model_cls.from_pretrained(str(model_dir))
    if keep is None:
        if not texts:
            raise CompsftError("trim-vocab: no text given (and no explicit list of pieces to keep)")
        keep = keep_ids_for(tokenizer, texts)
    before = {"pieces": len(tokenizer), "parameters": count_parameters(model)}
    new_tokenizer = trim_model_and_tokenizer(model, tokenizer, keep)
    after = {"pieces": len(new_tokenizer), "parameters": count_parameters(model)}
    summary = {"model": str(model_dir), "before": before, "after": after,
               "vocab": vocab_fingerprint(new_tokenizer), "texts": len(texts or [])}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        model.save_pretrained(tmp, safe_serialization=True)
        save_portable_tokenizer(new_tokenizer, tmp)
        info_path = model_dir / "compsft_model.json"
        info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
        info["trimmed"] = {k: v for k, v in summary.items() if k != "vocab"}
        (tmp / "compsft_model.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        (tmp / "kept_piece_ids.json").write_text(json.dumps(list(map(int, keep))) + "\n", encoding="utf-8")
    logger.info("trimmed %s: %d -> %d pieces, %d -> %d parameters", model_dir, before["pieces"], after["pieces"],
                before["parameters"], after["parameters"])
    return summary
