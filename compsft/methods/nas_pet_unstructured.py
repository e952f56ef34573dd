"""`nas-pet-unstructured`: NAS-PET pruning of single entries (defined in `nas_pet.py`)."""
from .nas_pet import UNSTRUCTURED as METHOD

__all__ = ["METHOD"]
