"""Tests of formats/int4.py against a scalar reference: symmetric scale amax / 7 per group of 128, round half
to even, clamp to [-8, 7]."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from hypothesis import given, settings
from strategies import INT4_GRID, INT4_TIES, blocked_tensors

from ckaqad.errors import FormatError
from ckaqad.formats import int4

FAST = settings(max_examples=20, deadline=None)
INT4_BLOCKS = dict(block=128, max_rows=2, max_blocks=2, points=INT4_GRID + INT4_TIES, block_max=7.0)


def f32(v: float) -> float:
    """`v` rounded to float32, as a Python float."""
    return struct.unpack("<f", struct.pack("<f", v))[0]


def reference_int4(x: torch.Tensor):
    """(codes, scales, float32 values) as lists over the flattened leading dims."""
    rows = x.detach().to(torch.float32).reshape(-1, x.shape[-1]).tolist()
    codes, scales, values = [], [], []
    for row in rows:
        row_codes, row_scales, row_values = [], [], []
        for start in range(0, len(row), 128):
            block = row[start:start + 128]
            scale = f32(max(abs(v) for v in block) / 7.0)
            row_scales.append(scale)
            for v in block:
                q = round(f32(v / scale)) if scale > 0 else 0  # Python round: half to even
                q = min(max(q, -8), 7)
                row_codes.append(q)
                row_values.append(f32(q * scale))
        codes.append(row_codes)
        scales.append(row_scales)
        values.append(row_values)
    return codes, scales, values


def check_against_reference(x: torch.Tensor) -> None:
    """Codes and scales exact; values equal (signed zeros carry no meaning in INT4, so not compared)."""
    codes, scales, values = reference_int4(x)
    q = int4.quantize(x)
    assert q.codes.dtype == torch.int8 and q.scales.dtype == torch.float32
    assert q.codes.reshape(-1, x.shape[-1]).tolist() == codes
    assert q.scales.reshape(len(scales), -1).tolist() == scales
    expected32 = torch.tensor(values, dtype=torch.float32).reshape(x.shape)
    assert torch.equal(q.dequantize(), expected32)
    out = int4.fake_quantize(x)
    assert out.dtype == x.dtype and torch.equal(out, expected32.to(x.dtype))
    assert torch.equal(q.dequantize().to(x.dtype), out)


def test_constants():
    assert (int4.BLOCK_SIZE, int4.QMAX, int4.QMIN) == (128, 7, -8)


@pytest.mark.parametrize("exponent", [0, -10, 30])
def test_golden_ties_round_half_to_even(exponent):
    # Group amax 7 * 2**e gives the scale 2**e exactly; k + 0.5 are exact ties.
    scale = 2.0**exponent
    ties = list(INT4_TIES)
    row = [7.0] + ties + [-t for t in ties] + list(INT4_GRID) + [-g for g in INT4_GRID]
    row += [0.0] * (128 - len(row))
    x = torch.tensor([row]) * scale
    q = int4.quantize(x)
    assert q.scales.tolist() == [[scale]]
    expected = [7, 0, 2, 2, 4, 4, 6, 6, 0, -2, -2, -4, -4, -6, -6] + list(range(8)) + [-i for i in range(8)]
    assert q.codes[0, :len(expected)].tolist() == expected
    assert torch.equal(int4.fake_quantize(x)[0, :len(expected)], torch.tensor(expected, dtype=torch.float32) * scale)
    check_against_reference(x)


def test_golden_scale_and_symmetric_range():
    x = torch.zeros(2, 256)
    x[0, 5], x[0, 130], x[1, 0], x[1, 200] = 3.5, -14.0, 0.1, 0.0
    q = int4.quantize(x)
    assert q.scales.tolist() == [[0.5, 2.0], [f32(0.1 / 7), 0.0]]
    assert q.codes[0, 5] == 7 and q.codes[0, 130] == -7 and q.codes.min() >= -7  # -8 is never used
    check_against_reference(x)


def test_zero_group_quantizes_to_zero():
    x = torch.cat([torch.zeros(1, 128), -torch.zeros(1, 128)])
    q = int4.quantize(x)
    assert q.scales.tolist() == [[0.0], [0.0]] and q.codes.abs().max() == 0
    assert torch.equal(int4.fake_quantize(x), torch.zeros(2, 128))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    x = (torch.randn(2, 256, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 2, 256)).to(dtype)
    check_against_reference(x)


@pytest.mark.parametrize("shape", [(2, 3, 128), (1, 128), (128,), (1, 384)])
def test_odd_shapes(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    assert int4.quantize(x).scales.shape == (*shape[:-1], shape[-1] // 128)
    check_against_reference(x)


@FAST
@given(blocked_tensors(**INT4_BLOCKS))
def test_random_inputs_match_the_reference(x):
    check_against_reference(x)


@FAST
@given(blocked_tensors(**INT4_BLOCKS))
def test_outputs_are_integers_times_the_scale_and_sign_symmetric(x):
    q = int4.quantize(x)
    out = int4.fake_quantize(x)
    candidates = (torch.arange(-7.0, 8.0) * q.scales.unsqueeze(-1)).unsqueeze(-2)  # (rows, K/128, 1, 15)
    assert (out.unflatten(-1, (-1, 128)).unsqueeze(-1) == candidates).any(-1).all()
    assert torch.equal(int4.fake_quantize(-x), -out)


@FAST
@given(blocked_tensors(**INT4_BLOCKS, exponents=(-30, 30)))
def test_requantizing_the_output_changes_nothing(x):
    # The group max maps to ±7 exactly, so the scale and every code come back (up to one float32 rounding
    # of the scale, which cannot move a code across a half-integer).
    once = int4.fake_quantize(x)
    assert torch.equal(int4.quantize(once).codes, int4.quantize(x).codes)
    assert torch.allclose(int4.fake_quantize(once), once, rtol=1e-6, atol=0)


def test_straight_through_gradient():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 256, generator=gen).requires_grad_()
    w = torch.randn(2, 256, generator=gen)
    (int4.fake_quantize(x) * w).sum().backward()
    assert torch.equal(x.grad, w)
    x.grad = None
    (int4.fake_quantize(x, clip_gradient=True) * w).sum().backward()
    assert torch.equal(x.grad, w)


@pytest.mark.parametrize("shape", [(2, 64), (2, 129), (200,)])
def test_last_dim_not_a_multiple_of_128_raises(shape):
    with pytest.raises(FormatError, match="multiple of 128"):
        int4.fake_quantize(torch.randn(shape))


def test_integer_tensors_raise():
    with pytest.raises(FormatError):
        int4.quantize(torch.ones(1, 128, dtype=torch.int16))


def test_sqnr_on_gaussian_data():
    # Measured 18.6 dB on 256 x 1024 standard normal data.
    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(3))
    sqnr = 10 * torch.log10(x.square().sum() / (x - int4.fake_quantize(x)).square().sum())
    assert sqnr > 18.0
    assert math.isfinite(float(sqnr))
