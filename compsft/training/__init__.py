"""LT-SFT training: the trainer, its arguments, mask strategies and the selection behind them."""
from .arguments import SftArguments
from .masks import MASK_STRATEGIES, MaskStrategy, get_mask_strategy, lottery_ticket, magnitude, random_mask
from .recipes import train_language_sft, train_task_sft
from .params import eligible_parameters, head_parameters, resolve_k, untie_output_embeddings
from .selection import select_top_k, top_k_of_scores
from .trainer import SparseFineTuner

__all__ = [
    "MASK_STRATEGIES", "MaskStrategy", "SftArguments", "SparseFineTuner", "eligible_parameters",
    "get_mask_strategy", "head_parameters", "lottery_ticket", "magnitude", "random_mask", "resolve_k",
    "select_top_k", "top_k_of_scores", "train_language_sft", "train_task_sft", "untie_output_embeddings",
]
