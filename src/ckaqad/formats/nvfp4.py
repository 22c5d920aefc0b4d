"""NVFP4: FP4 E2M1 elements in blocks of 16 along the last dim, one FP8 E4M3 scale per block and one FP32
global scale per tensor. The single reference for the format (docs/method.md#nvfp4-and-the-comparison-formats);
kernels are tested against it.

Arithmetic (all in FP32):
    g   = amax / (6 * 448)                              global scale (amax over the tensor, or calibrated)
    s8  = fp8_e4m3(min(block_amax / (6 * g), 448))      per-block scale, round-to-nearest-even
    s   = float(s8) * g                                 effective block scale
    q   = round_e2m1(|x| / s)  (ties to even)           element index 0..7 on {0, .5, 1, 1.5, 2, 3, 4, 6}
    out = sign(x) * q * s

>>> import torch
>>> x = torch.tensor([[0.0, 0.25, 0.3, 1.25, 6.0, -6.0, 2.6, 5.0] * 2])
>>> quantize(x).dequantize()[0, :8].tolist()
[0.0, 0.0, 0.5, 1.0, 6.0, -6.0, 3.0, 4.0]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ckaqad.errors import FormatError
from ckaqad.formats import backends
from ckaqad.formats.e2m1 import FP4_MAX, e2m1_grid, e2m1_index, e2m1_magnitudes
from ckaqad.formats.ste import straight_through

BLOCK_SIZE = 16
FP8_E4M3_MAX = 448.0
# The ratio between a tensor's amax and its global scale g: the largest FP4 value times the largest FP8 scale.
GLOBAL_RANGE = FP4_MAX * FP8_E4M3_MAX


def global_scale_from_amax(amax: torch.Tensor | float) -> torch.Tensor:
    """g = amax / (6 * 448) as a float32 scalar tensor."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    # Divide by a tensor: a Python-scalar divisor may become a multiply by its reciprocal on some backends.
    return amax / torch.tensor(GLOBAL_RANGE, dtype=torch.float32, device=amax.device)


def reciprocal_global_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """compressed-tensors' global scale G = fl32(2688 / amax) (`weight_global_scale`, `input_global_scale`),
    the reciprocal of g: one IEEE float32 division (a tensor divisor, never 2688 * (1/amax)), on amax's
    device, same shape. The export stores exactly this, and the runtime arithmetic uses it."""
    amax = torch.as_tensor(amax).detach().to(torch.float32)
    return torch.tensor(GLOBAL_RANGE, dtype=torch.float32, device=amax.device) / amax


def check_blockable(x: torch.Tensor, block_size: int = BLOCK_SIZE, name: str = "NVFP4") -> None:
    if x.dim() == 0 or x.shape[-1] % block_size != 0:
        raise FormatError(
            f"{name} needs the last dim to be a multiple of {block_size}, got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise FormatError(f"{name} quantizes floating-point tensors, got {x.dtype}")


def block_scales_fp8(block_amax: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 block scales s8 = fp8(min(block_amax / (6 g), 448)); zero where g == 0."""
    ratio = torch.where(g > 0, block_amax / (FP4_MAX * g), 0.0)  # g == 0: all-zero tensor
    return ratio.clamp(max=FP8_E4M3_MAX).to(torch.float8_e4m3fn)


@dataclass
class NVFP4Tensor:
    """A quantized tensor. `codes` has the input's shape (uint8, 0..15); `block_scales` is `[..., K/16]`."""

    codes: torch.Tensor
    block_scales: torch.Tensor
    global_scale: torch.Tensor
    dtype: torch.dtype = torch.float32

    def dequantize(self) -> torch.Tensor:
        """float32 values `code_value * float(s8) * g`."""
        values = e2m1_grid(self.codes.device)[self.codes.long()]
        scale = self.block_scales.to(torch.float32) * self.global_scale
        blocks = values.unflatten(-1, (-1, BLOCK_SIZE)) * scale.unsqueeze(-1)
        return blocks.flatten(-2)


def _quantize_blocks(x: torch.Tensor, global_amax: torch.Tensor | float | None):
    """Shared body of quantize/fake_quantize: returns (signed index codes, s8, g, effective scale)."""
    check_blockable(x)
    xf = x.to(torch.float32)
    blocks = xf.unflatten(-1, (-1, BLOCK_SIZE))  # (..., K/16, 16)
    amax = xf.abs().amax() if global_amax is None else torch.as_tensor(global_amax, dtype=torch.float32,
                                                                         device=x.device)
    g = global_scale_from_amax(amax).to(x.device)
    s8 = block_scales_fp8(blocks.abs().amax(dim=-1), g)
    s = (s8.to(torch.float32) * g).unsqueeze(-1)
    # A zero scale (all-zero block, or one whose FP8 scale underflows) sends every element to 0.
    index = e2m1_index(blocks.abs() / torch.where(s > 0, s, float("inf")))
    return blocks, index, s8, g, s


def quantize(x: torch.Tensor, global_amax: torch.Tensor | float | None = None) -> NVFP4Tensor:
    """Quantize `x` (any float dtype, last dim a multiple of 16) to NVFP4.

    `global_amax` overrides the tensor's own amax (a calibrated activation amax, or a fused group's shared
    weight amax); values beyond it saturate at ±6·s.
    """
    blocks, index, s8, g, _ = _quantize_blocks(x, global_amax)
    # The sign bit is kept for values that round to zero (code 8 = -0), as compressed-tensors and torchao do.
    sign = torch.signbit(blocks).to(torch.uint8) << 3
    codes = (sign | index).flatten(-2)
    return NVFP4Tensor(codes=codes, block_scales=s8, global_scale=g, dtype=x.dtype)


def fake_quantize_reference(x: torch.Tensor, global_amax: torch.Tensor | float | None = None) -> torch.Tensor:
    """Quantize-dequantize in plain torch, no autograd: `quantize(x, global_amax).dequantize()` in x.dtype."""
    blocks, index, _, _, s = _quantize_blocks(x, global_amax)
    mags = e2m1_magnitudes(index)
    # copysign keeps the sign of values that round to zero (-0), like the codes do.
    return torch.copysign(mags * s, blocks).flatten(-2).to(x.dtype)


def fake_quantize(x: torch.Tensor, global_amax: torch.Tensor | float | None = None,
                  clip_gradient: bool = False) -> torch.Tensor:
    """NVFP4 quantize-dequantize with a straight-through gradient; same shape and dtype as `x`.

    Equal to `quantize(x, global_amax).dequantize().to(x.dtype)`. The gradient passes unchanged, or, with
    `clip_gradient`, is zeroed where |x| > amax (the values that saturate).
    """
    quant_dequant = backends.fast_path("nvfp4", x) or fake_quantize_reference
    return straight_through(quant_dequant, x, global_amax, clip_gradient)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last dim, the even column in the low nibble: `[..., K] -> [..., K/2]`."""
    if codes.shape[-1] % 2:
        raise FormatError(f"pack needs an even last dim, got {tuple(codes.shape)}")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack`: `[..., K/2] uint8 -> [..., K]` codes 0..15."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)
