"""Tests of capture.py: which tokens CKA uses (sinks, padding, excluded ids), row sampling, and the hooks
that keep decoder-block outputs at those rows."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckaqad.capture import LayerCapture, select_rows, valid_token_mask
from ckaqad.cka import linear_cka

P = 258  # pad id of the tiny tokenizer
BOS = 256


# ---------------------------------------------------------------------------------------------------------
# valid_token_mask


def test_right_padding_drops_the_first_real_token_and_padding():
    ids = torch.tensor([[5, 6, 7, P, P], [8, 9, P, P, P], [1, 2, 3, 4, 5]])
    attn = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert valid_token_mask(ids, attn).int().tolist() == [[0, 1, 1, 0, 0], [0, 1, 0, 0, 0], [0, 1, 1, 1, 1]]


def test_left_padding_drops_the_first_real_token_and_padding():
    ids = torch.tensor([[P, P, 5, 6, 7], [P, P, P, 8, 9], [P, P, P, P, 9]])
    attn = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 1]])
    assert valid_token_mask(ids, attn).int().tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]]


def test_left_and_right_padding_agree_on_the_real_tokens():
    gen = torch.Generator().manual_seed(0)
    lengths = [7, 3, 10, 1]
    right = torch.zeros(4, 10, dtype=torch.long)
    left = torch.zeros(4, 10, dtype=torch.long)
    for b, length in enumerate(lengths):
        right[b, :length] = 1
        left[b, 10 - length:] = 1
    ids = torch.randint(0, 256, (4, 10), generator=gen)
    for n_sink in (0, 1, 2):
        mask_right = valid_token_mask(ids, right, n_sink=n_sink)
        mask_left = valid_token_mask(ids, left, n_sink=n_sink)
        for b, length in enumerate(lengths):
            assert mask_right[b, :length].tolist() == mask_left[b, 10 - length:].tolist()
            assert mask_right[b].sum() == max(length - n_sink, 0)


def test_no_attention_mask_and_other_sink_counts():
    ids = torch.tensor([[1, 2, 3, 4]])
    assert valid_token_mask(ids).tolist() == [[False, True, True, True]]
    assert valid_token_mask(ids, n_sink=0).all()
    assert valid_token_mask(ids, n_sink=3).tolist() == [[False, False, False, True]]


def test_excluded_token_ids_are_dropped_anywhere():
    ids = torch.tensor([[BOS, 5, BOS, 6, 257], [P, BOS, 7, 8, 9]])
    attn = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    mask = valid_token_mask(ids, attn, exclude_token_ids=(BOS, 257))
    assert mask.int().tolist() == [[0, 1, 0, 1, 0], [0, 0, 1, 1, 1]]
    # The sink is counted by position, not skipped past an excluded token.
    assert valid_token_mask(ids, attn, n_sink=0, exclude_token_ids=[BOS]).int().tolist() == [
        [0, 1, 0, 1, 1], [0, 0, 1, 1, 1]]


# ---------------------------------------------------------------------------------------------------------
# select_rows


def test_select_rows_without_m_is_every_valid_flat_index():
    mask = torch.tensor([[False, True, True], [True, False, True]])
    assert select_rows(mask).tolist() == [1, 2, 3, 5]
    assert select_rows(mask, m=10).tolist() == [1, 2, 3, 5]
    assert select_rows(mask, m=4).tolist() == [1, 2, 3, 5]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 40), st.floats(0.0, 1.0), st.integers(0, 60), st.integers(0, 2**31 - 1))
def test_select_rows_is_a_sorted_subset_of_valid_rows(batch, length, density, m, seed):
    mask = torch.rand(batch, length, generator=torch.Generator().manual_seed(seed)) < density
    valid = set(mask.flatten().nonzero().squeeze(1).tolist())
    rows = select_rows(mask, m, torch.Generator().manual_seed(seed))
    assert rows.dtype == torch.long
    assert rows.numel() == min(m, len(valid))
    assert rows.tolist() == sorted(set(rows.tolist()))  # sorted, no repeats
    assert set(rows.tolist()) <= valid
    again = select_rows(mask, m, torch.Generator().manual_seed(seed))
    assert torch.equal(rows, again)


def test_select_rows_depends_on_the_seed_and_covers_all_valid_rows():
    mask = torch.ones(4, 64, dtype=torch.bool)
    mask[:, 0] = False
    picks = [select_rows(mask, 16, torch.Generator().manual_seed(s)) for s in range(20)]
    assert len({tuple(p.tolist()) for p in picks}) == 20
    seen = set().union(*(p.tolist() for p in picks))
    assert not seen & {0, 64, 128, 192}
    assert len(seen) > 150  # the draws spread over the 252 valid rows


# ---------------------------------------------------------------------------------------------------------
# Sink exclusion


def test_excluding_the_sink_changes_cka_on_inputs_with_one_massive_row():
    # Two left-padded sequences of noisy, only weakly related states; at the first real token of each, the
    # same massive vector in student and teacher (an attention sink). With the sink rows CKA reads about 1;
    # without them it reads the weak relation underneath.
    gen = torch.Generator().manual_seed(1)
    batch, length, d = 2, 48, 32
    attn = torch.ones(batch, length, dtype=torch.long)
    attn[1, :5] = 0
    ids = torch.randint(0, 256, (batch, length), generator=gen)
    ids[1, :5] = P
    x = torch.randn(batch, length, d, generator=gen)
    y = 0.3 * x + torch.randn(batch, length, d, generator=gen)
    sink = torch.randn(d, generator=gen) * 1e3
    x[0, 0], y[0, 0] = sink, 1.1 * sink
    x[1, 5], y[1, 5] = sink, 1.1 * sink
    x, y = x.reshape(-1, d), y.reshape(-1, d)

    real = select_rows(attn.bool())
    with_sink = float(linear_cka(x[real], y[real]))
    rows = select_rows(valid_token_mask(ids, attn))
    assert rows.numel() == 2 * length - 5 - 2 and 0 not in rows.tolist() and length + 5 not in rows.tolist()
    without_sink = float(linear_cka(x[rows], y[rows]))
    assert with_sink > 0.99
    assert without_sink < 0.5
    # The same holds for a random subset of the valid rows.
    subset = select_rows(valid_token_mask(ids, attn), 40, torch.Generator().manual_seed(2))
    assert float(linear_cka(x[subset], y[subset])) < 0.6


# ---------------------------------------------------------------------------------------------------------
# LayerCapture on a tiny Llama


@pytest.fixture
def llama(tiny_model_factory):
    """Random 2-layer Llama: hidden 64, 4 heads, 2 kv heads, vocab 300."""
    return tiny_model_factory(0, vocab_size=300)


def _batch():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 300, (2, 11), generator=gen)
    attn = torch.ones(2, 11, dtype=torch.long)
    attn[1, :4] = 0  # left padding
    return ids, attn


def test_capture_all_rows_equals_the_hidden_states(llama):
    ids, attn = _batch()
    with torch.no_grad(), LayerCapture(llama, layers=[0, 1], detach=True) as capture:
        out = llama(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    hidden = out.hidden_states  # embeddings, block 0 output, normed block 1 output
    assert len(hidden) == 3
    assert capture.states[0].shape == (2 * 11, 64)
    assert torch.equal(capture.states[0], hidden[1].reshape(-1, 64))
    # The last entry of hidden_states is after the final norm.
    assert torch.equal(llama.model.norm(capture.states[1]), hidden[2].reshape(-1, 64))


def test_capture_selected_rows(llama):
    ids, attn = _batch()
    with torch.no_grad():
        hidden = llama(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states
    rows = select_rows(valid_token_mask(ids, attn), 8, torch.Generator().manual_seed(4))
    capture = LayerCapture(llama, layers=[0], detach=True)
    capture.rows = rows
    with torch.no_grad():
        llama(input_ids=ids, attention_mask=attn)
    assert list(capture.states) == [0]
    assert capture.states[0].shape == (8, 64)
    assert torch.equal(capture.states[0], hidden[1].reshape(-1, 64)[rows])
    capture.clear()
    assert capture.states == {}
    capture.remove()
    with torch.no_grad():
        llama(input_ids=ids, attention_mask=attn)
    assert capture.states == {}


def test_student_capture_carries_the_graph_and_teacher_capture_does_not(llama):
    ids, attn = _batch()
    student = LayerCapture(llama, layers=[1])
    teacher = LayerCapture(llama, layers=[1], detach=True)
    student.rows = teacher.rows = torch.tensor([3, 7, 15])
    llama(input_ids=ids, attention_mask=attn)
    assert student.states[1].requires_grad and not teacher.states[1].requires_grad
    student.states[1].square().sum().backward()
    assert llama.model.layers[0].mlp.down_proj.weight.grad is not None
    assert llama.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    student.remove()
    teacher.remove()


# ---------------------------------------------------------------------------------------------------------
# LayerMap: which student block meets which teacher block


def test_proportional_map_is_the_identity_at_equal_depth():
    from ckaqad.capture import LayerMap

    assert LayerMap.parse("proportional", 30, 30).pairs == tuple((i, i) for i in range(30))


def test_proportional_map_aligns_block_ends_for_a_shallower_student():
    from ckaqad.capture import LayerMap

    layer_map = LayerMap.parse("proportional", 26, 30)
    assert layer_map.pairs[-1] == (25, 29)  # the last blocks always meet
    teacher = [t for _, t in layer_map.pairs]
    assert teacher == sorted(teacher) and len(set(teacher)) == 26  # monotone, no teacher block twice
    assert LayerMap.parse("proportional", 2, 4).pairs == ((0, 1), (1, 3))


def test_explicit_map_and_layer_subset():
    from ckaqad.capture import LayerMap

    layer_map = LayerMap.parse("0:0,1:2,2:3", 3, 4, layers="0,2")
    assert layer_map.pairs == ((0, 0), (2, 3))
    assert layer_map.student_layers == [0, 2] and layer_map.teacher_layers == [0, 3]


@pytest.mark.parametrize(("spec", "match"), [("0:9", "out of range"), ("0-1", "pairs like"), ("0:0,0:1", "twice")])
def test_bad_layer_maps_name_the_flag(spec, match):
    from ckaqad.capture import LayerMap
    from ckaqad.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        LayerMap.parse(spec, 2, 4)


def test_parse_layers_ranges_and_errors():
    from ckaqad.capture import parse_layers
    from ckaqad.errors import ConfigError

    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("0,2-3,-1", 5) == [0, 2, 3, 4]
    for bad in ("3-1", "x", "9"):
        with pytest.raises(ConfigError):
            parse_layers(bad, 5)
