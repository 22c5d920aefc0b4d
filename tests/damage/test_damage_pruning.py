"""Pruning scores and masks: magnitude and 2:4 masks agree with torch.ao.pruning, Wanda's score and its
block-by-block calibration match a direct computation, and the measured patterns are what was asked."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.ao.pruning import WeightNormSparsifier

from ckaqad.damage.blockwise import first_block_inputs
from ckaqad.damage.pruning import (
    magnitude_score,
    n_m_mask,
    n_m_violations,
    prunable_linears,
    prune_,
    sparsity_pattern,
    unstructured_mask,
    wanda_input_sq_sums,
    wanda_score,
)
from ckaqad.errors import ConfigError, FormatError
from ckaqad.models.arch import decoder_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def calibration(n: int = 3, seq: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, 256, (2, seq), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return batches


def ao_mask(weight: torch.Tensor, **config) -> torch.Tensor:
    """The keep-mask torch.ao.pruning's WeightNormSparsifier gives `weight`."""
    layer = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    with torch.no_grad():
        layer[0].weight.copy_(weight)
    sparsifier = WeightNormSparsifier(**config)
    sparsifier.prepare(layer, [{"tensor_fqn": "0.weight"}])
    sparsifier.step()
    sparsifier.squash_mask()
    return layer[0].weight.detach() != 0


def test_magnitude_and_2_4_masks_equal_torch_ao_pruning():
    weight = torch.randn(12, 32, generator=torch.Generator().manual_seed(1))
    unstructured = ao_mask(weight, sparsity_level=0.5, sparse_block_shape=(1, 1), zeros_per_block=1)
    assert torch.equal(unstructured_mask(magnitude_score(weight), 0.5, per_row=False), unstructured)
    two_four = ao_mask(weight, sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    assert torch.equal(n_m_mask(magnitude_score(weight)), two_four)


def test_unstructured_mask_counts_per_row_and_per_layer():
    score = torch.rand(5, 40, generator=torch.Generator().manual_seed(2))
    per_row = unstructured_mask(score, 0.3, per_row=True)
    assert (per_row.sum(1) == 40 - 12).all()
    assert all(score[i][~per_row[i]].max() <= score[i][per_row[i]].min() for i in range(5))
    layer = unstructured_mask(score, 0.3, per_row=False)
    assert int((~layer).sum()) == int(0.3 * 200) and score[~layer].max() <= score[layer].min()


def test_n_m_mask_keeps_the_two_largest_of_every_four():
    score = torch.tensor([[0.1, 0.9, 0.5, 0.4, 3.0, 2.0, 1.0, 0.0]])
    assert n_m_mask(score).tolist() == [[False, True, True, False, True, True, False, False]]
    with pytest.raises(FormatError):
        n_m_mask(torch.rand(2, 6))


def test_wanda_score_and_calibration_match_a_direct_computation(tiny_model):
    batches = calibration()
    layers = prunable_linears(tiny_model)
    block = decoder_layers(tiny_model)[0]
    own = {n: m for n, m in layers.items() if n.startswith("model.layers.0.")}
    # Direct: every input row each layer sees in ordinary forwards, stacked.
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in own}
    def keep(name):
        return lambda module, args: seen[name].append(args[0].reshape(-1, args[0].shape[-1]))

    handles = [m.register_forward_pre_hook(keep(n)) for n, m in own.items()]
    with torch.no_grad():
        for batch in batches:
            tiny_model(**batch)
    for h in handles:
        h.remove()
    sums, tokens = wanda_input_sq_sums(block, own, first_block_inputs(tiny_model, batches))
    assert tokens == 3 * 2 * 16
    for name, layer in own.items():
        x = torch.cat(seen[name]).double()
        direct = layer.weight.detach().abs().double() * x.norm(dim=0).unsqueeze(0)
        torch.testing.assert_close(wanda_score(layer.weight, sums[name]).double(), direct, rtol=1e-5, atol=1e-7)


def test_wanda_prunes_each_block_on_the_outputs_of_the_pruned_blocks_before_it(tiny_model):
    batches = calibration()
    dense = copy.deepcopy(tiny_model)
    report = prune_(tiny_model, "unstructured", "wanda", 0.5, batches)
    pruned = prunable_linears(tiny_model)
    # Block 1 must have been scored with block 0 already pruned and block 1 still dense.
    probe = copy.deepcopy(tiny_model)
    probe.model.layers[1].load_state_dict(dense.model.layers[1].state_dict())
    own = {n: m for n, m in prunable_linears(probe).items() if n.startswith("model.layers.1.")}
    sums, _ = wanda_input_sq_sums(decoder_layers(probe)[1], own, _inputs_of_block(probe, 1, batches))
    for name, layer in own.items():
        expected = unstructured_mask(wanda_score(layer.weight, sums[name]), 0.5, per_row=True)
        assert torch.equal(pruned[name].weight != 0, expected), name
    assert report.sparsity == pytest.approx(0.5)
    assert all(v == pytest.approx(0.5) for v in report.layers.values())
    # Embeddings, norms and the head stay dense.
    assert torch.equal(tiny_model.model.embed_tokens.weight, dense.model.embed_tokens.weight)


def _inputs_of_block(model, index, batches):
    """The inputs of block `index` caught by an ordinary forward (the direct way)."""
    from ckaqad.damage.blockwise import BlockInput

    caught = []

    def catch(module, args, kwargs):
        caught.append(BlockInput(args[0].detach(), tuple(args[1:]), dict(kwargs)))

    handle = decoder_layers(model)[index].register_forward_pre_hook(catch, with_kwargs=True)
    with torch.no_grad():
        for batch in batches:
            model(**batch, use_cache=False)
    handle.remove()
    return caught


def test_2_4_pruning_leaves_two_of_every_four(tiny_model):
    prune_(tiny_model, "2:4", "wanda", 0.0, calibration())
    pattern = sparsity_pattern(tiny_model)
    assert pattern["is_2_4"] and pattern["zero_fraction"] == pytest.approx(0.5)
    for layer in prunable_linears(tiny_model).values():
        assert n_m_violations(layer.weight) == 0


def test_bad_sparsity_and_dims(tiny_model):
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="--sparsity"):
            prune_(tiny_model, "unstructured", "magnitude", bad)
    import transformers

    odd = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=259, hidden_size=64, intermediate_size=130, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2))
    with pytest.raises(FormatError, match="divisible by 4"):
        prune_(odd, "2:4", "magnitude", 0.5)
