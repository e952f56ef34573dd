"""An MLM head for encoders that never had one: train the head alone, with the encoder frozen.

The decoder stays tied to the (frozen) word embeddings, so what is trained is the head's transform
(dense + LayerNorm for BERT) and the output bias. Because the encoder is frozen its hidden states
are computed once per batch without gradients, and logits are taken only at the masked positions.
"""
from __future__ import annotations

import logging
import math
import os
import random
from pathlib import Path
from typing import Sequence

from ..errors import CompsftError

logger = logging.getLogger(__name__)


def mlm_head_module(model):
    """The head of a `*ForMaskedLM` model: its one child that is not the base model."""
    heads = [m for _, m in model.named_children() if m is not model.base_model]
    if len(heads) != 1:
        raise CompsftError(f"{type(model).__name__}: cannot tell which module is the MLM head")
    return heads[0]


def mlm_head_parameters(model) -> dict:
    """Named head parameters that are not shared with the encoder (so not the tied decoder)."""
    head = mlm_head_module(model)
    head_name = next(name for name, m in model.named_children() if m is head)
    base = {id(p) for p in model.base_model.parameters()}
    return {f"{head_name}.{n}": p for n, p in head.named_parameters() if id(p) not in base}


def save_mlm_head(model, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write the head's own parameters as safetensors (atomically)."""
    from safetensors.torch import save_file

    from ..atomic import atomic_path

    tensors = {k: v.detach().cpu().contiguous() for k, v in mlm_head_parameters(model).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_mlm_head(model, path: str | os.PathLike) -> None:
    """Load head parameters written by `save_mlm_head` into `model` (shapes must match)."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CompsftError(f"{path}: MLM head file not found")
    tensors = load_file(str(path))
    params = mlm_head_parameters(model)
    missing = sorted(set(params) - set(tensors))
    extra = sorted(set(tensors) - set(params))
    if missing or extra:
        raise CompsftError(f"{path}: head tensors do not match the model (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise CompsftError(f"{path}: tensor {name} has shape {tuple(value.shape)}, "
                                   f"the model expects {tuple(params[name].shape)}")
            params[name].copy_(value.to(params[name].dtype))


def _batches(tokenizer, texts: Sequence[str], batch_size: int, max_length: int, rng: random.Random):
    order = list(range(len(texts)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [texts[j] for j in order[i:i + batch_size]]
            yield tokenizer(chunk, truncation=True, max_length=max_length, padding=True,
                            return_tensors="pt", return_special_tokens_mask=True)


def _restricted_logits(head, hidden, subset):
    """BERT head logits over the pieces in `subset` only (a 250k-way softmax is the costly part)."""
    predictions = head.predictions
    states = predictions.transform(hidden)
    return states @ predictions.decoder.weight[subset].T + predictions.bias[subset]


def _masked_loss(model, head, collator, enc, device, subset=None, remap=None):
    import torch
    import torch.nn.functional as F

    features = [{"input_ids": ids, "special_tokens_mask": sm}
                for ids, sm in zip(enc["input_ids"], enc["special_tokens_mask"])]
    batch = collator(features)
    input_ids = batch["input_ids"].to(device)
    labels = batch["labels"].to(device)
    attention = enc["attention_mask"].to(device)
    with torch.no_grad():
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention).last_hidden_state
    where = labels != -100
    if not where.any():
        return None, 0
    if subset is None:
        return F.cross_entropy(head(hidden[where]).float(), labels[where]), int(where.sum())
    targets = remap[labels[where]]
    keep = targets >= 0
    if not keep.any():
        return None, 0
    logits = _restricted_logits(head, hidden[where][keep], subset)
    return F.cross_entropy(logits.float(), targets[keep]), int(keep.sum())


def evaluate_mlm_loss(model, tokenizer, texts: Sequence[str], batch_size: int = 16, max_length: int = 128,
                      mask_prob: float = 0.15, seed: int = 0) -> float:
    """Mean masked-token cross-entropy of `model` on `texts` (a fixed, seeded masking)."""
    import torch
    from transformers import DataCollatorForLanguageModeling

    torch.manual_seed(seed)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mask_prob, return_tensors="pt")
    head = mlm_head_module(model)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[i:i + batch_size]), truncation=True, max_length=max_length, padding=True,
                            return_tensors="pt", return_special_tokens_mask=True)
            loss, n = _masked_loss(model, head, collator, enc, device)
            if n:
                total += float(loss) * n
                count += n
    return total / max(count, 1)


def train_mlm_head(model, tokenizer, texts: Sequence[str], *, steps: int = 300, batch_size: int = 32,
                   max_length: int = 128, lr: float = 2e-3, mask_prob: float = 0.15, seed: int = 0,
                   eval_texts: Sequence[str] | None = None, progress: bool = True,
                   restrict_to_seen: bool = True) -> dict:
    """Train only the MLM head of `model` (a `*ForMaskedLM`) on `texts`; the encoder stays frozen.

    With `restrict_to_seen` (BERT heads only) the softmax runs over the pieces that occur in `texts`
    (5-15x faster with a 250k vocabulary); afterwards every other piece gets the lowest bias seen,
    so the head ranks unseen pieces last. Losses before and after are full-vocabulary losses on
    `eval_texts`. Returns a record with them and the settings used.
    """
    import torch
    from transformers import DataCollatorForLanguageModeling

    texts = [t for t in texts if t.strip()]
    if len(texts) < batch_size:
        raise CompsftError(f"train_mlm_head: {len(texts)} non-empty texts, need at least batch_size={batch_size}")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    trainable = mlm_head_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable.values():
        p.requires_grad_(True)
    head = mlm_head_module(model)
    device = next(model.parameters()).device
    eval_texts = list(eval_texts) if eval_texts else texts[:256]
    before = evaluate_mlm_loss(model, tokenizer, eval_texts, max_length=max_length, mask_prob=mask_prob, seed=seed)
    logger.info("MLM loss before head training: %.3f", before)

    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mask_prob, return_tensors="pt")
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    subset = remap = None
    if restrict_to_seen and hasattr(head, "predictions"):
        subset, remap, counts = _seen_pieces(tokenizer, texts, max_length, model.config.vocab_size, device)
        bias = head.predictions.bias
        if not bias.detach().any():
            # A fresh head: start the bias at the log unigram frequencies, which the transform then refines.
            with torch.no_grad():
                bias.copy_(torch.log((counts + 0.5) / counts.sum()).to(bias.dtype))
    batches = _batches(tokenizer, texts, batch_size, max_length, rng)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="MLM head", unit="step")
    model.eval()  # no dropout: the head learns from the encoder's deterministic states
    running = None
    for _ in range(steps):
        loss, n = _masked_loss(model, head, collator, next(batches), device, subset, remap)
        if loss is None:
            continue
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        running = float(loss) if running is None else 0.95 * running + 0.05 * float(loss)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}")
    if bar is not None:
        bar.close()
    for p in model.parameters():
        p.requires_grad_(True)
    if subset is not None:
        with torch.no_grad():
            bias = head.predictions.bias
            unseen = torch.ones_like(bias, dtype=torch.bool)
            unseen[subset] = False
            bias[unseen] = bias[subset].min()
    after = evaluate_mlm_loss(model, tokenizer, eval_texts, max_length=max_length, mask_prob=mask_prob, seed=seed)
    logger.info("MLM loss after head training: %.3f", after)
    return {
        "loss_before": round(before, 4), "loss_after": round(after, 4), "steps": steps,
        "batch_size": batch_size, "max_length": max_length, "lr": lr, "mask_prob": mask_prob, "seed": seed,
        "train_texts": len(texts), "eval_texts": len(eval_texts),
        "softmax_pieces": int(subset.numel()) if subset is not None else int(model.config.vocab_size),
    }


def _seen_pieces(tokenizer, texts: Sequence[str], max_length: int, vocab_size: int, device):
    """Sorted ids of the pieces in `texts` (specials included) and a map from old ids to positions."""
    import torch

    counts = torch.zeros(vocab_size, dtype=torch.float64)
    counts[tokenizer.all_special_ids] = 1
    for i in range(0, len(texts), 1000):
        for ids in tokenizer(list(texts[i:i + 1000]), truncation=True, max_length=max_length)["input_ids"]:
            counts += torch.bincount(torch.tensor(ids), minlength=vocab_size).double()
    subset = torch.nonzero(counts).flatten().to(device)
    remap = torch.full((vocab_size,), -1, dtype=torch.long, device=device)
    remap[subset] = torch.arange(subset.numel(), device=device)
    return subset, remap, counts
