"""Bottleneck adapters (MAD-X) on `transformers` encoders, through forward hooks: layers, files, attachment
and the MAD-X training recipes. The methods themselves are `compsft.methods.madx` (and `lora`)."""
from .attach import Adapter, AdapterBank, Stack, adapter_bank, add_adapter, set_active, train_only
from .files import AdapterConfig, load_adapter_config, load_adapter_files, save_adapter_files
from .layers import Bottleneck, NICECoupling

__all__ = [
    "Adapter", "AdapterBank", "AdapterConfig", "Bottleneck", "NICECoupling", "Stack", "adapter_bank", "add_adapter",
    "load_adapter_config", "load_adapter_files", "save_adapter_files", "set_active", "train_only",
]
