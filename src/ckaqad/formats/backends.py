"""Reference-first dispatch for the hot fake-quantize path. The plain-torch reference in each format module
is the entry point; a fast backend (the fused Triton kernel on CUDA) registers itself here and is used only
for tensors it supports. Both give bit-identical results (tests/formats/test_backends.py).

`CKAQAD_DISABLE_TRITON=1` turns the fast path off.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch

# format name -> quant-dequant function (x, global_amax) -> tensor, for CUDA tensors.
_CUDA_FAST_PATHS: dict[str, Callable] = {}


def triton_available() -> bool:
    """Triton is installed and not disabled (found without importing it: importing costs seconds)."""
    return not os.environ.get("CKAQAD_DISABLE_TRITON") and importlib.util.find_spec("triton") is not None


def register_cuda_fast_path(format_name: str, quant_dequant: Callable) -> None:
    _CUDA_FAST_PATHS[format_name] = quant_dequant


def fast_path(format_name: str, x: torch.Tensor) -> Callable | None:
    """The registered fast quant-dequant for `x`, or None (then the caller uses its reference)."""
    if not x.is_cuda or os.environ.get("CKAQAD_DISABLE_TRITON"):
        return None
    return _CUDA_FAST_PATHS.get(format_name)
