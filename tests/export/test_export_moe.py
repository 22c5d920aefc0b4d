"""tests for the MoE part of ckaqad/export: per-expert NVFP4 tensors under the names vLLM's MoE loaders read,
the round trip through load_export (bit-exact), `verify_export` on every expert (compressed-tensors'
decompressor), and transformers 5.25's reload of the experts (`reader.repair_served_experts`)."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from ckaqad.export.reader import inspect_export, load_export, load_served, read_tensors
from ckaqad.export.verify import verify_export
from ckaqad.export.writer import export_student
from ckaqad.models.arch import expert_modules
from ckaqad.quant.apply import calibrate, quant_experts, quantize_model_
from ckaqad.quant.linear import QuantConfig
from tests.conftest import make_tiny_tokenizer
from tests.moe_helpers import MOE_FAMILIES as FAMILIES
from tests.moe_helpers import make_tiny_moe

# The per-expert module names vLLM's loaders stack into w13 / w2 (what each family's save_pretrained writes;
# gpt_oss: llm-compressor's spelling, since save_pretrained keeps its experts fused).
EXPERT_NAMES = {
    "qwen3_moe": r"model\.layers\.\d+\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)",
    "mixtral": r"model\.layers\.\d+\.block_sparse_moe\.experts\.(\d+)\.(w1|w3|w2)",
    "gpt_oss": r"model\.layers\.\d+\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)",
    "deepseek_v3": r"model\.layers\.\d+\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)",
    "nemotron_h": r"backbone\.layers\.\d+\.mixer\.experts\.(\d+)\.(up_proj|down_proj)",
}
PROJECTIONS = {"mixtral": 3, "nemotron_h": 2}


def student_of(family: str, scheme: str = "w4a4"):
    teacher = make_tiny_moe(family)
    with torch.no_grad():  # a deployed teacher is bf16: its unquantized tensors survive the bf16 export
        for p in teacher.parameters():
            p.copy_(p.bfloat16().float())
    student = copy.deepcopy(teacher)
    quantize_model_(student, QuantConfig(scheme=scheme))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # float32 masters, as QAD steps leave them
        for m in quant_experts(student).values():
            for param in m.layout.fused:
                m.master(param).add_(1e-4 * torch.randn(m.master(param).shape, generator=g))
    calibrate(student, [{"input_ids": torch.randint(0, 259, (2, 16), generator=g)} for _ in range(2)])
    return student.eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("layout", ["compressed-tensors", "modelopt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_export_names_config_and_bit_exact_round_trip(tmp_path, family, layout):
    student = student_of(family)
    export_student(student, make_tiny_tokenizer(), tmp_path / "x", layout=layout)
    info = inspect_export(tmp_path / "x")
    tensors = read_tensors(info.weight_files)
    names = info.layout.names
    experts = set(expert_modules(student))
    # Nothing fused and no scale buffer reaches the checkpoint; every expert is there, per projection.
    fused = r"\.experts\.(gate_up_proj|up_proj|down_proj)(_bias)?$|_amax|calib_tokens"
    assert not [k for k in tensors if re.search(fused, k)]
    found = {}
    for key in tensors:
        match = re.fullmatch(EXPERT_NAMES[family] + r"\.(\w+)", key)
        if match:
            found.setdefault(match.group(3), set()).add((match.group(1), match.group(2)))
    per_module = 8 * PROJECTIONS.get(family, 3)
    assert set(found) >= set(names.of(True)) and all(len(v) == per_module for k, v in found.items()
                                                      if k in names.of(True))
    assert len([k for k in tensors if k.endswith(f".{names.block_scales}") and re.search(EXPERT_NAMES[family], k)]) \
        == per_module * len(experts)
    if family == "gpt_oss":  # biases go with their expert's projection
        assert found.get("bias") and len(found["bias"]) == per_module
    # gate and up of an expert share the weight global scale (vLLM fuses them into w13).
    ends = (f"gate_proj.{names.weight_global}", f"w1.{names.weight_global}")
    gates = [k for k in tensors if re.search(EXPERT_NAMES[family], k) and k.endswith(ends)]
    assert gates or family == "nemotron_h"
    for key in gates:
        up = key.replace("gate_proj.", "up_proj.").replace(".w1.", ".w3.")
        assert torch.equal(tensors[key], tensors[up])
    # The config says what is kept: the head and every router; `Linear` targets cover the rest.
    config = info.config["quantization_config"]
    ignore = config["ignore"]
    routers = [k.removesuffix(".weight") for k in tensors if re.search(r"\.(gate|router)\.weight$", k)]
    assert set(ignore) == {"lm_head", *routers} and routers
    back, _ = load_export(tmp_path / "x")
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids()).logits, student(input_ids=ids()).logits)


@pytest.mark.parametrize("family", ["qwen3_moe", "nemotron_h"])
def test_verify_covers_every_expert_through_compressed_tensors(tmp_path, family):
    student = student_of(family)
    export_student(student, make_tiny_tokenizer(), tmp_path / "x")
    check = verify_export(tmp_path / "x", student)
    experts = len(quant_experts(student))
    assert check["expert_projections"] == experts * 8 * PROJECTIONS.get(family, 3)
    assert check["expert_load_bit_exact_modules"] == experts
    assert check["runtime_kl"]["kl_mean"] < 1e-2
    # A damaged expert is caught: flip one expert's codes in the file.
    tensors = read_tensors(inspect_export(tmp_path / "x").weight_files)
    victim = next(k for k in tensors if re.search(r"experts\.3\.down_proj\.weight_packed$", k))
    import safetensors.torch

    tensors[victim] = tensors[victim] ^ 0x11
    safetensors.torch.save_file(tensors, str(tmp_path / "x" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(Exception, match="codes differ|differ"):
        verify_export(tmp_path / "x", student)


def test_transformers_reload_needs_the_repair_and_then_serves_the_students_experts(tmp_path, monkeypatch):
    """transformers 5.25 dequantizes NVFP4 experts without weight_global_scale (huggingface/transformers#48371):
    the plain load differs by ~2688/amax; `load_served` repairs it to the student's quantized experts in bf16.
    If this test's first assertion fails, transformers fixed the bug: drop the repair's warning."""
    from ckaqad.export import reader

    student = student_of("qwen3_moe", scheme="w4a16")
    export_student(student, make_tiny_tokenizer(), tmp_path / "x")
    monkeypatch.setattr(reader, "repair_served_experts", lambda *a: 0)
    raw, _ = load_served(tmp_path / "x")
    monkeypatch.undo()
    served, _ = load_served(tmp_path / "x")
    name = next(iter(quant_experts(student)))
    want = student.get_submodule(name).quantized_weight("down_proj").detach().bfloat16()
    assert not torch.equal(raw.get_submodule(name).down_proj, want)
    assert torch.equal(served.get_submodule(name).down_proj, want)
