"""`lt-sft-upper`: LT-SFT with the target language SFT composed on the upper half of the encoder only.

On the default model, language SFTs trained at lr 1e-3 help Maltese POS but cost Wolof several points.
Scoring parts of them on the Wolof and Maltese UD dev sets (`experiments/language_sft_layers.py`, issue 13)
located the cost in the lower encoder layers: the entries on layers 6–11 of 12 helped on both languages,
while a random subset of the same size still cost Wolof. This method carries that choice into the harness,
so it is measured as every method is. It uses the same modules as `lt-sft` (`language_key` and `task_key`
"lt-sft": nothing is trained twice) and differs only in what it composes.

Composition for a target: θ0 + φ_L(target) on encoder layers ≥ L // 2 (no embeddings, no lower layers,
MLM head never) + φ_T (task head from φ_T).
"""
from __future__ import annotations

from functools import partial

from .base import MethodSpec
from .sft_method import assemble_sfts, counts, train_language_module, train_task_module, upper_layers

METHOD = MethodSpec(
    name="lt-sft-upper",
    description="LT-SFT with φ_L composed on the upper half of the encoder layers only (issue 13)",
    composition="θ0 + φ_L(target) on layers ≥ L/2 + φ_T; MLM head never, task head from φ_T",
    train_language=partial(train_language_module, mask_strategy="lottery-ticket"),
    train_task=partial(train_task_module, mask_strategy="lottery-ticket"),
    assemble=partial(assemble_sfts, language_part=upper_layers),
    parameter_counts=counts,
    language_key="lt-sft",
    task_key="lt-sft",
)
