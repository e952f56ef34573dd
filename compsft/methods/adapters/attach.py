"""Putting adapters into a `transformers` encoder with forward hooks on its public modules.

Nothing of the model is patched or replaced: the adapters live in one sub-module,
`model.compsft_adapters` (an :class:`AdapterBank`, so the Trainer's optimizer and `.to(device)` see
them), and hooks on public modules route the hidden states through the active ones:

* after each layer's feed-forward block (`layer.output`, BERT's `BertOutput`: dense → dropout →
  LayerNorm(h + input)), a `seq_bn` bottleneck per active adapter, with `adapters`' Pfeiffer wiring:
  for a stack A, B (`Stack("lang", "task")`)::

      r = h                                   # the feed-forward output, after its dropout
      for adapter in (A, B):
          r = adapter(LayerNorm(r + input), residual=r)
      out = LayerNorm(r + input)              # the layer's own LayerNorm, every time

  With one adapter that is LN(up(act(down(LN(h + x)))) + h + x), exactly `adapters`' `seq_bn`.
* on the embeddings' output, the invertible (NICE) adapter of the *first* active adapter, if it has one;
* before the MLM decoder (`model.get_output_embeddings()`), the inverse of that NICE adapter, so the
  vocabulary projection sees the embedding space again (what `adapters` does only with its flexible
  `masked_lm` head; its static `BertForMaskedLM` skips the inverse).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

from compsft.errors import CompsftError

from .files import AdapterConfig, expected_shapes
from .layers import Bottleneck, NICECoupling

BANK_ATTR = "compsft_adapters"


@dataclass(frozen=True)
class Stack:
    """Adapters applied one after the other in every layer, first to last (`adapters.Stack`)."""

    names: tuple[str, ...]

    def __init__(self, *names: str) -> None:
        if not names or not all(isinstance(n, str) and n for n in names):
            raise CompsftError(f"Stack needs one or more adapter names, got {names!r}")
        if len(set(names)) != len(names):
            raise CompsftError(f"Stack names an adapter twice: {names!r}")
        object.__setattr__(self, "names", tuple(names))

    def to_dict(self) -> dict:
        return {"type": "stack", "children": list(self.names)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Stack":
        if not isinstance(data, Mapping) or data.get("type") != "stack" or not isinstance(data.get("children"), list):
            raise CompsftError(f"not a Stack: {data!r}")
        return cls(*data["children"])


class Adapter(nn.Module):
    """One named adapter: a bottleneck per layer (`layers[str(i)]`) and an optional invertible adapter."""

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleDict({
            str(i): Bottleneck(config.hidden_size, config.reduction_factor, config.non_linearity)
            for i in config.layers
        })
        self.invertible = (NICECoupling(config.hidden_size, config.inv_adapter_reduction_factor, config.non_linearity)
                           if config.inv_adapter == "nice" else None)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's weights under the names of the file format (`files.expected_shapes`)."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.load_state_dict({k: v.to(self.layers_dtype()) for k, v in tensors.items()}, strict=True)

    def layers_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class AdapterBank(nn.Module):
    """The adapters of one model and which of them are active (a :class:`Stack`, or none)."""

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.handles: list = []
        self._ffn_out: dict[int, torch.Tensor] = {}

    def first_invertible(self) -> NICECoupling | None:
        if not self.active:
            return None
        return self.adapters[self.active[0]].invertible

    def active_layers(self, index: int) -> list[Bottleneck]:
        key = str(index)
        return [self.adapters[n].layers[key] for n in self.active if key in self.adapters[n].layers]


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The encoder layers of a BERT-family model (`base_model.encoder.layer`), checked for `seq_bn`'s needs."""
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if layers is None:
        raise CompsftError(f"{type(model).__name__}: no base_model.encoder.layer; adapters support BERT-family encoders")
    for i, layer in enumerate(layers):
        out = getattr(layer, "output", None)
        if not all(hasattr(out, a) for a in ("dense", "dropout", "LayerNorm")):
            raise CompsftError(f"{type(model).__name__}: layer {i} has no output.dense/dropout/LayerNorm "
                               "(the feed-forward block `seq_bn` adapters attach to)")
    return list(layers)


def adapter_bank(model: nn.Module) -> AdapterBank:
    """The model's AdapterBank; the first call creates it and installs the hooks."""
    bank = getattr(model, BANK_ATTR, None)
    if isinstance(bank, AdapterBank):
        return bank
    layers = transformer_layers(model)
    bank = AdapterBank()
    param = next(model.parameters())
    bank.to(param.device)
    model.add_module(BANK_ATTR, bank)
    for i, layer in enumerate(layers):
        bank.handles.append(layer.output.dropout.register_forward_hook(_capture_ffn(bank, i)))
        bank.handles.append(layer.output.register_forward_hook(_route_through_adapters(bank, i), with_kwargs=True))
    embeddings = getattr(model.base_model, "embeddings", None)
    if embeddings is None:
        raise CompsftError(f"{type(model).__name__}: no base_model.embeddings for the invertible adapter")
    bank.handles.append(embeddings.register_forward_hook(_invertible_forward(bank)))
    decoder = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is not None:
        bank.handles.append(decoder.register_forward_pre_hook(_invertible_inverse(bank)))
    return bank


def _capture_ffn(bank: AdapterBank, index: int):
    def hook(module, args, output):
        if bank.active:
            bank._ffn_out[index] = output
    return hook


def _route_through_adapters(bank: AdapterBank, index: int):
    def hook(module, args, kwargs, output):
        h = bank._ffn_out.pop(index, None)
        adapters = bank.active_layers(index)
        if h is None or not adapters:
            return None
        x = args[1] if len(args) > 1 else kwargs["input_tensor"]
        norm = module.LayerNorm
        state, normed = h, output  # the block's own output is LayerNorm(h + x): the first adapter's input
        for k, adapter in enumerate(adapters):
            if k:
                normed = norm(state + x)
            state = adapter(normed, residual=state)
        return norm(state + x)
    return hook


def _invertible_forward(bank: AdapterBank):
    def hook(module, args, output):
        inv = bank.first_invertible()
        if inv is None:
            return None
        if isinstance(output, torch.Tensor):
            return inv(output)
        return (inv(output[0]),) + tuple(output[1:])
    return hook


def _invertible_inverse(bank: AdapterBank):
    def hook(module, args):
        inv = bank.first_invertible()
        if inv is None or not args:
            return None
        return (inv(args[0], rev=True),) + tuple(args[1:])
    return hook


def add_adapter(model: nn.Module, name: str, config: AdapterConfig,
                tensors: Mapping[str, torch.Tensor] | None = None) -> Adapter:
    """Add a new adapter called `name` (fresh weights, or `tensors` from a file) to `model`."""
    hidden = model.config.hidden_size
    layers = transformer_layers(model)
    if config.hidden_size != hidden or config.num_layers != len(layers):
        raise CompsftError(f"adapter {name!r} is for {config.num_layers} layers of width {config.hidden_size}, "
                           f"the model has {len(layers)} of width {hidden}")
    bank = adapter_bank(model)
    if name in bank.adapters:
        raise CompsftError(f"the model already has an adapter called {name!r}")
    param = next(model.parameters())
    adapter = Adapter(config).to(param.device)
    if tensors is not None:
        expected = expected_shapes(config)
        if set(tensors) != set(expected):
            raise CompsftError(f"adapter {name!r}: tensors {sorted(set(tensors) ^ set(expected))[:3]} do not match its config")
        adapter.load_tensors({k: v.to(param.device) for k, v in tensors.items()})
    bank.adapters[name] = adapter
    return adapter


def set_active(model: nn.Module, setup: Stack | str | None) -> None:
    """Make `setup` the adapters every forward pass goes through (None: none, the bare model)."""
    bank = adapter_bank(model)
    names: tuple[str, ...] = () if setup is None else (setup,) if isinstance(setup, str) else setup.names
    unknown = [n for n in names if n not in bank.adapters]
    if unknown:
        raise CompsftError(f"no adapter called {unknown[0]!r} (the model has {sorted(bank.adapters)})")
    bank.active = names
    bank._ffn_out.clear()


def train_only(model: nn.Module, adapter_names: Iterable[str], extra: Iterable[str] = ()) -> int:
    """Freeze everything but the named adapters and the parameters named in `extra` (a task head).

    Returns the number of trainable parameters.
    """
    bank = adapter_bank(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in adapter_names:
        for p in bank.adapters[name].parameters():
            p.requires_grad_(True)
    params = dict(model.named_parameters())
    for name in extra:
        params[name].requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
