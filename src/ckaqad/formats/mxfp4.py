"""MXFP4 (OCP Microscaling): FP4 E2M1 elements in blocks of 32 along the last dim, one E8M0 (power of two)
scale per block, no global scale. For comparison with NVFP4; the E2M1 grid comes from `e2m1`.

    e   = floor(log2(block_amax)) - 2          (2 = exponent of the largest E2M1 value, 6 = 1.5 * 2**2)
    q   = round_e2m1(|x| / 2**e)  (ties to even, saturating at 6)
    out = sign(x) * q * 2**e
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ckaqad.formats import backends
from ckaqad.formats.e2m1 import e2m1_grid, e2m1_index, e2m1_magnitudes
from ckaqad.formats.nvfp4 import check_blockable
from ckaqad.formats.ste import straight_through

BLOCK_SIZE = 32
E2M1_EMAX = 2
E8M0_BIAS = 127


@dataclass
class MXFP4Tensor:
    """`codes` (uint8 0..15, input shape) and `scale_exponents` (uint8 biased E8M0, `[..., K/32]`)."""

    codes: torch.Tensor
    scale_exponents: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        values = e2m1_grid(self.codes.device)[self.codes.long()]
        scale = torch.exp2(self.scale_exponents.to(torch.float32) - E8M0_BIAS)
        return (values.unflatten(-1, (-1, BLOCK_SIZE)) * scale.unsqueeze(-1)).flatten(-2)


def _blocks(x: torch.Tensor):
    check_blockable(x, BLOCK_SIZE, "MXFP4")
    blocks = x.to(torch.float32).unflatten(-1, (-1, BLOCK_SIZE))
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    # floor(log2(amax)) exactly from the float's exponent (a float32 log2 rounds up just below powers of
    # two). A zero block gets the smallest scale; its elements quantize to 0 whatever the scale.
    exponent = (torch.frexp(amax).exponent - 1 - E2M1_EMAX).to(torch.float32)
    exponent = torch.where(amax > 0, exponent, -E8M0_BIAS).clamp(-E8M0_BIAS, E8M0_BIAS)
    index = e2m1_index(blocks.abs() / torch.exp2(exponent))
    return blocks, index, exponent


def quantize(x: torch.Tensor, global_amax=None) -> MXFP4Tensor:
    """Quantize `x` (last dim a multiple of 32). `global_amax` is accepted for a uniform API and ignored."""
    blocks, index, exponent = _blocks(x)
    codes = (torch.signbit(blocks).to(torch.uint8) << 3) | index
    return MXFP4Tensor(codes.flatten(-2), (exponent.squeeze(-1) + E8M0_BIAS).to(torch.uint8))


def fake_quantize_reference(x: torch.Tensor, global_amax=None) -> torch.Tensor:
    blocks, index, exponent = _blocks(x)
    mags = e2m1_magnitudes(index)
    return torch.copysign(mags * torch.exp2(exponent), blocks).flatten(-2).to(x.dtype)


def fake_quantize(x: torch.Tensor, global_amax=None, clip_gradient: bool = False) -> torch.Tensor:
    """MXFP4 quantize-dequantize with a straight-through gradient; same shape and dtype as `x`."""
    quant_dequant = backends.fast_path("mxfp4", x) or fake_quantize_reference
    return straight_through(quant_dequant, x, None, clip_gradient)
