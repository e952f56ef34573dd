"""Helpers of the serve tests (no tests here): a tiny base model and a store of random SFTs built in code."""
from __future__ import annotations

from pathlib import Path

import torch
import xxhash

from compsft.sft import SftConfig, SparseDelta, SparseFineTuning

WORDS = ("the dog sees a cat . il kelb jara qattus . ndox mi neex na . Maria went to Paris with John "
         "yesterday and they ate bread in the old house near the river").split()
POS_LABELS = ["ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN",
              "PUNCT", "SCONJ", "SYM", "VERB", "X"]
NER_LABELS = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


def make_base(path: Path) -> Path:
    """A tiny random BERT (hidden 32, 2 layers) with a WordPiece tokenizer trained on WORDS."""
    from tasks_testutil import make_bert_dir, make_tokenizer

    return make_bert_dir(path, make_tokenizer(WORDS * 3, vocab_size=120))


def _encoder_state(base: Path) -> dict[str, torch.Tensor]:
    from transformers import BertForMaskedLM

    model = BertForMaskedLM.from_pretrained(base)
    return {n: p.detach() for n, p in model.named_parameters() if n.startswith("bert.")}


def _head_state(base: Path, task: str, labels: list[str], seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    if task == "dep":
        from compsft.tasks.biaffine import BiaffineParser

        model = BiaffineParser.from_encoder(base, labels)  # default sizes: what evaluate and predict build
        with torch.no_grad():
            for p in model.head_state_dict().values():
                p.normal_(0, 0.5)
        return {k: v.clone() for k, v in model.head_state_dict().items()}
    hidden = 32
    return {"classifier.weight": torch.randn(len(labels), hidden), "classifier.bias": torch.randn(len(labels)) * 0.1}


def random_sft(base: Path, kind: str, name: str, seed: int, density: float = 0.05, scale: float = 0.3,
               base_state: dict | None = None) -> SparseFineTuning:
    """A language SFT (`kind` "language", `name` its code) or task SFT (`name` pos/ner/dep) of random values
    on a random `density` of the encoder's entries, with its base fingerprint and vocabulary recorded."""
    from compsft.fingerprint import fingerprint
    from compsft.vocab import vocab_fingerprint
    from transformers import AutoTokenizer

    state = base_state or _encoder_state(base)
    g = torch.Generator().manual_seed(seed)
    diffs = {}
    for pname, p in state.items():
        if "LayerNorm" in pname:
            continue
        k = max(1, int(p.numel() * density))
        idx = torch.randperm(p.numel(), generator=g)[:k].sort().values
        diffs[pname] = SparseDelta(tuple(p.shape), idx.int(), torch.randn(k, generator=g) * scale)
    config = SftConfig(kind=kind, base_model=str(base), base_fingerprint=fingerprint(state, diffs),
                       vocab=vocab_fingerprint(AutoTokenizer.from_pretrained(base)))
    dense = {}
    if kind == "language":
        config.language = name
    else:
        labels = {"pos": POS_LABELS, "ner": NER_LABELS}.get(name)
        if labels is None:
            from compsft.tasks.dep import DEPRELS

            labels = list(DEPRELS)
        config.task = name
        config.training = {"labels": labels}
        dense = _head_state(base, name, labels, seed)
    return SparseFineTuning(diffs, dense, config)


def make_store(base: Path, store: Path, languages=("wol", "mlt"), tasks=("pos", "dep", "ner")) -> Path:
    """A store directory: one language SFT per language under lang/, one task SFT per task under task/."""
    state = _encoder_state(base)
    for i, code in enumerate(languages):
        random_sft(base, "language", code, seed=10 + i, base_state=state).save(store / "lang" / code)
    for i, task in enumerate(tasks):
        random_sft(base, "task", task, seed=100 + i, density=0.02, scale=0.1, base_state=state).save(
            store / "task" / task)
    return store


def state_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A 128-bit hash over every tensor's name and exact bytes: equal only if bit-identical."""
    h = xxhash.xxh3_128()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
