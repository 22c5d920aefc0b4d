"""tests for ckaqad/export/verify.py, and the exports read with compressed-tensors' own reader."""

from __future__ import annotations

import math

import pytest
import torch
from export_helpers import (
    ct_scheme,
    make_student,
    read_tensors,
    reciprocal,
    within_one_ulp,
    within_reciprocal_rounding,
)

from ckaqad.errors import ExportError
from ckaqad.export.reader import load_export, to_served_dtype
from ckaqad.export.verify import runtime_agreement, verify_export
from ckaqad.export.writer import export_student
from ckaqad.formats import nvfp4
from ckaqad.formats.e2m1 import e2m1_grid
from ckaqad.quant.apply import cached_quantized_weights, quant_linears


@pytest.mark.parametrize("scheme", ["w4a4", "w4a16"])
def test_compressed_tensors_reader_gets_the_students_codes_scales_and_values(tmp_path, tiny_tokenizer,
                                                                             scheme):
    from compressed_tensors.compressors.nvfp4 import NVFP4PackedCompressor, unpack_fp4_from_uint8
    from compressed_tensors.quantization import dequantize

    student = make_student(scheme=scheme)
    out = tmp_path / "ct"
    export_student(student, tiny_tokenizer, out)
    tensors, scheme_ct = read_tensors(out), ct_scheme(out)
    with cached_quantized_weights(student):
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
            ours = e2m1_grid()[ref.codes.long()]
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


@pytest.mark.parametrize("layout", ["compressed-tensors", "modelopt"])
@pytest.mark.parametrize("scheme", ["w4a4", "w4a16"])
def test_verify_export_passes_on_a_true_export(tmp_path, tiny_tokenizer, layout, scheme):
    student = make_student(scheme=scheme)
    export_student(student, tiny_tokenizer, tmp_path / "e", layout)
    check = verify_export(tmp_path / "e", student)
    assert check["layers"] == check["load_bit_exact_layers"] == len(quant_linears(student))
    # compressed-tensors decompresses to bf16 (relative 2^-8 at most); ModelOpt's code · s8 · g is exact
    assert check["max_relative_weight_difference"] <= (2.0 ** -8 if layout == "compressed-tensors" else 0.0)
    assert check["reader_agreement"] == ("within one bfloat16 ulp" if layout == "compressed-tensors" else "exact")
    assert check["reader"] == ("compressed-tensors NVFP4PackedCompressor" if layout == "compressed-tensors"
                               else "code * s8 * g")
    kl = check["runtime_kl"]
    if layout == "modelopt":  # transformers does not serve ModelOpt exports: no runtime comparison
        assert kl is None
    else:  # the float32 reference student against transformers' bf16 forward: close, not equal
        assert kl["tokens"] == 128  # the text, cut to the tiny model's max_position_embeddings
        assert 0.0 <= kl["kl_mean"] <= kl["kl_max"] and math.isfinite(kl["kl_max"])
        if scheme == "w4a16":
            assert kl["kl_max"] < 1e-4


def test_verify_export_kl_is_zero_for_runtime_arithmetic_in_bf16(tmp_path, tiny_tokenizer):
    """A student running the runtime's arithmetic in bf16 computes what transformers serves, bit for bit."""
    export_student(make_student(), tiny_tokenizer, tmp_path / "e")
    runtime, _ = load_export(tmp_path / "e", arithmetic="runtime")
    kl = runtime_agreement(tmp_path / "e", to_served_dtype(runtime))
    assert kl["kl_mean"] == kl["kl_max"] == 0.0 and kl["tokens"] == 128


@pytest.mark.parametrize("scheme", ["w4a4", "w4a16"])
def test_pow2_global_scales_make_the_reference_student_the_served_model(tmp_path, tiny_tokenizer, scheme):
    """With power-of-two global scales every dequantized value is exact in bf16, so ckaqad's own (reference)
    arithmetic in bf16 computes what transformers serves, bit for bit; the export stores G = 2^k."""
    export_student(make_student(scheme=scheme, global_scale="pow2"), tiny_tokenizer, tmp_path / "e")
    scales = [t for k, t in read_tensors(tmp_path / "e").items() if k.endswith("global_scale")]
    assert len(scales) == 14 * (2 if scheme == "w4a4" else 1)  # 7 quantized Linears a block, 2 blocks
    assert all(torch.frexp(g)[0].eq(0.5).all() for g in scales)
    reference, _ = load_export(tmp_path / "e")
    kl = runtime_agreement(tmp_path / "e", to_served_dtype(reference))
    assert kl["kl_mean"] == kl["kl_max"] == 0.0


@pytest.mark.parametrize("layout", ["compressed-tensors", "modelopt"])
def test_verify_export_catches_a_student_that_moved(tmp_path, tiny_tokenizer, layout):
    student = make_student()
    export_student(student, tiny_tokenizer, tmp_path / "e", layout)
    with torch.no_grad():  # one training step later: the export no longer holds this student
        next(iter(quant_linears(student).values())).weight.mul_(1.5)
    with pytest.raises(ExportError, match="does not match the student"):
        verify_export(tmp_path / "e", student)


@pytest.mark.parametrize("layout", ["compressed-tensors", "modelopt"])
def test_a_sharded_export_reads_back_as_the_one_file_export(tmp_path, tiny_tokenizer, layout):
    """Several safetensors files and model.safetensors.index.json: compressed-tensors' own loader finds every
    tensor through the index, load_export rebuilds the same student bit for bit, and verify_export (for
    compressed-tensors: transformers' from_pretrained of the sharded export, what vLLM reads too) gives the
    one-file export's numbers."""
    from compressed_tensors.utils.safetensors_load import get_weight_mappings

    student = make_student()
    one, many = tmp_path / "one", tmp_path / "many"
    export_student(student, tiny_tokenizer, one, layout)
    export_student(student, tiny_tokenizer, many, layout, shard_size_bytes=30_000)
    shards = sorted(many.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (many / "model.safetensors").exists()
    tensors = read_tensors(one)
    sharded = read_tensors(many)
    assert sharded.keys() == tensors.keys() and all(torch.equal(sharded[k], v) for k, v in tensors.items())
    mapping = get_weight_mappings(str(many))  # compressed-tensors: tensor name -> the shard file holding it
    assert set(mapping) == set(tensors) and {p.rsplit("/", 1)[1] for p in mapping.values()} == {p.name for p in shards}
    a, _ = load_export(one)
    b, _ = load_export(many)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    check_one, check_many = verify_export(one, student), verify_export(many, student)
    assert check_many["layers"] == check_many["load_bit_exact_layers"] == len(quant_linears(student))
    assert check_many["max_relative_weight_difference"] == check_one["max_relative_weight_difference"]
    assert check_many["runtime_kl"] == check_one["runtime_kl"]  # None for ModelOpt (transformers does not serve it)
    assert (check_many["runtime_kl"] is None) == (layout == "modelopt")
