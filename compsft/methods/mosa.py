"""MoSA (Zhang et al., arXiv 2312.02923: "MoSA: Mixture of Sparse Adapters for Visual Efficient Tuning", later
retitled "Split & Merge: Unlocking the Potential of Visual Adapters via Sparse Training"), written from the paper
for MAD-X-style language and task adapters (their code is CC BY-NC and for ViT).

The adapters are MAD-X's (`seq_bn` bottlenecks, language rf 2 + NICE, task rf 1: the same parameter budget,
the paper's K); only their training differs: each bottleneck weight matrix is split into N = 4 disjoint
random sparse sub-modules, one drawn at random per step is trained, and afterwards the sub-modules are merged
into one dense adapter (`compsft.methods.adapters.split`). The NICE adapter and the biases train densely.

`mosa-hier`: the hierarchical sparse strategy. The paper's abstract names it ("to better leverage limited
training data") but its method section could not be read here; the mechanism follows the authors' released
code (`split.py` says what was taken from where and what was chosen): the down projection of every bottleneck
is not split but shared, one dense module trained at every step, and only the up projection is split into
N = 4 sub-modules, one drawn per step. Same adapters, same files, same parameter counts as `mosa`; it trains
its own language adapters (their training differs), so it does not share `mosa`'s.

Composition rule (both): as MAD-X's, `Stack(target language adapter, task adapter)` after every feed-forward
block with the target's NICE adapter on the embeddings; the task adapter was trained on the stack with the
source language adapter, frozen. The module defining the methods: this one (`METHOD` = "mosa",
`METHOD_HIER` = "mosa-hier").
"""
from __future__ import annotations

from dataclasses import replace

from .madx import SETTINGS, make_method

N_SPLITS = 4
#: the projection `mosa-hier` keeps dense and shared (the authors' scripts share "down" for most tasks)
HIER_SHARED = "down"
METHOD = make_method("mosa", replace(SETTINGS, mosa_splits=N_SPLITS),
                     f"MoSA: MAD-X adapters trained as {N_SPLITS} random disjoint sparse sub-modules, "
                     "one per step, merged after training")
METHOD_HIER = make_method("mosa-hier", replace(SETTINGS, mosa_splits=N_SPLITS, mosa_shared=HIER_SHARED),
                          f"MoSA, hierarchical: a dense shared {HIER_SHARED} projection, the other split into "
                          f"{N_SPLITS} random disjoint sparse sub-modules, one per step, merged after training")
