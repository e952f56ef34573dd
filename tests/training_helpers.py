"""Tiny models and data for the training tests (no files, no downloads)."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

VOCAB = 60


def tiny_config(**kw):
    from transformers import BertConfig

    base = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                vocab_size=VOCAB, max_position_embeddings=32, hidden_dropout_prob=0.1,
                attention_probs_dropout_prob=0.1)
    base.update(kw)
    return BertConfig(**base)


class ToyTagging(Dataset):
    """Tag = token id mod 3: learnable from the embeddings alone."""

    def __init__(self, n=64, length=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, VOCAB, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids % 3}


def training_args(out, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=2,
                save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def char_tokenizer(vocab: list[str], vocab_file):
    """A WordPiece tokenizer over `vocab`. transformers 5 takes the vocabulary as a dict and ignores
    `vocab_file` (leaving 5 special tokens: every word became [UNK]); 4.x reads `vocab_file`."""
    from transformers import BertTokenizerFast

    try:
        tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True, strip_accents=True)
    except Exception:  # noqa: BLE001 - 4.x has no `vocab` argument and may fail without a vocab_file
        tok = None
    if tok is None or len(tok) != len(vocab):
        tok = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True, strip_accents=True)
    if len(tok) != len(vocab) or tok.tokenize("ta.") != ["t", "##a", "."]:
        raise RuntimeError(f"the test tokenizer did not take its vocabulary ({len(tok)} of {len(vocab)} pieces)")
    return tok


def make_model_dir(path, mlm: bool = True, seed: int = 0, **config):
    """A tiny BERT (MLM head included) and a character-level WordPiece tokenizer, saved to `path`."""
    import string

    from transformers import BertForMaskedLM

    path.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + ".,;:!?'\"-()")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = char_tokenizer(vocab, path / "vocab.txt")
    tok.save_pretrained(str(path))
    torch.manual_seed(seed)
    model = BertForMaskedLM(tiny_config(vocab_size=len(vocab), max_position_embeddings=64, **config))
    model.save_pretrained(str(path))
    return path


def write_text_corpus(path, n=120, seed=0):
    import random

    rng = random.Random(seed)
    words = ["ta", "xemx", "il", "kelb", "dar", "baħar", "ġmiel", "qalb", "ħobż", "tifel", "omm", "missier"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + "." for _ in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def first_sentences(name: str, n: int, out):
    """The first `n` sentences of a shipped CoNLL-U file (e.g. "ud:en_ewt:train"), as a small file at `out`
    (reading the whole file is slow)."""
    import gzip

    from compsft.tasks import data_path

    blocks, current = [], []
    with gzip.open(data_path(name), "rt", encoding="utf-8") as f:
        for line in f:
            current.append(line)
            if not line.strip():
                blocks.append("".join(current))
                current = []
                if len(blocks) == n:
                    break
    out.write_text("".join(blocks), encoding="utf-8")
    return out
