"""tests for ckaqad/export/writer.py: the export directory (files, configs, shards, summary, atomicity)."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest
import safetensors.torch
import torch
import transformers
from export_helpers import logits, make_student, read_tensors, within_one_ulp

from ckaqad.errors import ConfigError, DiskFullError, ExportError
from ckaqad.export.compress import compress, scales_of
from ckaqad.export.reader import load_export
from ckaqad.export.shards import write_shards
from ckaqad.export.writer import export_student
from ckaqad.formats import nvfp4
from ckaqad.quant.apply import cached_quantized_weights, quant_linears


@pytest.fixture
def w4a4_export(tmp_path, tiny_tokenizer):
    student = make_student()
    out = tmp_path / "ct"
    summary = export_student(student, tiny_tokenizer, out)
    return student, out, summary


def test_transformers_compressed_tensors_loader_accepts_the_export(w4a4_export):
    student, out, _ = w4a4_export
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.bfloat16, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    logits(model)  # the first forward decompresses through compressed-tensors
    with cached_quantized_weights(student):
        for name, m in quant_linears(student).items():
            loaded = model.get_submodule(name).weight.detach()
            assert within_one_ulp(loaded, m.quantized_weight().detach().to(loaded.dtype)), name
    assert torch.equal(model.model.embed_tokens.weight, student.model.embed_tokens.weight.bfloat16())


def test_modelopt_layout_holds_the_same_numbers(w4a4_export, tmp_path, tiny_tokenizer):
    student, ct_dir, _ = w4a4_export
    mo_dir = tmp_path / "mo"
    export_student(student, tiny_tokenizer, mo_dir, layout="modelopt")
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
    assert hf_quant["quantization"] == {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                                        "exclude_modules": ["lm_head"]}
    qconfig = json.loads((mo_dir / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "modelopt" and qconfig["quant_algo"] == "NVFP4"
    assert qconfig["config_groups"]["group_0"]["targets"] == ["Linear"]
    layers = set(quant_linears(student))
    dense_ct = {k: v for k, v in ct.items() if k.rpartition(".")[0] not in layers}
    dense_mo = {k: v for k, v in mo.items() if k.rpartition(".")[0] not in layers}
    assert dense_ct.keys() == dense_mo.keys() and all(torch.equal(dense_ct[k], dense_mo[k]) for k in dense_ct)


@pytest.mark.parametrize("scheme", ["w4a4", "w4a16"])
def test_config_has_the_fields_vllm_reads(tmp_path, tiny_tokenizer, scheme):
    from compressed_tensors.quantization import QuantizationConfig

    out = tmp_path / "ct"
    export_student(make_student(scheme=scheme), tiny_tokenizer, out)
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
    export_student(student, tiny_tokenizer, out)
    tensors = read_tensors(out)
    assert ("lm_head.weight" in tensors) is not tie
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert "lm_head" in json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]


def test_export_leaves_the_students_forward_unchanged(tmp_path, tiny_tokenizer):
    """export_student freezes the weight global amaxes into buffers; a dynamic student's forward ignores them."""
    student = make_student()
    ref = logits(student)
    export_student(student, tiny_tokenizer, tmp_path / "e")
    assert torch.equal(logits(student), ref)
    for m in quant_linears(student).values():
        assert torch.equal(m.weight_amax, m.weight_global_amax())


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


def test_existing_out_dir_is_refused_without_overwrite(w4a4_export, tiny_tokenizer):
    student, out, _ = w4a4_export
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ExportError, match="already exists"):
        export_student(student, tiny_tokenizer, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot


def test_overwrite_replaces_an_export_but_not_other_directories(w4a4_export, tmp_path, tiny_tokenizer):
    student, out, _ = w4a4_export
    (out / "stale.txt").write_text("from an older export")
    export_student(student, tiny_tokenizer, out, layout="modelopt", overwrite=True)
    assert (out / "hf_quant_config.json").is_file() and not (out / "stale.txt").exists()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an export"):
        export_student(student, tiny_tokenizer, other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"


def failing_save(monkeypatch, error: Exception):
    """Make the second safetensors write raise `error`; returns the list of paths written to."""
    real_save, calls = safetensors.torch.save_file, []

    def save_then_fail(*args, **kwargs):
        calls.append(args[1])
        if len(calls) > 1:
            raise error
        return real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_fail)
    return calls, real_save


def test_failure_while_writing_leaves_nothing_behind(tmp_path, tiny_tokenizer, monkeypatch):
    student = make_student()
    calls, real_save = failing_save(monkeypatch, OSError("injected failure"))
    parent = tmp_path / "exports"
    parent.mkdir()
    with pytest.raises(OSError, match="injected"):
        export_student(student, tiny_tokenizer, parent / "ct", shard_size_bytes=50_000)
    assert len(calls) == 2 and os.listdir(parent) == []
    # an existing export survives a failed overwrite untouched
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    export_student(student, tiny_tokenizer, parent / "ct")
    snapshot = {p.name: p.read_bytes() for p in (parent / "ct").iterdir()}
    calls, _ = failing_save(monkeypatch, OSError("injected failure"))
    with pytest.raises(OSError, match="injected"):
        export_student(student, tiny_tokenizer, parent / "ct", overwrite=True, shard_size_bytes=50_000)
    assert os.listdir(parent) == ["ct"]
    assert {p.name: p.read_bytes() for p in (parent / "ct").iterdir()} == snapshot


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("Error while serializing: No space left on device (os error 28)")])
def test_a_full_disk_is_a_one_line_disk_full_error(tmp_path, tiny_tokenizer, monkeypatch, error):
    student = make_student()
    failing_save(monkeypatch, error)
    parent = tmp_path / "exports"
    parent.mkdir()
    with pytest.raises(DiskFullError, match=f"no space left on the device while writing {parent / 'ct'}"):
        export_student(student, tiny_tokenizer, parent / "ct", shard_size_bytes=50_000)
    assert os.listdir(parent) == []


def test_sharded_export_has_a_complete_index(tmp_path, tiny_tokenizer):
    student = make_student()
    out = tmp_path / "sharded"
    summary = export_student(student, tiny_tokenizer, out, shard_size_bytes=30_000)
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
    assert set(stored) == set(compress(student.state_dict(), scales_of(student), "compressed-tensors"))
    assert summary.tensor_bytes == sum(p.stat().st_size for p in shards)
    model, _ = load_export(out)
    assert torch.equal(logits(model), logits(student))


def test_tokenizer_can_come_from_the_teacher_dir(tmp_path, tiny_tokenizer):
    teacher_dir = tmp_path / "teacher"
    tiny_tokenizer.save_pretrained(str(teacher_dir))
    out = tmp_path / "ct"
    export_student(make_student(), None, out, teacher_dir=teacher_dir)
    assert load_export(out)[1].pad_token == "<pad>"
    with pytest.raises(ExportError, match="does not exist"):
        export_student(make_student(), None, tmp_path / "x", teacher_dir=tmp_path / "nowhere")
    with pytest.raises(ExportError, match="tokenizer"):
        export_student(make_student(), None, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_mxfp4_student_is_refused(tmp_path, tiny_tokenizer):
    student = make_student(fmt="mxfp4")
    message = "only NVFP4 students can be exported to NVFP4 layouts; this student is mxfp4"
    with pytest.raises(ExportError, match=message):
        export_student(student, tiny_tokenizer, tmp_path / "mx")
    assert not (tmp_path / "mx").exists()


def test_uncalibrated_w4a4_student_is_refused(tmp_path, tiny_tokenizer):
    student = make_student()
    for m in quant_linears(student).values():
        m.input_amax.zero_()
    with pytest.raises(ExportError, match="calibrate"):
        export_student(student, tiny_tokenizer, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_unknown_layout_and_bad_shard_size_are_config_errors(tmp_path, tiny_tokenizer):
    with pytest.raises(ConfigError, match="did you mean: modelopt"):
        export_student(make_student(), tiny_tokenizer, tmp_path / "x", layout="modelop")
    with pytest.raises(ConfigError, match="shard size must be positive"):
        export_student(make_student(), tiny_tokenizer, tmp_path / "x", shard_size_bytes=0)
    assert not (tmp_path / "x").exists()


def test_the_streamed_export_writes_the_files_of_the_whole_compressed_state_dict(tmp_path, tiny_tokenizer):
    """export_student compresses one state-dict entry at a time into the current shard; the files equal those of
    compressing the whole state dict and writing it at once, byte for byte (tied head included)."""
    student = make_student(tie=True)
    export_student(student, tiny_tokenizer, tmp_path / "streamed", shard_size_bytes=30_000)
    whole = tmp_path / "whole"
    whole.mkdir()
    write_shards(compress(student.state_dict(), scales_of(student), "compressed-tensors"), whole, 30_000)
    written = sorted(p.name for p in whole.iterdir())
    assert len(written) > 3 and written == sorted(p.name for p in (tmp_path / "streamed").glob("model*"))
    assert all((whole / n).read_bytes() == (tmp_path / "streamed" / n).read_bytes() for n in written)
