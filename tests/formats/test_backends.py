"""The fake-quantize dispatch of formats/backends.py (through `nvfp4.fake_quantize`) is bit-exact with the
plain-torch reference (`nvfp4.fake_quantize_reference` on CPU, itself tested against a scalar reference in
test_nvfp4.py) on every special input and on random ones, on every available device."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from strategies import nvfp4_inputs, nvfp4_special_cases

from ckaqad.formats import backends, nvfp4

# CUDA joins the list only where it exists (no always-skipping tests).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_dispatch_matches_reference(x: torch.Tensor, global_amax, device: str) -> None:
    """`nvfp4.fake_quantize` on `device` equals the CPU reference bit for bit (signed zeros too)."""
    expected = nvfp4.fake_quantize_reference(x, global_amax)
    amax = global_amax if global_amax is None or isinstance(global_amax, float) else global_amax.to(device)
    with torch.no_grad():
        actual = nvfp4.fake_quantize(x.to(device), amax)
    assert actual.device.type == device and actual.dtype == x.dtype and actual.shape == x.shape
    int_type = {4: torch.int32, 2: torch.int16}[x.element_size()]
    mismatch = actual.cpu().view(int_type) != expected.view(int_type)
    assert not mismatch.any(), (
        f"{int(mismatch.sum())} of {mismatch.numel()} differ, e.g. {actual.cpu()[mismatch][:4].tolist()} "
        f"vs {expected[mismatch][:4].tolist()} for inputs {x[mismatch][:4].tolist()}"
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", nvfp4_special_cases(), ids=lambda case: case[0])
def test_special_inputs(case, device):
    _, x, global_amax = case
    assert_dispatch_matches_reference(x, global_amax, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_and_tensor_global_amax(device, dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 256, generator=gen) * torch.logspace(-4, 3, 256)).to(dtype)
    assert_dispatch_matches_reference(x, None, device)
    assert_dispatch_matches_reference(x, torch.tensor(5.0), device)


@pytest.mark.parametrize("device", DEVICES)
def test_large_llm_like_shape(device):
    # Many blocks and a row count that is not a power of two; a few massive outliers as in real activations.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(333, 2048, generator=gen)
    x[::37, 5] *= 1000.0
    assert_dispatch_matches_reference(x.bfloat16(), None, device)


@pytest.mark.parametrize("device", DEVICES)
def test_random_inputs(device):
    @settings(max_examples=20, deadline=None)
    @given(nvfp4_inputs())
    def check(case):
        assert_dispatch_matches_reference(*case, device)

    check()



def test_cpu_tensors_take_the_reference_and_the_switch_turns_the_fast_path_off(monkeypatch):
    x = torch.randn(2, 32)
    assert backends.fast_path("nvfp4", x) is None
    monkeypatch.setitem(backends._CUDA_FAST_PATHS, "nvfp4", lambda t, g: t)
    assert backends.fast_path("nvfp4", x) is None  # registered, but for CUDA tensors only
    monkeypatch.setenv("CKAQAD_DISABLE_TRITON", "1")
    assert not backends.triton_available()
