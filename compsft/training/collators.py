"""An MLM collator whose dynamic masking survives a resume.

`DataCollatorForLanguageModeling` draws its masks from the global torch RNG. The Trainer restores
that RNG from a checkpoint only after it has already fetched (and so masked) the first batch after
the resume point, so a resumed run masks that batch differently from an uninterrupted one and the
two runs part ways. Here each batch is masked with a generator seeded by the seed and a hash of
the batch's token ids: masking is still dynamic (a batch of other examples, as every epoch's
reshuffle gives, gets other masks) but no longer depends on the RNG's history.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DataCollatorForLanguageModeling


@dataclass
class ResumableMlmCollator(DataCollatorForLanguageModeling):
    """`DataCollatorForLanguageModeling` with batch-content-seeded masking (`seed` is required)."""

    def torch_call(self, examples):
        crc = 0
        for e in examples:
            ids = e["input_ids"] if isinstance(e, dict) else e
            crc = zlib.crc32(np.asarray(ids, dtype=np.int64).tobytes(), crc)
        self.generator = torch.Generator().manual_seed(((self.seed or 0) << 32) ^ crc)
        return super().torch_call(examples)
