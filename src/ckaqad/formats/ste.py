"""Straight-through gradient shared by every format's `fake_quantize`."""

from __future__ import annotations

from collections.abc import Callable

import torch


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, quant_dequant, global_amax, clip):
        if clip:
            amax = x.detach().abs().amax() if global_amax is None else global_amax
            ctx.save_for_backward(x.detach().abs() <= amax)
        ctx.clip = clip
        return quant_dequant(x, global_amax)

    @staticmethod
    def backward(ctx, grad):
        if ctx.clip:
            (inside,) = ctx.saved_tensors
            grad = grad * inside
        return grad, None, None, None


def straight_through(quant_dequant: Callable, x: torch.Tensor, global_amax=None, clip: bool = False):
    """`quant_dequant(x, global_amax)` in the forward pass; the backward passes the gradient unchanged, or
    with `clip` zeroes it where |x| exceeds the amax (the saturated values)."""
    return _StraightThrough.apply(x, quant_dequant, global_amax, clip)
