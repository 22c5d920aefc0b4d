"""The sparsity mask is part of the student: under AdamW (with weight decay and clipping) masked weights stay
exactly zero while the others train; without the mask they would not."""

from __future__ import annotations

import pytest
import torch

from ckaqad.damage.constraints import SparsityMask, masks_from_zeros
from ckaqad.damage.pruning import n_m_violations, prunable_linears, prune_
from ckaqad.errors import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")


def train_a_few_steps(model, steps: int = 4) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 256, (2, 16), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()


def test_masked_weights_stay_exactly_zero_under_adamw(tiny_model_factory):
    model = tiny_model_factory(0)
    prune_(model, "2:4", "magnitude", 0.5)
    masks = masks_from_zeros(model)
    assert set(masks) == set(prunable_linears(model))
    before = {n: layer.weight.detach().clone() for n, layer in prunable_linears(model).items()}
    model.requires_grad_(True).train()
    constraint = SparsityMask(model, masks)
    train_a_few_steps(model)
    assert constraint.violations() == 0
    for name, layer in prunable_linears(model).items():
        w = layer.weight.detach()
        assert torch.equal(w[~masks[name]], torch.zeros_like(w[~masks[name]]))
        assert n_m_violations(w) == 0
        assert not torch.equal(w[masks[name]], before[name][masks[name]])  # the kept weights did train
    constraint.remove()
    train_a_few_steps(model, 1)  # without the hooks the same loop fills the zeros in
    assert any(n_m_violations(layer.weight) > 0 for layer in prunable_linears(model).values())


def test_masks_from_zeros_finds_pruned_layers_only(tiny_model):
    layers = prunable_linears(tiny_model)
    name = next(iter(layers))
    with torch.no_grad():
        layers[name].weight[:, ::2] = 0
    assert list(masks_from_zeros(tiny_model)) == [name]
    with pytest.raises(CheckpointError):
        masks_from_zeros(tiny_model, ["model.layers.9.mlp.up_proj"])
