"""INT4: symmetric integers in [-8, 7] with one float32 scale per group of 128 along the last dim (the
common GPTQ/AWQ-style weight format), for comparison with NVFP4.

    scale = group_amax / 7;   q = clamp(round_half_even(x / scale), -8, 7);   out = q * scale
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ckaqad.formats import backends
from ckaqad.formats.nvfp4 import check_blockable
from ckaqad.formats.ste import straight_through

BLOCK_SIZE = 128
QMAX = 7
QMIN = -8


@dataclass
class INT4Tensor:
    """`codes` int8 in [-8, 7] with the input's shape, `scales` float32 `[..., K/128]`."""

    codes: torch.Tensor
    scales: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        blocks = self.codes.to(torch.float32).unflatten(-1, (-1, BLOCK_SIZE))
        return (blocks * self.scales.unsqueeze(-1)).flatten(-2)


def _blocks(x: torch.Tensor):
    check_blockable(x, BLOCK_SIZE, "INT4")
    return blocks_unchecked(x)


def blocks_unchecked(x: torch.Tensor):
    """(rounded codes as float, scales) of the groups of x, whose last dim the caller has checked."""
    blocks = x.to(torch.float32).unflatten(-1, (-1, BLOCK_SIZE))
    scale = blocks.abs().amax(dim=-1, keepdim=True) / QMAX
    q = torch.where(scale > 0, blocks / torch.where(scale > 0, scale, 1.0), 0.0)
    return torch.round(q).clamp(QMIN, QMAX), scale


def quantize(x: torch.Tensor, global_amax=None) -> INT4Tensor:
    """Quantize `x` (last dim a multiple of 128). `global_amax` is accepted for a uniform API and ignored."""
    q, scale = _blocks(x)
    return INT4Tensor(q.to(torch.int8).flatten(-2), scale.squeeze(-1))


def fake_quantize_reference(x: torch.Tensor, global_amax=None) -> torch.Tensor:
    q, scale = _blocks(x)
    return (q * scale).flatten(-2).to(x.dtype)


def fake_quantize(x: torch.Tensor, global_amax=None, clip_gradient: bool = False) -> torch.Tensor:
    """INT4 quantize-dequantize with a straight-through gradient; same shape and dtype as `x`."""
    quant_dequant = backends.fast_path("int4", x) or fake_quantize_reference
    return straight_through(quant_dequant, x, None, clip_gradient)
