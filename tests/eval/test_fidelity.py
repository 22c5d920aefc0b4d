"""Tests for `ckaqad.eval.fidelity`: a tiny teacher against itself, a copy and an NVFP4 W4A4 student; token
selection; layer subsets and layer maps (a student of another depth); the headline projection; weights
quantized once per pass; and the `--layers` parser (`capture.parse_layers`)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import make_tiny_model

from ckaqad.capture import LayerMap, parse_layers
from ckaqad.cka import linear_cka
from ckaqad.errors import ConfigError
from ckaqad.eval.fidelity import COMPARED, HEADLINE, Fidelity, measure_fidelity
from ckaqad.models.arch import decoder_layers
from ckaqad.quant.apply import calibrate, quant_linears, quantize_model_
from ckaqad.quant.linear import QuantConfig

pytestmark = pytest.mark.usefixtures("one_thread")

N_LAYERS = 2
BATCH, SEQ, N_BATCHES = 2, 16, 3


def random_batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Byte tokens only (no BOS/EOS/pad), so every position but the sink is a valid CKA token."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(N_BATCHES):
        ids = torch.randint(0, 256, (BATCH, SEQ), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def nvfp4_student(teacher, scheme: str = "w4a4"):
    student = copy.deepcopy(teacher).float()
    quantize_model_(student, QuantConfig(format="nvfp4", scheme=scheme))
    calibrate(student, random_batches(seed=1))
    return student.requires_grad_(False)


@pytest.fixture(scope="module")
def teacher():
    return make_tiny_model(seed=0).requires_grad_(False)


@pytest.fixture(scope="module")
def w4a4_student(teacher):
    return nvfp4_student(teacher)


def numbers(fidelity: dict) -> list[float]:
    """Every number of a Fidelity dict (the per-layer rows flattened), for pytest.approx."""
    rows = [v for row in fidelity["layers"] for v in row.values()]
    return rows + [v for k, v in sorted(fidelity.items()) if isinstance(v, int | float)]


def no_hooks_left(model) -> bool:
    return all(not block._forward_hooks for block in decoder_layers(model))


# ---------------------------------------------------------------------------------------------------------
# measure_fidelity


def test_teacher_against_a_copy_of_itself_is_perfect(teacher):
    results, teacher_stats = measure_fidelity(teacher, {"copy": copy.deepcopy(teacher)}, random_batches(),
                                              progress=False)
    r = results["copy"]
    assert [row["index"] for row in r.layers] == list(range(N_LAYERS))
    assert [row["teacher_index"] for row in r.layers] == list(range(N_LAYERS))  # the identity map
    for row in r.layers:
        assert row["cka"] == pytest.approx(1.0, abs=1e-6)
        assert row["cka_debiased"] == pytest.approx(1.0, abs=1e-6)
    assert r.mean_cka == pytest.approx(1.0, abs=1e-6) and r.min_cka == pytest.approx(1.0, abs=1e-6)
    assert r.kl_per_token == pytest.approx(0.0, abs=1e-7)
    assert r.top1_agreement == 1.0
    assert r.perplexity == pytest.approx(teacher_stats["perplexity"], rel=1e-6)
    # 1 sink position per sequence is left out of CKA; the last position predicts nothing.
    assert r.cka_tokens == N_BATCHES * BATCH * (SEQ - 1)
    assert r.predicted_tokens == teacher_stats["predicted_tokens"] == N_BATCHES * BATCH * (SEQ - 1)
    assert no_hooks_left(teacher)


def test_the_teacher_object_itself_as_student_is_perfect(teacher):
    # `ckaqad eval --model default` measures the teacher against itself: one module, two sets of hooks, and a
    # last batch smaller than the first (rows left from a bigger batch must not be used).
    batches = random_batches()
    batches[-1] = {k: v[:1] for k, v in batches[-1].items()}
    results, _ = measure_fidelity(teacher, {"self": teacher}, batches, progress=False)
    r = results["self"]
    assert r.kl_per_token == 0.0 and r.top1_agreement == 1.0
    assert r.mean_cka == pytest.approx(1.0, abs=1e-6) and r.min_cka == pytest.approx(1.0, abs=1e-6)
    assert r.cka_tokens == ((N_BATCHES - 1) * BATCH + 1) * (SEQ - 1)
    assert no_hooks_left(teacher)


def test_nvfp4_w4a4_student_drifts_from_the_teacher(teacher, w4a4_student):
    results, teacher_stats = measure_fidelity(teacher, {"nvfp4-w4a4": w4a4_student}, random_batches(),
                                              progress=False)
    r = results["nvfp4-w4a4"]
    assert r.label == "nvfp4-w4a4"
    for row in r.layers:
        assert 0.0 <= row["cka"] < 1.0 - 1e-6
    assert r.mean_cka < 1.0 - 1e-6 and r.min_cka <= r.mean_cka
    assert r.min_cka == min(row["cka"] for row in r.layers)
    assert r.min_cka_layer == min(r.layers, key=lambda row: row["cka"])["index"]
    assert r.kl_per_token > 1e-6
    assert 0.0 <= r.top1_agreement <= 1.0
    assert math.isfinite(r.perplexity) and r.perplexity != pytest.approx(teacher_stats["perplexity"], rel=1e-6)
    assert no_hooks_left(teacher) and no_hooks_left(w4a4_student)


def test_students_are_measured_independently(teacher, w4a4_student):
    together, _ = measure_fidelity(teacher, {"copy": copy.deepcopy(teacher), "q": w4a4_student}, random_batches(),
                                   progress=False)
    alone, _ = measure_fidelity(teacher, {"q": w4a4_student}, random_batches(), progress=False)
    assert numbers(together["q"].to_dict()) == pytest.approx(numbers(alone["q"].to_dict()), rel=1e-6)
    assert together["copy"].mean_cka == pytest.approx(1.0, abs=1e-6)


def test_layer_subset(teacher, w4a4_student):
    results, _ = measure_fidelity(teacher, {"q": w4a4_student}, random_batches(), layers=[1], progress=False)
    full, _ = measure_fidelity(teacher, {"q": w4a4_student}, random_batches(), progress=False)
    assert [row["index"] for row in results["q"].layers] == [1]
    assert results["q"].layers[0] == pytest.approx(full["q"].layers[1])
    with pytest.raises(ConfigError, match="out of range"):
        measure_fidelity(teacher, {"q": w4a4_student}, random_batches(), layers=[2], progress=False)


def test_sinks_padding_and_excluded_tokens_are_left_out_of_cka(teacher):
    batches = random_batches()
    for b in batches:
        b["input_ids"][:, 5] = 256  # a BOS in the middle of each sequence
        b["attention_mask"][0, -4:] = 0  # right padding on one row
    padded = 4 * N_BATCHES
    count = {}
    for n_sink, exclude in ((0, ()), (1, ()), (3, ()), (1, (256,))):
        results, _ = measure_fidelity(teacher, {"s": copy.deepcopy(teacher)}, batches, n_sink=n_sink,
                                      exclude_token_ids=exclude, progress=False)
        count[n_sink, exclude] = results["s"].cka_tokens
    real = N_BATCHES * BATCH * SEQ - padded
    assert count[0, ()] == real
    assert count[1, ()] == real - N_BATCHES * BATCH
    assert count[3, ()] == real - 3 * N_BATCHES * BATCH
    assert count[1, (256,)] == real - N_BATCHES * BATCH - N_BATCHES * BATCH


# ---------------------------------------------------------------------------------------------------------
# layer maps: a student of another depth


def block_states(model, batches) -> list[torch.Tensor]:
    """The output of every decoder block over all batches at the CKA rows (sink excluded), (N, d) each."""
    states: list[list[torch.Tensor]] = [[] for _ in decoder_layers(model)]

    def keep(index):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output  # (B, T, d)
            states[index].append(hidden[:, 1:].reshape(-1, hidden.shape[-1]))

        return hook

    hooks = [block.register_forward_hook(keep(i)) for i, block in enumerate(decoder_layers(model))]
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(s) for s in states]


def test_a_shallower_student_meets_the_teacher_blocks_of_its_layer_map(teacher):
    # A 1-block student (the teacher with its first block pruned): the proportional map pairs its only
    # block with the teacher's last one; an explicit map can pair it with block 0 instead.
    pruned = copy.deepcopy(teacher)
    pruned.model.layers = torch.nn.ModuleList([pruned.model.layers[1]])
    pruned.config.num_hidden_layers = 1
    pruned.model.layers[0].self_attn.layer_idx = 0  # as a pruned model loaded from its own config has it
    batches = random_batches()
    t_states, s_states = block_states(teacher, batches), block_states(pruned, batches)

    results, _ = measure_fidelity(teacher, {"pruned": pruned}, batches, progress=False)
    [row] = results["pruned"].layers
    assert (row["index"], row["teacher_index"]) == (0, 1)
    assert row["cka"] == pytest.approx(float(linear_cka(s_states[0].double(), t_states[1].double())), abs=1e-5)
    assert results["pruned"].min_cka_layer == 0

    explicit, _ = measure_fidelity(teacher, {"pruned": pruned}, batches, progress=False,
                                   layer_map=LayerMap.parse("0:0", 1, 2))
    [row0] = explicit["pruned"].layers
    assert (row0["index"], row0["teacher_index"]) == (0, 0)
    assert row0["cka"] == pytest.approx(float(linear_cka(s_states[0].double(), t_states[0].double())), abs=1e-5)
    assert explicit["pruned"].kl_per_token == pytest.approx(results["pruned"].kl_per_token, rel=1e-6)
    assert no_hooks_left(teacher) and no_hooks_left(pruned)


def test_a_layer_map_must_fit_every_student(teacher, w4a4_student):
    with pytest.raises(ConfigError, match="does not fit"):
        measure_fidelity(teacher, {"q": w4a4_student}, random_batches(), progress=False,
                         layer_map=LayerMap(((0, 2),)))
    with pytest.raises(ConfigError, match="not both"):
        measure_fidelity(teacher, {"q": w4a4_student}, random_batches(), progress=False, layers=[0],
                         layer_map=LayerMap(((0, 0),)))


# ---------------------------------------------------------------------------------------------------------
# the record and the weight cache


def test_headline_is_the_flat_numbers_of_the_record(teacher, w4a4_student):
    results, _ = measure_fidelity(teacher, {"q": w4a4_student}, random_batches(), progress=False)
    r = results["q"]
    headline = r.headline()
    assert list(headline) == list(HEADLINE) and set(COMPARED) <= set(HEADLINE)
    assert headline == {k: r.to_dict()[k] for k in HEADLINE}
    assert "layers" not in headline and all(isinstance(v, int | float) for v in headline.values())
    assert Fidelity(label="empty").headline()["min_cka_layer"] == -1


def test_weights_are_quantized_once_per_pass_and_released(teacher, monkeypatch):
    student = nvfp4_student(teacher, scheme="w4a16")
    layers = list(quant_linears(student).values())
    calls = []
    original = type(layers[0]).hold_quantized_weight

    def counting(self):
        calls.append(self)
        original(self)

    monkeypatch.setattr(type(layers[0]), "hold_quantized_weight", counting)
    results, _ = measure_fidelity(teacher, {"q": student}, random_batches(), progress=False)
    assert len(calls) == len(layers)  # once per layer for the three batches, not once per forward
    assert all(m._held_weight is None for m in layers)  # released afterwards: training sees fresh weights
    monkeypatch.undo()
    again, _ = measure_fidelity(teacher, {"q": student}, random_batches(), progress=False)
    assert numbers(again["q"].to_dict()) == pytest.approx(numbers(results["q"].to_dict()), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# parse_layers (capture.parse_layers: the `--layers` flag)


@pytest.mark.parametrize(("spec", "expected"), [
    ("all", [0, 1, 2, 3, 4, 5]), ("", [0, 1, 2, 3, 4, 5]), ("0,1", [0, 1]), ("3", [3]), ("1-3", [1, 2, 3]),
    ("0,2-4", [0, 2, 3, 4]), ("4,0,4,1-2", [0, 1, 2, 4]), ("-1", [5]), ("0,-2", [0, 4]), (" 1 , 3-4 ", [1, 3, 4]),
    ("5-5", [5]),
])
def test_parse_layers(spec, expected):
    assert parse_layers(spec, 6) == expected


@pytest.mark.parametrize("spec", ["6", "0,6", "5-6", "-7", "0-10"])
def test_parse_layers_rejects_out_of_range(spec):
    with pytest.raises(ConfigError, match=r"--layers .*out of range for a model with 6 layers"):
        parse_layers(spec, 6)


@pytest.mark.parametrize("spec", ["first", "1-", "0,,1", "1.5", "a-b"])
def test_parse_layers_rejects_malformed(spec):
    with pytest.raises(ConfigError, match="--layers must be 'all' or a list like 0,4,8-11"):
        parse_layers(spec, 6)


def test_parse_layers_rejects_a_backwards_range():
    with pytest.raises(ConfigError, match="--layers '3-1'.*backwards"):
        parse_layers("3-1", 6)
