"""Shared by the tests of ckaqad/export/: a tiny calibrated NVFP4 student, its logits, an export's tensors and
the independent reference numbers the exports are checked against."""

from __future__ import annotations

import copy
import json

import safetensors.torch
import torch
import transformers

from ckaqad.quant.apply import calibrate, quant_linears, quantize_model_
from ckaqad.quant.linear import QuantConfig

VOCAB = 300
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def make_student(tie: bool = False, scheme: str = "w4a4", fmt: str = "nvfp4", seed: int = 0,
                 weight_global: str = "dynamic", global_scale: str = "exact"):
    """Tiny random Llama student, calibrated on two random batches.

    The teacher is rounded to bf16 (a deployed teacher is bf16, so the student's unquantized tensors survive
    the bf16 export unchanged); the quantized weights then get a float32 perturbation, as QAD steps give
    them, so the export quantizes genuine float32 master weights.
    """
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie,
        bos_token_id=256, eos_token_id=257, pad_token_id=258)
    torch.manual_seed(seed)
    teacher = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # parameters only: inv_freq stays float32, as from_pretrained keeps it
        for p in teacher.parameters():
            p.copy_(p.bfloat16().float())
    student = copy.deepcopy(teacher).float()
    quantize_model_(student, QuantConfig(format=fmt, scheme=scheme, weight_global=weight_global,
                                         global_scale=global_scale))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in quant_linears(student).values():
            m.weight.add_(1e-4 * torch.randn(m.weight.shape, generator=generator))
    batches = [{"input_ids": torch.randint(0, VOCAB, (2, 16), generator=generator)} for _ in range(2)]
    calibrate(student, batches)
    return student.eval()


def logits(model, seed: int = 7) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def read_tensors(export_dir) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(export_dir.glob("*.safetensors")):
        tensors.update(safetensors.torch.load_file(str(path)))
    return tensors


def reciprocal(amax: torch.Tensor) -> torch.Tensor:
    """`2688/amax` correctly rounded to float32, computed independently of the exporter: in float64, whose
    53 bits make the second rounding harmless for a quotient of float32s. (Not `2688.0 / amax`: torch
    evaluates a scalar over a tensor as 2688 · (1/amax), rounding twice.)"""
    return (2688.0 / amax.detach().double()).float().reshape(amax.shape or (1,))


def within_one_ulp(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Every element of `a` equals the element of `b` or is its float neighbour (same dtype)."""
    return bool(((a == b) | (torch.nextafter(a, b) == b)).all())


# compressed-tensors dequantizes `q · fl(s8 / G)` with `G = fl(2688/amax)`, the student `q · fl(s8 · g)` with
# `g = fl(amax/2688)`: six float32 roundings apart (G, g, the two scale products, the two products with q),
# so the values agree to a relative 6·2⁻²⁴ (≤ 6 ulps; 4 seen in 200k random cases, 4% beyond one ulp).
RECIPROCAL_RTOL = 6 * 2.0 ** -24


def within_reciprocal_rounding(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a - b).abs() <= RECIPROCAL_RTOL * b.abs()).all()) and torch.equal(a == 0, b == 0)


def ct_scheme(export_dir):
    from compressed_tensors.quantization import QuantizationConfig

    config = json.loads((export_dir / "config.json").read_text())["quantization_config"]
    return QuantizationConfig.model_validate(config).config_groups["group_0"]
