"""MoSA (Luo et al. 2024, "Split & Merge: Unlocking the Potential of Visual Adapters via Sparse Training"),
written from the paper for MAD-X-style language and task adapters (their code is CC BY-NC and for ViT).

The adapters are MAD-X's (`seq_bn` bottlenecks, language rf 2 + NICE, task rf 1: the same parameter budget,
the paper's K); only their training differs: each bottleneck weight matrix is split into N = 4 disjoint
random sparse sub-modules, one drawn at random per step is trained, and afterwards the sub-modules are merged
into one dense adapter (`compsft.methods.adapters.split`). The NICE adapter and the biases train densely.
Not implemented: the paper's hierarchical sparse variant.

Composition rule: as MAD-X's, `Stack(target language adapter, task adapter)` after every feed-forward
block with the target's NICE adapter on the embeddings; the task adapter was trained on the stack with the
source language adapter, frozen. The module defining the method: this one (`METHOD` = "mosa").
"""
from __future__ import annotations

from dataclasses import replace

from .madx import SETTINGS, make_method

N_SPLITS = 4
METHOD = make_method("mosa", replace(SETTINGS, mosa_splits=N_SPLITS),
                     f"MoSA: MAD-X adapters trained as {N_SPLITS} random disjoint sparse sub-modules, "
                     "one per step, merged after training")
