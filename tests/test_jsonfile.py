"""Every JSON side file compsft reads fails with a CompsftError naming the file, whatever is in it."""
from __future__ import annotations

from pathlib import Path

import pytest

from compsft.errors import CompsftError

BAD = {
    "nested": "[" * 100_000,  # json's recursion gives out before any check (RecursionError)
    "not-json": "{kind: task",
    "not-utf8": b"\xff\xfe{}",
    "not-an-object": "[1, 2]",
}


def _readers():
    from compsft.methods.adapters.files import CONFIG_NAME as ADAPTER_CONFIG, load_adapter_config
    from compsft.methods.hydra import CONFIG_NAME as HYDRA_CONFIG, HydraConfig
    from compsft.methods.lora import SIDE_CONFIG, read_side_config
    from compsft.methods.spa_layers import CONFIG_NAME as SPA_CONFIG, SpaConfig
    from compsft.serialization import CONFIG_NAME as SFT_CONFIG, read_config

    return {
        "sft": (SFT_CONFIG, read_config),
        "hydra": (HYDRA_CONFIG, lambda d: HydraConfig.from_file(d / HYDRA_CONFIG)),
        "lora": (SIDE_CONFIG, lambda d: read_side_config(d, "task")),
        "adapter": (ADAPTER_CONFIG, load_adapter_config),
        "spa": (SPA_CONFIG, lambda d: SpaConfig.from_file(d / SPA_CONFIG)),
    }


@pytest.mark.parametrize("reader", ["sft", "hydra", "lora", "adapter", "spa"])
@pytest.mark.parametrize("content", list(BAD))
def test_malformed_json_is_a_clear_error(tmp_path: Path, reader: str, content: str):
    name, read = _readers()[reader]
    data = BAD[content]
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    with pytest.raises(CompsftError) as err:
        read(tmp_path)
    assert name in str(err.value)


@pytest.mark.parametrize("reader", ["sft", "hydra", "lora", "adapter", "spa"])
def test_missing_file_is_a_clear_error(tmp_path: Path, reader: str):
    name, read = _readers()[reader]
    with pytest.raises(CompsftError):
        read(tmp_path)
