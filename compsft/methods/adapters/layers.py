"""The two adapter layers of MAD-X (Pfeiffer et al. 2020): a bottleneck and a NICE coupling block.

Both follow AdapterHub `adapters` 1.3.0 to the letter (sub-module names included: `adapter_down.0`,
`adapter_up`, `F.0`, `F.2`, `G.0`, `G.2`), so weights copy across by name and the parity test
(`tests/test_madx_parity.py`) can compare outputs directly.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.activations import get_activation


def _activation(name: str) -> nn.Module:
    # `adapters` lower-cases the name and asks transformers for it ("relu", "gelu", "swish", ...).
    return get_activation(name.lower())


def init_bert_weights(module: nn.Module) -> None:
    """BERT's initialisation (normal(0, 0.02) weights, zero biases), as `adapters` uses for its layers."""
    if isinstance(module, nn.Linear):
        module.weight.data.normal_(mean=0.0, std=0.02)
        if module.bias is not None:
            module.bias.data.zero_()


class Bottleneck(nn.Module):
    """down-project, non-linearity, up-project, plus the residual: `adapter_up(act(adapter_down(x))) + residual`.

    The residual is not `x`: in the `seq_bn` (Pfeiffer) placement `x` is LayerNorm(h + input) while the
    residual is `h`, the feed-forward output before that LayerNorm (see `hooks.AdaptedOutput`).
    """

    def __init__(self, hidden_size: int, reduction_factor: float, non_linearity: str = "relu") -> None:
        super().__init__()
        bottleneck = max(int(hidden_size // reduction_factor), 1)
        self.adapter_down = nn.Sequential(nn.Linear(hidden_size, bottleneck), _activation(non_linearity))
        self.adapter_up = nn.Linear(bottleneck, hidden_size)
        self.apply(init_bert_weights)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.adapter_up(self.adapter_down(x)) + residual


def _subnet(inp: int, out: int, reduction_factor: float, non_linearity: str) -> nn.Sequential:
    inner = int(inp // reduction_factor)
    return nn.Sequential(nn.Linear(inp, inner), _activation(non_linearity), nn.Linear(inner, out))


class NICECoupling(nn.Module):
    """An invertible additive coupling (Dinh et al. 2015, NICE) over the hidden dimension.

    With x = [x1, x2] split at half the width: y1 = x1 + F(x2), y2 = x2 + G(y1). The inverse
    subtracts in the opposite order, so `inverse(forward(x)) == x` up to float rounding, for any
    F and G: that is what lets MAD-X undo, before the MLM decoder, what it did to the embeddings.
    """

    def __init__(self, hidden_size: int, reduction_factor: float = 2, non_linearity: str = "relu") -> None:
        super().__init__()
        self.split1 = hidden_size // 2
        self.split2 = hidden_size - self.split1
        # Each sub-network narrows its own input (half the width) by the reduction factor, as in `adapters`.
        self.F = _subnet(self.split2, self.split1, reduction_factor, non_linearity)
        self.G = _subnet(self.split1, self.split2, reduction_factor, non_linearity)
        self.apply(init_bert_weights)

    def forward(self, x: torch.Tensor, rev: bool = False) -> torch.Tensor:
        x1, x2 = x[..., :self.split1], x[..., self.split1:]
        if not rev:
            y1 = x1 + self.F(x2)
            y2 = x2 + self.G(y1)
        else:
            y2 = x2 - self.G(x1)
            y1 = x1 - self.F(y2)
        return torch.cat((y1, y2), -1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.forward(y, rev=True)
