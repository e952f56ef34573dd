"""Which parameters LT-SFT masks, which it trains dense, and the default K.

As in the paper and the reference implementation:

* **Eligible (maskable)**: every parameter of the encoder (`model.base_model`): word, position and
  token-type embeddings, attention, feed-forward, and a pooler if the model has one. Position and
  token-type embeddings stay maskable, as in the reference, which masks the whole base model:
  they are few (0.2% of mBERT) and rarely selected.
* **Frozen**: normalisation layers (LayerNorm/RMSNorm) of the encoder, when `freeze_layer_norm`.
* **Heads (dense)**: every parameter outside the encoder (a tagger's classifier, the MLM head's
  transform and bias). They are fully trained in both phases and stored dense in the SFT.
* **MLM**: the output embeddings are untied from the input embeddings and the output copy is
  frozen (`untie_output_embeddings`), so the language SFT changes only the input embeddings.
"""
from __future__ import annotations

import logging
import re

import torch
from torch import nn

from ..errors import CompsftError

logger = logging.getLogger(__name__)

# The paper's K for mBERT and XLM-R base (12 layers, 768 wide): the sizes of MAD-X adapters.
PAPER_K = {"language": 7_667_712, "task": 14_155_776}

_NORM_NAME = re.compile(r"(layer_?norm|rms_?norm|(^|\.)norm(\.|$)|_norm(\.|$)|\bln_)", re.IGNORECASE)


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "layernorm" in name or "rmsnorm" in name


def eligible_parameters(model: nn.Module, freeze_layer_norm: bool = True) -> dict[str, nn.Parameter]:
    """Maskable parameters of `model`, by their names in `model.named_parameters()`, in model order."""
    base = getattr(model, "base_model", None)
    if base is None or base is model and not hasattr(model, "base_model_prefix"):
        raise CompsftError(f"{type(model).__name__}: not a transformers model with a base model")
    norm_params = set()
    if freeze_layer_norm:
        for mod_name, module in base.named_modules():
            if _is_norm(module):
                norm_params.update(id(p) for p in module.parameters(recurse=False))
    base_ids = {id(p) for p in base.parameters()}
    out = {}
    for name, p in model.named_parameters():
        if id(p) not in base_ids or id(p) in norm_params:
            continue
        if freeze_layer_norm and _NORM_NAME.search(name):
            continue
        out[name] = p
    if not out:
        raise CompsftError(f"{type(model).__name__}: no eligible parameters found")
    return out


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters outside the encoder that are trained (stored dense): the heads."""
    base_ids = {id(p) for p in model.base_model.parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) not in base_ids and p.requires_grad}


def untie_output_embeddings(model: nn.Module) -> bool:
    """Give an MLM model its own frozen copy of the output embeddings; True if they were tied."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if out is None:
        return False
    tied = inp is not None and out.weight is inp.weight
    if tied:
        out.weight = nn.Parameter(out.weight.detach().clone(), requires_grad=False)
    else:
        out.weight.requires_grad_(False)
    # Keep transformers from tying them again (save/load, resize, post_init).
    if getattr(model.config, "tie_word_embeddings", None) is not None:
        model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        try:
            model.config.get_text_config().tie_word_embeddings = False
        except Exception:  # noqa: BLE001 - older configs without a text config
            pass
    return tied


def freeze_for_lt_sft(model: nn.Module, freeze_layer_norm: bool = True) -> tuple[dict, dict]:
    """Set requires_grad as LT-SFT trains: eligible and heads trainable, the rest frozen.

    Returns (eligible, heads). Call after `untie_output_embeddings` for MLM models.
    """
    frozen_out = None
    if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        out = model.get_output_embeddings().weight
        if not out.requires_grad:
            frozen_out = out
    eligible = eligible_parameters(model, freeze_layer_norm)
    ids = {id(p) for p in eligible.values()}
    base_ids = {id(p) for p in model.base_model.parameters()}
    for p in model.parameters():
        if id(p) in ids:
            p.requires_grad_(True)
        elif id(p) in base_ids or p is frozen_out:
            p.requires_grad_(False)
        else:
            p.requires_grad_(True)
    return eligible, head_parameters(model)


def adapter_equivalent_k(hidden_size: int, num_layers: int, kind: str) -> int:
    """The paper's default K for a model of this width and depth: the size of the MAD-X adapters.

    * language: ``(L + 1) · h²`` (a bottleneck adapter of reduction factor 2 in each of the L layers,
      2 · h · h/2 = h² weights each, plus the invertible adapter, about h²);
    * task: ``2 · L · h²`` (a bottleneck adapter of reduction factor 1 per layer, 2 · h² weights).

    It depends on h and L only, not on the vocabulary: mBERT and XLM-R base (L = 12, h = 768) both
    get the paper's 7,667,712 and 14,155,776.

    >>> adapter_equivalent_k(768, 12, "language"), adapter_equivalent_k(768, 12, "task")
    (7667712, 14155776)
    """
    if kind == "language":
        return (num_layers + 1) * hidden_size ** 2
    if kind == "task":
        return 2 * num_layers * hidden_size ** 2
    raise CompsftError(f"no default K for kind {kind!r}; give --k or --density")


def model_shape(config) -> tuple[int, int]:
    """(hidden size h, number of layers L) of a `transformers` config (text config for multimodal ones)."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    h, layers = getattr(config, "hidden_size", None), getattr(config, "num_hidden_layers", None)
    if not isinstance(h, int) or not isinstance(layers, int) or h < 1 or layers < 1:
        raise CompsftError(f"{type(config).__name__} names no hidden_size / num_hidden_layers, so the paper's "
                           f"default K cannot be derived; give --k or --density")
    return h, layers


def resolve_k(num_eligible: int, k: int | None = None, density: float | None = None, kind: str = "task",
              *, config=None) -> int:
    """K from a count, a density, or by default the paper's K for the model's shape.

    The default is `adapter_equivalent_k` for the hidden size h and layer count L of `config` (a
    `transformers` config): language ``(L + 1) · h²``, task ``2 · L · h²`` (mBERT and XLM-R base:
    7,667,712 and 14,155,776), capped at `num_eligible`.

    >>> from transformers import BertConfig
    >>> resolve_k(177_224_448, kind="language", config=BertConfig())
    7667712
    """
    if k is not None and density is not None:
        raise CompsftError("give K as a count or as a density, not both")
    if k is not None:
        if not 0 < k <= num_eligible:
            raise CompsftError(f"K={k} must be between 1 and the {num_eligible:,} eligible parameters")
        return int(k)
    if density is not None:
        if not 0 < density <= 1:
            raise CompsftError(f"density {density} must be in (0, 1]")
        return max(1, round(density * num_eligible))
    if config is None:
        raise CompsftError("the default K needs the model's config (hidden size, layers); give --k or --density")
    h, layers = model_shape(config)
    return min(num_eligible, adapter_equivalent_k(h, layers, kind))


_ENCODER_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


def encoder_layer(name: str) -> int | None:
    """The index of the encoder layer a parameter belongs to (`bert.encoder.layer.3.…` → 3); None for the
    embeddings, heads and anything else outside the layers."""
    m = _ENCODER_LAYER.search(name)
    return int(m.group(1)) if m else None


def layer_type(name: str) -> str:
    """A parameter's layer type: its name with layer numbers replaced by '*'."""
    return re.sub(r"\.\d+\.", ".*.", name)


def density_by_layer_type(shapes: dict[str, tuple[int, ...]], counts: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(selected, total) per layer type, in first-seen order."""
    out: dict[str, list[int]] = {}
    for name, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        row = out.setdefault(layer_type(name), [0, 0])
        row[0] += int(counts.get(name, 0))
        row[1] += n
    return {k: (v[0], v[1]) for k, v in out.items()}
