"""Fused fake quant on CPU: each format's quantize-dequantize compiled by `torch.compile` (inductor's C++
backend) into one loop over the tensor, in place of the reference's dozen separate elementwise passes.

Bit-exact with the references (`nvfp4.fake_quantize_reference`, `mxfp4`, `int4`, and the served
arithmetics of `nvfp4_runtime`; tests/formats/test_cpu_fused.py). The bodies below are the references'
formulas, op for op, with three changes that keep the results and let inductor fuse:
* the E2M1 magnitude is selected by the where-cascade over `e2m1.E2M1_BOUNDARIES` (`e2m1.e2m1_round`)
  instead of an index and a table gather (a gather cannot be vectorised and made the compiled reference
  slower than eager);
* intermediate roundings to a narrower dtype (the runtime's amax / 6 in bf16) are kept:
  `emulate_precision_casts`, without which inductor computes the whole chain in fp32;
* a tensor's own NVFP4 global amax is the max of its block amaxes, inside the compiled function (max is
  exact), instead of two eager passes over the tensor before it.
Divisions stay IEEE divisions (inductor never rewrites x / y as x * (1 / y), and compiles with
-ffp-contract=off, so no multiply-add is fused into an FMA).

Cost: the first call of each function and dtype compiles it (10-30 s on the 2-core box; inductor's on-disk
cache makes later processes faster), so the dispatch (`backends.fast_path`) takes it only for tensors of at least
`MIN_ELEMENTS`, where the reference costs milliseconds. `CKAQAD_CPU_FUSED=0` turns it off, `=1` forces it
for every size (the tests); shapes are compiled dynamic, once per function and dtype.
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


def _block_and_global_amax(blocks: torch.Tensor, global_amax: torch.Tensor, own: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(each block's amax, the global amax): the given one, or with `own` the tensor's own, taken as the max of
    its blocks' amaxes (max is exact, NaN propagates as in `x.abs().amax()`), so it costs no pass over x."""
    block_amax = blocks.abs().amax(dim=-1)
    return block_amax, torch.where(own, block_amax.amax(), global_amax)


def _nvfp4(x: torch.Tensor, global_amax: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """`nvfp4.fake_quantize_reference` with the amax given, or the tensor's own where `own` is true."""
    blocks = x.to(torch.float32).unflatten(-1, (-1, nvfp4.BLOCK_SIZE))
    block_amax, global_amax = _block_and_global_amax(blocks, global_amax, own)
    g = nvfp4.global_scale_from_amax(global_amax)
    s8 = nvfp4.block_scales_fp8(block_amax, g)
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
    """`int4.fake_quantize_reference` without its shape check (the caller's; here it broke the graph in two)."""
    q, scale = int4.blocks_unchecked(x)
    return (q * scale).flatten(-2).to(x.dtype)


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


def _runtime_weight(w: torch.Tensor, global_amax: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """`quant.linear._runtime_weight`: ckaqad's NVFP4 codes and block scales of `w`, decompressed as
    compressed-tensors does, `bf16(fl32(q * fl32(bf16(s8) / G)))` with G = fl32(2688 / amax), in w's dtype."""
    blocks = w.to(torch.float32).unflatten(-1, (-1, nvfp4.BLOCK_SIZE))
    block_amax, global_amax = _block_and_global_amax(blocks, global_amax, own)
    g = nvfp4.global_scale_from_amax(global_amax)
    s8 = nvfp4.block_scales_fp8(block_amax, g)
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
    """x as (rows, K), both sizes marked unbacked: one compiled graph per function and dtype serves every shape
    (no recompile for a rank, a K, or 0/1-row tensors, which dynamic shapes would otherwise specialise).

    Not a view where no gradient flows through (the straight-through Functions call these with grad off):
    dynamo guards a view's base too, so a reshaped 1-D or 3-D input recompiled on its base's sizes."""
    rows = x.reshape(-1, x.shape[-1])
    if not torch.is_grad_enabled():
        rows = rows.detach()
    torch._dynamo.decorators.mark_unbacked(rows, 0)
    torch._dynamo.decorators.mark_unbacked(rows, 1)
    return rows


def _run(name: str, x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
    """compiled(name) on x as (rows, K), returned in x's shape. Without a gradient to carry (the
    straight-through Functions call with grad off) it runs under no_grad, so that a caller with grad mode on
    (an evaluation, a test) does not compile a second graph for the other grad mode."""
    if torch.is_grad_enabled() and x.requires_grad:
        return compiled(name)(_rows(x), *args).reshape(x.shape)
    with torch.no_grad():
        return compiled(name)(_rows(x), *args).reshape(x.shape)


_OWN, _GIVEN = torch.tensor(True), torch.tensor(False)
_UNUSED_AMAX = torch.tensor(0.0)


def _amax_arguments(x: torch.Tensor, global_amax) -> tuple[torch.Tensor, torch.Tensor]:
    """(global amax, own flag) for the compiled functions: None asks for the tensor's own amax."""
    if global_amax is None:
        return _UNUSED_AMAX.to(x.device), _OWN.to(x.device)
    return torch.as_tensor(global_amax, dtype=torch.float32, device=x.device), _GIVEN.to(x.device)


def nvfp4_fake_quantize(x: torch.Tensor, global_amax=None) -> torch.Tensor:
    nvfp4.check_blockable(x)
    return _run("nvfp4", x, *_amax_arguments(x, global_amax))


def mxfp4_fake_quantize(x: torch.Tensor, global_amax=None) -> torch.Tensor:
    nvfp4.check_blockable(x, mxfp4.BLOCK_SIZE, "MXFP4")
    return _run("mxfp4", x)


def int4_fake_quantize(x: torch.Tensor, global_amax=None) -> torch.Tensor:
    nvfp4.check_blockable(x, int4.BLOCK_SIZE, "INT4")
    return _run("int4", x)


def runtime_fake_quantize(x: torch.Tensor, global_scale) -> torch.Tensor:
    nvfp4.check_blockable(x, nvfp4.BLOCK_SIZE, "NVFP4 runtime")
    G = torch.as_tensor(global_scale, dtype=torch.float32, device=x.device)
    return _run("runtime-input", x, G)


def runtime_weight(w: torch.Tensor, global_amax) -> torch.Tensor:
    nvfp4.check_blockable(w)
    return _run("runtime-weight", w, *_amax_arguments(w, global_amax))


FUNCTIONS: dict[str, Callable] = {"nvfp4": nvfp4_fake_quantize, "mxfp4": mxfp4_fake_quantize,
                                  "int4": int4_fake_quantize, "runtime-input": runtime_fake_quantize,
                                  "runtime-weight": runtime_weight}
