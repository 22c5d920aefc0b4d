"""The loss of the global batch when each rank holds a slice of it (docs/distributed.md#numerics).

Each rank's term is its *share* of the global term (a sum over its tokens divided by the global token count),
so the gradients that FSDP sums over ranks are the global batch's gradient. `sum_over_ranks` gives that share
the global value for everything that reads it (logging, λ auto, the finite check) while its gradient stays the
share's own. Without a process group both are the identity, and a one-process run computes what it did.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def global_count(count: torch.Tensor) -> torch.Tensor:
    """The number of valid tokens of the global batch (float32 scalar): this rank's count all-reduced."""
    total = count.detach().to(torch.float32).reshape(()).clone()
    if distributed():
        dist.all_reduce(total)
    return total


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, share: torch.Tensor) -> torch.Tensor:
        total = share.detach().clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def sum_over_ranks(share: torch.Tensor) -> torch.Tensor:
    """Σ over ranks of each rank's `share` (a scalar), the same on every rank; the gradient reaching `share` is
    the incoming one unchanged (this rank's part of the global gradient, which FSDP then sums)."""
    return _SumOverRanks.apply(share) if distributed() else share
