"""Fused fake quant on CPU: each format's quantize-dequantize compiled by `torch.compile` (inductor's C++
backend) into one loop over the tensor, in place of the reference's dozen separate elementwise passes.

Bit-exact with the references (`nvfp4.fake_quantize_reference`, `mxfp4`, `int4`, and the served
arithmetics of `nvfp4_runtime`; tests/formats/test_cpu_fused.py). The bodies below are the references'
formulas, op for op, with two changes that keep the results and let inductor fuse:
* the E2M1 magnitude is selected by the where-cascade over `e2m1.E2M1_BOUNDARIES` (`e2m1.e2m1_round`)
  instead of an index and a table gather (a gather cannot be vectorised and made the compiled reference
  slower than eager);
* intermediate roundings to a narrower dtype (the runtime's amax / 6 in bf16) are kept:
  `emulate_precision_casts`, without which inductor computes the whole chain in fp32.
Divisions stay IEEE divisions (inductor never rewrites x / y as x * (1 / y), and compiles with
-ffp-contract=off, so no multiply-add is fused into an FMA).

Cost: the first call of each function compiles it (10-30 s on the 2-core box; inductor's on-disk cache
makes later processes faster), so the dispatch (`backends.fast_path`) takes it only for tensors of at least
`MIN_ELEMENTS`, where the reference costs milliseconds. `CKAQAD_CPU_FUSED=0` turns it off, `=1` forces it
for every size (the tests); shapes are compiled dynamic, once per function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from ckaqad.formats import int4, mxfp4, nvfp4
from ckaqad.formats.e2m1 import FP4_MAX, e2m1_round
from ckaqad.formats.nvfp4_runtime import FP8_E4M3_EPS

# Below this many elements the reference's passes are cheap (a tiny test model's layers); from here on a
# SmolLM2 layer (576 x 576 = 331k) and its activations take the fused loop.
MIN_ELEMENTS = 65536
_COMPILE_OPTIONS = {"emulate_precision_casts": True}


def _nvfp4(x: torch.Tensor, global_amax: torch.Tensor) -> torch.Tensor:
    """`nvfp4.fake_quantize_reference` with the amax given (the caller computes the tensor's own)."""
    blocks = x.to(torch.float32).unflatten(-1, (-1, nvfp4.BLOCK_SIZE))
    g = nvfp4.global_scale_from_amax(global_amax)
    s8 = nvfp4.block_scales_fp8(blocks.abs().amax(dim=-1), g)
    s = (s8.to(torch.float32) * g).unsqueeze(-1)
    magnitude = e2m1_round(blocks.abs() / torch.where(s > 0, s, float("inf")))
    return torch.copysign(magnitude * s, blocks).flatten(-2).to(x.dtype)


def _mxfp4(x: torch.Tensor) -> torch.Tensor:
    """`mxfp4.fake_quantize_reference`: the E8M0 exponent from the float's exponent, as there."""
    blocks = x.to(torch.float32).unflatten(-1, (-1, mxfp4.BLOCK_SIZE))
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    exponent = (torch.frexp(amax).exponent - 1 - mxfp4.E2M1_EMAX).to(torch.float32)
    exponent = torch.where(amax > 0, exponent, -mxfp4.E8M0_BIAS).clamp(-mxfp4.E8M0_BIAS, mxfp4.E8M0_BIAS)
    scale = torch.exp2(exponent)
    return torch.copysign(e2m1_round(blocks.abs() / scale) * scale, blocks).flatten(-2).to(x.dtype)


def _int4(x: torch.Tensor) -> torch.Tensor:
    return int4.fake_quantize_reference(x)


def _runtime_input(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """`nvfp4_runtime.runtime_fake_quantize(x, G)` (compressed-tensors' input quantize-dequantize)."""
    G = global_scale.to(torch.float32).reshape(1)
    blocks = x.unflatten(-1, (-1, nvfp4.BLOCK_SIZE))
    six = torch.full((), FP4_MAX, dtype=x.dtype, device=x.device)
    s = G * (blocks.abs().amax(dim=-1) / six)
    s8 = s.clamp(-nvfp4.FP8_E4M3_MAX, nvfp4.FP8_E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    s8 = torch.where(s8 == 0, FP8_E4M3_EPS, s8)
    scale = (s8 / G).unsqueeze(-1)
    t = (blocks / scale + 0.0).clamp(-FP4_MAX, FP4_MAX)
    q = torch.where(torch.isnan(t), t.abs(), e2m1_round(t.abs())) * torch.sign(t)
    return (q * scale).flatten(-2).to(x.dtype)


def _runtime_weight(w: torch.Tensor, global_amax: torch.Tensor) -> torch.Tensor:
    """`quant.linear._runtime_weight`: ckaqad's NVFP4 codes and block scales of `w`, decompressed as
    compressed-tensors does, `bf16(fl32(q * fl32(bf16(s8) / G)))` with G = fl32(2688 / amax), in w's dtype."""
    blocks = w.to(torch.float32).unflatten(-1, (-1, nvfp4.BLOCK_SIZE))
    g = nvfp4.global_scale_from_amax(global_amax)
    s8 = nvfp4.block_scales_fp8(blocks.abs().amax(dim=-1), g)
    s = (s8.to(torch.float32) * g).unsqueeze(-1)
    magnitude = e2m1_round(blocks.abs() / torch.where(s > 0, s, float("inf")))
    q = torch.copysign(magnitude, blocks).to(torch.bfloat16)          # the code's value, -0 for code 8
    G = nvfp4.reciprocal_global_scale(global_amax).reshape(1)  # [1], not 0-dim: bf16 / G promotes to fp32
    scale = (s8.to(torch.bfloat16) / G).unsqueeze(-1)                  # fp32 = fl32(bf16(s8) / G)
    return (q.to(torch.float32) * scale).flatten(-2).to(torch.bfloat16).to(w.dtype)


@functools.cache
def compiled(name: str) -> Callable:
    """The compiled function `name` (nvfp4, mxfp4, int4, runtime-input, runtime-weight), built on first use."""
    body = {"nvfp4": _nvfp4, "mxfp4": _mxfp4, "int4": _int4, "runtime-input": _runtime_input,
            "runtime-weight": _runtime_weight}[name]
    return torch.compile(body, dynamic=True, options=_COMPILE_OPTIONS)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as (rows, K), rows marked unbacked: one compiled graph per function and dtype serves every shape
    (no recompile for a rank or for 0/1-row tensors, which dynamic shapes would otherwise specialise)."""
    rows = x.reshape(-1, x.shape[-1])
    torch._dynamo.decorators.mark_unbacked(rows, 0)
    return rows


def _own_amax(x: torch.Tensor, global_amax) -> torch.Tensor:
    if global_amax is None:
        return x.abs().amax().to(torch.float32)
    return torch.as_tensor(global_amax, dtype=torch.float32, device=x.device)


def nvfp4_fake_quantize(x: torch.Tensor, global_amax=None) -> torch.Tensor:
    nvfp4.check_blockable(x)
    return compiled("nvfp4")(_rows(x), _own_amax(x, global_amax)).reshape(x.shape)


def mxfp4_fake_quantize(x: torch.Tensor, global_amax=None) -> torch.Tensor:
    nvfp4.check_blockable(x, mxfp4.BLOCK_SIZE, "MXFP4")
    return compiled("mxfp4")(_rows(x)).reshape(x.shape)


def int4_fake_quantize(x: torch.Tensor, global_amax=None) -> torch.Tensor:
    nvfp4.check_blockable(x, int4.BLOCK_SIZE, "INT4")
    return compiled("int4")(_rows(x)).reshape(x.shape)


def runtime_fake_quantize(x: torch.Tensor, global_scale) -> torch.Tensor:
    nvfp4.check_blockable(x, nvfp4.BLOCK_SIZE, "NVFP4 runtime")
    G = torch.as_tensor(global_scale, dtype=torch.float32, device=x.device)
    return compiled("runtime-input")(_rows(x), G).reshape(x.shape)


def runtime_weight(w: torch.Tensor, global_amax) -> torch.Tensor:
    nvfp4.check_blockable(w)
    return compiled("runtime-weight")(_rows(w), _own_amax(w, global_amax)).reshape(w.shape)


FUNCTIONS: dict[str, Callable] = {"nvfp4": nvfp4_fake_quantize, "mxfp4": mxfp4_fake_quantize,
                                  "int4": int4_fake_quantize, "runtime-input": runtime_fake_quantize,
                                  "runtime-weight": runtime_weight}
