"""`lt-sft-lang+spiel-task`: LT-SFT language SFTs with a SpIEL task SFT (defined in `spiel.py`)."""
from .spiel import MIXED as METHOD

__all__ = ["METHOD"]
