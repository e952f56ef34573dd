"""compsft's MAD-X adapters against AdapterHub `adapters` 1.3.0, the reference implementation.

Skipped where `adapters` is not importable: it needs transformers 4.57.x, and compsft's main environment
has transformers 5. `.ci/parity` builds a second environment (transformers 4.57.6 + adapters 1.3.0) and
runs this file there, where it must not skip.

Each test builds a tiny random BERT in code, creates the same adapters in both implementations, gives
the library's adapters non-trivial random weights, copies them into compsft's by name and compares
logits (max abs diff <= 1e-5). Two traps of the library's MLM path are avoided on purpose: a static
`BertForMaskedLM` with `adapters.init` never runs the inverse of the invertible adapter, so the MLM
reference is `BertAdapterModel` with a flexible `masked_lm` head; and that head is filled by copying
the MLM head (output bias included) by hand rather than by `from_pretrained`, which drops the bias.
"""
from __future__ import annotations

import pytest
import torch

adapters = pytest.importorskip("adapters")

from compsft.methods.adapters import AdapterConfig, Stack, add_adapter, set_active  # noqa: E402

TOL = 1e-5
HIDDEN, LAYERS, VOCAB = 32, 3, 80


def _bert_config(**kw):
    from transformers import BertConfig

    return BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, **kw)


def _randomise(tensors: dict, seed: int) -> None:
    """Every adapter weight and bias random (the library's init leaves biases at zero, weights tiny)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tensors.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _library_adapter_tensors(lib_model, name: str) -> dict[str, torch.nn.Parameter]:
    """The library's parameters of adapter `name`, under compsft's file names."""
    out = {}
    for key, p in lib_model.named_parameters():
        parts = key.split(".")
        if f"invertible_adapters.{name}." in key:
            out["invertible." + key.split(f"invertible_adapters.{name}.", 1)[1]] = p
        elif f"output.adapters.{name}." in key and "attention" not in parts:
            layer = parts[parts.index("layer") + 1]
            out[f"layers.{layer}." + key.split(f"output.adapters.{name}.", 1)[1]] = p
    assert out, f"no parameters of adapter {name!r} found in the library model"
    return out


def _compsft_config(kind: str, rf: float, inv: bool, leave_out=()) -> AdapterConfig:
    return AdapterConfig(kind=kind, task="pos" if kind == "task" else None, hidden_size=HIDDEN, num_layers=LAYERS,
                         reduction_factor=rf, inv_adapter="nice" if inv else None, leave_out=list(leave_out))


def _library_config(rf: float, inv: bool, leave_out=()):
    from adapters import SeqBnConfig, SeqBnInvConfig

    cls = SeqBnInvConfig if inv else SeqBnConfig
    return cls(reduction_factor=rf, leave_out=list(leave_out))


def _ids(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, VOCAB, (3, 11), generator=g)


def _copy_mlm_head(ours, lib_head) -> None:
    """compsft's BertForMaskedLM head -> the flexible masked_lm head (transform, LayerNorm, decoder + bias)."""
    pred = ours.cls.predictions
    layers = [m for m in lib_head if not isinstance(m, torch.nn.Identity)]
    linears = [m for m in lib_head.modules() if isinstance(m, torch.nn.Linear)]
    norms = [m for m in lib_head.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(linears) == 2 and len(norms) == 1, layers
    with torch.no_grad():
        linears[0].weight.copy_(pred.transform.dense.weight)
        linears[0].bias.copy_(pred.transform.dense.bias)
        norms[0].weight.copy_(pred.transform.LayerNorm.weight)
        norms[0].bias.copy_(pred.transform.LayerNorm.bias)
        linears[1].weight.copy_(pred.decoder.weight)
        linears[1].bias.copy_(pred.bias)


@pytest.mark.parametrize("inv", [True, False], ids=["with-nice", "without-nice"])
def test_mlm_logits_match_library(inv):
    from adapters import BertAdapterModel
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    ours = BertForMaskedLM(_bert_config()).eval()
    with torch.no_grad():  # a non-zero output bias, so that dropping it would show
        ours.cls.predictions.bias.copy_(torch.randn(VOCAB) * 0.5)
    lib = BertAdapterModel(_bert_config())
    missing, unexpected = lib.bert.load_state_dict(ours.bert.state_dict(), strict=False)
    # BertAdapterModel's encoder has a pooler and a prompt-tuning embedding copy; neither is on the MLM path.
    assert not unexpected and all(k.startswith(("pooler.", "prompt_tuning.")) for k in missing), missing
    lib.add_masked_lm_head("mlm")
    _copy_mlm_head(ours, lib.heads["mlm"])
    lib.add_adapter("lang", config=_library_config(2, inv))
    lib.set_active_adapters("lang")
    lib.eval()
    lib_tensors = _library_adapter_tensors(lib, "lang")
    _randomise(lib_tensors, seed=1)

    add_adapter(ours, "lang", _compsft_config("language", 2, inv), {k: v.detach() for k, v in lib_tensors.items()})
    set_active(ours, "lang")
    ids = _ids()
    with torch.no_grad():
        expected = lib(input_ids=ids).logits
        got = ours(input_ids=ids).logits
        bare = BertForMaskedLM(_bert_config()).eval()
        bare.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("compsft_adapters.")})
        without = bare(input_ids=ids).logits
    assert (expected - without).abs().max() > 1e-2, "the adapter should change the logits"
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("leave_out", [(), (LAYERS - 1,)], ids=["mad-x", "mad-x-2.0"])
def test_tagging_logits_of_stack_match_library(leave_out):
    from transformers import BertForTokenClassification

    torch.manual_seed(0)
    ours = BertForTokenClassification(_bert_config(num_labels=5)).eval()
    lib = BertForTokenClassification(_bert_config(num_labels=5))
    lib.load_state_dict(ours.state_dict())
    adapters.init(lib)
    lib.add_adapter("lang", config=_library_config(2, True, leave_out))
    lib.add_adapter("task", config=_library_config(1, False))
    lib.set_active_adapters(adapters.composition.Stack("lang", "task"))
    lib.eval()
    lang, task = _library_adapter_tensors(lib, "lang"), _library_adapter_tensors(lib, "task")
    _randomise(lang, seed=2)
    _randomise(task, seed=3)

    add_adapter(ours, "lang", _compsft_config("language", 2, True, leave_out), {k: v.detach() for k, v in lang.items()})
    add_adapter(ours, "task", _compsft_config("task", 1, False), {k: v.detach() for k, v in task.items()})
    set_active(ours, Stack("lang", "task"))
    ids = _ids(1)
    with torch.no_grad():
        expected = lib(input_ids=ids).logits
        got = ours(input_ids=ids).logits
        set_active(ours, Stack("task", "lang"))
        swapped = ours(input_ids=ids).logits
    assert (got - expected).abs().max().item() <= TOL
    assert (swapped - expected).abs().max() > 1e-3  # order matters, so the match above is not by chance
