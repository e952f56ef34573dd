"""Writing predictions: CoNLL-U (predicted columns replaced, everything else kept) and NER columns."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from compsft.atomic import atomic_path
from compsft.errors import CompsftError

from .base import Sentence


def _conllu_block(gold: Sentence, pred: Sentence, columns: Sequence[str]) -> str:
    """One sentence in CoNLL-U with `columns` ("upos", "head", "deprel") taken from `pred`."""
    if gold.tokenlist is None:
        lines = [f"# sent_id = {gold.sent_id}"] if gold.sent_id else []
        for i, word in enumerate(gold.words):
            upos = (pred.tags if "upos" in columns else gold.tags) or ["_"] * len(gold.words)
            heads = (pred.heads if "head" in columns else gold.heads) or ["_"] * len(gold.words)
            rels = (pred.deprels if "deprel" in columns else gold.deprels) or ["_"] * len(gold.words)
            lines.append("\t".join([str(i + 1), word, "_", upos[i], "_", "_", str(heads[i]), rels[i], "_", "_"]))
        return "\n".join(lines) + "\n\n"
    return fill_conllu(gold.tokenlist, pred, columns).serialize()


def fill_conllu(tokenlist, pred: Sentence, columns: Sequence[str]):
    """A copy of a parsed CoNLL-U sentence with `columns` ("upos", "head", "deprel") of its words
    taken from `pred`; multi-word token lines, empty nodes and comments are kept as they are."""
    from conllu.models import TokenList

    # TokenList.copy() shares the token dicts: copy each, so the input sentence stays as it was read.
    tokens = TokenList([type(t)(t) for t in tokenlist], dict(tokenlist.metadata), tokenlist.default_fields)
    k = 0
    for token in tokens:
        if not isinstance(token["id"], int):
            continue
        if "upos" in columns:
            token["upos"] = pred.tags[k]
        if "head" in columns:
            token["head"] = int(pred.heads[k])
            # The enhanced graph is gold and would contradict the predicted tree.
            token["deps"] = None
        if "deprel" in columns:
            token["deprel"] = pred.deprels[k]
        k += 1
    if k != len(pred.words):
        raise CompsftError(f"{pred.source or 'a sentence'}: {k} words in the CoNLL-U sentence, {len(pred.words)} predicted")
    return tokens


def write_conllu(path: str | Path, gold: Sequence[Sentence], predicted: Sequence[Sentence], columns: Sequence[str]) -> None:
    """Write `gold`'s sentences with the predicted `columns` (a subset of upos, head, deprel)."""
    if len(gold) != len(predicted):
        raise CompsftError(f"{path}: {len(gold)} sentences but {len(predicted)} predictions")
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for g, p in zip(gold, predicted):
                f.write(_conllu_block(g, p, columns))


def write_ner_columns(path: str | Path, gold: Sequence[Sentence], predicted: Sequence[Sentence]) -> None:
    """`word gold predicted` per line, a blank line between sentences (conlleval's input format)."""
    if len(gold) != len(predicted):
        raise CompsftError(f"{path}: {len(gold)} sentences but {len(predicted)} predictions")
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for g, p in zip(gold, predicted):
                gold_tags = g.tags or ["O"] * len(g.words)
                for word, gt, pt in zip(g.words, gold_tags, p.tags):
                    f.write(f"{word} {gt} {pt}\n")
                f.write("\n")
