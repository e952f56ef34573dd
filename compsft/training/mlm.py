"""MLM logits only at the masked positions.

A `*ForMaskedLM` model computes vocabulary logits for every position, although the loss only uses
the ~15% that are masked; with a large vocabulary that projection dominates the step. Two forward
pre-hooks make the model's own code do the cheap thing: the model hook keeps the positions whose
label is not -100 and passes only their labels on; the head hook gathers the hidden states at
those positions. The loss (the model's own cross-entropy, mean over masked tokens) is unchanged;
the logits returned have shape (1, M, V) for the M masked tokens.

A third hook fixes the loss normalisation the Trainer assumes: a model whose `forward` takes
``**kwargs`` is expected to return ``sum / num_items_in_batch`` (the masked tokens of the whole
optimizer step, over all accumulation steps and processes), but BERT-style MLM heads return the
mean over the micro-batch. The hook rescales the mean to that sum, so gradient accumulation and
`torchrun` give the gradient of the mean over the global batch, as one process with the same
global batch does.
"""
from __future__ import annotations

import inspect

from torch import nn
from torch.utils.hooks import RemovableHandle

from ..models.mlm_head import mlm_head_module


class MaskedPositionsOnly:
    """Installs the two hooks on `model`; `remove()` takes them off."""

    def __init__(self, model: nn.Module) -> None:
        self._where = None
        self._scale = None
        self._forward_takes_kwargs = any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values()
        )
        head = mlm_head_module(model)
        self.handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(self._model_hook, with_kwargs=True),
            head.register_forward_pre_hook(self._head_hook),
            model.register_forward_hook(self._loss_hook),
        ]

    def _model_hook(self, module, args, kwargs):
        kwargs = dict(kwargs)
        if self._forward_takes_kwargs:
            items = kwargs.get("num_items_in_batch")
        else:
            items = kwargs.pop("num_items_in_batch", None)
        labels = kwargs.get("labels")
        if labels is None:
            self._where = self._scale = None
            return args, kwargs
        where = labels != -100
        self._where = where
        self._scale = None if items is None else where.sum() / items
        kwargs["labels"] = labels[where].unsqueeze(0)
        return args, kwargs

    def _head_hook(self, module, args):
        where, self._where = self._where, None
        if where is None or not args or args[0].shape[:2] != where.shape:
            return None
        return (args[0][where].unsqueeze(0),) + tuple(args[1:])

    def _loss_hook(self, module, args, output):
        scale, self._scale = self._scale, None
        loss = getattr(output, "loss", None)
        if scale is not None and loss is not None:
            output.loss = loss * scale.to(loss.device, loss.dtype)
        return output

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
