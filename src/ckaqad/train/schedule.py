"""The learning-rate schedule: linear warmup to the peak, then cosine decay to `min_lr_ratio` of it."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(steps: int, warmup_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """LambdaLR factor: (step + 1)/(warmup + 1) during warmup, then cosine from 1 to `min_lr_ratio` at `steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        span = max(steps - warmup_steps, 1)
        progress = min((step - warmup_steps) / span, 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
