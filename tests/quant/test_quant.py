"""Tests for `ckaqad.quantize`: which modules the student quantizes, shared scales, calibration, STE."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn
from torch.nn import functional as F

from ckaqad.errors import ConfigError
from ckaqad.formats import nvfp4
from ckaqad.quant.apply import (
    QuantReport,
    cached_quantized_weights,
    calibrate,
    freeze_scales,
    quant_config_of,
    quant_linears,
    quantize_model_,
)
from ckaqad.quant.linear import QuantConfig, QuantLinear
from ckaqad.students.spec import build_ptq_student


def build_student(teacher, config):
    """The PTQ student before calibration (the tests calibrate it themselves)."""
    student = copy.deepcopy(teacher).float()
    report = quantize_model_(student, config)
    if not report.quantized:
        return build_ptq_student(teacher, config, None)  # raises the user-facing ConfigError
    return student.requires_grad_(True), report

VOCAB = 300
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def tiny_llama(intermediate_size: int = 128, seed: int = 0) -> transformers.LlamaForCausalLM:
    """Random 2-layer Llama (hidden 64, 4 heads, 2 kv heads, vocab 300), float32, eval mode."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).float().eval()


def linear_names(n_layers: int = 2) -> list[str]:
    names = []
    for i in range(n_layers):
        names += [f"model.layers.{i}.self_attn.{p}" for p in ATTN]
        names += [f"model.layers.{i}.mlp.{p}" for p in MLP]
    return names


def batches(n: int = 2, seed: int = 1, batch: int = 2, seq: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


@pytest.fixture(scope="module")
def teacher() -> transformers.LlamaForCausalLM:
    """Shared read-only teacher: tests must not modify it (one test checks that build_student does not)."""
    model = tiny_llama()
    with torch.no_grad():  # make the siblings' amaxes differ clearly, so sharing is visible
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.mul_(3.0)
            layer.mlp.up_proj.weight.mul_(2.0)
    return model


def get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


# ------------------------------------------------------------------------------------ what is quantized


def test_quantizes_every_projection_and_nothing_else(teacher):
    student, report = build_student(teacher, QuantConfig())
    expected = linear_names()
    assert sorted(report.quantized) == sorted(expected)
    assert sorted(quant_linears(student)) == sorted(expected)
    for name in expected:
        module = get(student, name)
        assert isinstance(module, QuantLinear), name
        assert module.in_features == get(teacher, name).in_features
    # lm_head stays a plain Linear and is reported with its reason
    assert type(student.lm_head) is nn.Linear
    assert list(report.excluded) == ["lm_head"]
    assert "lm_head" in report.excluded["lm_head"]
    # embeddings and norms keep their types
    assert type(student.model.embed_tokens) is nn.Embedding
    for (name, module), (t_name, t_module) in zip(student.named_modules(), teacher.named_modules(), strict=True):
        assert name == t_name
        if name not in expected:
            assert type(module) is type(t_module), name
    # parameter counts
    linear_params = sum(get(teacher, n).weight.numel() for n in expected)
    assert report.quantized_params == linear_params
    assert report.total_linear_params == linear_params + teacher.lm_head.weight.numel()


def test_fused_sibling_groups_reported(teacher):
    student, report = build_student(teacher, QuantConfig())
    expected = []
    for i in range(2):
        expected.append([f"model.layers.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")])
        expected.append([f"model.layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj")])
    assert sorted(report.groups) == sorted(expected)
    for i in range(2):
        assert get(student, f"model.layers.{i}.self_attn.o_proj").group is None
        assert get(student, f"model.layers.{i}.mlp.down_proj").group is None


def test_input_dim_not_divisible_by_block_is_left_in_high_precision():
    teacher = tiny_llama(intermediate_size=72)  # down_proj: in_features 72, not a multiple of 16
    student, report = build_student(teacher, QuantConfig())
    down = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    for name in down:
        assert type(get(student, name)) is nn.Linear
        reason = report.excluded[name]
        assert "72" in reason and "16" in reason and "not a multiple" in reason
    assert sorted(report.quantized) == sorted(set(linear_names()) - set(down))
    # gate/up have in_features 64 (fine) and out_features 72: still quantized and grouped
    assert isinstance(get(student, "model.layers.0.mlp.gate_proj"), QuantLinear)
    with torch.no_grad():
        logits = student(**batches(1)[0]).logits
    assert torch.isfinite(logits).all()


def test_custom_exclude_patterns(teacher):
    config = QuantConfig(exclude=("lm_head", "*.o_proj", "model.layers.1.mlp.*"))
    student, report = build_student(teacher, config)
    excluded = {"lm_head", "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj",
                "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"}
    assert set(report.excluded) == excluded
    assert set(report.quantized) == set(linear_names()) - excluded
    for name in excluded:
        assert type(get(student, name)) is nn.Linear
        assert "excluded by pattern" in report.excluded[name]
    assert report.excluded["model.layers.1.mlp.up_proj"] == "excluded by pattern 'model.layers.1.mlp.*'"
    # only layer 0's gate/up remains a complete MLP group
    assert [g for g in report.groups if "mlp" in g[0]] == [["model.layers.0.mlp.gate_proj",
                                                             "model.layers.0.mlp.up_proj"]]


def test_exclude_without_lm_head_quantizes_the_head(teacher):
    student, report = build_student(teacher, QuantConfig(exclude=()))
    assert isinstance(student.lm_head, QuantLinear)
    assert report.excluded == {}


def test_excluding_everything_is_a_config_error(teacher):
    with pytest.raises(ConfigError, match="no Linear layer"):
        build_student(teacher, QuantConfig(exclude=("*",)))


def test_teacher_is_not_modified(teacher):
    types_before = {n: type(m) for n, m in teacher.named_modules()}
    state_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    grad_flags = {n: p.requires_grad for n, p in teacher.named_parameters()}
    student, _ = build_student(teacher, QuantConfig(weight_global="frozen"))
    calibrate(student, batches())
    student.train()
    student(**batches(1)[0]).logits.sum().backward()
    torch.optim.SGD(student.parameters(), lr=0.1).step()
    assert {n: type(m) for n, m in teacher.named_modules()} == types_before
    state_after = teacher.state_dict()
    assert state_after.keys() == state_before.keys()
    for key, value in state_before.items():
        assert torch.equal(state_after[key], value), key
    assert {n: p.requires_grad for n, p in teacher.named_parameters()} == grad_flags
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(isinstance(m, QuantLinear) for m in teacher.modules())
    teacher_ptrs = {p.data_ptr() for p in teacher.parameters()}
    assert not teacher_ptrs & {p.data_ptr() for p in student.parameters()}


# ----------------------------------------------------------------------------------------- global scales


@pytest.mark.parametrize("siblings", [("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))])
def test_fused_siblings_share_weight_global_amax(teacher, siblings):
    block, names = siblings
    student, _ = build_student(teacher, QuantConfig())
    for i in range(2):
        members = [get(student, f"model.layers.{i}.{block}.{n}") for n in names]
        own = [m.weight.detach().abs().amax().float() for m in members]
        assert len({float(a) for a in own}) > 1  # the fixture made them differ
        shared = [m.weight_global_amax() for m in members]
        for amax in shared:
            assert torch.equal(amax, torch.stack(own).amax())


@pytest.mark.parametrize("siblings", [("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))])
def test_fused_siblings_share_input_amax_after_calibration(teacher, siblings):
    block, names = siblings
    student, _ = build_student(teacher, QuantConfig())
    calibrate(student, batches())
    for i in range(2):
        members = [get(student, f"model.layers.{i}.{block}.{n}") for n in names]
        amaxes = {float(m.input_amax) for m in members}
        assert len(amaxes) == 1 and amaxes.pop() > 0


def test_unfused_layer_uses_its_own_weight_amax(teacher):
    student, _ = build_student(teacher, QuantConfig())
    o_proj = get(student, "model.layers.0.self_attn.o_proj")
    assert torch.equal(o_proj.weight_global_amax(), o_proj.weight.detach().abs().amax().float())


def test_calibration_records_max_abs_input(teacher):
    student, _ = build_student(teacher, QuantConfig())
    observed: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            amax = args[0].detach().abs().amax().float()
            observed[name] = torch.maximum(observed.get(name, amax), amax)

        return record

    layers = quant_linears(student)
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        used = calibrate(student, batches(n=3))
    finally:
        for handle in handles:
            handle.remove()
    assert used == 3
    for name, module in layers.items():
        group = module.group
        expected = observed[name] if group is None else torch.stack(
            [observed[n] for n, m in layers.items() if m.group is group]).amax()
        assert torch.equal(module.input_amax, expected), name
        assert module.input_amax > 0


def test_calibration_needs_a_batch(teacher):
    student, _ = build_student(teacher, QuantConfig())
    with pytest.raises(ConfigError, match="at least one batch"):
        calibrate(student, [])


def test_frozen_weight_global_stays_fixed_dynamic_follows(teacher):
    frozen, _ = build_student(teacher, QuantConfig(weight_global="frozen", scheme="w4a16"))
    dynamic, _ = build_student(teacher, QuantConfig(weight_global="dynamic", scheme="w4a16"))
    calibrate(frozen, batches(1))
    calibrate(dynamic, batches(1))
    for student, is_frozen in ((frozen, True), (dynamic, False)):
        for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"):
            layer = get(student, name)
            before = layer.weight_global_amax().clone()
            assert before > 0
            with torch.no_grad():
                layer.weight.mul_(10.0)  # 10x: q_proj now dominates its group (k_proj was scaled 3x)
            after = layer.weight_global_amax()
            if is_frozen:
                assert torch.equal(after, before), name
            else:
                assert torch.equal(after, layer.weight.detach().abs().amax()), name
                assert after > before


# ----------------------------------------------------------------------------------------- forward math


def test_w4a16_quantizes_weights_only(teacher):
    student, _ = build_student(teacher, QuantConfig(scheme="w4a16"))
    calibrate(student, batches(1))
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2))
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.o_proj"):
        layer = get(student, name)
        assert not layer.quantize_input
        w_q = nvfp4.fake_quantize_reference(layer.weight.detach(), layer.weight_global_amax())
        with torch.no_grad():
            assert torch.equal(layer(x), F.linear(x, w_q, layer.bias))
        assert not torch.equal(w_q, layer.weight.detach())  # it really is quantized


def test_w4a4_quantizes_inputs_with_calibrated_amax(teacher):
    student, _ = build_student(teacher, QuantConfig(scheme="w4a4"))
    calibrate(student, batches())
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(3))
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.o_proj"):
        layer = get(student, name)
        assert layer.quantize_input
        group_amax = layer.weight_global_amax()
        if layer.group is not None:
            assert torch.equal(group_amax, torch.stack([m.weight.detach().abs().amax() for m in layer.group.members])
                               .amax())
        w_q = nvfp4.fake_quantize_reference(layer.weight.detach(), group_amax)
        x_q = nvfp4.fake_quantize_reference(x, layer.input_amax)
        with torch.no_grad():
            out = layer(x.clone())
        assert torch.equal(out, F.linear(x_q, w_q, layer.bias))
        assert not torch.equal(out, F.linear(x, w_q, layer.bias))


def test_w4a4_student_output_differs_from_w4a16_and_teacher(teacher):
    batch = batches(1)[0]
    w4a4, _ = build_student(teacher, QuantConfig(scheme="w4a4"))
    w4a16, _ = build_student(teacher, QuantConfig(scheme="w4a16"))
    calibrate(w4a4, batches())
    with torch.no_grad():
        t, a, b = (m(**batch).logits for m in (teacher, w4a4, w4a16))
    assert not torch.equal(a, b) and not torch.equal(a, t) and not torch.equal(b, t)
    # lossy but close: signal-to-quantization-noise floor on the logits
    for out in (a, b):
        sqnr = 10 * torch.log10(t.pow(2).mean() / (out - t).pow(2).mean())
        assert sqnr > 5


def test_weight_cache_invalidated_by_in_place_update(teacher):
    student, _ = build_student(teacher, QuantConfig(scheme="w4a16"))
    student.requires_grad_(False)
    batch = batches(1)[0]
    layer = get(student, "model.layers.0.mlp.down_proj")
    with torch.no_grad():
        first = student(**batch).logits.clone()
        again = student(**batch).logits
        assert torch.equal(first, again)  # the cache gives the same answer
        layer.weight.add_(0.5 * torch.randn_like(layer.weight))
        changed = student(**batch).logits
    assert not torch.equal(first, changed)
    # and the cached weight is the quantization of the new weight
    expected = nvfp4.fake_quantize_reference(layer.weight, layer.weight.abs().amax())
    with torch.no_grad():
        assert torch.equal(layer.quantized_weight(), expected)


def test_weight_cache_invalidated_by_optimizer_step(teacher):
    student, _ = build_student(teacher, QuantConfig(scheme="w4a16"))
    batch = batches(1)[0]
    with torch.no_grad():
        before = student(**batch).logits.clone()
    student(**batch).logits.pow(2).mean().backward()
    torch.optim.AdamW(student.parameters(), lr=1e-2).step()
    with torch.no_grad():
        after = student(**batch).logits
    assert not torch.equal(before, after)


def test_straight_through_gradients_reach_student_weights(teacher):
    student, _ = build_student(teacher, QuantConfig(scheme="w4a4"))
    calibrate(student, batches())
    student.train()
    student(**batches(1)[0]).logits.pow(2).mean().backward()
    for name, layer in quant_linears(student).items():
        assert layer.weight.grad is not None, name
        assert layer.weight.grad.abs().sum() > 0, name


def test_straight_through_weight_gradient_is_exact(teacher):
    student, _ = build_student(teacher, QuantConfig(scheme="w4a16"))
    layer = get(student, "model.layers.0.self_attn.o_proj")
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(4))
    grad_out = torch.randn(7, 64, generator=torch.Generator().manual_seed(5))
    layer(x).backward(grad_out)
    # d/dW of F.linear(x, q(W)) with q's gradient the identity: grad_out^T x
    torch.testing.assert_close(layer.weight.grad, grad_out.T @ x)


@pytest.mark.parametrize("fmt", ["mxfp4", "int4"])
@pytest.mark.parametrize("scheme", ["w4a4", "w4a16"])
def test_other_formats_build_and_run(teacher, fmt, scheme):
    student, report = build_student(teacher, QuantConfig(format=fmt, scheme=scheme))
    assert report.format == fmt and report.scheme == scheme
    if fmt == "mxfp4":  # block 32: every projection (in 64 or 128) qualifies
        assert sorted(report.quantized) == sorted(linear_names())
    else:  # block 128: only down_proj (in 128); the rest (in 64) is reported
        assert sorted(report.quantized) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
        assert "128" in report.excluded["model.layers.0.self_attn.q_proj"]
    for layer in quant_linears(student).values():
        assert layer.format_name == fmt and layer.weight_global_amax() is None
    assert calibrate(student, batches(1)) == 0  # no calibrated global scale in these formats
    batch = batches(1)[0]
    with torch.no_grad():
        out, ref = student(**batch).logits, teacher(**batch).logits
    assert torch.isfinite(out).all() and not torch.equal(out, ref)


def test_int4_on_a_model_with_no_eligible_layer_is_a_config_error():
    teacher = tiny_llama(intermediate_size=72)  # every in_features is 64 or 72: none divides by 128
    with pytest.raises(ConfigError, match="no Linear layer"):
        build_student(teacher, QuantConfig(format="int4"))


# --------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"format": "nvfp5"}, r"unknown format.*nvfp5.*did you mean: nvfp4"),
    ({"format": "fp8"}, r"unknown format.*fp8.*choose from: int4, mxfp4, nvfp4"),
    ({"scheme": "w3a3"}, r"unknown scheme.*w3a3"),
    ({"weight_global": "static"}, r"--weight-global"),
    ({"calib_batches": 0}, r"--calib-batches"),
])
def test_bad_quant_config_raises_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        QuantConfig(**kwargs)


def test_report_summary_mentions_counts(teacher):
    _, report = build_student(teacher, QuantConfig())
    assert isinstance(report, QuantReport)
    text = report.summary()
    assert text.startswith("nvfp4 w4a4: 14 Linear layers quantized")
    assert f"{report.quantized_params:,} of {report.total_linear_params:,}" in text
    assert "4 fused sibling groups" in text
    assert "lm_head (excluded by pattern 'lm_head')" in text
    assert report.to_dict()["quantized"] == report.quantized


def test_report_save_round_trips(teacher, tmp_path):
    import json

    _, report = build_student(teacher, QuantConfig(format="mxfp4", scheme="w4a16"))
    report.save(tmp_path / "quant.json")
    assert json.loads((tmp_path / "quant.json").read_text()) == report.to_dict()


def test_weight_change_through_data_is_seen_without_a_version_bump(teacher):
    """FSDP2 refills parameter storage in place without bumping version counters: nothing may be cached on
    them. A `.data` write keeps `_version` and must still change the quantized weight and the group amax."""
    student, _ = build_student(teacher, QuantConfig(scheme="w4a16"))
    q = get(student, "model.layers.0.self_attn.q_proj")
    version = q.weight._version
    before = q.quantized_weight().detach().clone()
    amax_before = q.group.weight_amax().clone()
    q.weight.data.copy_(q.weight.data * 3.0)
    assert q.weight._version == version
    assert not torch.equal(q.quantized_weight().detach(), before)
    assert q.group.weight_amax() > amax_before


def test_cached_quantized_weights_holds_then_releases(teacher):
    student, _ = build_student(teacher, QuantConfig(scheme="w4a16"))
    layer = get(student, "model.layers.0.mlp.down_proj")
    expected = nvfp4.fake_quantize_reference(layer.weight.detach(), layer.weight.detach().abs().amax())
    with cached_quantized_weights(student):
        held = layer.quantized_weight()
        assert torch.equal(held, expected)
        assert layer.quantized_weight() is held  # computed once
        with cached_quantized_weights(student):  # nested: the outer copy is kept
            assert layer.quantized_weight() is held
        assert layer.quantized_weight() is held
    assert layer._held_weight is None
    with torch.no_grad():
        layer.weight.mul_(2.0)
    assert not torch.equal(layer.quantized_weight().detach(), held)


def test_freeze_scales_writes_the_amax_the_forward_uses(teacher):
    student, _ = build_student(teacher, QuantConfig(scheme="w4a16"))
    freeze_scales(student)
    for layer in quant_linears(student).values():
        assert torch.equal(layer.weight_amax, layer.weight_global_amax())
    q = get(student, "model.layers.0.self_attn.q_proj")
    k = get(student, "model.layers.0.self_attn.k_proj")
    assert torch.equal(q.weight_amax, k.weight_amax)  # siblings share the group's amax


def test_quant_config_of_and_only(teacher):
    student, report = build_student(teacher, QuantConfig(scheme="w4a16"))
    assert quant_config_of(student) == QuantConfig(scheme="w4a16")
    assert quant_config_of(teacher) is None
    subset = report.quantized[:3]
    again = copy.deepcopy(teacher).float()
    rebuilt = quantize_model_(again, QuantConfig(scheme="w4a16"), only=subset)
    assert rebuilt.quantized == subset
    assert sorted(quant_linears(again)) == sorted(subset)


def test_frozen_weight_scales_are_set_before_the_calibration_forward(teacher):
    """W4A4 with frozen weight scales: the calibration forward already quantizes weights with their real
    amaxes, so every layer (o_proj and down_proj included, fed by quantized layers) gets a positive amax."""
    student, _ = build_student(teacher, QuantConfig(weight_global="frozen"))
    calibrate(student, batches())
    for name, layer in quant_linears(student).items():
        assert float(layer.weight_amax) > 0 and float(layer.input_amax) > 0, name


def is_pow2_form(amax: torch.Tensor) -> bool:
    """amax = 2688 * 2^-k: the global scale fl32(2688 / amax) is then exactly a power of two."""
    g = torch.tensor(nvfp4.GLOBAL_RANGE, dtype=torch.float32) / amax.float()
    return bool(torch.frexp(g)[0].eq(0.5).all())


def test_pow2_global_scales_round_every_amax_up_to_a_power_of_two_form(tiny_model):
    batches = [{"input_ids": torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(i))}
               for i in range(2)]
    exact, _ = build_student(tiny_model, QuantConfig(weight_global="dynamic"))
    pow2, _ = build_student(tiny_model, QuantConfig(global_scale="pow2"))
    frozen, _ = build_student(tiny_model, QuantConfig(global_scale="pow2", weight_global="frozen"))
    for student in (exact, pow2, frozen):
        calibrate(student, batches)
    for name, m in quant_linears(pow2).items():
        e = quant_linears(exact)[name]
        for a, b in ((m.input_amax, e.input_amax), (m.weight_global_amax(), e.weight_global_amax())):
            assert is_pow2_form(a) and a >= b and a / 2 < b, name  # the smallest such amax >= the exact one
        assert not is_pow2_form(e.weight_global_amax()), name
        assert torch.equal(quant_linears(frozen)[name].weight_amax, m.weight_global_amax()), name


def test_global_scale_and_high_precision_choices_are_checked():
    with pytest.raises(ConfigError, match=r"--global-scale.*'pow3'.*did you mean: pow2"):
        QuantConfig(global_scale="pow3")
    with pytest.raises(ConfigError, match="--global-scale pow2 needs a format with global scales, not mxfp4"):
        QuantConfig(format="mxfp4", global_scale="pow2")
    with pytest.raises(ConfigError, match=r"--high-precision.*choose from: frozen, train"):
        QuantConfig(high_precision="fp32")
