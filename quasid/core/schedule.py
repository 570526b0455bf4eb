"""Training the SID tokenizers: the seeded fit loop and the `train` pipeline over a dataset folder.

`fit_model` is the loop: k-means codebook init, AdamW with linear warm-up and cosine decay,
bf16 autocast on CUDA (the quantizer and the losses stay in fp32), gradient clipping,
dead-code re-seeding after each epoch, per-epoch losses and SID metrics, a rich progress
bar, and a checkpoint that a rerun with the same config resumes from (same seed, same
result as an uninterrupted run, on the CPU).

`train_tokenizer` is what `quasid train` and the flows call: data folder in, SID table,
tokenizer, metrics and plot out.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


def lr_factor(step: int, total: int, warmup_share: float, final_share: float) -> float:
    """Linear warm-up over `warmup_share` of the steps, then cosine decay to `final_share`."""
    warm = max(1, int(round(warmup_share * total)))
    if step < warm:
        return (step + 1) / warm
    t = min(1.0, (step - warm) / max(1, total - warm))
    return final_share + (1 - final_share) * 0.5 * (1 + math.cos(math.pi * t))
