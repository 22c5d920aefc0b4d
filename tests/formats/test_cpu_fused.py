"""The compiled CPU fake quant (formats/cpu_fused.py) is bit-exact with each reference: NVFP4, MXFP4, INT4 and
the served NVFP4 arithmetic (input and weight), on the special inputs, every dtype, small and odd shapes and
hypothesis-drawn blocks; the dispatch (`backends.fast_path`) takes it by size or by CKAQAD_CPU_FUSED.

Every function is compiled once for the module (dynamic shapes); the compile is the bulk of these tests' time.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from strategies import blocked_tensors, nvfp4_inputs, nvfp4_special_cases

from ckaqad.formats import backends, cpu_fused, int4, mxfp4, nvfp4
from ckaqad.formats.nvfp4_runtime import runtime_dequantize_weight, runtime_quantize
from ckaqad.quant.linear import SERVED_FUNCTIONS

# fp32 (weights, fp32 activations) and bf16 (autocast activations): each dtype is one more compile per function.
DTYPES = [torch.float32, torch.bfloat16]


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    int_type = {4: torch.int32, 2: torch.int16}[actual.element_size()]
    # Bit for bit (signed zeros included); a NaN matches a NaN whatever its sign and payload, which compiled
    # and eager code choose differently (the INT4 reference makes NaNs of f32-subnormal groups).
    both_nan = torch.isnan(actual) & torch.isnan(expected)
    mismatch = (actual.view(int_type) != expected.view(int_type)) & ~both_nan
    assert not mismatch.any(), (f"{int(mismatch.sum())} of {mismatch.numel()} differ, e.g. "
                                f"{actual[mismatch][:4].tolist()} vs {expected[mismatch][:4].tolist()}")


def runtime_input_reference(x: torch.Tensor, G) -> torch.Tensor:
    """`runtime_fake_quantize`'s reference body (the function itself dispatches)."""
    q, _, scale = runtime_quantize(x, G)
    return (q * scale).flatten(-2).to(x.dtype)


def runtime_weight_reference(w: torch.Tensor, amax) -> torch.Tensor:
    q = nvfp4.quantize(w.float(), amax)
    return runtime_dequantize_weight(q.codes, q.block_scales, nvfp4.reciprocal_global_scale(amax)).to(w.dtype)


def check_all(x: torch.Tensor, global_amax=None) -> None:
    """Every fused function against its reference on `x` (those whose block divides the last dim)."""
    assert_bits_equal(cpu_fused.nvfp4_fake_quantize(x, global_amax), nvfp4.fake_quantize_reference(x, global_amax))
    amax = x.abs().amax().float() if global_amax is None else torch.as_tensor(global_amax, dtype=torch.float32)
    if amax > 0 and torch.isfinite(amax):  # activations: fp32, or bf16 under autocast
        G = nvfp4.reciprocal_global_scale(amax)
        assert_bits_equal(cpu_fused.runtime_fake_quantize(x, G), runtime_input_reference(x, G))
    if x.dtype != torch.float32:
        return  # the weight paths see the float32 master weights (each dtype is one more compile)
    assert_bits_equal(cpu_fused.runtime_weight(x, amax), runtime_weight_reference(x, amax))
    if global_amax is None:  # the own amax, taken inside the compiled function from the block amaxes
        assert_bits_equal(cpu_fused.runtime_weight(x, None), runtime_weight_reference(x, amax))
    if x.shape[-1] % mxfp4.BLOCK_SIZE == 0:
        assert_bits_equal(cpu_fused.mxfp4_fake_quantize(x), mxfp4.fake_quantize_reference(x))
    if x.shape[-1] % int4.BLOCK_SIZE == 0:
        assert_bits_equal(cpu_fused.int4_fake_quantize(x), int4.fake_quantize_reference(x))


@pytest.mark.parametrize("case", nvfp4_special_cases(), ids=lambda case: case[0])
def test_special_inputs(case):
    _, x, global_amax = case
    check_all(x, global_amax)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 16), (3, 5, 48), (7, 256), (33, 384)], ids=str)
def test_dtypes_and_odd_shapes(dtype, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen) * torch.logspace(-4, 3, shape[-1])).to(dtype)
    x.view(-1)[::7] = -0.0
    check_all(x)
    check_all(x, torch.tensor(5.0))


def test_random_blocks():
    @settings(max_examples=25, deadline=None)
    @given(nvfp4_inputs(max_rows=4, max_blocks=8))
    def nvfp4_family(case):
        check_all(*case)

    @settings(max_examples=10, deadline=None)
    @given(blocked_tensors(block=128, max_rows=3, max_blocks=2))
    def int4_groups(x):
        check_all(x)

    nvfp4_family()
    int4_groups()


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "int4"])
def test_dispatch_by_size_and_switch_with_the_same_values_and_gradient(fmt, monkeypatch):
    module = {"nvfp4": nvfp4, "mxfp4": mxfp4, "int4": int4}[fmt]
    small, large = torch.randn(4, 128), torch.randn(cpu_fused.MIN_ELEMENTS // 128, 128)
    monkeypatch.delenv("CKAQAD_CPU_FUSED", raising=False)
    assert backends.fast_path(fmt, small) is None and backends.fast_path(fmt, large) is cpu_fused.FUNCTIONS[fmt]
    monkeypatch.setenv("CKAQAD_CPU_FUSED", "0")
    assert backends.fast_path(fmt, large) is None
    monkeypatch.setenv("CKAQAD_CPU_FUSED", "1")
    assert backends.fast_path(fmt, small) is cpu_fused.FUNCTIONS[fmt]
    x = (small * 3).requires_grad_(True)
    out = module.fake_quantize(x, None, clip_gradient=True)
    assert_bits_equal(out.detach(), module.fake_quantize_reference(x.detach()))
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad, torch.ones_like(x))  # straight through (nothing exceeds the own amax)


def test_served_functions_dispatch(monkeypatch):
    monkeypatch.setenv("CKAQAD_CPU_FUSED", "1")
    x = torch.randn(6, 64).bfloat16()
    amax = x.abs().amax().float()
    runtime_input, runtime_weight = SERVED_FUNCTIONS["runtime"]
    assert_bits_equal(runtime_input(x, amax), runtime_input_reference(x, nvfp4.reciprocal_global_scale(amax)))
    w = torch.randn(6, 64)
    assert_bits_equal(runtime_weight(w, w.abs().amax()), runtime_weight_reference(w, w.abs().amax()))
    monkeypatch.setenv("CKAQAD_CPU_FUSED", "0")
    assert backends.fast_path("runtime-input", x) is None
