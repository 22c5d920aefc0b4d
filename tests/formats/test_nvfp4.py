"""Tests of formats/nvfp4.py against an independent scalar reference written here with Python floats.

The reference follows METHOD.md §2 literally, emulating FP32 arithmetic one operation at a time (a float32
operation on float32 operands equals the double result rounded once to float32), with E2M1 rounding by
comparing distances to the grid and FP8 E4M3 rounding written by hand (no torch float8 cast).
"""

from __future__ import annotations

import math
import struct

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from strategies import FP4_GRID, nvfp4_inputs, nvfp4_special_cases

from ckaqad.errors import FormatError
from ckaqad.formats import e2m1, nvfp4

FAST = settings(max_examples=25, deadline=None)

# ---------------------------------------------------------------------------------------------------------
# Scalar reference


def f32(v: float) -> float:
    """`v` rounded to the nearest float32 (ties to even), as a Python float; ±inf on overflow."""
    try:
        return struct.unpack("<f", struct.pack("<f", v))[0]
    except OverflowError:
        return math.copysign(math.inf, v)


def fp8_e4m3_round(v: float) -> float:
    """Round `0 <= v <= 448` to FP8 E4M3 (fn): 3-bit mantissa, exponent >= -6, subnormals k * 2**-9."""
    assert 0.0 <= v <= 448.0
    if v == 0.0:
        return 0.0
    _, e = math.frexp(v)  # v = m * 2**e, 0.5 <= m < 1, so floor(log2 v) = e - 1
    exponent = max(e - 1, -6)  # below 2**-6 the spacing stays 2**-9 (subnormals)
    quantum = 2.0 ** (exponent - 3)
    result = round(v / quantum) * quantum  # exact division by a power of two; round() ties to even
    assert result <= 448.0
    return result


def e2m1_round_index(a: float) -> int:
    """Index 0..7 of the E2M1 magnitude nearest to `a >= 0`; ties go to the even mantissa (even index)."""
    if a >= FP4_GRID[-1]:
        return len(FP4_GRID) - 1
    distances = [abs(a - g) for g in FP4_GRID]
    best = min(distances)
    nearest = [i for i, d in enumerate(distances) if d == best]
    if len(nearest) == 1:
        return nearest[0]
    assert len(nearest) == 2
    return next(i for i in nearest if i % 2 == 0)


def reference_nvfp4(x: torch.Tensor, global_amax: float | None = None):
    """(codes, block scales s8, g, dequantized float32 values) of `x` per METHOD §2, as nested lists
    flattened over the leading dims: codes/values `[rows][K]`, s8 `[rows][K/16]`."""
    rows = x.detach().to(torch.float32).reshape(-1, x.shape[-1]).tolist()
    amax = max((abs(v) for row in rows for v in row), default=0.0) if global_amax is None else f32(global_amax)
    g = f32(amax / 2688.0)
    six_g = f32(6.0 * g)
    codes, scales, values = [], [], []
    for row in rows:
        row_codes, row_scales, row_values = [], [], []
        for start in range(0, len(row), 16):
            block = row[start:start + 16]
            block_amax = max(abs(v) for v in block)
            ratio = f32(block_amax / six_g) if g > 0 else 0.0
            s8 = fp8_e4m3_round(min(ratio, 448.0))
            s = f32(s8 * g)
            row_scales.append(s8)
            for v in block:
                a = f32(abs(v) / s) if s > 0 else 0.0
                index = e2m1_round_index(a)
                negative = math.copysign(1.0, v) < 0
                row_codes.append(index | (8 if negative else 0))
                row_values.append(math.copysign(f32(FP4_GRID[index] * s), v))
        codes.append(row_codes)
        scales.append(row_scales)
        values.append(row_values)
    return codes, scales, g, values


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal values, dtypes, shapes and bit patterns (so -0 differs from +0)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    int_type = {4: torch.int32, 2: torch.int16}[actual.element_size()]
    mismatch = actual.view(int_type) != expected.view(int_type)
    assert not mismatch.any(), (
        f"{int(mismatch.sum())} mismatches, first at {mismatch.nonzero()[0].tolist()}: "
        f"{actual[mismatch][:4].tolist()} vs {expected[mismatch][:4].tolist()}"
    )


def check_against_reference(x: torch.Tensor, global_amax: float | None) -> None:
    """quantize (codes, s8, g), dequantize, fake_quantize and fake_quantize_reference all bit-exact."""
    codes, scales, g, values = reference_nvfp4(x, global_amax)
    shape = x.shape
    q = nvfp4.quantize(x, global_amax)
    assert q.codes.dtype == torch.uint8 and q.block_scales.dtype == torch.float8_e4m3fn
    assert q.codes.tolist() == torch.tensor(codes, dtype=torch.uint8).reshape(shape).tolist()
    assert q.block_scales.float().reshape(-1, shape[-1] // 16).tolist() == scales
    assert q.global_scale.dtype == torch.float32 and float(q.global_scale) == g
    expected32 = torch.tensor(values, dtype=torch.float32).reshape(shape)
    assert_bits_equal(q.dequantize(), expected32)
    # The output dtype cast of the float32 result is torch's (round to nearest even).
    expected = expected32.to(x.dtype)
    assert_bits_equal(nvfp4.fake_quantize_reference(x, global_amax), expected)
    assert_bits_equal(nvfp4.fake_quantize(x, global_amax), expected)
    assert_bits_equal(q.dequantize().to(x.dtype), expected)


# ---------------------------------------------------------------------------------------------------------
# The reference itself


def test_reference_fp8_rounding_matches_the_e4m3_value_set():
    # All 127 non-negative finite E4M3 values, written from the bit layout, are fixed points of the rounding.
    fp8_values = [m * 2.0**-9 for m in range(8)]
    fp8_values += [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16) for m in range(8) if (e, m) != (15, 7)]
    assert len(fp8_values) == 127 and max(fp8_values) == 448.0
    assert [fp8_e4m3_round(v) for v in fp8_values] == fp8_values
    # Midpoints round to the even mantissa, and to the nearer neighbour either side of them.
    for lo, hi in zip(fp8_values, fp8_values[1:], strict=False):
        mid = (lo + hi) / 2
        even = lo if (fp8_values.index(lo) % 2 == 0) else hi
        assert fp8_e4m3_round(mid) == even
        assert fp8_e4m3_round(math.nextafter(mid, 0.0)) == lo
        assert fp8_e4m3_round(math.nextafter(mid, math.inf)) == hi


def test_reference_e2m1_golden_ties():
    assert [FP4_GRID[e2m1_round_index(t)] for t in (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)] == [
        0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert [FP4_GRID[e2m1_round_index(g)] for g in FP4_GRID] == list(FP4_GRID)
    assert FP4_GRID[e2m1_round_index(1e30)] == 6.0


def test_module_constants_agree_with_the_reference():
    assert e2m1.E2M1_VALUES == FP4_GRID
    assert nvfp4.e2m1_grid().tolist() == list(FP4_GRID) + [-v for v in FP4_GRID]
    assert math.copysign(1.0, nvfp4.e2m1_grid()[8].item()) == -1.0  # code 8 is -0
    assert nvfp4.BLOCK_SIZE == 16 and nvfp4.FP4_MAX == 6.0 and nvfp4.FP8_E4M3_MAX == 448.0
    assert nvfp4.GLOBAL_RANGE == 6.0 * 448.0


def test_e2m1_index_on_every_grid_point_tie_and_neighbour():
    points = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0])
    for a in torch.cat([points, torch.nextafter(points, torch.tensor(math.inf)),
                        torch.nextafter(points, torch.tensor(0.0))]).tolist():
        assert int(nvfp4.e2m1_index(torch.tensor([a]))) == e2m1_round_index(a), a


# ---------------------------------------------------------------------------------------------------------
# Golden values


@pytest.mark.parametrize("case", nvfp4_special_cases(), ids=lambda case: case[0])
def test_special_inputs_match_the_reference(case):
    _, x, global_amax = case
    check_against_reference(x, global_amax)


@pytest.mark.parametrize("scale", [1.0, 2.0**-25, 3.0 * 2.0**20])
def test_golden_ties_round_to_even(scale):
    # Block [6, ties...] with g = 1: s8 = scale exactly, so every tie is exact in |x| / s.
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    x = torch.tensor([[6.0] + ties + [-t for t in ties] + [0.0]]) * scale
    out = nvfp4.fake_quantize(x, global_amax=2688.0 * scale)
    expected = torch.tensor([[6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0,
                              0.0]]) * scale
    assert_bits_equal(out, expected)


def test_golden_just_either_side_of_ties():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    above = torch.cat([torch.tensor([6.0]), torch.nextafter(ties, torch.tensor(10.0)), torch.zeros(8)])
    below = torch.cat([torch.tensor([6.0]), torch.nextafter(ties, torch.tensor(0.0)), torch.zeros(8)])
    out = nvfp4.fake_quantize(torch.stack([above, below]), global_amax=2688.0)
    assert out[0, 1:8].tolist() == [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert out[1, 1:8].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0]


def test_golden_codes_block_scale_and_global_scale():
    x = torch.tensor([[0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]])
    q = nvfp4.quantize(x * 0.25, global_amax=2688.0 * 2.0**-3)  # g = 1/8, s8 = 2, s = 1/4
    assert q.codes.tolist() == [list(range(16))]
    assert q.block_scales.float().tolist() == [[2.0]] and float(q.global_scale) == 0.125
    assert_bits_equal(q.dequantize(), x * 0.25)


def test_saturation_beyond_global_amax():
    # Tensor amax 100, calibrated amax 10: g = 10 / 2688, the block scale saturates at 448 (s = 10 / 6) and
    # every element beyond 10 lands on ±6 * s = ±10.
    x = torch.tensor([[100.0, -50.0, 11.0, 10.0, 9.0, 1.0, -0.0, 0.3] + [0.0] * 8])
    q = nvfp4.quantize(x, global_amax=10.0)
    assert q.block_scales.float().tolist() == [[448.0]]
    assert (q.codes[0, :4] & 7).tolist() == [7, 7, 7, 7]
    s = f32(448.0 * f32(10.0 / 2688.0))
    assert nvfp4.fake_quantize(x, global_amax=10.0)[0, :3].tolist() == [f32(6 * s), -f32(6 * s), f32(6 * s)]
    check_against_reference(x, 10.0)


def test_fp8_block_scale_subnormal_and_zero():
    # g = 1: s8 = fp8(block_amax / 6). 2**-10 is the FP8 tie between 0 and 2**-9 (rounds to 0, even);
    # 1.5 * 2**-9 ties between 2**-9 and 2**-8 (rounds to 2**-8, even mantissa).
    amaxes = [6 * 2.0**-10, 6 * 2.0**-9 * 1.5, 6 * 2.0**-12, 6 * 2.0**-9, 6 * 2.0**-7 * 3]
    x = torch.zeros(len(amaxes), 16)
    x[:, 0] = torch.tensor(amaxes)
    x[:, 1] = -x[:, 0] / 3
    q = nvfp4.quantize(x, global_amax=2688.0)
    assert q.block_scales.float().flatten().tolist() == [0.0, 2.0**-8, 0.0, 2.0**-9, 3 * 2.0**-7]
    out = nvfp4.fake_quantize(x, global_amax=2688.0)
    assert out[0].abs().amax() == 0 and math.copysign(1.0, out[0, 1].item()) == -1.0
    check_against_reference(x, 2688.0)


def test_all_zero_tensor_gives_zero_scales_and_signed_zeros():
    x = torch.tensor([[0.0, -0.0] * 16])
    q = nvfp4.quantize(x)
    assert float(q.global_scale) == 0.0 and q.block_scales.float().tolist() == [[0.0, 0.0]]
    assert q.codes.tolist() == [[0, 8] * 16]
    assert_bits_equal(nvfp4.fake_quantize(x), x)


def test_negative_values_rounding_to_zero_keep_the_sign_bit():
    x = torch.tensor([[6.0, -0.25, -0.1, -0.0, 0.25, 0.0] + [0.0] * 10])
    q = nvfp4.quantize(x, global_amax=2688.0)
    assert q.codes[0, :6].tolist() == [0b0111, 0b1000, 0b1000, 0b1000, 0b0000, 0b0000]
    out = nvfp4.fake_quantize(x, global_amax=2688.0)
    assert [math.copysign(1.0, v) for v in out[0, 1:6].tolist()] == [-1.0, -1.0, -1.0, 1.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("global_amax", [None, 3.0])
def test_low_precision_inputs_keep_their_dtype(dtype, global_amax):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 64, generator=gen) * torch.logspace(-3, 2, 64)).to(dtype)
    out = nvfp4.fake_quantize(x, global_amax)
    assert out.dtype == dtype
    check_against_reference(x, global_amax)
    assert nvfp4.quantize(x).dtype == dtype


@pytest.mark.parametrize("shape", [(2, 3, 32), (1, 16), (16,), (5, 1, 48)])
def test_odd_shapes(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    q = nvfp4.quantize(x)
    assert q.codes.shape == x.shape and q.block_scales.shape == (*shape[:-1], shape[-1] // 16)
    check_against_reference(x, None)


def test_global_amax_accepts_a_tensor():
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    assert_bits_equal(nvfp4.fake_quantize(x, torch.tensor(1.7)), nvfp4.fake_quantize(x, 1.7))
    check_against_reference(x, 1.7)


# Below this amax the global scale g is a float32 subnormal.
SUBNORMAL_G_AMAX = 2688.0 * 2.0**-126


@pytest.mark.parametrize("amax", [1e-36, 3.5e-41])
def test_tensor_amax_with_a_subnormal_global_scale(amax):
    assert amax < SUBNORMAL_G_AMAX
    x = torch.full((1, 16), amax)
    check_against_reference(x, None)


# ---------------------------------------------------------------------------------------------------------
# Packing


def test_pack_nibble_order_golden():
    codes = torch.tensor([[0b0001, 0b1010, 0b1111, 0b0000, 0b0111, 0b1000]], dtype=torch.uint8)
    assert nvfp4.pack(codes).tolist() == [[0b10100001, 0b00001111, 0b10000111]]
    assert nvfp4.unpack(torch.tensor([[0b10100001]], dtype=torch.uint8)).tolist() == [[0b0001, 0b1010]]


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(1, 8))
def test_pack_unpack_round_trip(seed, rows, half_k):
    codes = torch.randint(16, (rows, 2 * half_k), generator=torch.Generator().manual_seed(seed),
                          dtype=torch.uint8)
    packed = nvfp4.pack(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, half_k)
    assert torch.equal(nvfp4.unpack(packed), codes)


def test_pack_odd_last_dim_raises():
    with pytest.raises(FormatError):
        nvfp4.pack(torch.zeros(2, 3, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------------------
# Straight-through gradient


def test_straight_through_gradient_passes_unchanged():
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(4, 32, generator=gen) * 3).requires_grad_()
    w = torch.randn(4, 32, generator=gen)
    (nvfp4.fake_quantize(x, global_amax=1.0) * w).sum().backward()
    assert torch.equal(x.grad, w)


@pytest.mark.parametrize("global_amax", [1.0, None])
def test_clipped_gradient_is_zero_beyond_the_amax(global_amax):
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(4, 32, generator=gen) * 3).requires_grad_()
    w = torch.randn(4, 32, generator=gen)
    (nvfp4.fake_quantize(x, global_amax=global_amax, clip_gradient=True) * w).sum().backward()
    amax = x.detach().abs().amax() if global_amax is None else global_amax
    inside = x.detach().abs() <= amax
    assert torch.equal(x.grad, torch.where(inside, w, 0.0))
    if global_amax is not None:
        assert not inside.all() and inside.any()


# ---------------------------------------------------------------------------------------------------------
# Properties


@settings(max_examples=30, deadline=None)
@given(nvfp4_inputs())
def test_random_inputs_match_the_reference(case):
    x, global_amax = case
    # Subnormal global scales are the known bug of test_tensor_amax_with_a_subnormal_global_scale.
    assume((float(x.abs().amax()) if global_amax is None else global_amax) >= SUBNORMAL_G_AMAX)
    check_against_reference(x, global_amax)


@FAST
@given(nvfp4_inputs())
def test_outputs_lie_on_the_grid_times_the_block_scale(case):
    x, global_amax = case
    q = nvfp4.quantize(x, global_amax)
    s = (q.block_scales.float() * q.global_scale).unsqueeze(-1)  # (rows, K/16, 1)
    candidates = (torch.tensor(FP4_GRID) * s).unsqueeze(-2)  # (rows, K/16, 1, 8), float32 q * s
    out = nvfp4.fake_quantize(x, global_amax).unflatten(-1, (-1, 16)).abs().unsqueeze(-1)
    assert (out == candidates).any(-1).all()


@FAST
@given(nvfp4_inputs())
def test_sign_symmetry(case):
    x, global_amax = case
    assert_bits_equal(nvfp4.fake_quantize(-x, global_amax), -nvfp4.fake_quantize(x, global_amax))


@FAST
@given(nvfp4_inputs(exponents=(-30, 30)))
def test_requantizing_the_output_changes_nothing(case):
    # Holds for every block whose largest element quantizes to ±6 (always the case with a normal FP8 scale)
    # or that is all zero. A block with an FP8-subnormal scale can have its largest element round to 4 or
    # less; re-quantizing such a block picks a smaller scale, which is the format, not an error.
    x, global_amax = case
    amax = float(x.abs().amax()) if global_amax is None else global_amax
    q = nvfp4.quantize(x, global_amax)
    once = q.dequantize()
    twice = nvfp4.fake_quantize(once, amax)
    block_max = (q.codes & 7).unflatten(-1, (-1, 16)).amax(-1)
    stable = ((block_max == 7) | (block_max == 0)).repeat_interleave(16, dim=-1)
    assert_bits_equal(twice[stable], once[stable])
    normal_scale = (q.block_scales.float() >= 2.0**-6).repeat_interleave(16, dim=-1)
    assert stable[normal_scale].all()


# ---------------------------------------------------------------------------------------------------------
# Errors and the lossy path


@pytest.mark.parametrize("shape", [(4, 8), (2, 17), (33,), (16, 15)])
def test_last_dim_not_a_multiple_of_16_raises(shape):
    with pytest.raises(FormatError, match="multiple of 16"):
        nvfp4.fake_quantize(torch.randn(shape))
    with pytest.raises(FormatError):
        nvfp4.quantize(torch.randn(shape))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.uint8, torch.int64, torch.bool])
def test_integer_tensors_raise(dtype):
    with pytest.raises(FormatError):
        nvfp4.quantize(torch.ones(2, 16, dtype=dtype))


def test_scalar_raises():
    with pytest.raises(FormatError):
        nvfp4.quantize(torch.tensor(1.0))


def test_sqnr_on_gaussian_data():
    # Measured 20.4 dB on 256 x 1024 standard normal data.
    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(6))
    err = x - nvfp4.fake_quantize(x)
    sqnr = 10 * torch.log10(x.square().sum() / err.square().sum())
    assert sqnr > 19.5
