"""Fused NVFP4 quantize-dequantize in one Triton kernel: one read and one write of the tensor.

Bit-exact with `nvfp4.fake_quantize_reference` (tests/formats/test_nvfp4_triton.py runs it under the Triton
interpreter on CPU, and on the GPU when there is one). Exactness rests on three choices:
* divisions use `div_rn` (IEEE round-to-nearest), not Triton's default approximate fp32 division;
* the FP8 E4M3 rounding of the block scale is done in FP32 arithmetic, not by a hardware cast: the
  quantum 2^(max(e, -6) - 3) is built from the exponent bits and the mantissa is rounded half-to-even by
  the 1.5·2^23 trick, so the result is the same on every backend;
* the sign is OR-ed back as a bit, exactly like `torch.copysign` (signed zeros included);
* a bf16 output is rounded from FP32 to nearest-even on the bits, as torch's cast does.
The global scale `g = amax / (6·448)` is computed by torch (the same expression as the reference) and read
by the kernel from device memory, so there is no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ckaqad.formats import backends
from ckaqad.formats.e2m1 import E2M1_BOUNDARIES, E2M1_VALUES
from ckaqad.formats.nvfp4 import BLOCK_SIZE, FP8_E4M3_MAX, check_blockable, global_scale_from_amax

BLOCKS_PER_PROGRAM = 128  # 128 blocks x 16 elements = 2048 elements per program
_RNE_MAGIC = 12582912.0  # 1.5 * 2**23: adding and subtracting it rounds |r| < 2**22 half-to-even
# The E2M1 rounding, as constexpr kernel arguments generated from `e2m1` (never re-typed here): boundary k
# separates magnitude k from k+1, and TIE_k says whether the boundary itself rounds up.
_GRID_ARGS = {**{f"B{k}": b for k, (b, _) in enumerate(E2M1_BOUNDARIES)},
              **{f"TIE{k}": up for k, (_, up) in enumerate(E2M1_BOUNDARIES)},
              **{f"V{k}": v for k, v in enumerate(E2M1_VALUES)}}


@triton.jit
def _e4m3_round(v):
    """Round v in [0, 448] to the nearest FP8 E4M3 value, ties to even (subnormals below 2^-6)."""
    bits = v.to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) - 127
    exponent = tl.maximum(exponent, -6)
    quantum = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(e-3), exact
    r = tl.math.div_rn(v, quantum)
    r = (r + 12582912.0) - 12582912.0
    return r * quantum


@triton.jit
def _above(a, boundary: tl.constexpr, tie_up: tl.constexpr):
    if tie_up:
        return a >= boundary
    else:
        return a > boundary


@triton.jit
def _nvfp4_fake_quant_kernel(x_ptr, out_ptr, g_ptr, n_blocks, BLOCKS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                             OUT_BF16: tl.constexpr, FP4_MAX: tl.constexpr, FP8_MAX: tl.constexpr,
                             B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr,
                             B4: tl.constexpr, B5: tl.constexpr, B6: tl.constexpr,
                             TIE0: tl.constexpr, TIE1: tl.constexpr, TIE2: tl.constexpr, TIE3: tl.constexpr,
                             TIE4: tl.constexpr, TIE5: tl.constexpr, TIE6: tl.constexpr,
                             V0: tl.constexpr, V1: tl.constexpr, V2: tl.constexpr, V3: tl.constexpr,
                             V4: tl.constexpr, V5: tl.constexpr, V6: tl.constexpr, V7: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCKS + tl.arange(0, BLOCKS)
    cols = tl.arange(0, BLOCK_SIZE)
    offsets = rows[:, None].to(tl.int64) * BLOCK_SIZE + cols[None, :]
    mask = rows[:, None] < n_blocks
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr)
    ax = tl.abs(x)
    block_amax = tl.max(ax, axis=1)
    ratio = tl.where(g > 0, tl.math.div_rn(block_amax, FP4_MAX * g), 0.0)
    s8 = _e4m3_round(tl.minimum(ratio, FP8_MAX))
    s = (s8 * g)[:, None]
    a = tl.where(s > 0, tl.math.div_rn(ax, tl.where(s > 0, s, 1.0)), 0.0)
    # Boundaries increase, so each passed boundary overwrites the magnitude below it.
    q = tl.where(_above(a, B0, TIE0), V1, V0)
    q = tl.where(_above(a, B1, TIE1), V2, q)
    q = tl.where(_above(a, B2, TIE2), V3, q)
    q = tl.where(_above(a, B3, TIE3), V4, q)
    q = tl.where(_above(a, B4, TIE4), V5, q)
    q = tl.where(_above(a, B5, TIE5), V6, q)
    q = tl.where(_above(a, B6, TIE6), V7, q)
    magnitude = (q * s).to(tl.int32, bitcast=True)
    sign = x.to(tl.int32, bitcast=True) & -2147483648  # 0x80000000
    out_bits = magnitude | sign
    if OUT_BF16:
        # fp32 -> bf16 round-to-nearest-even on the bits (exact on every backend; out_ptr is an int16 view).
        u = out_bits.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        tl.store(out_ptr + offsets, u.to(tl.int16), mask=mask)
    else:
        out = out_bits.to(tl.float32, bitcast=True)
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def fake_quantize(x: torch.Tensor, global_amax: torch.Tensor | float | None = None) -> torch.Tensor:
    """NVFP4 quantize-dequantize of `x` (last dim a multiple of 16), same dtype and shape, no autograd."""
    check_blockable(x)
    x = x.contiguous()
    amax = x.abs().amax().float() if global_amax is None else torch.as_tensor(global_amax, dtype=torch.float32,
                                                                                device=x.device)
    g = global_scale_from_amax(amax).to(x.device).reshape(1)
    out = torch.empty_like(x)
    bf16 = x.dtype == torch.bfloat16
    n_blocks = x.numel() // BLOCK_SIZE
    grid = (triton.cdiv(n_blocks, BLOCKS_PER_PROGRAM),)
    _nvfp4_fake_quant_kernel[grid](x, out.view(torch.int16) if bf16 else out, g, n_blocks,
                                   BLOCKS=BLOCKS_PER_PROGRAM, BLOCK_SIZE=BLOCK_SIZE, OUT_BF16=bf16,
                                   FP4_MAX=E2M1_VALUES[-1], FP8_MAX=FP8_E4M3_MAX, **_GRID_ARGS)
    return out


backends.register_cuda_fast_path("nvfp4", fake_quantize)
