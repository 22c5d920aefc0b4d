"""The per-token surrogate objectives of GRPO and ABC-GRPO, GRPO's group-normalised advantages, and what the
clipping did to a batch of tokens (the four quadrants of (sign A, r ≶ 1) and how many tokens were clipped).

With the token ratio r = π_θ / π_old and the sequence advantage A (broadcast over the sequence's tokens):

- GRPO (Shao et al. 2024, PPO's clip):  `min(r·A, clip(r, 1−ε_low, 1+ε_high)·A)`. The min bounds only
  (A>0, r>1+ε_high) and (A<0, r<1−ε_low); (A>0, r<1−ε_low) and (A<0, r>1+ε_high) keep the unclipped `r·A`.
- ABC-GRPO (arXiv 2601.03895, eq. 5):  `r̂·A` with `r̂ = clip(r, 1−ε₂, 1+ε₁)` if A > 0 and
  `r̂ = clip(r, 1−ε₄, 1+ε₃)` if A ≤ 0, and no min: every quadrant is bounded. With ε₂ = ε₃ = ∞,
  ε₁ = ε_high and ε₄ = ε_low it is GRPO's objective exactly (tests/rl/test_rl_objectives.py).

Both are objectives to maximise (the loss is the negative), of the shape of `ratio`, differentiable in it;
their gradient is exactly zero on a token where a bound is active.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ckaqad.errors import ConfigError

ADVANTAGE_EPS = 1e-4
"""Added to the group's standard deviation (TRL's value), so a group of equal rewards gets A = 0, not NaN."""


def _broadcast(advantages: Tensor, ratio: Tensor) -> Tensor:
    """Sequence advantages (batch,) broadcast against token ratios (batch, tokens); same-shape ones as they are."""
    while advantages.dim() < ratio.dim():
        advantages = advantages.unsqueeze(-1)
    return advantages.to(ratio.dtype)


def _check_eps(**eps: float) -> None:
    for name, value in eps.items():
        if not (isinstance(value, int | float) and not isinstance(value, bool)) or math.isnan(value) or value < 0:
            raise ConfigError(f"{name} must be a number >= 0 (math.inf for no bound), got {value!r}")


def grpo_token_objective(ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float) -> Tensor:
    """GRPO's per-token objective `min(r·A, clip(r, 1−eps_low, 1+eps_high)·A)` (shape of `ratio`)."""
    _check_eps(eps_low=eps_low, eps_high=eps_high)
    adv = _broadcast(advantages, ratio)
    return torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)


def abc_token_objective(ratio: Tensor, advantages: Tensor, eps1: float, eps2: float, eps3: float,
                        eps4: float) -> Tensor:
    """ABC-GRPO's per-token objective `r̂·A` (eq. 5): `r̂ = clip(r, 1−eps2, 1+eps1)` where A > 0 and
    `clip(r, 1−eps4, 1+eps3)` where A ≤ 0 (shape of `ratio`; no min)."""
    _check_eps(eps1=eps1, eps2=eps2, eps3=eps3, eps4=eps4)
    adv = _broadcast(advantages, ratio)
    low, high = _bounds(adv > 0, ratio, eps1, eps2, eps3, eps4)
    return torch.clamp(ratio, min=low, max=high) * adv


def _bounds(positive: Tensor, ratio: Tensor, eps1: float, eps2: float, eps3: float,
            eps4: float) -> tuple[Tensor, Tensor]:
    """(lower, upper) ratio bound per token, in the ratio's dtype (rounded as `ratio.clamp(1 - eps, ...)`
    rounds its Python floats, so that ABC with GRPO's bounds equals GRPO bit for bit)."""
    def scalar(value: float) -> Tensor:
        return torch.tensor(value, dtype=ratio.dtype, device=ratio.device)

    return (torch.where(positive, scalar(1 - eps2), scalar(1 - eps4)),
            torch.where(positive, scalar(1 + eps1), scalar(1 + eps3)))


def group_advantages(rewards: Tensor, group_size: int, eps: float = ADVANTAGE_EPS) -> Tensor:
    """GRPO's outcome advantages: each reward minus its group's mean, over the group's standard deviation
    (Bessel-corrected, as torch.std and TRL) plus `eps`. `rewards` holds whole groups, consecutive:
    (n_groups · group_size,)."""
    if group_size < 2:
        raise ConfigError(f"a GRPO group needs at least 2 completions, got --group-size {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ConfigError(f"{rewards.numel()} rewards do not form groups of {group_size}")
    grouped = rewards.double().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    return (centred / (grouped.std(dim=1, keepdim=True) + eps)).view(-1).to(rewards.dtype)


@dataclass(frozen=True)
class ClipBounds:
    """The four ratio bounds of a clipped objective: [1−eps2, 1+eps1] where A > 0, [1−eps4, 1+eps3] where
    A ≤ 0. GRPO is `eps2 = eps3 = inf` (its min leaves those sides unbounded)."""

    eps1: float
    eps2: float
    eps3: float
    eps4: float

    @classmethod
    def grpo(cls, eps_low: float, eps_high: float) -> ClipBounds:
        return cls(eps1=eps_high, eps2=math.inf, eps3=math.inf, eps4=eps_low)

    def clipped(self, ratio: Tensor, advantages: Tensor) -> Tensor:
        """Where a bound is active: the token's objective is constant in the ratio (its gradient is zero)."""
        adv = _broadcast(advantages, ratio)
        low, high = _bounds(adv > 0, ratio, self.eps1, self.eps2, self.eps3, self.eps4)
        return (ratio < low) | (ratio > high)


QUADRANTS = ("pos_up", "pos_down", "neg_up", "neg_down")
"""(A>0, r≥1), (A>0, r<1), (A<0, r≥1), (A<0, r<1). Tokens with A = 0 (a group whose rewards are all equal)
carry no gradient and are counted apart, as `zero_adv`."""


def clip_statistics(ratio: Tensor, advantages: Tensor, mask: Tensor, bounds: ClipBounds,
                    eps_low: float = 0.2, eps_high: float = 0.2) -> dict[str, Tensor]:
    """Fractions of the valid tokens (`mask`) in each quadrant (`quadrant_<name>`), with A = 0
    (`quadrant_zero_adv`), clipped under `bounds` (`clipped`, and per quadrant `clipped_<name>`), and in the
    two regions GRPO with (eps_low, eps_high) leaves unbounded (`grpo_unbounded`: A>0, r<1−eps_low or A<0,
    r>1+eps_high), where the two objectives differ. 0-dim tensors; one host transfer reads them all."""
    adv = _broadcast(advantages, ratio).expand_as(ratio)
    valid = mask.bool()
    n = valid.sum().clamp(min=1).to(ratio.dtype)
    up = ratio >= 1
    regions = {"pos_up": (adv > 0) & up, "pos_down": (adv > 0) & ~up, "neg_up": (adv < 0) & up,
               "neg_down": (adv < 0) & ~up}
    clipped = bounds.clipped(ratio, adv) & valid & (adv != 0)
    stats = {f"quadrant_{name}": (region & valid).sum() / n for name, region in regions.items()}
    stats["quadrant_zero_adv"] = ((adv == 0) & valid).sum() / n
    stats.update({f"clipped_{name}": (region & clipped).sum() / n for name, region in regions.items()})
    stats["clipped"] = clipped.sum() / n
    unbounded = ((adv > 0) & (ratio < 1 - eps_low)) | ((adv < 0) & (ratio > 1 + eps_high))
    stats["grpo_unbounded"] = (unbounded & valid).sum() / n
    return stats
