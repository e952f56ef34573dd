"""Model and tokenizer arguments are local directories, never names on a model hub.

`transformers` treats any string that is not an existing directory as a hub name and goes to the
network; compsft must not (no network at run time, and a typo must not download someone else's
model). Every command checks its model and tokenizer arguments here first, naming the option::

    model_dir = local_dir(model, "--model")                       # config.json required
    tokenizer_dir = local_dir(tokenizer, "--tokenizer", need=None)
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import CompsftError

MODEL_CONFIG = "config.json"


def local_dir(path: str | os.PathLike, option: str, need: str | None = MODEL_CONFIG) -> Path:
    """`path` as an existing local directory (holding `need`, if given), else a CompsftError naming `option`.

    Example::

        local_dir("xlm-roberta-base", "--tokenizer")
        # CompsftError: --tokenizer: 'xlm-roberta-base' is not a local directory; ...
    """
    p = Path(path)
    if not p.is_dir():
        raise CompsftError(
            f"{option}: {str(path)!r} is not a local directory; compsft loads models and tokenizers only "
            "from directories written by save_pretrained (it never looks names up on a model hub)"
        )
    if need and not (p / need).is_file():
        raise CompsftError(f"{option}: {p} is not a model directory (no {need})")
    return p


def load_model_by_architecture(model_dir: str | os.PathLike, option: str = "model"):
    """The model in `model_dir`, with the class its config names (else `AutoModel`), from local files only."""
    import transformers
    from transformers import AutoConfig, AutoModel

    model_dir = local_dir(model_dir, option)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    for arch in config.architectures or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls.from_pretrained(model_dir, local_files_only=True)
    return AutoModel.from_pretrained(model_dir, local_files_only=True)


def load_tokenizer(tokenizer_dir: str | os.PathLike, option: str = "tokenizer", required: bool = True):
    """The tokenizer saved in `tokenizer_dir` (local files only); None if there is none and not `required`."""
    from transformers import AutoTokenizer

    tokenizer_dir = local_dir(tokenizer_dir, option, need=None)
    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - transformers raises many types for "no tokenizer here"
        if not required:
            return None
        raise CompsftError(f"{option}: {tokenizer_dir} holds no tokenizer this transformers can load ({err})") from None
