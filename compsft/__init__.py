"""compsft: cross-lingual transfer by composable sparse fine-tuning (LT-SFT).

The public API is a few verbs::

    import compsft
    lang = compsft.load("sfts/mt-language")          # a SparseFineTuning
    task = compsft.load("sfts/pos-task")
    handle = compsft.apply(model, lang, task, with_dense=[False, True])
    ...
    compsft.revert(model, handle)                    # bit-identical
    both = compsft.compose(lang, task)               # one SFT; both.overlap per tensor
    compsft.save(both, "sfts/mt-pos")

Training (imported on first use, as it pulls in the `transformers` Trainer)::

    compsft.train_language_sft("models/e5", "mlt", "sfts/mlt")
    compsft.train_task_sft("pos", "models/e5", "ud:en_ewt:train", "sfts/pos", source_sft="sfts/eng")
"""
from __future__ import annotations

from pathlib import Path

from .errors import CompsftError, FingerprintMismatch, VocabularyMismatch
from .merge import AppliedSft, applied, apply, compose, revert
from .sft import SftConfig, SparseDelta, SparseFineTuning
from .version import __version__


def load(directory: str | Path, device: str = "cpu") -> SparseFineTuning:
    """Load an SFT directory (`sft.safetensors` + `sft_config.json`), validated."""
    return SparseFineTuning.load(directory, device=device)


def save(sft: SparseFineTuning, directory: str | Path, **kwargs) -> Path:
    """Save `sft` into `directory` atomically; kwargs: dtype, index_encoding."""
    return sft.save(directory, **kwargs)


_LAZY = {"SparseFineTuner", "SftArguments", "train_language_sft", "train_task_sft"}


def __getattr__(name: str):
    if name in _LAZY:
        from . import training

        return getattr(training, name)
    if name == "Predictor":  # `compsft.Predictor(model, sfts=[...], task="pos")`: imports the tasks on first use
        from .predict import Predictor

        return Predictor
    if name == "CompareConfig":  # the harness: `compsft.compare.compare(compsft.CompareConfig(...))`
        from .compare import CompareConfig

        return CompareConfig
    raise AttributeError(f"module 'compsft' has no attribute {name!r}")


__all__ = sorted([
    "AppliedSft",
    "CompareConfig",
    "CompsftError",
    "FingerprintMismatch",
    "Predictor",
    "SftConfig",
    "SparseDelta",
    "SftArguments",
    "SparseFineTuner",
    "SparseFineTuning",
    "VocabularyMismatch",
    "__version__",
    "applied",
    "apply",
    "compose",
    "load",
    "revert",
    "save",
    "train_language_sft",
    "train_task_sft",
])
