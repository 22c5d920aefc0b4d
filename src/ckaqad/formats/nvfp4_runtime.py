"""NVFP4 as the serving runtime computes it: compressed-tensors 0.20.1, the arithmetic transformers 5.24 runs
when it loads an `nvfp4-pack-quantized` export (the NVFP4 preset: tensor_group, group 16, `dynamic: local`,
`scale_dtype` float8_e4m3fn). Plain torch, op for op, bit for bit (tests/formats/test_nvfp4_runtime.py
checks it against compressed-tensors' own functions). No autograd: wrap it in a straight-through estimator
to train with it.

Paths are relative to site-packages/compressed_tensors/. `fl32(.)`, `bf16(.)`, `fl_x(.)` round to float32,
bfloat16, x's dtype (nearest even). G is the global scale as the checkpoint stores it, float32 [1]:
`G = fl32(2688 / amax)`, 2688 = 6 * 448 (`input_global_scale`, `weight_global_scale`).

Input quantize-dequantize (`runtime_fake_quantize`; quantization/lifecycle/forward.py:251-286 forward_quantize
-> quantization/utils/helpers.py:142-197 compute_dynamic_scales_and_zp, :52-139 calculate_qparams ->
forward.py fake_quantize -> quantization/lifecycle/forward_helpers.py:119-165 _process_group, :168-203
_quantize_dequantize). x arrives in the model dtype (bf16 in a served bf16 model):

    a     : x.dtype = fl_x(max16|x| / 6)            # helpers.py:82,88  divided in x's dtype
    s     : fp32    = fl32(G * a)                   # helpers.py:103-104
    s8    : fp32    = e4m3_rne(clamp(s, -448, 448)) # helpers.py:107-110; quant_args.py:470,476
    s8    : fp32    = 0.125 where s8 == 0           # helpers.py:117-128 (fp8 eps, not 0)
    scale : fp32    = fl32(s8 / G)                  # forward_helpers.py:184-185  a division, never 1/G
    t     : fp32    = fl32(x / scale) + 0.0         # forward_helpers.py:187-190  (+0 zero point: -0 -> +0)
    q     : fp32    = e2m1_rne(clamp(t, -6, 6))     # quant_args.py:501,508; quantization/utils/fp4_utils.py:76-97
                                                    #   |t| to nearest E2M1, ties to even, then * sign(t)
    out   : x.dtype = fl_x(fl32(q * scale))         # forward_helpers.py:199-203, :163

Weight (`runtime_dequantize_weight`; compressors/nvfp4/base.py:100-135 NVFP4PackedCompressor.decompress,
compressors/nvfp4/helpers.py:418-451 unpack_fp4_from_uint8, forward_helpers.py:54-60,557-565 _dequantize),
done once at load:

    q     : bf16 = E2M1 value of the code (sign bit 3; code 8 is -0)     # helpers.py:448,451 (exact)
    scale : fp32 = fl32(bf16(s8) / G)                                      # base.py:122; forward_helpers.py:557-558
    W     : bf16 = bf16(fl32(q * scale))                                   # forward_helpers.py:560-565, :163
    then `.to(model dtype)` (transformers/integrations/compressed_tensors.py:93)

The E2M1 rounding is compressed-tensors' threshold cascade (fp4_utils.py:87-97), which is exactly
`e2m1.e2m1_index` (its boundaries and ties; a test proves it on every tie and its float32 neighbours); NaN
stays NaN as there (the cascade leaves a NaN in place; `round_e2m1` puts it back), and ±inf saturates.

How this differs from `nvfp4.fake_quantize_reference` (ckaqad's training arithmetic, all in fp32 on
`x.float()`, with `g = fl32(amax / 2688)`):

* **bf16 rounding of amax/6.** The runtime divides the block amax by 6 in x's dtype, so for bf16 x the
  ratio is `fl32(G * bf16(amax / 6))`, where ckaqad computes `fl32(amax / fl32(6 g))`. With a G that is not
  a power of two this moves 1.5% of bf16 blocks' FP8 scale by one step (all 16 values change): the measured
  main cause of the served/trained divergence.
* **Divide by fl32(s8 / G)** where ckaqad multiplies `fl32(s8 * g)`: the dequantized values differ by
  float32 ulps (a quarter of the elements on fp32 inputs), the FP4 codes do not.
* **Zero block scales** become 0.125 (scale 0.125/G) instead of 0; such a block still quantizes to ±0
  (|x|/scale <= 6 * 8 * 2^-10 < 0.25), so only the 0/0 is avoided.
* **-0 -> +0**: the +0 zero point turns an input of exactly -0 into +0 (ckaqad keeps -0); values that round
  to zero keep their sign in both.

Power-of-two global scales (`pow2_global_amax`): with G = 2^k every product and quotient by G is exact, so
`fl32(s8 / G) = s8 * 2^-k = fl32(s8 * g)`, and q * s8 has at most 2 + 4 = 6 significant bits, fewer than
bf16's 8: every dequantized weight and activation is exact in bf16 (for k <= 116), whatever the order of
the operations. The block scales agree too (multiplying by 2^k commutes with the roundings, and for bf16 x
`bf16(amax / 6)` cannot cross an E4M3 midpoint that `fl32(amax / 6)` does not cross), so the reference
and the runtime then agree bit for bit, exact -0 inputs aside.
"""

from __future__ import annotations

import torch

from ckaqad.errors import FormatError
from ckaqad.formats import backends
from ckaqad.formats.e2m1 import FP4_MAX, e2m1_index, e2m1_magnitudes
from ckaqad.formats.nvfp4 import BLOCK_SIZE, FP8_E4M3_MAX, GLOBAL_RANGE, check_blockable

# The FP8 E4M3 machine epsilon: compressed-tensors' replacement for a block scale that rounds to 0
# (quantization/utils/helpers.py:117-128, 379-383).
FP8_E4M3_EPS = 0.125


def _global(global_scale: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """G as compressed-tensors holds it: float32 [1] on the data's device."""
    return torch.as_tensor(global_scale, dtype=torch.float32).to(device).reshape(1)


def round_e2m1(t: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' `cast_to_fp4` (fp4_utils.py:76-97): the nearest signed E2M1 value, ties to even,
    `magnitude * sign(t)` (±inf -> ±6, -0 -> ±0 as sign gives), float32. NaN stays NaN: the cascade leaves
    it in place (no threshold compares true), where `e2m1_index` gives it index 0, so it is put back."""
    t = t.to(torch.float32)
    mags = e2m1_magnitudes(e2m1_index(t.abs()))
    return torch.where(torch.isnan(t), t.abs(), mags) * torch.sign(t)


def runtime_quantize(x: torch.Tensor, global_scale: torch.Tensor | float, group_size: int = BLOCK_SIZE):
    """The runtime's W4A4 input quantizer up to the FP4 values. Returns `(q, s8, scale)`: q float32
    `[..., K/g, g]` signed E2M1 values, s8 float32 `[..., K/g]` (the FP8 block scale, 0.125 where it
    rounded to 0), scale float32 `[..., K/g, 1]` = fl32(s8 / G)."""
    check_blockable(x, group_size, name="NVFP4 runtime")
    G = _global(global_scale, x.device)
    blocks = x.unflatten(-1, (-1, group_size))                   # still x.dtype
    # amax / 6 in x's dtype, divided by a tensor on x's device (a Python-scalar divisor may become a
    # multiply by its reciprocal on CUDA); compressed-tensors divides by bit_range / 2 as a 0-dim tensor.
    six = torch.full((), FP4_MAX, dtype=x.dtype, device=x.device)
    s = G * (blocks.abs().amax(dim=-1) / six)                    # fp32 = fl32(G * fl_x(amax / 6))
    s8 = s.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    s8 = torch.where(s8 == 0, torch.full((), FP8_E4M3_EPS, dtype=torch.float32, device=x.device), s8)
    scale = (s8 / G).unsqueeze(-1)                               # fp32 = fl32(s8 / G)
    scaled = blocks / scale + 0.0                                # fp32; the +0 zero point turns -0 into +0
    q = round_e2m1(scaled.clamp(-FP4_MAX, FP4_MAX))
    return q, s8, scale


def runtime_fake_quantize(x: torch.Tensor, global_scale: torch.Tensor | float, dtype: torch.dtype | None = None,
                          group_size: int = BLOCK_SIZE) -> torch.Tensor:
    """NVFP4 W4A4 input quantize-dequantize exactly as compressed-tensors' forward_quantize runs it.

    x: the activation in the dtype the served model runs (bf16), last dim a multiple of 16. global_scale:
    the checkpoint's `input_global_scale` G = fl32(2688 / amax). Returns `fl(fl32(q * fl32(s8 / G)))` in
    `dtype` (x.dtype by default), same shape as x.
    """
    fused = backends.fast_path("runtime-input", x)
    if fused is not None and group_size == BLOCK_SIZE and dtype in (None, x.dtype):
        return fused(x, global_scale)
    q, _, scale = runtime_quantize(x, global_scale, group_size)
    return (q * scale).flatten(-2).to(dtype or x.dtype)


def runtime_dequantize_weight(codes: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor | float,
                              dtype: torch.dtype = torch.bfloat16, group_size: int = BLOCK_SIZE) -> torch.Tensor:
    """The weight the served model multiplies by: NVFP4PackedCompressor.decompress,
    `bf16(fl32(q * fl32(bf16(s8) / G)))`, then the cast to the model dtype.

    codes: uint8 `[..., K]` (sign << 3 | index, as `nvfp4.quantize` gives them); block_scales: float8_e4m3fn
    `[..., K/16]`; global_scale: `weight_global_scale` G = fl32(2688 / amax).
    """
    if codes.dim() == 0 or codes.shape[-1] % group_size or block_scales.shape != (*codes.shape[:-1],
                                                                                   codes.shape[-1] // group_size):
        raise FormatError(f"NVFP4 runtime: codes {tuple(codes.shape)} and block scales "
                          f"{tuple(block_scales.shape)} do not form blocks of {group_size}")
    sign = torch.where((codes & 8).bool(), -1.0, 1.0)
    q = (e2m1_magnitudes(codes & 7) * sign).to(torch.bfloat16)  # unpack_fp4_from_uint8's default dtype
    scale = block_scales.to(torch.bfloat16) / _global(global_scale, codes.device)   # fp32 = fl32(s8 / G)
    w = q.unflatten(-1, (-1, group_size)).to(torch.float32) * scale.unsqueeze(-1)
    return w.flatten(-2).to(torch.bfloat16).to(dtype)


def _vllm_reciprocal(t: torch.Tensor) -> torch.Tensor:
    """vLLM's `get_reciprocal`: 1 / (t + (t == 0) * 1e8), float32 (a zero gives 1e-8, not inf)."""
    return 1.0 / (t + (t == 0).to(t.dtype) * 1e8)


def vllm_emulation_fake_quantize(x: torch.Tensor, global_scale: torch.Tensor | float,
                                 dtype: torch.dtype | None = None, group_size: int = BLOCK_SIZE) -> torch.Tensor:
    """NVFP4 W4A4 input quantize-dequantize as vLLM's emulation computes it on CPU
    (`VLLM_USE_NVFP4_CT_EMULATIONS=1`; vllm/model_executor/layers/quantization/utils/nvfp4_emulation_utils.py,
    `ref_nvfp4_quant` and `ref_nvfp4_quant_dequant`), with G the checkpoint's `input_global_scale`:

        s8    = e4m3(clamp(fl32(G * fl32(max16|x| * fl32(1/6))), ±448))   # no rounding of amax/6 to x.dtype
        t     = fl32(x * recip(fl32(s8 * recip(G))))                       # a multiply by reciprocals
        out   = fl_x(fl32(e2m1_rne(clamp(t, ±6)) * fl32(s8 / G)))

    The same checkpoint, the other reciprocal convention: the deployment perturbation of `runtime_fake_quantize`.
    """
    check_blockable(x, group_size, name="NVFP4 vLLM emulation")
    G = _global(global_scale, x.device)
    blocks = x.unflatten(-1, (-1, group_size)).to(torch.float32)
    sixth = torch.full((), 1 / FP4_MAX, dtype=torch.float32, device=x.device)
    s = G * (blocks.abs().amax(dim=-1, keepdim=True) * sixth)
    s8 = s.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    scaled = blocks * _vllm_reciprocal(s8 * _vllm_reciprocal(G))
    q = round_e2m1(scaled.clamp(-FP4_MAX, FP4_MAX))
    return (q * (s8 / G)).flatten(-2).to(dtype or x.dtype)


def vllm_emulation_dequantize_weight(codes: torch.Tensor, block_scales: torch.Tensor,
                                     global_scale: torch.Tensor | float, dtype: torch.dtype = torch.bfloat16,
                                     group_size: int = BLOCK_SIZE) -> torch.Tensor:
    """The weight vLLM's emulation multiplies by: `dequantize_to_dtype` with the reciprocal global scale its
    compressed-tensors scheme precomputes (`process_weights_after_loading`: 1 / weight_global_scale), i.e.
    `bf16(fl32(q * fl32(s8 * fl32(1 / G))))`, where compressed-tensors divides, `s8 / G`."""
    if codes.dim() == 0 or codes.shape[-1] % group_size or block_scales.shape != (*codes.shape[:-1],
                                                                                   codes.shape[-1] // group_size):
        raise FormatError(f"NVFP4 vLLM emulation: codes {tuple(codes.shape)} and block scales "
                          f"{tuple(block_scales.shape)} do not form blocks of {group_size}")
    sign = torch.where((codes & 8).bool(), -1.0, 1.0)
    q = e2m1_magnitudes(codes & 7) * sign
    inverse = 1.0 / _global(global_scale, codes.device)
    scale = block_scales.to(torch.float32) * inverse
    w = q.unflatten(-1, (-1, group_size)) * scale.unsqueeze(-1)
    return w.flatten(-2).to(torch.bfloat16).to(dtype)


def pow2_global_amax(amax: torch.Tensor | float) -> torch.Tensor:
    """The smallest `2688 * 2^-k >= amax` (k an integer), float32, same shape as `amax`.

    Calibrating to this amax makes the global scale a power of two, G = fl32(2688 / amax') = 2^k exactly
    (2688 = 21 * 2^7 has 5 significant bits, so 2688 * 2^-k is an exact float32 and so is the quotient).
    Then every dequantized value q * s8 / G is exact in bf16 and ckaqad's arithmetic equals the runtime's
    (module docstring). Rounding *up* means no value within the old amax saturates that did not before;
    the price is at most one binade of FP8 block-scale range (the largest block scale lands in (224, 448])
    and one binade earlier entry into FP8 subnormals for small blocks.
    """
    a = torch.as_tensor(amax, dtype=torch.float32)
    if not bool(torch.isfinite(a).all()) or bool((a <= 0).any()):
        raise FormatError(f"pow2_global_amax needs finite positive amaxes, got {a}")
    big = torch.tensor(GLOBAL_RANGE, dtype=torch.float32, device=a.device)
    k = torch.floor(torch.log2(big / a))
    out = big * torch.exp2(-k)                                   # exact: 2688 * 2^-k
    # log2 is not exact: correct by at most one binade either way so that out is the smallest one >= a.
    out = torch.where(out < a, out * 2, out)
    return torch.where(out / 2 >= a, out / 2, out)
