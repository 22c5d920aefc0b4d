"""Shared hypothesis strategies and special inputs for the format and CKA tests.

Blocked tensors are (rows, k * block) float32 with every block drawn from one of a few kinds (gaussian at a
per-block magnitude, grid points and exact ties, all zeros, sparse, f32-subnormal), so one example mixes
blocks whose scales differ by dozens of binades. Values come from a seeded torch generator: hypothesis draws
the structure (shape, kinds, exponents, seed), which keeps examples cheap even for 128-wide INT4 groups.
"""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

# E2M1 magnitudes and the midpoints between neighbours (the ties of round-to-nearest).
FP4_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_TIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
# INT4 magnitudes (scale = amax / 7) and their half-integer ties.
INT4_GRID = tuple(float(i) for i in range(8))
INT4_TIES = tuple(i + 0.5 for i in range(7))

BLOCK_KINDS = ("gaussian", "ties", "zeros", "sparse", "subnormal")


def _block(kind: str, size: int, exponent: int, points: tuple[float, ...], block_max: float,
           gen: torch.Generator) -> torch.Tensor:
    """One block of `size` float32 values of the given kind at magnitude about 2**exponent."""
    scale = 2.0**exponent
    if kind == "gaussian":
        return (torch.randn(size, generator=gen, dtype=torch.float64) * scale).float()
    if kind == "ties":
        # Grid points and exact ties times 2**exponent, with ±block_max * 2**exponent somewhere, so the
        # block scale is exactly 2**exponent when the global scale is a power of two.
        pick = torch.randint(len(points), (size,), generator=gen)
        sign = torch.where(torch.rand(size, generator=gen) < 0.5, -1.0, 1.0).double()
        block = torch.tensor(points, dtype=torch.float64)[pick] * sign * scale
        where = int(torch.randint(size, (1,), generator=gen))
        block[where] = math.copysign(block_max * scale, float(sign[where]))
        return block.float()
    if kind == "zeros":
        # +0 and -0 mixed.
        return torch.where(torch.rand(size, generator=gen) < 0.5, -0.0, 0.0).float()
    if kind == "sparse":
        dense = torch.randn(size, generator=gen, dtype=torch.float64) * scale
        return torch.where(torch.rand(size, generator=gen) < 0.8, 0.0, dense).float()
    if kind == "subnormal":
        # float32 subnormals (below 2**-126), some exactly the smallest one.
        block = torch.randn(size, generator=gen, dtype=torch.float64) * 2.0**-135
        return torch.where(torch.rand(size, generator=gen) < 0.2, 2.0**-149, block).float()
    raise ValueError(kind)


@st.composite
def blocked_tensors(draw, block: int = 16, max_rows: int = 3, max_blocks: int = 3,
                    exponents: tuple[int, int] = (-60, 60), points: tuple[float, ...] = FP4_GRID + FP4_TIES,
                    block_max: float = 6.0, kinds: tuple[str, ...] = BLOCK_KINDS) -> torch.Tensor:
    """float32 tensor (rows, k * block) whose blocks mix magnitudes 2**exponents, zeros, ties and tiny values.

    `points` and `block_max` define the "ties" kind (grid values and midpoints, in units of the block scale).
    """
    rows = draw(st.integers(1, max_rows))
    k = draw(st.integers(1, max_blocks))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(rows * k):
        kind = draw(st.sampled_from(kinds))
        exponent = draw(st.integers(*exponents))
        blocks.append(_block(kind, block, exponent, points, block_max, gen))
    return torch.stack(blocks).reshape(rows, k * block)


@st.composite
def nvfp4_inputs(draw, max_rows: int = 3, max_blocks: int = 3, exponents: tuple[int, int] = (-60, 60)):
    """(x, global_amax) for NVFP4: global_amax is None (the tensor's own amax), 2688 * 2**E (a power-of-two
    global scale, so ties stay exact), or an arbitrary positive float (possibly below the tensor amax, which
    saturates blocks at 448 and elements at 6)."""
    x = draw(blocked_tensors(16, max_rows, max_blocks, exponents))
    choice = draw(st.sampled_from(("own", "power_of_two", "arbitrary")))
    if choice == "own":
        return x, None
    if choice == "power_of_two":
        return x, 2688.0 * 2.0 ** draw(st.integers(exponents[0] - 2, exponents[1] + 2))
    return x, draw(st.floats(2.0**-66, 2.0**66, width=32))


def nvfp4_special_cases() -> list[tuple[str, torch.Tensor, float | None]]:
    """Named (x, global_amax) inputs that exercise every special path of NVFP4 (also run through kernels).

    The global scale g is a power of two wherever exact ties matter (global_amax = 2688 * 2**E makes
    g = 2**E exactly and a block whose amax is 6 * s8 * g gets the FP8 scale s8 exactly)."""
    cases: list[tuple[str, torch.Tensor, float | None]] = []
    # Every grid point, tie and the float32 neighbours on both sides, for several exact block scales
    # (normal, 448 = FP8 max, and FP8 subnormals 2**-9, 3 * 2**-9).
    points = torch.tensor(FP4_GRID + FP4_TIES, dtype=torch.float32)
    around = torch.cat([points, torch.nextafter(points, torch.tensor(math.inf)),
                        torch.nextafter(points, torch.tensor(-math.inf)).clamp_min(0)])
    for s8 in (1.0, 0.5, 1.375, 448.0, 2.0**-9, 3 * 2.0**-9, 0.875):
        for g_exp in (0, -20, 30):
            scale = s8 * 2.0**g_exp
            values = around * scale
            pad = (-values.numel()) % 15
            values = torch.cat([values, torch.zeros(pad)]).reshape(-1, 15)
            # First element of every block is 6 * scale: block amax / (6 g) = s8 exactly.
            x = torch.cat([torch.full((values.shape[0], 1), 6 * scale), values], dim=1)
            x = torch.cat([x, -x])
            cases.append((f"grid_ties_s8={s8}_g=2**{g_exp}", x, 2688.0 * 2.0**g_exp))
    gen = torch.Generator().manual_seed(0)
    gauss = torch.randn(4, 64, generator=gen)
    cases.append(("gaussian_own_amax", gauss, None))
    # Values beyond the given global amax: elements saturate at 6, block scales at 448.
    cases.append(("beyond_global_amax", gauss * 10, float(gauss.abs().amax())))
    cases.append(("far_beyond_global_amax", gauss * 1e6, 1e-3))
    # All-zero blocks next to live ones, and an all-zero tensor (g = 0), with -0 kept.
    mixed = gauss.clone()
    mixed[1, 16:48] = 0.0
    mixed[2, :16] = -0.0
    cases.append(("zero_blocks", mixed, None))
    cases.append(("all_zero", torch.tensor([[0.0, -0.0] * 8] * 2), None))
    cases.append(("all_zero_given_amax", torch.zeros(2, 32), 1.0))
    # Blocks far below the tensor amax: FP8 scale subnormal (ratio in [2**-9, 2**-6)), rounding to the
    # smallest subnormal or to zero (ratio <= 2**-10), with negative values that round to -0.
    tiny = gauss.clone()
    tiny[0, :16] *= 1e-3
    tiny[0, 16:32] *= 1e-4
    tiny[1, :16] *= 1e-5
    tiny[1, 16:32] = -tiny[1, 16:32].abs() * 1e-8
    tiny[2, :16] *= 1e-30
    cases.append(("tiny_blocks", tiny, None))
    # Block amax exactly at the FP8 subnormal tie 2**-10 * 6g (rounds to 0) and just above it.
    for ratio in (2.0**-10, float(torch.nextafter(torch.tensor(2.0**-10), torch.tensor(1.0))), 2.0**-9 * 1.5):
        block = torch.linspace(-1, 1, 16) * ratio * 6
        cases.append((f"fp8_boundary_ratio={ratio:.3g}", torch.stack([block, -block]), 2688.0))
    # Negative zero and negative values that round to zero (code 8).
    negz = torch.tensor([[6.0, -0.0, -0.1, -0.25, 0.25, 0.1, 0.0, -0.2] * 2])
    cases.append(("negative_zero", negz, None))
    # Huge and f32-subnormal magnitudes in one tensor.
    wide = gauss.clone()
    wide[0] *= 1e30
    wide[3, :16] = 2.0**-149
    wide[3, 16:32] *= 2.0**-130
    cases.append(("huge_and_subnormal", wide, None))
    # Odd shapes: 3-D, one row, K = 16.
    cases.append(("three_d", torch.randn(2, 3, 32, generator=gen), None))
    cases.append(("one_row_k16", torch.randn(1, 16, generator=gen), None))
    cases.append(("vector_k16", torch.randn(16, generator=gen), None))
    return cases


@st.composite
def representation_pairs(draw, min_n: int = 4, max_n: int = 40, max_d: int = 12,
                         dtype: torch.dtype = torch.float64):
    """(x, y): (n, d1) and (n, d2) representations of the same n tokens: independent, a noisy linear map of
    each other, or sharing a low-rank part, at scales from 2**-20 to 2**20 and with column offsets."""
    n = draw(st.integers(min_n, max_n))
    d1 = draw(st.integers(1, max_d))
    d2 = draw(st.integers(1, max_d))
    relation = draw(st.sampled_from(("independent", "linear", "shared")))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d1, generator=gen, dtype=torch.float64)
    if relation == "independent":
        y = torch.randn(n, d2, generator=gen, dtype=torch.float64)
    elif relation == "linear":
        noise = draw(st.floats(0.0, 2.0))
        y = x @ torch.randn(d1, d2, generator=gen, dtype=torch.float64)
        y = y + noise * torch.randn(n, d2, generator=gen, dtype=torch.float64)
    else:
        z = torch.randn(n, 2, generator=gen, dtype=torch.float64)
        x = x + 3 * z @ torch.randn(2, d1, generator=gen, dtype=torch.float64)
        y = torch.randn(n, d2, generator=gen, dtype=torch.float64) + 3 * z @ torch.randn(
            2, d2, generator=gen, dtype=torch.float64)
    # Column offsets up to a few times the spread: centring matters, yet a Gram-form reference built from
    # the uncentred K = XXᵀ keeps its digits.
    scale_x, scale_y = 2.0 ** draw(st.integers(-20, 20)), 2.0 ** draw(st.integers(-20, 20))
    x = (x + 2 * torch.randn(1, d1, generator=gen, dtype=torch.float64)) * scale_x
    y = (y + 2 * torch.randn(1, d2, generator=gen, dtype=torch.float64)) * scale_y
    return x.to(dtype), y.to(dtype)
