"""The E2M1 grid, written once: values, boundaries at the midpoints, ties to the even mantissa."""

from __future__ import annotations

import torch

from ckaqad.formats import e2m1


def test_values_and_codes():
    assert e2m1.E2M1_VALUES == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    grid = e2m1.e2m1_grid()
    assert grid[:8].tolist() == list(e2m1.E2M1_VALUES)
    assert torch.signbit(grid[8]) and grid[8] == 0  # code 8 is -0
    assert e2m1.FP4_MAX == 6.0


def test_boundaries_are_midpoints_with_ties_to_even():
    assert [b for b, _ in e2m1.E2M1_BOUNDARIES] == [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    # The tie goes up exactly when the upper neighbour has the even mantissa (an even index).
    for k, (boundary, up) in enumerate(e2m1.E2M1_BOUNDARIES):
        index = int(e2m1.e2m1_index(torch.tensor([boundary])))
        assert index == (k + 1 if up else k)
        assert up == ((k + 1) % 2 == 0)


def test_index_saturates_and_is_monotone():
    a = torch.linspace(0, 10, 2001)
    index = e2m1.e2m1_index(a)
    assert index.dtype == torch.uint8 and int(index.max()) == 7
    assert bool((index[1:] >= index[:-1]).all())
    assert e2m1.e2m1_magnitudes(index).max() == 6.0
