"""formats/nvfp4_runtime.py bit for bit against compressed-tensors' own functions (the arithmetic transformers
runs when it serves an nvfp4-pack-quantized export), and how it relates to ckaqad's reference.

Every comparison is on the raw bits (-0 != +0); NaNs are canonicalised first (compressed-tensors does not keep
a NaN's sign or payload stable, and they mean nothing).
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from strategies import FP4_GRID, FP4_TIES

from ckaqad.errors import FormatError
from ckaqad.formats import e2m1, nvfp4
from ckaqad.formats.nvfp4_runtime import (
    pow2_global_amax,
    round_e2m1,
    runtime_dequantize_weight,
    runtime_fake_quantize,
    runtime_quantize,
    vllm_emulation_dequantize_weight,
    vllm_emulation_fake_quantize,
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def bits(t: torch.Tensor) -> torch.Tensor:
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype]
    t = torch.where(torch.isnan(t), torch.full((), float("nan"), dtype=t.dtype), t)
    return t.contiguous().view(view)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def G_of(amax) -> torch.Tensor:
    """The stored global scale fl32(2688 / amax), float32 [1], divided by a tensor (correctly rounded)."""
    return torch.tensor(nvfp4.GLOBAL_RANGE, dtype=torch.float32) / torch.as_tensor(amax, dtype=torch.float32).reshape(1)


# ---------------------------------------------------------------------------------------------------------
# compressed-tensors' own functions


@pytest.fixture(scope="module")
def ct():
    # compressed-tensors is a dependency of the package: its functions are the oracle here
    from compressed_tensors.compressors.nvfp4 import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize, forward_quantize
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp
    from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4

    scheme = preset_name_to_scheme("NVFP4", ["Linear"])   # the preset ckaqad's export writes
    args = scheme.input_activations
    assert (args.strategy, args.group_size, args.dynamic, args.scale_dtype) == \
        ("tensor_group", 16, "local", torch.float8_e4m3fn)
    # the args as the loader sees them: after a round trip through config.json
    args = QuantizationArgs.model_validate(json.loads(json.dumps(args.model_dump(mode="json"))))
    assert args.scale_dtype == torch.float8_e4m3fn

    class Holder(torch.nn.Module):
        """What forward_quantize reads off a decompressed Linear."""

        def __init__(self, G):
            super().__init__()
            self.input_global_scale = torch.nn.Parameter(G.reshape(1).float(), requires_grad=False)
            self.quantization_status = QuantizationStatus.DECOMPRESSED

    def fake_quantize_(x, G):
        return forward_quantize(Holder(G), x, "input", args)

    def fake_quantize_pieces(x, G):
        scale, zp = compute_dynamic_scales_and_zp(value=x, args=args, module=None, global_scale=G.reshape(1))
        return fake_quantize(x=x, scale=scale, zero_point=zp, args=args, global_scale=G.reshape(1))

    def decompress(packed, s8, G):
        state = {"weight_packed": packed, "weight_scale": s8, "weight_global_scale": G}
        return NVFP4PackedCompressor.decompress(state, scheme)["weight"]

    return SimpleNamespace(fake_quantize=fake_quantize_, fake_quantize_pieces=fake_quantize_pieces,
                           decompress=decompress, cast_to_fp4=cast_to_fp4)


# ---------------------------------------------------------------------------------------------------------
# inputs (ported from the probe, /work/notes/runtime_probe.py)


def random_inputs(gen: torch.Generator, n_cases: int):
    """(x float32 [rows, K], calibrated amax) of many kinds: heavy tails, blocks spread over many octaves
    (FP8 subnormals and underflow), exact E2M1 ties, zeros and -0, dyadic values, power-of-two G, inf/NaN,
    values on the grid of their exact block scale, saturating blocks."""
    for case in range(n_cases):
        rows = int(torch.randint(1, 9, (1,), generator=gen))
        k = 16 * int(torch.randint(1, 9, (1,), generator=gen))
        kind = case % 10
        x = torch.randn(rows, k, generator=gen) * torch.exp(torch.randn(1, generator=gen) * 3)
        if kind == 1:
            x = x * torch.exp(torch.randn(rows, k, generator=gen) * 2)
        if kind == 2:
            x = (x.unflatten(-1, (-1, 16)) * torch.exp2(torch.randint(-40, 8, (rows, k // 16, 1),
                                                                        generator=gen).float())).flatten(-2)
        calib = x.abs().amax().clamp(min=1e-30) * float(torch.exp(torch.randn(1, generator=gen) * 0.7))
        if kind == 3:
            s = calib / 2688.0 * 448.0 / 64
            mids = torch.tensor([*FP4_TIES, 6.0])
            x = mids[torch.randint(0, len(mids), (rows, k), generator=gen)] * s
            x = x * torch.where(torch.rand(rows, k, generator=gen) < 0.5, -1.0, 1.0)
        if kind == 4:
            x = torch.where(torch.rand(rows, k, generator=gen) < 0.5, x, -0.0)
            x[:, :16] = 0.0
        if kind == 5:
            x = torch.randint(-64, 65, (rows, k), generator=gen).float() / 8
            calib = torch.tensor(float(torch.randint(1, 64, (1,), generator=gen)))
        if kind == 6:
            calib = pow2_global_amax(calib)
        if kind == 7:
            x = x.clone()
            x.view(-1)[torch.randint(0, x.numel(), (2,), generator=gen)] = float("inf")
            x.view(-1)[torch.randint(0, x.numel(), (1,), generator=gen)] = float("-inf")
            x.view(-1)[torch.randint(0, x.numel(), (1,), generator=gen)] = float("nan")
        if kind in (8, 9):
            G = 2.0 ** int(torch.randint(-8, 12, (1,), generator=gen))
            calib = torch.tensor(2688.0 / G)
            codes = torch.arange(1, 127, dtype=torch.uint8)[torch.randint(0, 126, (rows, k // 16, 1),
                                                                           generator=gen)]
            s8 = codes.view(torch.float8_e4m3fn).float()
            t = torch.tensor([0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0])
            vals = t[torch.randint(0, len(t), (rows, k // 16, 16), generator=gen)]
            vals[..., 0] = 6.0   # block amax 6 * s8 / G: the block scale is exactly s8
            vals = vals * torch.where(torch.rand(vals.shape, generator=gen) < 0.5, -1.0, 1.0)
            x = (vals * s8 / G).flatten(-2)
            if kind == 9:
                calib = calib / 4   # calibrated below the data: block scales clamp at 448
        yield x, calib.reshape(())


# ---------------------------------------------------------------------------------------------------------
# E2M1 rounding


def test_e2m1_index_is_compressed_tensors_cast_to_fp4_on_ties_and_neighbours(ct):
    points = torch.tensor([*FP4_GRID, *FP4_TIES, 7.0, 1e-30, 100.0])
    up = torch.nextafter(points, torch.tensor(float("inf")))
    down = torch.nextafter(points, torch.tensor(float("-inf"))).clamp(min=0.0)
    mags = torch.cat([points, up, down, torch.tensor([float("inf"), float("nan")])])
    t = torch.cat([mags, -mags])
    ref = ct.cast_to_fp4(t.clone())
    assert same_bits(round_e2m1(t), ref)
    # the cascade is e2m1_index: |ref| is the magnitude of the index ckaqad's reference picks
    finite = ~torch.isnan(t)
    assert torch.equal(ref.abs()[finite], e2m1.e2m1_magnitudes(e2m1.e2m1_index(t.abs()))[finite])
    assert torch.isnan(ref[~finite]).all()


# ---------------------------------------------------------------------------------------------------------
# activations


def test_fake_quantize_is_compressed_tensors_bit_for_bit(ct):
    gen = torch.Generator().manual_seed(1234)
    seen = dict.fromkeys(("eps", "saturated", "ties", "clipped", "nan"), 0)
    n = 0
    for x32, calib in random_inputs(gen, 120):
        G = G_of(calib)
        for dt in DTYPES:
            x = x32.to(dt)
            ref = ct.fake_quantize(x, G)
            mine = runtime_fake_quantize(x, G)
            assert same_bits(ref, mine), (dt, (bits(ref) != bits(mine)).nonzero()[:5].tolist())
            assert same_bits(ct.fake_quantize_pieces(x, G), mine)
            x3 = torch.stack([x, x.flip(0)])                       # [batch, tokens, K]
            assert same_bits(ct.fake_quantize(x3, G), runtime_fake_quantize(x3, G))
            n += 1
            q, s8, scale = runtime_quantize(x, G)
            raw = G * (x.unflatten(-1, (-1, 16)).abs().amax(-1) / torch.full((), 6.0, dtype=dt))
            eps = (raw > 0) & (raw.to(torch.float8_e4m3fn).float() == 0)
            assert (q[eps] == 0).all()                             # the 0.125 eps never changes a value
            scaled = (x.unflatten(-1, (-1, 16)) / scale).abs()
            seen["eps"] += int(eps.sum())
            seen["saturated"] += int((raw > 448).sum())
            seen["ties"] += int(sum((scaled == m).sum() for m in FP4_TIES))
            seen["clipped"] += int((scaled > 6).sum())
            seen["nan"] += int(torch.isnan(mine).sum())
    assert n == 3 * 120
    assert all(v > 0 for v in seen.values()), seen                # every special case was exercised


def test_special_values(ct):
    G = G_of(torch.tensor(3.0))
    row = torch.tensor([0.0, -0.0, 1e-30, -1e-30, float("inf"), float("-inf"), 2.5, -2.5,
                        1.0, 0.5, 0.75, 100.0, -3.0, 6.0, 1.75, 5.0])
    x = torch.stack([row, torch.where(torch.arange(16) == 3, float("nan"), row), torch.zeros(16),
                     torch.full((16,), -0.0), torch.full((16,), 1e-12)])
    for dt in DTYPES:
        xd = x.to(dt)
        out = runtime_fake_quantize(xd, G)
        assert same_bits(out, ct.fake_quantize(xd, G))
        assert torch.isnan(out[1]).all()                          # NaN poisons its block, as in the runtime
        assert not torch.signbit(out[3]).any()                    # -0 -> +0 (the +0 zero point)
        assert torch.isfinite(out[0]).all() and out[0, 4] == -out[0, 5] > 0   # ±inf saturates
    assert runtime_fake_quantize(x, G, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_input_checks():
    with pytest.raises(FormatError):
        runtime_fake_quantize(torch.zeros(3, 8), torch.tensor([1.0]))
    with pytest.raises(FormatError):
        runtime_fake_quantize(torch.zeros(3, 16, dtype=torch.int32), torch.tensor([1.0]))
    with pytest.raises(FormatError):
        runtime_dequantize_weight(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, 2), torch.tensor([1.0]))


# ---------------------------------------------------------------------------------------------------------
# weights


def test_dequantize_weight_is_decompress_bit_for_bit(ct):
    gen = torch.Generator().manual_seed(99)
    for case in range(60):
        out_f = int(torch.randint(1, 40, (1,), generator=gen))
        in_f = 16 * int(torch.randint(1, 12, (1,), generator=gen))
        w = torch.randn(out_f, in_f, generator=gen) * torch.exp(torch.randn(1, generator=gen) * 4)
        if case % 3 == 1:
            w = w * torch.exp(torch.randn(out_f, in_f, generator=gen) * 2)
        amax = w.abs().amax() * (1.0 if case % 4 else float(torch.exp(torch.rand(1, generator=gen))))
        if case % 5 == 0:
            amax = pow2_global_amax(amax)
        quantized = nvfp4.quantize(w, amax)
        G = G_of(amax)
        ref = ct.decompress(nvfp4.pack(quantized.codes), quantized.block_scales, G)
        assert ref.dtype == torch.bfloat16
        assert same_bits(ref, runtime_dequantize_weight(quantized.codes, quantized.block_scales, G))
        for dt in (torch.float32, torch.float16):                 # transformers' `.to(param dtype)`
            assert same_bits(ref.to(dt), runtime_dequantize_weight(quantized.codes, quantized.block_scales, G, dt))


# ---------------------------------------------------------------------------------------------------------
# ckaqad's reference vs the runtime


def bf16_activations(seed: int, jitter: float = 0.3):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(16, 256, generator=gen) * torch.exp(torch.randn(16, 256, generator=gen))).to(torch.bfloat16)
    x = x + 0.0                                                   # no exact -0 (the one documented difference)
    amax = x.float().abs().amax() * float(torch.exp(torch.randn(1, generator=gen) * jitter))
    return x, amax


def test_the_harness_sees_the_reference_differ_for_arbitrary_global_scales():
    differs = 0
    for seed in range(8):
        x, amax = bf16_activations(seed)
        differs += int((bits(nvfp4.fake_quantize_reference(x, amax)) != bits(runtime_fake_quantize(x, G_of(amax))))
                       .sum())
    assert differs > 0


def test_with_pow2_global_amax_the_reference_is_the_runtime_bit_for_bit():
    for seed in range(8):
        x, amax = bf16_activations(seed)
        a2 = pow2_global_amax(amax)
        for xd in (x, x.float()):
            assert same_bits(nvfp4.fake_quantize_reference(xd, a2), runtime_fake_quantize(xd, G_of(a2)))
        quantized = nvfp4.quantize(x.float(), a2)
        assert same_bits(quantized.dequantize().to(torch.bfloat16),
                         runtime_dequantize_weight(quantized.codes, quantized.block_scales, G_of(a2)))


def test_pow2_global_amax_rounds_up_to_a_power_of_two_global_scale():
    gen = torch.Generator().manual_seed(5)
    a = torch.cat([torch.exp(torch.randn(2000, generator=gen) * 20),
                   2688.0 * torch.exp2(torch.arange(-60, 60).float()),          # already of the form
                   torch.nextafter(2688.0 * torch.exp2(torch.arange(-60, 60).float()), torch.tensor(0.0))])
    p = pow2_global_amax(a)
    assert p.dtype == torch.float32 and p.shape == a.shape
    assert (p >= a).all() and (p / 2 < a).all()                   # the smallest such amax >= a
    G = torch.tensor(2688.0) / p
    m, e = torch.frexp(G)
    assert (m == 0.5).all()                                      # G = 2^k exactly
    assert torch.equal(p[2000:2120], 2688.0 * torch.exp2(torch.arange(-60, 60).float()))
    assert float(pow2_global_amax(2688.0)) == 2688.0 and float(pow2_global_amax(2689.0)) == 5376.0
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(FormatError):
            pow2_global_amax(bad)


def f32(v: float) -> float:
    """Round a Python float (double) to float32."""
    return float(np.float32(v))


def e4m3(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32).to(torch.float8_e4m3fn).float())


def e2m1_rne(t: float) -> float:
    """The nearest E2M1 value to |t| <= 6, ties to the even code, with t's sign (as vLLM's cast_to_fp4)."""
    best = min(range(8), key=lambda i: (abs(abs(t) - e2m1.E2M1_VALUES[i]), i % 2))
    return math.copysign(e2m1.E2M1_VALUES[best], t) if t != 0 else 0.0


def vllm_emulation_oracle(x: torch.Tensor, G: float) -> torch.Tensor:
    """vLLM's CPU emulation of the input quantizer, one element at a time in float32 scalars (numpy), from its
    documented steps: s8 = e4m3(G * (vmax * fl32(1/6))), t = x * 1/(s8 * (1/G)), out = e2m1(t) * (s8 / G)."""
    rows = x.float().reshape(-1, x.shape[-1]).tolist()
    out = []
    sixth = f32(1 / 6)
    inv_g = f32(1 / G)
    for row in rows:
        for b in range(0, len(row), 16):
            block = row[b:b + 16]
            s8 = e4m3(max(-448.0, min(448.0, f32(G * f32(max(abs(v) for v in block) * sixth)))))
            denom = f32(s8 * inv_g)
            recip = f32(1 / (denom if denom != 0 else 1e8))
            dequant_scale = f32(s8 / G)
            out += [f32(e2m1_rne(max(-6.0, min(6.0, f32(v * recip)))) * dequant_scale) for v in block]
    return torch.tensor(out, dtype=torch.float32).reshape(x.shape).to(x.dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_vllm_emulation_input_follows_its_steps_element_for_element(dtype):
    for seed in range(3):
        x, amax = bf16_activations(seed)
        x = x[:4, :64].to(dtype)
        G = G_of(amax)
        assert same_bits(vllm_emulation_fake_quantize(x, G), vllm_emulation_oracle(x, float(G)))


def test_vllm_emulation_weight_multiplies_by_the_reciprocal_global_scale():
    x, amax = bf16_activations(1)
    q = nvfp4.quantize(x.float(), amax)
    G = G_of(amax)
    expected = (torch.tensor([e2m1.E2M1_VALUES[int(c) & 7] * (-1 if int(c) & 8 else 1) for c in q.codes.flatten()])
                .reshape(q.codes.shape).unflatten(-1, (-1, 16))
                * (q.block_scales.float() * (1.0 / G)).unsqueeze(-1)).flatten(-2).to(torch.bfloat16)
    got = vllm_emulation_dequantize_weight(q.codes, q.block_scales, G)
    assert same_bits(got, expected)
    # After the bf16 rounding the divide (compressed-tensors) and the reciprocal (vLLM) rarely differ (a scale
    # one float32 ulp apart must straddle a bf16 midpoint); for a power-of-two G both are exact:
    a2 = pow2_global_amax(amax)
    q2 = nvfp4.quantize(x.float(), a2)
    assert same_bits(vllm_emulation_dequantize_weight(q2.codes, q2.block_scales, G_of(a2)),
                     runtime_dequantize_weight(q2.codes, q2.block_scales, G_of(a2)))
