"""A biaffine dependency parser (Dozat & Manning 2017) over a `transformers` encoder.

Words are represented by their first sub-word; the root by the first (CLS/<s>) token. Two MLPs
per scorer project them into dependent and head spaces; a biaffine product scores every arc and,
for a given head, every relation. The encoder sits under `encoder.base_model_prefix` (`self.bert`
for BERT), so parameter names (`bert.encoder.layer.0...`) match `BertForMaskedLM` and
`BertForTokenClassification` and sparse fine-tunings apply by name.

Files (`save_pretrained`): the encoder's own `config.json` + `model.safetensors`, the head in
`parser_head.safetensors` and its settings (labels, sizes) in `parser_config.json`.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from compsft.errors import CompsftError

logger = logging.getLogger(__name__)

HEAD_FILE = "parser_head.safetensors"
CONFIG_FILE = "parser_config.json"


@dataclass
class ParserConfig:
    labels: list[str] = field(default_factory=list, metadata={"help": "dependency relations, in id order"})
    arc_dim: int = field(default=256, metadata={"help": "size of the arc MLP projections"})
    rel_dim: int = field(default=100, metadata={"help": "size of the relation MLP projections"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on word representations and MLPs"})
    format: str = "compsft-biaffine-v1"


class _MLP(nn.Sequential):
    def __init__(self, inp: int, out: int, dropout: float) -> None:
        super().__init__(nn.Linear(inp, out), nn.GELU(), nn.Dropout(dropout))


class Biaffine(nn.Module):
    """score[b, i, j, o] = x_i^T W_o y_j + w_o·x_i + v_o·y_j (+ b_o): dependents x, heads y."""

    def __init__(self, dim: int, outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(outputs, dim + 1, dim + 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ones = x.new_ones(*x.shape[:-1], 1)
        x = torch.cat([x, ones], -1)
        y = torch.cat([y, y.new_ones(*y.shape[:-1], 1)], -1)
        # Two large matmuls (x W for all outputs at once, then with y); einsum picks slow orders here.
        b, i, d = x.shape
        o, _, e = self.weight.shape
        xw = (x.reshape(b * i, d) @ self.weight.permute(1, 0, 2).reshape(d, o * e)).view(b, i * o, e)
        scores = torch.bmm(xw, y.transpose(1, 2))  # [b, i * o, j]
        return scores.view(b, i, o, -1).permute(0, 1, 3, 2)


class BiaffineParser(nn.Module):
    """Encoder + biaffine arc and relation scorers. forward(**batch) returns a dict with `loss`."""

    def __init__(self, encoder: nn.Module, config: ParserConfig) -> None:
        super().__init__()
        if not config.labels:
            raise CompsftError("a parser needs at least one dependency relation label")
        self.base_model_prefix = getattr(encoder, "base_model_prefix", "") or "encoder"
        # Registered under the prefix so parameter names match the MLM / tagging models.
        self.add_module(self.base_model_prefix, encoder)
        self.parser_config = config
        # The Trainer and `default_max_length` read `model.config`: expose the encoder's.
        self.config = encoder.config
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(config.dropout)
        self.arc_dep = _MLP(hidden, config.arc_dim, config.dropout)
        self.arc_head = _MLP(hidden, config.arc_dim, config.dropout)
        self.rel_dep = _MLP(hidden, config.rel_dim, config.dropout)
        self.rel_head = _MLP(hidden, config.rel_dim, config.dropout)
        self.arc_scorer = Biaffine(config.arc_dim, 1)
        self.rel_scorer = Biaffine(config.rel_dim, len(config.labels))

    @property
    def encoder(self) -> nn.Module:
        return getattr(self, self.base_model_prefix)

    @property
    def base_model(self) -> nn.Module:
        """The encoder, under the name `transformers` models use (the LT-SFT trainer looks for it)."""
        return self.encoder

    @property
    def labels(self) -> list[str]:
        return list(self.parser_config.labels)

    # -- pieces, also used by inference ---------------------------------------------------------
    def word_representations(self, input_ids, attention_mask, word_starts) -> torch.Tensor:
        """[batch, words + 1, hidden]: the first token (root) followed by each word's first sub-word."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        index = word_starts.clamp(min=0)
        words = torch.gather(hidden, 1, index.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))
        return torch.cat([hidden[:, :1], words], 1)

    def arc_scores(self, reps: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """[batch, n, n] scores of head j for dependent i (n = words + 1); padded heads get -inf-like."""
        reps = self.dropout(reps)
        scores = self.arc_scorer(self.arc_dep(reps), self.arc_head(reps)).squeeze(-1)
        head_mask = torch.cat([word_mask.new_ones(word_mask.size(0), 1), word_mask], 1)
        return scores.masked_fill(~head_mask.unsqueeze(1), torch.finfo(scores.dtype).min)

    def rel_scores(self, reps: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """[batch, words, labels] relation scores of each word given its head (0 = root)."""
        reps = self.dropout(reps)
        dep = self.rel_dep(reps[:, 1:])
        head_reps = self.rel_head(reps)
        index = heads.clamp(min=0).unsqueeze(-1).expand(-1, -1, head_reps.size(-1))
        chosen = torch.gather(head_reps, 1, index)  # [batch, words, rel_dim]
        # The biaffine product for the one chosen head per word: pair dep i with chosen i.
        b, w, d = dep.shape
        scores = self.rel_scorer(dep.reshape(b * w, 1, d), chosen.reshape(b * w, 1, d))
        return scores.reshape(b, w, -1)

    def forward(self, input_ids, attention_mask, word_starts, arc_labels=None, rel_labels=None, **unused):
        """Batch: sub-word `input_ids`/`attention_mask`, `word_starts` (first sub-word position per
        word, -1 for padding), gold `arc_labels` (head per word, 0 = root, -100 ignored) and
        `rel_labels` (relation ids, -100 ignored)."""
        word_mask = word_starts >= 0
        reps = self.word_representations(input_ids, attention_mask, word_starts)
        arc_logits = self.arc_scores(reps, word_mask)[:, 1:]  # rows: words (the root has no head)
        out = {"arc_logits": arc_logits}
        if arc_labels is not None:
            heads = arc_labels.masked_fill(arc_labels < 0, 0)
            rel_logits = self.rel_scores(reps, heads)
            loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
            loss = loss_fn(arc_logits.reshape(-1, arc_logits.size(-1)).float(), arc_labels.reshape(-1))
            if rel_labels is not None:
                loss = loss + loss_fn(rel_logits.reshape(-1, rel_logits.size(-1)).float(), rel_labels.reshape(-1))
            out["loss"] = loss
            out["rel_logits"] = rel_logits
        return out

    # -- files ---------------------------------------------------------------------------------------
    def head_state_dict(self) -> dict[str, torch.Tensor]:
        prefix = self.base_model_prefix + "."
        return {k: v for k, v in self.state_dict().items() if not k.startswith(prefix)}

    def save_pretrained(self, directory: str | Path, **kwargs) -> None:
        """Write the encoder (`save_pretrained`), the head and its config into `directory`, atomically as a
        whole: a crash leaves the previous parser complete, never a new encoder beside an old head."""
        from safetensors.torch import save_file

        from compsft.atomic import atomic_path

        directory = Path(directory)
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            self.encoder.save_pretrained(tmp, **kwargs)
            save_file({k: v.detach().contiguous().cpu() for k, v in self.head_state_dict().items()}, str(tmp / HEAD_FILE),
                      metadata={"format": "pt"})
            (tmp / CONFIG_FILE).write_text(json.dumps(asdict(self.parser_config), indent=2) + "\n", encoding="utf-8")
            _keep_other_files(directory, tmp)

    @classmethod
    def from_encoder(cls, model_dir: str | Path, labels: Sequence[str], **config) -> "BiaffineParser":
        """A fresh parser head on the encoder in `model_dir` (any `save_pretrained` directory)."""
        return cls(load_encoder(model_dir), ParserConfig(labels=list(labels), **config))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "BiaffineParser":
        """A parser saved with `save_pretrained`."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path = directory / CONFIG_FILE
        if not config_path.is_file():
            raise CompsftError(f"{directory}: no {CONFIG_FILE}; not a parser saved by compsft")
        try:
            data = json.loads(config_path.read_text(encoding="utf-8"))
            config = ParserConfig(**data)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, RecursionError) as err:
            raise CompsftError(f"{config_path}: invalid parser config ({str(err)[:200]})") from None
        model = cls(load_encoder(directory), config)
        head_path = directory / HEAD_FILE
        if not head_path.is_file():
            raise CompsftError(f"{directory}: no {HEAD_FILE}")
        state = load_file(str(head_path))
        expected = model.head_state_dict()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise CompsftError(f"{head_path}: missing tensors {missing[:3]}")
        for name, tensor in state.items():
            if name not in expected:
                raise CompsftError(f"{head_path}: unexpected tensor {name!r}")
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise CompsftError(f"{head_path}: tensor {name!r} has shape {list(tensor.shape)}, "
                                   f"expected {list(expected[name].shape)}")
        model.load_state_dict(state, strict=False)
        return model


# Files a parser save writes (or that an older save of other weights may have left): never carried over.
_OWN_FILES = re.compile(r"^(config\.json|generation_config\.json|(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)"
                        r"(\.index\.json)?|" + re.escape(HEAD_FILE) + "|" + re.escape(CONFIG_FILE) + ")$")


def _keep_other_files(old: Path, new: Path) -> None:
    """Copy what else `old` holds (a tokenizer saved there first) into `new`, so replacing the directory
    as a whole loses nothing but the previous parser."""
    import shutil

    if not old.is_dir():
        return
    for entry in old.iterdir():
        if _OWN_FILES.match(entry.name) or (new / entry.name).exists():
            continue
        if entry.is_dir():
            shutil.copytree(entry, new / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, new / entry.name, follow_symlinks=False)


def load_encoder(model_dir: str | Path) -> nn.Module:
    """The bare encoder of a `save_pretrained` directory, without a pooler (it would never be trained)."""
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(model_dir, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_pretrained(model_dir)
