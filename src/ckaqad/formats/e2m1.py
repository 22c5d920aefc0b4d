"""FP4 E2M1, the element type of NVFP4 and MXFP4: its eight magnitudes, the rounding boundaries between them
and their ties, written once (the reference quantizers and the Triton kernel both take them from here).

Code = sign<<3 | index, index 0..7 on {0, 0.5, 1, 1.5, 2, 3, 4, 6}. Rounding is to nearest with ties to
the even mantissa, saturating at 6:

>>> import torch
>>> e2m1_index(torch.tensor([0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0])).tolist()
[0, 1, 2, 2, 4, 4, 6, 6, 7]
"""

from __future__ import annotations

import torch

# E2M1 magnitudes indexed by the 3-bit code; the sign is bit 3.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_MAX = E2M1_VALUES[-1]
# Rounding boundaries between consecutive grid points (the midpoints). `True`: the boundary itself rounds up
# (the upper neighbour has the even mantissa); `False`: it rounds down.
E2M1_BOUNDARIES = tuple((boundary, upper_is_even)
                        for boundary, upper_is_even in zip(
                            [(lo + hi) / 2 for lo, hi in zip(E2M1_VALUES, E2M1_VALUES[1:], strict=False)],
                            (False, True, False, True, False, True, False), strict=True))


def e2m1_index(a: torch.Tensor) -> torch.Tensor:
    """Index 0..7 of the E2M1 magnitude nearest to `a >= 0` (ties to even, saturating at 6), uint8.

    Seven compare-and-add passes: on CPU this beats `torch.bucketize` by about 8x.
    """
    index = torch.zeros_like(a, dtype=torch.uint8)
    for boundary, tie_up in E2M1_BOUNDARIES:
        index += (a >= boundary) if tie_up else (a > boundary)
    return index


def e2m1_grid(device=None) -> torch.Tensor:
    """The 16 code values (code = sign<<3 | index) as float32; code 8 is -0."""
    mags = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])


def e2m1_magnitudes(index: torch.Tensor) -> torch.Tensor:
    """float32 magnitudes of indices 0..7."""
    return torch.tensor(E2M1_VALUES, dtype=torch.float32, device=index.device)[index.long()]


def e2m1_round(a: torch.Tensor) -> torch.Tensor:
    """float32 E2M1 magnitude nearest to `a >= 0`: `e2m1_magnitudes(e2m1_index(a))` as a cascade of selects
    over the same boundaries (NaN -> 0 as there), with no table gather, so a compiler can fuse it into one
    loop (formats/cpu_fused.py). Eagerly it is seven passes: the references keep the index form.

    >>> e2m1_round(torch.tensor([0.25, 0.26, 0.75, 2.5, 3.5, 5.0, 7.0])).tolist()
    [0.0, 0.5, 1.0, 2.0, 4.0, 4.0, 6.0]
    """
    magnitude = torch.zeros_like(a, dtype=torch.float32)
    for (boundary, tie_up), upper in zip(E2M1_BOUNDARIES, E2M1_VALUES[1:], strict=True):
        above = (a >= boundary) if tie_up else (a > boundary)
        magnitude = torch.where(above, upper, magnitude)
    return magnitude
