"""tests for quant/experts.py: fused 3-D experts of transformers 5 MoE families fake-quantized per expert.

Tiny random models from transformers' config classes (tests/moe_helpers.py). The properties: every expert
tensor is quantized (coverage); gate and up of one expert share a global scale; an expert no calibration
token reached still has finite scales; the per-expert W4A4 fake quant equals compressed-tensors' functions
bit for bit; grouped_mm and eager compute the same fake-quantized output; gradients reach the fp32 masters.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from moe_helpers import FAMILIES, MOE_FAMILIES, make_tiny_moe

from ckaqad.errors import ConfigError
from ckaqad.formats import nvfp4
from ckaqad.formats.nvfp4_runtime import pow2_global_amax
from ckaqad.models.arch import checkpoint_expert_names, expert_modules, experts_layout
from ckaqad.quant.apply import (
    cached_quantized_weights,
    calibrate,
    quant_experts,
    quantize_model_,
)
from ckaqad.quant.experts import QuantExperts, fake_quantize_expert_weights
from ckaqad.quant.linear import QuantConfig
from ckaqad.students.spec import build_ptq_student, high_precision_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


def ids(seed: int = 0, batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def quantized(family: str, scheme: str = "w4a4", **kwargs):
    model = make_tiny_moe(family)
    report = quantize_model_(model, QuantConfig(scheme=scheme, **kwargs))
    calibrate(model, [{"input_ids": ids(1)}])
    return model, report


@pytest.fixture(scope="module")
def students():
    """Every family quantized W4A4 and calibrated once (tests that do not change them share them)."""
    return {family: quantized(family) for family in FAMILIES}


# ------------------------------------------------------------------------------------------------ coverage


@pytest.mark.parametrize("family", FAMILIES)
def test_every_weight_outside_declared_exclusions_is_quantized(students, family):
    model, report = students[family]
    assert report.share_outside_declared >= 0.99
    assert report.share_quantized >= 0.97  # routers, norms, biases, conv1d: declared and small
    assert set(report.quantized_experts) == set(expert_modules(model))
    for name, module in expert_modules(model).items():
        assert isinstance(module, QuantExperts)
        for param in module.layout.fused:
            assert report.coverage[f"{name}.{param}"] == "quantized (experts)"
    kept = {reason for reason in report.coverage.values() if not reason.startswith("quantized")}
    assert "no rule" not in kept
    assert "coverage:" in report.summary()


def test_the_issue_families_were_mostly_unquantized_before():
    # What main quantized: the Linear layers only (the experts are 3-D parameters).
    model = make_tiny_moe("qwen3_moe")
    report = quantize_model_(model, QuantConfig(scheme="w4a16", exclude=("lm_head", "*.router", "*.gate",
                                                                         "*.experts")))
    assert report.share_quantized < 0.25
    assert "*.experts" in report.excluded["model.layers.0.mlp.experts"]


def test_a_block_weight_without_a_rule_is_an_error_or_a_listed_warning():
    model = make_tiny_moe("qwen3")
    model.model.layers[1].mlp.register_parameter("mystery", torch.nn.Parameter(torch.ones(4, 4)))
    with pytest.raises(ConfigError, match=r"model.layers.1.mlp.mystery \(4, 4\).*--allow-unquantized"):
        quantize_model_(copy.deepcopy(model), QuantConfig(scheme="w4a16"))
    with pytest.warns(UserWarning, match="mystery"):
        report = quantize_model_(model, QuantConfig(scheme="w4a16", allow_unquantized=True))
    assert report.coverage["model.layers.1.mlp.mystery"] == "no rule"


def test_nemotron_nano_recipe_keeps_attention_and_the_mamba_block_before_it():
    model = make_tiny_moe("nemotron_h")  # blocks: mamba, moe, attention, moe
    report = quantize_model_(model, QuantConfig(scheme="w4a16", recipe="nemotron-nano-nvfp4"))
    kept = {n for n, why in report.excluded.items() if why.startswith("recipe nemotron-nano-nvfp4")}
    assert kept == {f"model.layers.2.mixer.{p}_proj" for p in "qkvo"}  # block 1 (moe) precedes the attention
    model = make_tiny_moe("nemotron_h")
    model.model.layers[1], model.model.layers[0] = model.model.layers[0], model.model.layers[1]  # moe, mamba, *
    report = quantize_model_(model, QuantConfig(scheme="w4a16", recipe="nemotron-nano-nvfp4"))
    kept = {n for n, why in report.excluded.items() if why.startswith("recipe")}
    assert kept == {f"model.layers.2.mixer.{p}_proj" for p in "qkvo"} | \
        {"model.layers.1.mixer.in_proj", "model.layers.1.mixer.out_proj"}
    assert report.share_outside_declared >= 0.99
    with pytest.raises(ConfigError, match="recipe"):
        QuantConfig(recipe="nemotron-nano")


# ------------------------------------------------------------------------------------------------ scales


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_gate_and_up_of_an_expert_share_one_global_scale_and_experts_do_not(students, family):
    model, _ = students[family]
    for module in quant_experts(model).values():
        amaxes = module.weight_global_amaxes()
        weights = module.canonical_weights()
        if "gate_proj" in amaxes:
            assert torch.equal(amaxes["gate_proj"], amaxes["up_proj"])
            joint = torch.maximum(weights["gate_proj"].abs().amax((-2, -1)), weights["up_proj"].abs().amax((-2, -1)))
            assert torch.equal(amaxes["gate_proj"], joint)
        assert torch.equal(amaxes["down_proj"], weights["down_proj"].abs().amax((-2, -1)))
        assert len(set(amaxes["down_proj"].tolist())) == amaxes["down_proj"].numel()  # per expert
        inputs = module.input_amaxes()
        assert inputs["up_proj"].dim() == 0 and bool(inputs["up_proj"] > 0) and bool(inputs["down_proj"] > 0)


def test_fake_quantized_experts_are_each_experts_nvfp4_with_its_own_global_scale(students):
    model, _ = students["gpt_oss"]  # transposed, interleaved gate/up, biases
    module = next(iter(quant_experts(model).values()))
    stored = module.gate_up_proj  # the property: fake-quantized, stored layout [E, H, 2I]
    assert stored.shape == module.master("gate_up_proj").shape
    canon = module.layout.canonical("gate_up_proj", stored)
    amax = module.weight_global_amax("gate_up_proj")
    master = module.layout.canonical("gate_up_proj", module.master("gate_up_proj").detach())
    for e in range(canon.shape[0]):
        assert torch.equal(canon[e], nvfp4.quantize(master[e], amax[e]).dequantize())
    split = module.layout.split("gate_up_proj", stored.detach())
    assert torch.equal(split["gate_proj"], canon[:, 0::2]) and torch.equal(split["up_proj"], canon[:, 1::2])


@pytest.mark.parametrize("kwargs", [{"global_scale": "pow2"}, {"weight_global": "frozen"}])
def test_pow2_and_frozen_global_scales_hold_for_experts(kwargs):
    model, _ = quantized("qwen3_moe", scheme="w4a4", **kwargs)
    module = next(iter(quant_experts(model).values()))
    for param in module.layout.fused:
        amax = module.weight_global_amax(param)
        if "global_scale" in kwargs:
            assert torch.equal(amax, pow2_global_amax(amax))
            assert torch.equal(module._buffers[f"{param}_input_amax"],
                               pow2_global_amax(module._buffers[f"{param}_input_amax"]))
        else:
            with torch.no_grad():
                module.master(param).mul_(2)  # frozen: the global scale does not follow the weights
            assert torch.equal(module.weight_global_amax(param), amax)


def test_an_expert_no_calibration_token_reached_gets_finite_sensible_scales():
    model = make_tiny_moe("qwen3_moe")
    quantize_model_(model, QuantConfig(scheme="w4a4"))
    module = model.model.layers[0].mlp.experts
    # The router never picks expert 0: its choices are moved to expert 1 before the experts run.
    hook = module.register_forward_pre_hook(lambda m, args: (args[0], args[1].clamp(min=1), args[2]))
    calibrate(model, [{"input_ids": ids(2)}])
    hook.remove()
    assert module.calib_tokens[0] == 0 and module.calib_tokens.sum() == 2 * 24 * 2
    for param in module.layout.fused:
        weight_amax = module.weight_global_amax(param)
        assert torch.isfinite(weight_amax).all() and bool((weight_amax > 0).all())
        input_amax = module._buffers[f"{param}_input_amax"]
        assert torch.isfinite(nvfp4.reciprocal_global_scale(input_amax)) and bool(input_amax > 0)
    # Routed to after calibration, expert 0 computes something close to its unquantized output.
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3)) * 0.5
    index, weights = torch.zeros(5, 2, dtype=torch.long), torch.tensor([[1.0, 0.0]] * 5)
    out = module(x, index, weights)
    reference = copy.deepcopy(module)
    reference.quant_config = QuantConfig(scheme="w4a16", format="nvfp4")
    exact = torch.nn.functional.linear(x, reference.layout.canonical("gate_up_proj", module.master("gate_up_proj"))[0])
    gate, up = exact.chunk(2, -1)
    exact = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, module.master("down_proj")[0])
    sqnr = 10 * torch.log10(exact.square().sum() / (out - exact).square().sum())
    assert torch.isfinite(out).all() and sqnr > 10


# ------------------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_grouped_mm_batched_mm_and_eager_give_the_same_fake_quantized_output(students, family):
    model, _ = students[family]
    outputs = {}
    with torch.no_grad():
        for implementation in ("grouped_mm", "eager", "batched_mm"):
            model.config._experts_implementation = implementation
            outputs[implementation] = model(input_ids=ids(5)).logits
    model.config._experts_implementation = "grouped_mm"
    assert torch.equal(outputs["grouped_mm"], outputs["eager"])
    torch.testing.assert_close(outputs["batched_mm"], outputs["eager"], rtol=1e-5, atol=1e-5)
    teacher = make_tiny_moe(family)
    with torch.no_grad():
        assert not torch.allclose(teacher(input_ids=ids(5)).logits, outputs["eager"], atol=1e-3)


def test_hold_quantized_weight_gives_the_same_output(students):
    model, _ = students["mixtral"]
    with torch.no_grad():
        live = model(input_ids=ids(6)).logits
        with cached_quantized_weights(model):
            assert all(m._held is not None for m in quant_experts(model).values())
            held = model(input_ids=ids(6)).logits
    assert torch.equal(live, held)
    assert all(m._held is None for m in quant_experts(model).values())


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "nemotron_h"])
def test_straight_through_gradients_reach_the_fp32_masters_and_frozen_keeps_them_trainable(family):
    teacher = make_tiny_moe(family)
    student, _ = build_ptq_student(teacher, QuantConfig(scheme="w4a16"), None)
    experts = quant_experts(student)
    masters = {id(m.master(p)) for m in experts.values() for p in m.layout.fused}
    assert not masters & {id(p) for p in high_precision_parameters(student)}
    before = {n: m.master(p).detach().clone() for n, m in experts.items() for p in m.layout.fused}
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    loss = student(input_ids=ids(7), labels=ids(7)).loss
    loss.backward()
    optimizer.step()
    for name, module in experts.items():
        for param in module.layout.fused:
            assert module.master(param).requires_grad and module.master(param).dtype == torch.float32
            assert not torch.equal(module.master(param).detach(), before[name])


def test_fake_quantize_expert_weights_gradient_is_straight_through():
    w = torch.randn(3, 8, 32, requires_grad=True)
    amax = w.detach().abs().amax((-2, -1))
    grad = torch.randn(3, 8, 32)
    fake_quantize_expert_weights(w, amax, QuantConfig()).backward(grad)
    assert torch.equal(w.grad, grad)


# ----------------------------------------------------------------------------- W4A4 vs compressed-tensors


def test_per_expert_w4a4_runtime_fake_quant_is_compressed_tensors_bit_for_bit():
    from compressed_tensors.compressors.nvfp4 import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    scheme = preset_name_to_scheme("NVFP4", ["Linear"])

    class Holder(torch.nn.Module):  # what forward_quantize reads off a decompressed Linear
        def __init__(self, G):
            super().__init__()
            self.input_global_scale = torch.nn.Parameter(G.reshape(1), requires_grad=False)
            self.quantization_status = QuantizationStatus.DECOMPRESSED

    model, _ = quantized("nemotron_h", arithmetic="runtime")
    model.to(torch.bfloat16)
    module = next(iter(quant_experts(model).values()))
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(8)).bfloat16()
    weights, amaxes = module.canonical_weights(), module.weight_global_amaxes()
    served = {param: module.layout.canonical(param, getattr(module, param)) for param in module.layout.fused}
    for proj, param in (("up_proj", "up_proj"), ("down_proj", "down_proj")):
        for e in range(weights[proj].shape[0]):
            q = nvfp4.quantize(weights[proj][e].float(), amaxes[proj][e])
            state = {"weight_packed": nvfp4.pack(q.codes), "weight_scale": q.block_scales,
                     "weight_global_scale": nvfp4.reciprocal_global_scale(amaxes[proj][e]).reshape(1)}
            expected = NVFP4PackedCompressor.decompress(state, scheme)["weight"]
            assert torch.equal(served[param][e].view(torch.int16), expected.view(torch.int16))
        G = nvfp4.reciprocal_global_scale(module.input_amaxes()[proj])
        act = x if proj == "up_proj" else torch.relu(x).square()
        expected = forward_quantize(Holder(G), act, "input", scheme.input_activations)
        assert torch.equal(module.quantized_input(param, act).view(torch.int16), expected.view(torch.int16))


# ------------------------------------------------------------------------------------------------ layouts, names


def test_layout_split_and_merge_round_trip_and_de_interleave():
    module = make_tiny_moe("gpt_oss").model.layers[0].mlp.experts
    layout = experts_layout(module)
    assert layout.transposed and layout.interleaved and layout.biases == {
        "gate_up_proj": "gate_up_proj_bias", "down_proj": "down_proj_bias"}
    stored = module.gate_up_proj.detach()
    parts = layout.split("gate_up_proj", stored)
    assert torch.equal(parts["gate_proj"], stored.transpose(-2, -1)[:, 0::2])
    assert torch.equal(layout.merge("gate_up_proj", parts), stored)
    bias = module.gate_up_proj_bias.detach()
    assert torch.equal(layout.merge("gate_up_proj", layout.split("gate_up_proj", bias)), bias)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "nemotron_h", "gpt_oss"])
def test_checkpoint_expert_names_are_what_save_pretrained_writes(family, tmp_path):
    from safetensors import safe_open

    model = make_tiny_moe(family)
    name = list(expert_modules(model))[-1]
    names = checkpoint_expert_names(model, name)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    if family == "gpt_oss":
        assert names is None and f"{name}.gate_up_proj" in saved  # kept fused by save_pretrained
        return
    canonical = experts_layout(model.get_submodule(name))
    module = model.get_submodule(name)
    per_proj = {p: w for param in canonical.fused for p, w in canonical.split(param, module._parameters[param]).items()}
    assert len(names) == 8 * len(per_proj)
    for (e, proj), key in names.items():
        assert torch.equal(saved[key], per_proj[proj][e])


def test_report_json_lists_calibration_tokens(students, tmp_path):
    teacher = make_tiny_moe("mixtral")
    from ckaqad.data.blocks import TokenBlocks

    blocks = TokenBlocks(train=ids(9, batch=8, length=16), heldout=ids(10, batch=2, length=16), source="test")
    _, report = build_ptq_student(teacher, QuantConfig(calib_batches=1, calib_batch_size=4), blocks)
    assert sorted(report.calibration_tokens) == sorted(expert_modules(teacher))
    assert all(sum(t) == 4 * 16 * 2 for t in report.calibration_tokens.values())
    report.save(tmp_path / "q.json")
    assert json.loads((tmp_path / "q.json").read_text())["calibration_tokens"] == report.calibration_tokens
    assert "calibration tokens per expert" in report.summary()


def test_mamba_mixers_of_a_quantized_student_never_take_the_fused_kernel_that_reads_out_proj_weight(monkeypatch):
    from transformers.models.nemotron_h import modeling_nemotron_h

    calls = []

    def fused(*args, **kwargs):  # stands in for mamba-ssm's kernel on GPU: it would read outproj_weight itself
        calls.append(kwargs["outproj_weight"])
        return None

    monkeypatch.setattr(modeling_nemotron_h, "mamba2_split_conv1d_scan_combined", fused)
    model = make_tiny_moe("nemotron_h").train()
    model(input_ids=ids(11), use_cache=False)
    assert len(calls) == 1  # the unquantized model in training mode takes the fused path
    quantize_model_(model, QuantConfig(scheme="w4a16"))
    mixer = model.model.layers[0].mixer
    seen = []
    mixer.out_proj.register_forward_hook(lambda m, a, o: seen.append(o))
    model(input_ids=ids(11), use_cache=False)
    assert len(calls) == 1 and len(seen) == 1  # the quantized out_proj ran as a module
    assert model.training and mixer.training  # the mixer is back in training mode afterwards
