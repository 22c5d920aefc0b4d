"""Backend choice for the hot fake-quantize path: a fused Triton kernel on CUDA when Triton is installed,
the plain-torch reference everywhere else. Both give bit-identical results (tests/formats/test_kernels.py).
"""

from __future__ import annotations

import os

import torch

from ckaqad.formats import nvfp4


def triton_available() -> bool:
    if os.environ.get("CKAQAD_DISABLE_TRITON"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def nvfp4_fake_quantize(x: torch.Tensor, global_amax=None) -> torch.Tensor:
    """NVFP4 quantize-dequantize without autograd, on the fastest backend for `x.device`."""
    if x.is_cuda and triton_available():
        from ckaqad.formats import nvfp4_triton

        return nvfp4_triton.fake_quantize(x, global_amax)
    return nvfp4.fake_quantize_reference(x, global_amax)
