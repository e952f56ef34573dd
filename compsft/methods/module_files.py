"""The files of a low-rank module (Hydra, SPA): one safetensors file of its tensors, an optional
`head.safetensors` (a task module's head) and a JSON config, each written atomically; reading names
the file of any error."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import torch

from compsft.atomic import atomic_path, write_text
from compsft.errors import CompsftError

HEAD_NAME = "head.safetensors"


def write_module(out: Path, weights_name: str, tensors: Mapping[str, torch.Tensor], config_name: str, config: Any,
                 head: Mapping[str, torch.Tensor] | None = None) -> None:
    """Tensors, head and config (a dataclass) into `out`; the config last, so it marks a complete module."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / weights_name) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    if head:
        with atomic_path(out / HEAD_NAME) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in head.items()}, str(tmp))
    write_text(out / config_name, json.dumps(dataclasses.asdict(config), indent=2, ensure_ascii=False) + "\n")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (no code runs: safetensors holds data only)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors' own error types
        raise CompsftError(f"{path}: not a readable safetensors file ({e})") from None


def read_head(directory: Path) -> dict[str, torch.Tensor]:
    """The head tensors of a task module, or {} for a module without a head."""
    path = Path(directory) / HEAD_NAME
    return read_tensors(path) if path.exists() else {}


def check_names(path: Path, tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple]) -> None:
    """The file holds exactly the tensors its config describes."""
    if set(tensors) != set(shapes):
        raise CompsftError(f"{path}: tensor {sorted(set(tensors) ^ set(shapes))[0]!r} is missing or not in the config")


def open_task_module(ctx, task_dir: Path, config: Any, head: Mapping[str, torch.Tensor], config_name: str,
                     what: str):
    """(a fresh task model on θ0 holding the module's head, the model's vocabulary record), after checking
    that the module in `task_dir` is a task module trained with this model's vocabulary."""
    from compsft.tasks import get_task
    from compsft.vocab import require_same_vocab

    from .adapters.recipes import load_head, load_vocab

    if config.kind != "task":
        raise CompsftError(f"{Path(task_dir) / config_name}: field 'kind' is {config.kind!r}, expected 'task'")
    _, vocab = load_vocab(ctx.model_dir)
    require_same_vocab(config.vocab, vocab, f"{what} module {task_dir}")
    model = get_task(config.task).build_model(ctx.model_dir, config.labels)
    load_head(model, head, Path(task_dir))
    return model, vocab
