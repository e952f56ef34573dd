"""LT-SFT training: the trainer, its arguments, mask strategies and the selection behind them; full
fine-tuning (the baseline) and model selection on source dev data."""
from .arguments import SftArguments
from .dev_selection import DevSelection
from .full_ft import FullFineTuning, load_full_ft, train_full_ft
from .masks import MASK_STRATEGIES, MaskStrategy, get_mask_strategy, lottery_ticket, magnitude, random_mask
from .recipes import train_language_sft, train_task_sft
from .params import eligible_parameters, head_parameters, resolve_k, untie_output_embeddings
from .selection import select_top_k, top_k_of_scores
from .trainer import SparseFineTuner

__all__ = [
    "DevSelection", "FullFineTuning", "MASK_STRATEGIES", "MaskStrategy", "SftArguments", "SparseFineTuner",
    "eligible_parameters", "load_full_ft", "train_full_ft",
    "get_mask_strategy", "head_parameters", "lottery_ticket", "magnitude", "random_mask", "resolve_k",
    "select_top_k", "top_k_of_scores", "train_language_sft", "train_task_sft", "untie_output_embeddings",
]
