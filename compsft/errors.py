"""One exception type, so the CLI can print a single clear line for every expected failure."""
from __future__ import annotations


class CompsftError(ValueError):
    """A problem with user input (a file, a model, an option) that the user can fix.

    The message names the file and, where there is one, the tensor or line at fault.
    """


class FingerprintMismatch(CompsftError):
    """An SFT is applied to a base model other than the one it was trained from."""


class VocabularyMismatch(CompsftError):
    """An SFT is applied to a model whose vocabulary differs from the one it was trained with."""
