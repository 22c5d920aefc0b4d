"""Tests of formats/mxfp4.py against a scalar reference (E8M0 scale 2**(floor(log2 amax) - 2), block 32),
and of the format registry in formats/__init__.py."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from hypothesis import given, settings
from strategies import FP4_GRID, blocked_tensors

from ckaqad.errors import ConfigError, FormatError
from ckaqad.formats import FORMATS, get_format, int4, mxfp4, nvfp4

FAST = settings(max_examples=25, deadline=None)


def f32(v: float) -> float:
    """`v` rounded to float32, as a Python float."""
    return struct.unpack("<f", struct.pack("<f", v))[0]


def e2m1_round_index(a: float) -> int:
    """Nearest E2M1 magnitude index by comparison with the grid; ties to the even index; saturates at 6."""
    if a >= 6.0:
        return 7
    distances = [abs(a - g) for g in FP4_GRID]
    nearest = [i for i, d in enumerate(distances) if d == min(distances)]
    return nearest[0] if len(nearest) == 1 else next(i for i in nearest if i % 2 == 0)


def reference_mxfp4(x: torch.Tensor):
    """(codes, unbiased scale exponents, float32 values) as lists over the flattened leading dims.

    A zero block gets the smallest E8M0 exponent, -127; exponents clamp to the E8M0 range [-127, 127]."""
    rows = x.detach().to(torch.float32).reshape(-1, x.shape[-1]).tolist()
    codes, exponents, values = [], [], []
    for row in rows:
        row_codes, row_exps, row_values = [], [], []
        for start in range(0, len(row), 32):
            block = row[start:start + 32]
            amax = max(abs(v) for v in block)
            exponent = math.frexp(amax)[1] - 1 - 2 if amax > 0 else -127  # floor(log2 amax) - 2, exactly
            exponent = min(max(exponent, -127), 127)
            scale = 2.0**exponent
            row_exps.append(exponent)
            for v in block:
                index = e2m1_round_index(f32(abs(v) / scale))
                row_codes.append(index | (8 if math.copysign(1.0, v) < 0 else 0))
                row_values.append(math.copysign(f32(FP4_GRID[index] * scale), v))
        codes.append(row_codes)
        exponents.append(row_exps)
        values.append(row_values)
    return codes, exponents, values


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    int_type = {4: torch.int32, 2: torch.int16}[actual.element_size()]
    assert torch.equal(actual.view(int_type), expected.view(int_type)), (actual, expected)


def check_against_reference(x: torch.Tensor) -> None:
    codes, exponents, values = reference_mxfp4(x)
    q = mxfp4.quantize(x)
    assert q.codes.dtype == torch.uint8 and q.scale_exponents.dtype == torch.uint8
    assert q.codes.reshape(-1, x.shape[-1]).tolist() == codes
    assert (q.scale_exponents.reshape(len(exponents), -1).long() - 127).tolist() == exponents
    expected32 = torch.tensor(values, dtype=torch.float32).reshape(x.shape)
    assert_bits_equal(q.dequantize(), expected32)
    assert_bits_equal(mxfp4.fake_quantize(x), expected32.to(x.dtype))
    assert_bits_equal(q.dequantize().to(x.dtype), mxfp4.fake_quantize(x))


def test_constants():
    assert mxfp4.BLOCK_SIZE == 32 and mxfp4.E2M1_EMAX == 2 and mxfp4.E8M0_BIAS == 127


@pytest.mark.parametrize("exponent", [0, -3, 20, -100, 120])
def test_golden_grid_and_ties(exponent):
    # Block amax 6 * 2**e gives the scale 2**e exactly; every grid point and tie is then exact.
    scale = 2.0**exponent
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    row = [6.0] + list(FP4_GRID) + ties + [-t for t in ties] + [-g for g in FP4_GRID[1:]] + [0.0, 0.0]
    assert len(row) == 32
    x = torch.tensor([row]) * scale
    q = mxfp4.quantize(x)
    assert q.scale_exponents.tolist() == [[exponent + 127]]
    expected = [6.0] + list(FP4_GRID) + [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    expected += [-0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0] + [-g for g in FP4_GRID[1:]] + [0.0, 0.0]
    assert_bits_equal(mxfp4.fake_quantize(x), torch.tensor([expected]) * scale)
    check_against_reference(x)


@pytest.mark.parametrize(("amax", "exponent", "out"), [
    (1.0, -2, 1.0), (6.0, 0, 6.0), (7.0, 0, 6.0), (7.75, 0, 6.0), (8.0, 1, 8.0), (0.1, -6, 0.09375),
    (2.0**-126, -128 + 1, 2.0**-126), (3.0e38, 125, 6.0 * 2.0**125)])
def test_golden_scale_exponent(amax, exponent, out):
    # floor(log2 amax) - 2; amax in [6, 8) * 2**e saturates to 6 * 2**e (the MX rule, no rounding up).
    x = torch.zeros(1, 32)
    x[0, 3] = amax
    q = mxfp4.quantize(x)
    assert int(q.scale_exponents[0, 0]) - 127 == exponent
    assert mxfp4.fake_quantize(x)[0, 3].item() == f32(out)
    check_against_reference(x)


def test_zero_block_gets_the_smallest_exponent_and_keeps_signed_zeros():
    x = torch.tensor([[0.0, -0.0] * 16 + [1.0] * 32])
    q = mxfp4.quantize(x)
    assert q.scale_exponents.tolist() == [[0, 125]]
    assert q.codes[0, :32].tolist() == [0, 8] * 16
    assert_bits_equal(mxfp4.fake_quantize(x), x)


@pytest.mark.parametrize("k", [4, 10, 100, -5, -100])
def test_amax_just_below_a_power_of_two(k):
    amax = float(torch.nextafter(torch.tensor(2.0**k), torch.tensor(0.0)))
    x = torch.full((1, 32), amax)
    q = mxfp4.quantize(x)
    assert int(q.scale_exponents[0, 0]) - 127 == k - 1 - 2  # floor(log2 amax) = k - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    x = (torch.randn(3, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 64)).to(dtype)
    assert mxfp4.fake_quantize(x).dtype == dtype
    check_against_reference(x)


@pytest.mark.parametrize("shape", [(2, 3, 64), (1, 32), (32,)])
def test_odd_shapes(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    assert mxfp4.quantize(x).scale_exponents.shape == (*shape[:-1], shape[-1] // 32)
    check_against_reference(x)


@settings(max_examples=30, deadline=None)
@given(blocked_tensors(block=32, exponents=(-120, 120)))
def test_random_inputs_match_the_reference(x):
    check_against_reference(x)


@FAST
@given(blocked_tensors(block=32))
def test_outputs_on_the_grid_times_the_scale_and_sign_symmetric(x):
    q = mxfp4.quantize(x)
    scale = torch.exp2(q.scale_exponents.float() - 127).unsqueeze(-1)
    candidates = (torch.tensor(FP4_GRID) * scale).unsqueeze(-2)  # (rows, K/32, 1, 8)
    out = mxfp4.fake_quantize(x)
    assert (out.unflatten(-1, (-1, 32)).abs().unsqueeze(-1) == candidates).any(-1).all()
    assert_bits_equal(mxfp4.fake_quantize(-x), -out)


@FAST
@given(blocked_tensors(block=32, exponents=(-100, 100)))
def test_requantizing_the_output_changes_nothing(x):
    once = mxfp4.fake_quantize(x)
    assert_bits_equal(mxfp4.fake_quantize(once), once)


def test_straight_through_gradient():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 64, generator=gen).requires_grad_()
    w = torch.randn(2, 64, generator=gen)
    (mxfp4.fake_quantize(x) * w).sum().backward()
    assert torch.equal(x.grad, w)
    # No global amax: nothing lies beyond the tensor's own amax, so clipping changes nothing.
    x.grad = None
    (mxfp4.fake_quantize(x, clip_gradient=True) * w).sum().backward()
    assert torch.equal(x.grad, w)


@pytest.mark.parametrize("shape", [(2, 16), (48,), (3, 33)])
def test_last_dim_not_a_multiple_of_32_raises(shape):
    with pytest.raises(FormatError, match="multiple of 32"):
        mxfp4.fake_quantize(torch.randn(shape))


def test_integer_tensors_raise():
    with pytest.raises(FormatError):
        mxfp4.quantize(torch.ones(2, 32, dtype=torch.int32))


def test_sqnr_on_gaussian_data():
    # Measured 18.8 dB on 256 x 1024 standard normal data.
    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(3))
    sqnr = 10 * torch.log10(x.square().sum() / (x - mxfp4.fake_quantize(x)).square().sum())
    assert sqnr > 18.3


# ---------------------------------------------------------------------------------------------------------
# The format registry (formats/__init__.py)


def test_registry_names():
    assert dict(FORMATS.items()) == {"nvfp4": nvfp4, "mxfp4": mxfp4, "int4": int4}
    for name, module in FORMATS.items():
        assert get_format(name) is module


def test_unknown_format_lists_close_matches():
    with pytest.raises(ConfigError, match="nvfp4"):
        get_format("nvfp5")
    with pytest.raises(ConfigError, match="int4"):
        get_format("fp8")
