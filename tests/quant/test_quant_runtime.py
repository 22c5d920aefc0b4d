"""tests for QuantConfig(arithmetic="runtime"): a student that computes what compressed-tensors' served forward
computes. Its export, loaded back by ckaqad in runtime arithmetic and moved to bf16, gives the logits
transformers gives for the same export, bit for bit (W4A4 and W4A16); the reference arithmetic does not."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from ckaqad.errors import ConfigError
from ckaqad.export.reader import load_export, to_served_dtype
from ckaqad.export.writer import export_student
from ckaqad.formats import nvfp4
from ckaqad.formats.nvfp4_runtime import runtime_fake_quantize
from ckaqad.quant.apply import cached_quantized_weights, calibrate, quant_linears, quantize_model_
from ckaqad.quant.linear import QuantConfig

VOCAB = 300


def make_student(scheme: str, arithmetic: str = "runtime", seed: int = 0):
    """A tiny random Llama student (bf16-exact teacher, float32-perturbed quantized weights), calibrated."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    torch.manual_seed(seed)
    teacher = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(p.bfloat16().float())
    student = copy.deepcopy(teacher).float()
    quantize_model_(student, QuantConfig(scheme=scheme, arithmetic=arithmetic))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in quant_linears(student).values():
            m.weight.add_(1e-4 * torch.randn(m.weight.shape, generator=generator))
    calibrate(student, [{"input_ids": torch.randint(0, VOCAB, (2, 16), generator=generator)} for _ in range(2)])
    return student.eval()


def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=input_ids()).logits


@pytest.mark.parametrize("scheme", ["w4a4", "w4a16"])
def test_runtime_arithmetic_matches_transformers_bit_for_bit(tmp_path, tiny_tokenizer, scheme):
    out = tmp_path / scheme
    export_student(make_student(scheme), tiny_tokenizer, out)
    served = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16).eval()
    expected = logits(served)

    ours, _ = load_export(out, arithmetic="runtime")
    ours = to_served_dtype(ours)  # .to(bf16), but rotary inv_freq stays float32 as from_pretrained keeps it
    layers = quant_linears(ours)
    assert all(m.input_amax.dtype == m.weight_amax.dtype == torch.float32 for m in layers.values())
    got = logits(ours)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)
    with cached_quantized_weights(ours):  # the held weight is the runtime one
        assert torch.equal(logits(ours), expected)
        name, layer = next(iter(layers.items()))
        assert torch.equal(layer._held_weight.to(torch.bfloat16), served.get_submodule(name).weight)

    if scheme == "w4a4":
        # The harness can fail: the same bf16 model with the reference arithmetic differs (bf16 amax/6 moves
        # some activation block scales).
        for m in layers.values():
            m.arithmetic = "reference"
        assert not torch.equal(logits(ours), expected)


def test_runtime_gradients_reach_the_float32_master_weights():
    student = make_student("w4a4").train()
    layers = quant_linears(student)
    student(input_ids=input_ids()).logits.float().square().mean().backward()
    for m in layers.values():
        assert m.weight.dtype == torch.float32 and m.weight.grad is not None
        assert m.weight.grad.dtype == torch.float32 and m.weight.grad.abs().sum() > 0
    # straight-through: the weight gradient is the gradient w.r.t. the runtime weight, passed unchanged
    layer = next(iter(layers.values()))
    x = torch.randn(3, layer.in_features, requires_grad=True)
    layer.weight.grad = None
    layer(x).sum().backward()
    expected = torch.ones(3, layer.out_features).T @ layer.quantized_input(x.detach())
    assert torch.allclose(layer.weight.grad, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(layer.quantized_weight().bfloat16().float(), layer.quantized_weight())  # bf16 values
    assert torch.equal(x.grad, torch.ones(3, layer.out_features) @ layer.quantized_weight().detach().float())


def test_runtime_input_uses_the_exported_global_scale():
    layer = next(iter(quant_linears(make_student("w4a4")).values()))
    x = torch.randn(5, layer.in_features).bfloat16()
    with torch.no_grad():
        got = layer.quantized_input(x)
    G = torch.tensor(2688.0, dtype=torch.float32) / layer.input_amax
    assert got.dtype == torch.bfloat16 and torch.equal(got, runtime_fake_quantize(x, G))
    assert torch.equal(nvfp4.reciprocal_global_scale(layer.input_amax), G)


def test_runtime_arithmetic_config_errors():
    with pytest.raises(ConfigError, match="--arithmetic"):
        QuantConfig(format="mxfp4", arithmetic="runtime")
    with pytest.raises(ConfigError, match="--arithmetic"):
        QuantConfig(arithmetic="served")
    assert QuantConfig().arithmetic == "reference"
