"""Train the default model's MLM head once and write compsft/data/e5_mlm_head.{safetensors,json}.

multilingual-e5-small was trained contrastively and has no MLM head. This trains `BertForMaskedLM`'s
head alone (encoder frozen, decoder tied to the word embeddings) on multilingual text: UD treebank
train `# text =` lines, UDHR, and MAFAND-MT train text with every MasakhaNER dev/test sentence removed.
No test-set sentence is used for training; the losses are measured on dev text.

    python experiments/train_mlm_head.py --assets /work/shared/assets [--steps 350]

Runs on one CPU thread in about a quarter of an hour.
"""
from __future__ import annotations

import sys
from pathlib import Path


import argparse
import glob
import json
import os
import random
import re
import time

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "compsft" / "data"


def _key(line: str) -> str:
    return re.sub(r"\s+", "", line).lower()


def _ud_text(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line[len("# text = "):].strip() for line in f if line.startswith("# text = ")]


def _ner_sentences(path: str) -> list[str]:
    sents, words = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if not parts:
                if words:
                    sents.append(" ".join(words))
                words = []
            else:
                words.append(parts[0])
    if words:
        sents.append(" ".join(words))
    return sents


def collect(assets: Path, per_source: int, seed: int) -> tuple[list[str], list[str], dict]:
    rng = random.Random(seed)
    banned = set()
    for path in glob.glob(str(assets / "ner/masakhaner/*/test.txt")) + glob.glob(str(assets / "ner/masakhaner/*/dev.txt")):
        banned.update(_key(s) for s in _ner_sentences(path))
    sources: dict[str, list[str]] = {}
    for path in sorted(glob.glob(str(assets / "ud/*/*-ud-train.conllu"))):
        sources[Path(path).name] = _ud_text(path)
    for path in sorted(glob.glob(str(assets / "text/*/udhr_*.txt"))):
        sources[Path(path).name] = [l.strip() for l in open(path, encoding="utf-8")]
    for path in sorted(glob.glob(str(assets / "text/*/mafand_train.*"))):
        sources[Path(path).name] = [l.strip() for l in open(path, encoding="utf-8")]
    train, counts = [], {}
    for name, lines in sources.items():
        lines = [l for l in lines if l and _key(l) not in banned]
        rng.shuffle(lines)
        counts[name] = min(len(lines), per_source)
        train += lines[:per_source]
    rng.shuffle(train)
    dev = []
    for path in sorted(glob.glob(str(assets / "ud/*/*-ud-dev.conllu"))):
        dev += _ud_text(path)[:40]
    for path in sorted(glob.glob(str(assets / "text/*/mafand_dev.*"))):
        dev += [l.strip() for l in open(path, encoding="utf-8") if l.strip() and _key(l) not in banned][:40]
    return train, dev, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--assets", type=Path, default=Path("/work/shared/assets"))
    parser.add_argument("--steps", type=int, default=350)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--per-source", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from compsft.models.convert import build_e5_model, build_e5_tokenizer
    from compsft.models.mlm_head import save_mlm_head, train_mlm_head

    train, dev, counts = collect(args.assets, args.per_source, seed=0)
    print(f"{len(train)} training lines, {len(dev)} dev lines")
    model = build_e5_model()
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    tokenizer = build_e5_tokenizer()
    start = time.time()
    record = train_mlm_head(model, tokenizer, train, steps=args.steps, batch_size=args.batch_size,
                            max_length=64, lr=2e-3, eval_texts=dev)
    record["seconds"] = round(time.time() - start, 1)
    record["device"] = f"CPU, {args.threads} torch thread(s)"
    record["trained"] = "head transform (dense + LayerNorm) and output bias; encoder frozen; decoder tied to word embeddings"
    record["train_text"] = counts
    record["eval_text"] = "first 40 '# text' lines of each UD dev set and 40 MAFAND dev lines per language (MasakhaNER sentences removed)"
    record["loss"] = "masked-token cross-entropy over the full 250,002-piece vocabulary, 15% masking (80/10/10)"
    args.out.mkdir(parents=True, exist_ok=True)
    save_mlm_head(model, args.out / "e5_mlm_head.safetensors", metadata={"loss_after": record["loss_after"]})
    (args.out / "e5_mlm_head.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.chmod(args.out / "e5_mlm_head.safetensors", 0o644)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
