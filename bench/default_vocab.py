"""Choose the trimmed default model's vocabulary; writes compsft/data/e5_default_vocab.json.gz.

Kept: every piece that the train and dev text of the shipped languages tokenises into (UD treebanks'
`# text =` lines, NER train/dev sentences, UDHR, MAFAND-MT train/dev), every single-character piece,
and the special tokens. Test sets are not read, so evaluation text can only tokenise into pieces
that some training-side text also uses, or into single characters.

    python bench/default_vocab.py --assets /work/shared/assets
"""
from __future__ import annotations

import sys
from pathlib import Path


import argparse
import glob
import gzip
import json

ROOT = Path(__file__).resolve().parents[1]


def corpus_files(assets: Path) -> list[str]:
    patterns = [
        "ud/*/*-ud-train.conllu", "ud/*/*-ud-dev.conllu",
        "text/*/udhr_*.txt", "text/*/mafand_train.*", "text/*/mafand_dev.*",
        "ner/masakhaner/*/train.txt", "ner/masakhaner/*/dev.txt",
        "ner/uner/*/*-train.iob2", "ner/uner/*/*-dev.iob2",
    ]
    return sorted(f for p in patterns for f in glob.glob(str(assets / p)))


def read_lines(path: str) -> list[str]:
    from compsft.vocab import read_text_lines

    if path.endswith(".iob2") or "/masakhaner/" in path:
        sents, words = [], []
        for line in open(path, encoding="utf-8"):
            if line.startswith("#"):
                continue
            parts = line.rstrip("\n").split("\t") if path.endswith(".iob2") else line.split()
            if not line.strip():
                if words:
                    sents.append(" ".join(words))
                words = []
            else:
                words.append(parts[1] if path.endswith(".iob2") else parts[0])
        return sents + ([" ".join(words)] if words else [])
    return read_text_lines([path])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--assets", type=Path, default=Path("/work/shared/assets"))
    parser.add_argument("--out", type=Path, default=ROOT / "compsft" / "data" / "e5_default_vocab.json.gz")
    args = parser.parse_args()

    from compsft.models.convert import build_e5_tokenizer
    from compsft.vocab import keep_ids_for, vocab_fingerprint

    tokenizer = build_e5_tokenizer()
    files = corpus_files(args.assets)
    texts = [line for f in files for line in read_lines(f)]
    keep = keep_ids_for(tokenizer, texts)
    record = {
        "keep": keep,
        "base_vocab": vocab_fingerprint(tokenizer),
        "corpora": [str(Path(f).relative_to(args.assets)) for f in files],
        "lines": len(texts),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(args.out, "wt", encoding="utf-8", compresslevel=9) as f:
        f.write(json.dumps(record))
    print(f"{len(texts)} lines from {len(files)} files: keep {len(keep)} of {len(tokenizer)} pieces -> {args.out}")


if __name__ == "__main__":
    main()
