"""`lt-sft-no-source`: LT-SFT with its task SFT trained on θ0, without the source language SFT (an ablation).

LT-SFT trains φ_T with φ_eng applied, so that φ_T learns the task and φ_eng holds what is English; a target
φ_L then stands in for φ_eng. This method asks whether that matters on the model at hand: the task SFT is
trained on θ0 alone (`uses_source_language` False: no source language module is trained or applied), and
composed with the same target language SFTs as `lt-sft` (`language_key` "lt-sft": nothing is trained twice).

Composition for a target: θ0 + φ_L(target) + φ_T(trained without φ_eng); the MLM head of φ_L never, the task
head from φ_T.
"""
from __future__ import annotations

from functools import partial

from .base import MethodSpec
from .sft_method import assemble_sfts, counts, train_language_module, train_task_module

METHOD = MethodSpec(
    name="lt-sft-no-source",
    description="LT-SFT ablation: the task SFT trained without the source language SFT, composed with φ_L",
    composition="θ0 + φ_L(target) + φ_T (trained on θ0, no φ_source); MLM head never, task head from φ_T",
    train_language=partial(train_language_module, mask_strategy="lottery-ticket"),
    train_task=partial(train_task_module, mask_strategy="lottery-ticket"),
    assemble=assemble_sfts,
    parameter_counts=counts,
    uses_source_language=False,
    language_key="lt-sft",
)
