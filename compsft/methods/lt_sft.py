"""`lt-sft`: Lottery-Ticket Sparse Fine-Tuning (Ansell et al. 2022), the method itself.

Language module: a language SFT φ_L by masked language modelling on the language's text
(`compsft.training.train_language_sft`, lottery-ticket mask: full fine-tuning, keep the top-K of
|θ1 − θ0|, reset, retrain those K). Task module: a task SFT φ_T on the source task data with the
*source* language SFT applied while training (`train_task_sft`), so φ_T learns the task, not English.

Composition for a target: θ0 + φ_L(target) + φ_T (`compsft.apply`); the MLM head of φ_L never, the
task head from φ_T.
"""
from __future__ import annotations

from functools import partial

from .base import MethodSpec
from .sft_method import assemble_sfts, counts, train_language_module, train_task_module

METHOD = MethodSpec(
    name="lt-sft",
    description="LT-SFT: language SFT + task SFT (lottery-ticket masks), composed",
    composition="θ0 + φ_L(target) + φ_T; MLM head never, task head from φ_T",
    train_language=partial(train_language_module, mask_strategy="lottery-ticket"),
    train_task=partial(train_task_module, mask_strategy="lottery-ticket"),
    assemble=assemble_sfts,
    parameter_counts=counts,
)
