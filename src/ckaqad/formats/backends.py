"""Reference-first dispatch for the hot fake-quantize path. The plain-torch reference in each format module
is the entry point; a fast backend (the fused Triton kernel on CUDA, the compiled loops of `cpu_fused` on
CPU) registers itself here and is used only for tensors it supports. Both give bit-identical results
(tests/formats/test_backends.py, tests/formats/test_cpu_fused.py).

`CKAQAD_DISABLE_TRITON=1` turns the CUDA fast path off. `CKAQAD_CPU_FUSED` chooses the CPU one: unset, for
tensors of at least the registered size (the first call compiles, which only large tensors repay); `0`, never;
`1`, for every size.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch

# format name -> quant-dequant function (x, global_amax) -> tensor, for CUDA tensors.
_CUDA_FAST_PATHS: dict[str, Callable] = {}
# name -> (quant-dequant function for CPU tensors, the smallest numel it is used for by default).
_CPU_FAST_PATHS: dict[str, tuple[Callable, int]] = {}


def triton_available() -> bool:
    """Triton is installed and not disabled (found without importing it: importing costs seconds)."""
    return not os.environ.get("CKAQAD_DISABLE_TRITON") and importlib.util.find_spec("triton") is not None


def register_cuda_fast_path(format_name: str, quant_dequant: Callable) -> None:
    _CUDA_FAST_PATHS[format_name] = quant_dequant


def register_cpu_fast_path(format_name: str, quant_dequant: Callable, min_elements: int) -> None:
    _CPU_FAST_PATHS[format_name] = (quant_dequant, min_elements)


def cpu_fused_mode() -> str:
    """`auto` (by size), `off` or `on` (every size), from CKAQAD_CPU_FUSED."""
    return {"0": "off", "1": "on"}.get(os.environ.get("CKAQAD_CPU_FUSED", ""), "auto")


def fast_path(format_name: str, x: torch.Tensor) -> Callable | None:
    """The registered fast quant-dequant for `x`, or None (then the caller uses its reference)."""
    if x.device.type == "cpu":
        entry = _CPU_FAST_PATHS.get(format_name)
        mode = cpu_fused_mode()
        if entry is None or mode == "off" or (mode == "auto" and x.numel() < entry[1]):
            return None
        return entry[0]
    if not x.is_cuda or os.environ.get("CKAQAD_DISABLE_TRITON"):
        return None
    return _CUDA_FAST_PATHS.get(format_name)
