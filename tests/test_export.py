"""tests for ckaqad/export.py: deployable NVFP4 checkpoints, read back with compressed-tensors' own reader."""

from __future__ import annotations

import json
import os
import stat

import pytest
import safetensors.torch
import torch
import transformers

from ckaqad import __version__, export
from ckaqad.errors import ConfigError, ExportError
from ckaqad.formats import nvfp4
from ckaqad.quantize import QuantConfig, build_student, calibrate, quant_linears

VOCAB = 300
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def make_student(tie: bool = False, scheme: str = "w4a4", fmt: str = "nvfp4", seed: int = 0):
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
    student, _ = build_student(teacher, QuantConfig(format=fmt, scheme=scheme))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in quant_linears(student).values():
            m.weight.add_(1e-4 * torch.randn(m.weight.shape, generator=generator))
    batches = [{"input_ids": torch.randint(0, VOCAB, (2, 16), generator=generator)} for _ in range(2)]
    calibrate(student, batches)
    return student


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


@pytest.fixture
def w4a4_export(tmp_path, tiny_tokenizer):
    student = make_student()
    out = tmp_path / "ct"
    summary = export.export_student(student, tiny_tokenizer, out)
    return student, out, summary


# ------------------------------------------------------------------------- compressed-tensors' reader


@pytest.mark.parametrize("scheme", ["w4a4", "w4a16"])
def test_compressed_tensors_reader_gets_the_students_codes_scales_and_values(tmp_path, tiny_tokenizer,
                                                                             scheme):
    from compressed_tensors.compressors.nvfp4 import NVFP4PackedCompressor, unpack_fp4_from_uint8
    from compressed_tensors.quantization import dequantize

    student = make_student(scheme=scheme)
    out = tmp_path / "ct"
    export.export_student(student, tiny_tokenizer, out)
    tensors, scheme_ct = read_tensors(out), ct_scheme(out)
    for name, m in quant_linears(student).items():
        ref = nvfp4.quantize(m.weight.detach().float(), m.weight_global_amax())
        packed, scale, global_scale = (tensors[f"{name}.{k}"] for k in
                                       ("weight_packed", "weight_scale", "weight_global_scale"))
        assert packed.dtype == torch.uint8 and tuple(packed.shape) == (m.out_features, m.in_features // 2)
        assert scale.dtype == torch.float8_e4m3fn
        assert tuple(scale.shape) == (m.out_features, m.in_features // 16)
        assert global_scale.dtype == torch.float32 and tuple(global_scale.shape) == (1,)
        # Codes, through compressed-tensors' unpacker: values and sign bits (code 8 is -0).
        values = unpack_fp4_from_uint8(packed, m.out_features, m.in_features, dtype=torch.float32)
        ours = nvfp4.e2m1_grid()[ref.codes.long()]
        assert torch.equal(values, ours) and torch.equal(torch.signbit(values), torch.signbit(ours))
        assert torch.equal(scale.view(torch.uint8), ref.block_scales.view(torch.uint8))
        assert torch.equal(global_scale, reciprocal(m.weight_global_amax()))
        # Values: compressed-tensors divides by the reciprocal global scale (see RECIPROCAL_RTOL).
        dense = dequantize(x_q=values, scale=scale.float(), args=scheme_ct.weights, global_scale=global_scale,
                           dtype=torch.float32)
        student_weight = m.quantized_weight().detach()
        assert within_reciprocal_rounding(dense, student_weight)
        # The compressor transformers and llm-compressor call (it dequantizes to bf16).
        local = {k: tensors[f"{name}.{k}"] for k in ("weight_packed", "weight_scale", "weight_global_scale")}
        decompressed = NVFP4PackedCompressor.decompress(local, scheme_ct)["weight"]
        assert within_one_ulp(decompressed, student_weight.to(decompressed.dtype))
        if scheme == "w4a4":
            input_global = tensors[f"{name}.input_global_scale"]
            assert input_global.dtype == torch.float32 and tuple(input_global.shape) == (1,)
            assert torch.equal(input_global, reciprocal(m.input_amax))
        else:
            assert f"{name}.input_global_scale" not in tensors


def test_transformers_compressed_tensors_loader_accepts_the_export(w4a4_export):
    student, out, _ = w4a4_export
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.bfloat16, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    logits(model)  # the first forward decompresses through compressed-tensors
    for name, m in quant_linears(student).items():
        loaded = model.get_submodule(name).weight.detach()
        assert within_one_ulp(loaded, m.quantized_weight().detach().to(loaded.dtype)), name
    assert torch.equal(model.model.embed_tokens.weight, student.model.embed_tokens.weight.bfloat16())


# ------------------------------------------------------------------------------------ layouts, config


def test_modelopt_layout_holds_the_same_numbers(w4a4_export, tmp_path, tiny_tokenizer):
    student, ct_dir, _ = w4a4_export
    mo_dir = tmp_path / "mo"
    export.export_student(student, tiny_tokenizer, mo_dir, layout="modelopt")
    ct, mo = read_tensors(ct_dir), read_tensors(mo_dir)
    for name, m in quant_linears(student).items():
        assert torch.equal(mo[f"{name}.weight"], ct[f"{name}.weight_packed"])
        assert mo[f"{name}.weight_scale"].dtype == torch.float8_e4m3fn
        assert torch.equal(mo[f"{name}.weight_scale"].view(torch.uint8),
                           ct[f"{name}.weight_scale"].view(torch.uint8))
        for mo_key, ct_key, amax in (("weight_scale_2", "weight_global_scale", m.weight_global_amax()),
                                     ("input_scale", "input_global_scale", m.input_amax)):
            g = mo[f"{name}.{mo_key}"]
            assert g.dtype == torch.float32 and g.shape == ()  # ModelOpt writes scalars
            assert torch.equal(g, nvfp4.global_scale_from_amax(amax))  # exactly the student's g
            assert within_one_ulp(g, (1.0 / ct[f"{name}.{ct_key}"]).reshape(()))
    hf_quant = json.loads((mo_dir / "hf_quant_config.json").read_text())
    assert hf_quant == {"producer": {"name": "ckaqad", "version": __version__},
                        "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                                         "exclude_modules": ["lm_head"]}}
    qconfig = json.loads((mo_dir / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "modelopt" and qconfig["quant_algo"] == "NVFP4"
    assert qconfig["config_groups"]["group_0"]["targets"] == ["Linear"]
    layers = set(quant_linears(student))
    dense_ct = {k: v for k, v in ct.items() if k.rpartition(".")[0] not in layers}
    dense_mo = {k: v for k, v in mo.items() if k.rpartition(".")[0] not in layers}
    assert dense_ct.keys() == dense_mo.keys() and all(torch.equal(dense_ct[k], dense_mo[k]) for k in dense_ct)


def test_fused_siblings_share_global_scales(w4a4_export):
    student, out, _ = w4a4_export
    tensors = read_tensors(out)
    for layer in range(2):
        for group in FUSED:
            prefix = f"model.layers.{layer}.{'mlp' if 'gate_proj' in group else 'self_attn'}"
            for kind in ("weight_global_scale", "input_global_scale"):
                values = [tensors[f"{prefix}.{member}.{kind}"] for member in group]
                assert all(torch.equal(v, values[0]) for v in values), (prefix, group, kind)
    # and the shared weight scale is the group's largest amax, not each member's own
    attn = student.model.layers[0].self_attn
    group_amax = max(p.weight.abs().max() for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert torch.equal(tensors["model.layers.0.self_attn.k_proj.weight_global_scale"],
                       reciprocal(group_amax))


@pytest.mark.parametrize("scheme", ["w4a4", "w4a16"])
def test_config_has_the_fields_vllm_reads(tmp_path, tiny_tokenizer, scheme):
    from compressed_tensors.quantization import QuantizationConfig

    out = tmp_path / "ct"
    export.export_student(make_student(scheme=scheme), tiny_tokenizer, out)
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "nvfp4-pack-quantized"
    assert qc["quantization_status"] == "compressed"
    group = qc["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"]
    weights = group["weights"]
    assert (weights["num_bits"], weights["type"], weights["strategy"], weights["group_size"]) == (
        4, "float", "tensor_group", 16)
    assert weights["symmetric"] is True and weights["dynamic"] is False
    if scheme == "w4a4":
        inputs = group["input_activations"]
        assert (inputs["num_bits"], inputs["type"], inputs["strategy"], inputs["group_size"]) == (
            4, "float", "tensor_group", 16)
        assert inputs["dynamic"] == "local" and inputs["symmetric"] is True
    else:
        assert group["input_activations"] is None
    assert "lm_head" in qc["ignore"]
    parsed = QuantizationConfig.model_validate(qc)  # the library's own validation
    assert parsed.format == "nvfp4-pack-quantized"
    # vLLM's scheme predicates (compressed_tensors.py: _is_fp4a4_nvfp4 / _is_fp4a16_nvfp4), on parsed args
    w, a = parsed.config_groups["group_0"].weights, parsed.config_groups["group_0"].input_activations
    assert (w.strategy, w.type, w.num_bits, w.group_size, w.symmetric) == (
        "tensor_group", "float", 4, 16, True)
    assert (a is None) == (scheme == "w4a16")
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert transformers.AutoConfig.from_pretrained(str(out)).model_type == "llama"


@pytest.mark.parametrize("tie", [False, True])
def test_tied_output_embedding_is_written_once(tmp_path, tiny_tokenizer, tie):
    student = make_student(tie=tie)
    out = tmp_path / "ct"
    export.export_student(student, tiny_tokenizer, out)
    tensors = read_tensors(out)
    assert ("lm_head.weight" in tensors) is not tie
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert "lm_head" in json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]


# ------------------------------------------------------------------------------------------ load


@pytest.mark.parametrize(("layout", "tie", "scheme"), [
    ("compressed-tensors", False, "w4a4"), ("compressed-tensors", True, "w4a4"),
    ("compressed-tensors", False, "w4a16"), ("modelopt", False, "w4a4"), ("modelopt", True, "w4a16")])
def test_load_reproduces_the_students_logits_exactly(tmp_path, tiny_tokenizer, layout, tie, scheme):
    student = make_student(tie=tie, scheme=scheme)
    out = tmp_path / "export"
    export.export_student(student, tiny_tokenizer, out, layout=layout)
    model, tokenizer = export.load(out)
    assert not model.training and tokenizer.eos_token == tiny_tokenizer.eos_token
    assert torch.equal(logits(model), logits(student))
    stored = read_tensors(out)
    packed_name = "weight_packed" if layout == "compressed-tensors" else "weight"
    for name, m in quant_linears(model).items():
        assert torch.equal(m.weight, quant_linears(student)[name].quantized_weight().detach())
        # re-quantizing the loaded weight with its frozen amax returns the stored codes and scales
        again = nvfp4.quantize(m.weight, m.weight_global_amax())
        assert torch.equal(nvfp4.pack(again.codes), stored[f"{name}.{packed_name}"])
        assert torch.equal(again.block_scales.view(torch.uint8),
                           stored[f"{name}.weight_scale"].view(torch.uint8))


def test_load_without_the_scales_record_is_within_float32_rounding(w4a4_export):
    """compressed-tensors' 2688/amax cannot give back g exactly; without ckaqad_scales.json the logits move
    by float32 rounding only."""
    student, out, _ = w4a4_export
    (out / "ckaqad_scales.json").unlink()
    model, _ = export.load(out)
    ref, got = logits(student), logits(model)
    assert torch.allclose(got, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def test_global_scale_recovery():
    amax = torch.rand(20_000, generator=torch.Generator().manual_seed(0)) * 30 + 1e-3
    g = nvfp4.global_scale_from_amax(amax)
    inverse = reciprocal(amax)
    # ModelOpt stores g itself: an amax giving exactly that g is found.
    assert all(torch.equal(nvfp4.global_scale_from_amax(export._amax_from_global(x)), x) for x in g[:2000])
    # compressed-tensors stores 2688/amax: the plain reciprocal misses g for a good share of amaxes ...
    naive = nvfp4.global_scale_from_amax(reciprocal(inverse))
    assert (naive != g).float().mean() > 0.02  # 7% of these
    # ... and the recorded exact amax restores it.
    for a, r, x in zip(amax[:2000], inverse[:2000], g[:2000], strict=True):
        assert torch.equal(nvfp4.global_scale_from_amax(export._amax_from_reciprocal(r, float(a).hex())), x)


# ------------------------------------------------------------------------------ files and failures


def test_summary_and_files(w4a4_export):
    student, out, summary = w4a4_export
    assert json.loads((out / "export_summary.json").read_text()) == summary.to_dict()
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "ckaqad_scales.json", "export_summary.json"} <= names
    assert not any(n.startswith(".") for n in os.listdir(out.parent))  # no temp dir left beside it
    assert summary.files["model.safetensors"] == (out / "model.safetensors").stat().st_size
    layers = quant_linears(student)
    n = sum(m.weight.numel() for m in layers.values())
    expected_bytes = n // 2 + n // 16 + 2 * 4 * len(layers)  # codes, fp8 scales, weight + input globals
    assert summary.quantized_params == n and summary.quantized_bytes == expected_bytes
    assert 4.5 < summary.bits_per_quantized_param < 4.6
    assert summary.bf16_bytes == 2 * sum(p.numel() for p in student.parameters())
    assert summary.size_vs_bf16 == summary.tensor_bytes / summary.bf16_bytes
    assert "bits / quantized param" in summary.table()
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 257
    # A serving engine often runs as another user: no file may keep mkdtemp's or safetensors' 0600.
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {p: 0o666 & ~umask for p in names}


def test_compress_state_dict_does_not_touch_the_student():
    student = make_student()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    ref = logits(student)
    tensors = export.compress_state_dict(student, "compressed-tensors")
    after = student.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(logits(student), ref)
    pointers = {t.untyped_storage().data_ptr() for t in student.state_dict().values()}
    assert not any(t.untyped_storage().data_ptr() in pointers for t in tensors.values())


def test_existing_out_dir_is_refused_without_overwrite(w4a4_export, tiny_tokenizer):
    student, out, _ = w4a4_export
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ExportError, match="already exists"):
        export.export_student(student, tiny_tokenizer, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot


def test_overwrite_replaces_an_export_but_not_other_directories(w4a4_export, tmp_path, tiny_tokenizer):
    student, out, _ = w4a4_export
    (out / "stale.txt").write_text("from an older export")
    export.export_student(student, tiny_tokenizer, out, layout="modelopt", overwrite=True)
    assert (out / "hf_quant_config.json").is_file() and not (out / "stale.txt").exists()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an export"):
        export.export_student(student, tiny_tokenizer, other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"


def test_failure_while_writing_leaves_nothing_behind(tmp_path, tiny_tokenizer, monkeypatch):
    student = make_student()
    real_save, calls = safetensors.torch.save_file, []

    def save_then_fail(*args, **kwargs):
        calls.append(args[1])
        if len(calls) > 1:
            raise OSError("disk full (injected)")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_fail)
    parent = tmp_path / "exports"
    parent.mkdir()
    with pytest.raises(OSError, match="injected"):
        export.export_student(student, tiny_tokenizer, parent / "ct", shard_size_bytes=50_000)
    assert len(calls) == 2 and os.listdir(parent) == []
    # an existing export survives a failed overwrite untouched
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    export.export_student(student, tiny_tokenizer, parent / "ct")
    snapshot = {p.name: p.read_bytes() for p in (parent / "ct").iterdir()}
    calls.clear()
    monkeypatch.setattr(safetensors.torch, "save_file", save_then_fail)
    with pytest.raises(OSError, match="injected"):
        export.export_student(student, tiny_tokenizer, parent / "ct", overwrite=True, shard_size_bytes=50_000)
    assert os.listdir(parent) == ["ct"]
    assert {p.name: p.read_bytes() for p in (parent / "ct").iterdir()} == snapshot


def test_sharded_export_has_a_complete_index(tmp_path, tiny_tokenizer):
    student = make_student()
    out = tmp_path / "sharded"
    summary = export.export_student(student, tiny_tokenizer, out, shard_size_bytes=30_000)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert [p.name for p in shards] == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                        for i in range(1, len(shards) + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    stored = {}
    for path in shards:
        for key, tensor in safetensors.torch.load_file(str(path)).items():
            stored[key] = (path.name, tensor.numel() * tensor.element_size())
    assert index["weight_map"] == {k: name for k, (name, _) in stored.items()}
    assert index["metadata"]["total_size"] == sum(size for _, size in stored.values())
    assert set(stored) == set(export.compress_state_dict(student, "compressed-tensors"))
    assert summary.tensor_bytes == sum(p.stat().st_size for p in shards)
    model, _ = export.load(out)
    assert torch.equal(logits(model), logits(student))


def test_tokenizer_can_come_from_the_teacher_dir(tmp_path, tiny_tokenizer):
    teacher_dir = tmp_path / "teacher"
    tiny_tokenizer.save_pretrained(str(teacher_dir))
    out = tmp_path / "ct"
    export.export_student(make_student(), None, out, teacher_dir=teacher_dir)
    assert export.load(out)[1].pad_token == "<pad>"
    with pytest.raises(ExportError, match="does not exist"):
        export.export_student(make_student(), None, tmp_path / "x", teacher_dir=tmp_path / "nowhere")
    with pytest.raises(ExportError, match="tokenizer"):
        export.export_student(make_student(), None, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_mxfp4_student_is_refused(tmp_path, tiny_tokenizer):
    student = make_student(fmt="mxfp4")
    message = "only NVFP4 students can be exported to NVFP4 layouts; this student is mxfp4"
    with pytest.raises(ExportError, match=message):
        export.export_student(student, tiny_tokenizer, tmp_path / "mx")
    assert not (tmp_path / "mx").exists()


def test_uncalibrated_w4a4_student_is_refused(tmp_path, tiny_tokenizer):
    student = make_student()
    for m in quant_linears(student).values():
        m.input_amax.zero_()
    with pytest.raises(ExportError, match="calibrate"):
        export.export_student(student, tiny_tokenizer, tmp_path / "raw")


def test_unknown_layout_names_the_valid_ones(tmp_path, tiny_tokenizer):
    with pytest.raises(ConfigError, match="modelopt"):
        export.export_student(make_student(), tiny_tokenizer, tmp_path / "x", layout="modelop")


def test_load_and_is_export_dir_reject_what_is_not_an_export(tmp_path, w4a4_export):
    _, out, _ = w4a4_export
    assert export.is_export_dir(out)
    with pytest.raises(ExportError, match="does not exist"):
        export.load(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExportError, match="no config.json"):
        export.load(empty)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ExportError, match="not an NVFP4 export"):
        export.load(plain)
    (out / "model.safetensors").unlink()
    with pytest.raises(ExportError, match="missing model.safetensors"):
        export.load(out)
    assert not any(export.is_export_dir(p) for p in (tmp_path / "missing", empty, plain, out))


# ------------------------------------------------------------------------- verify_export


@pytest.mark.parametrize("layout", ["compressed-tensors", "modelopt"])
def test_verify_export_passes_on_a_true_export(tmp_path, tiny_tokenizer, layout):
    student = make_student()
    export.export_student(student, tiny_tokenizer, tmp_path / "e", layout)
    check = export.verify_export(tmp_path / "e", student)
    assert check["layers"] == check["load_bit_exact_layers"] == len(quant_linears(student))
    # compressed-tensors decompresses to bf16 (relative 2^-8 at most); ModelOpt's code · s8 · g is exact
    assert check["max_relative_weight_difference"] <= (2.0 ** -8 if layout == "compressed-tensors" else 0.0)
    assert check["reader_agreement"] == ("within one bfloat16 ulp" if layout == "compressed-tensors" else "exact")


def test_verify_export_catches_a_student_that_moved(tmp_path, tiny_tokenizer):
    student = make_student()
    export.export_student(student, tiny_tokenizer, tmp_path / "e")
    with torch.no_grad():  # one training step later: the export no longer holds this student
        next(iter(quant_linears(student).values())).weight.mul_(1.5)
    with pytest.raises(ExportError, match="does not match the student"):
        export.verify_export(tmp_path / "e", student)
