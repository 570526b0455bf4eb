"""The learning-rate schedule every trained model here uses: linear warm-up, cosine decay."""

from __future__ import annotations

import math


def warmup_steps(share: float, total: int) -> int:
    """Warm-up length for a warm-up given as a share of `total` steps (at least one step)."""
    return max(1, int(round(share * total)))


def lr_factor(step: int, total: int, warmup: int, floor: float) -> float:
    """Multiplier of the base learning rate at `step` (0-based) of `total`.

    Linear warm-up over the first `warmup` steps ((step + 1) / warmup), then cosine decay
    from 1 to `floor`: floor + (1 - floor) * (1 + cos(pi * t)) / 2, t = share of the
    remaining steps done (held at 1 past the end).
    """
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
