"""tests for ckaqad/export/reader.py: reading an export back into the student it was written from."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from export_helpers import logits, make_student, read_tensors

from ckaqad.errors import ExportError
from ckaqad.export.reader import inspect_export, is_export_dir, load_export
from ckaqad.export.writer import export_student
from ckaqad.formats import nvfp4
from ckaqad.paths import detect
from ckaqad.quant.apply import cached_quantized_weights, quant_linears


@pytest.fixture
def w4a4_export(tmp_path, tiny_tokenizer):
    student = make_student()
    out = tmp_path / "ct"
    export_student(student, tiny_tokenizer, out)
    return student, out


@pytest.mark.parametrize(("layout", "tie", "scheme"), [
    ("compressed-tensors", False, "w4a4"), ("compressed-tensors", True, "w4a4"),
    ("compressed-tensors", False, "w4a16"), ("modelopt", False, "w4a4"), ("modelopt", True, "w4a16")])
def test_load_reproduces_the_students_logits_exactly(tmp_path, tiny_tokenizer, layout, tie, scheme, caplog):
    student = make_student(tie=tie, scheme=scheme)
    out = tmp_path / "export"
    export_student(student, tiny_tokenizer, out, layout=layout)
    with caplog.at_level(logging.WARNING, logger="ckaqad.export.reader"):
        model, tokenizer = load_export(out)
    assert not caplog.records  # every layer re-quantizes to its stored codes
    assert not model.training and tokenizer.eos_token == tiny_tokenizer.eos_token
    assert not any(p.requires_grad for p in model.parameters())
    assert torch.equal(logits(model), logits(student))
    info = inspect_export(out)
    assert (info.layout.name, info.w4a4) == (layout, scheme == "w4a4")
    stored = read_tensors(out)
    packed_name = "weight_packed" if layout == "compressed-tensors" else "weight"
    with cached_quantized_weights(student):
        for name, m in quant_linears(model).items():
            assert m.frozen_weight_global
            assert torch.equal(m.weight, quant_linears(student)[name].quantized_weight().detach())
            # re-quantizing the loaded weight with its frozen amax returns the stored codes and scales
            again = nvfp4.quantize(m.weight, m.weight_global_amax())
            assert torch.equal(nvfp4.pack(again.codes), stored[f"{name}.{packed_name}"])
            assert torch.equal(again.block_scales.view(torch.uint8),
                               stored[f"{name}.weight_scale"].view(torch.uint8))


def test_load_without_the_scales_record_is_within_float32_rounding(w4a4_export):
    """compressed-tensors' 2688/amax cannot give back g exactly; without ckaqad_scales.json the logits move
    by float32 rounding only."""
    student, out = w4a4_export
    (out / "ckaqad_scales.json").unlink()
    model, _ = load_export(out)
    ref, got = logits(student), logits(model)
    assert torch.allclose(got, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def test_load_and_is_export_dir_reject_what_is_not_an_export(tmp_path, w4a4_export):
    _, out = w4a4_export
    assert is_export_dir(out) and detect(out) == "export"
    with pytest.raises(ExportError, match="does not exist"):
        load_export(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExportError, match="no config.json"):
        load_export(empty)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ExportError, match="not an NVFP4 export"):
        load_export(plain)
    (out / "model.safetensors").unlink()
    with pytest.raises(ExportError, match="missing model.safetensors"):
        load_export(out)
    assert not any(is_export_dir(p) for p in (tmp_path / "missing", empty, plain, out))


def test_load_names_tensors_that_do_not_fit_the_model(tmp_path, tiny_tokenizer):
    import safetensors.torch

    out = tmp_path / "e"
    export_student(make_student(), tiny_tokenizer, out)
    tensors = read_tensors(out)
    safetensors.torch.save_file({**tensors, "model.extra.weight": torch.zeros(2)}, str(out / "model.safetensors"))
    with pytest.raises(ExportError, match="tensors that the model does not use: \\['model.extra.weight'\\]"):
        load_export(out)
    del tensors["model.norm.weight"]
    safetensors.torch.save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ExportError, match="missing tensor model.norm.weight"):
        load_export(out)
