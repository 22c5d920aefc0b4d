"""tests for ckaqad/export/compress.py: the pure state dict <-> export tensor maps."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from export_helpers import FUSED, logits, make_student, read_tensors, reciprocal

from ckaqad.errors import ExportError
from ckaqad.export.compress import (
    compress,
    decompress,
    scales_from_state_dict,
    scales_of,
    scales_record,
)
from ckaqad.export.writer import export_student
from ckaqad.formats import nvfp4
from ckaqad.quant.apply import freeze_scales, quant_linears

LAYOUTS = ["compressed-tensors", "modelopt"]


def frozen(student):
    freeze_scales(student)
    return student


def snapshot(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (float8 has no torch.equal of its own; -0 and NaN compared as bits)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def unchanged(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return before.keys() == after.keys() and all(
        before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compress_does_not_touch_the_student_or_its_state_dict(layout):
    student = frozen(make_student())
    state = student.state_dict()
    before = snapshot(state)
    ref = logits(student)
    tensors = compress(state, scales_of(student), layout)
    assert unchanged(before, state) and unchanged(before, student.state_dict())
    assert torch.equal(logits(student), ref)
    pointers = {t.untyped_storage().data_ptr() for t in student.state_dict().values()}
    assert not any(t.untyped_storage().data_ptr() in pointers for t in tensors.values())
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in tensors.values())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compress_works_on_a_loaded_state_dict_without_a_module(tmp_path, layout):
    """A state dict read back from safetensors (what a gathered multi-GPU state dict is) compresses to the
    same tensors as the live student's."""
    student = frozen(make_student(tie=True))
    scales = scales_of(student)
    path = tmp_path / "student.safetensors"  # tied tensors cloned: safetensors refuses shared storage
    safetensors.torch.save_file({k: v.clone() for k, v in student.state_dict().items()}, str(path))
    loaded = safetensors.torch.load_file(str(path))
    before = snapshot(loaded)
    from_file = compress(loaded, scales_from_state_dict(loaded, scales.modules, scales.w4a4, scales.tied_output),
                         layout)
    assert unchanged(before, loaded)
    live = compress(student.state_dict(), scales, layout)
    assert from_file.keys() == live.keys()
    assert all(same_bits(from_file[k], live[k]) for k in live)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compress_of_the_state_dict_equals_the_written_export(tmp_path, tiny_tokenizer, layout):
    student = make_student()
    export_student(student, tiny_tokenizer, tmp_path / "e", layout=layout)
    written = read_tensors(tmp_path / "e")
    ours = compress(student.state_dict(), scales_of(student), layout)
    assert ours.keys() == written.keys()
    assert all(same_bits(ours[k], written[k]) for k in ours)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scheme", ["w4a4", "w4a16"])
def test_decompress_inverts_compress_and_is_pure(layout, scheme):
    student = frozen(make_student(scheme=scheme))
    scales = scales_of(student)
    tensors = compress(student.state_dict(), scales, layout)
    before = snapshot(tensors)
    back = decompress(tensors, layout, w4a4=scheme == "w4a4", record=scales_record(scales, layout))
    assert unchanged(before, tensors)
    layers = quant_linears(student)
    for name, m in layers.items():
        assert torch.equal(back[f"{name}.weight"], m.quantized_weight().detach())
        # the amax comes back exactly (compressed-tensors with the record) or as one with the same g (modelopt)
        g = nvfp4.global_scale_from_amax
        assert torch.equal(g(back[f"{name}.weight_amax"]), g(m.weight_global_amax()))
        if scheme == "w4a4":
            assert torch.equal(g(back[f"{name}.input_amax"]), g(m.input_amax))
        else:
            assert torch.equal(back[f"{name}.input_amax"], torch.zeros(()))
    assert set(back) == set(student.state_dict())  # a complete student state dict (no tied head here)


def test_decompress_without_the_record_misses_only_by_an_ulp():
    student = frozen(make_student())
    tensors = compress(student.state_dict(), scales_of(student), "compressed-tensors")
    back = decompress(tensors, "compressed-tensors", w4a4=True)
    for name, m in quant_linears(student).items():
        g, want = nvfp4.global_scale_from_amax(back[f"{name}.weight_amax"]), nvfp4.global_scale_from_amax(
            m.weight_global_amax())
        assert g == want or torch.nextafter(g, want) == want


def test_decompress_names_missing_and_inconsistent_tensors():
    student = frozen(make_student())
    tensors = compress(student.state_dict(), scales_of(student), "modelopt")
    name = next(iter(quant_linears(student)))
    gone = {k: v for k, v in tensors.items() if k != f"{name}.weight_scale_2"}
    with pytest.raises(ExportError, match=f"missing tensors \\['{name}.weight_scale_2'\\]"):
        decompress(gone, "modelopt", w4a4=True, where="here")
    short = dict(tensors, **{f"{name}.weight": tensors[f"{name}.weight"][:, :-8]})
    with pytest.raises(ExportError, match="do not describe one Linear weight"):
        decompress(short, "modelopt", w4a4=True)


def test_fused_siblings_share_global_scales():
    student = frozen(make_student())
    tensors = compress(student.state_dict(), scales_of(student), "compressed-tensors")
    for layer in range(2):
        for group in FUSED:
            prefix = f"model.layers.{layer}.{'mlp' if 'gate_proj' in group else 'self_attn'}"
            for kind in ("weight_global_scale", "input_global_scale"):
                values = [tensors[f"{prefix}.{member}.{kind}"] for member in group]
                assert all(torch.equal(v, values[0]) for v in values), (prefix, group, kind)
    # and the shared weight scale is the group's largest amax, not each member's own
    attn = student.model.layers[0].self_attn
    group_amax = max(p.weight.abs().max() for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert torch.equal(tensors["model.layers.0.self_attn.k_proj.weight_global_scale"], reciprocal(group_amax))


def test_frozen_weight_global_is_exported_as_frozen():
    student = make_student(scheme="w4a16", weight_global="frozen")  # W4A4: see the quant.apply.calibrate note
    state = student.state_dict()
    scales = scales_of(student)  # calibrate froze it already: no freeze_scales needed
    name = next(iter(scales.modules))
    assert torch.equal(scales.weight_amax[name], state[f"{name}.weight_amax"])
    assert torch.equal(scales.weight_amax[name], quant_linears(student)[name].weight_global_amax())


@pytest.mark.parametrize("tie", [False, True])
def test_tied_output_embedding_is_left_out(tie):
    student = frozen(make_student(tie=tie))
    scales = scales_of(student)
    assert scales.tied_output == ("lm_head.weight" if tie else None)
    tensors = compress(student.state_dict(), scales, "compressed-tensors")
    assert ("lm_head.weight" in tensors) is not tie
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_mxfp4_student_is_refused():
    message = "only NVFP4 students can be exported to NVFP4 layouts; this student is mxfp4"
    with pytest.raises(ExportError, match=message):
        scales_of(make_student(fmt="mxfp4"))


def test_uncalibrated_or_unfrozen_scales_are_refused():
    student = make_student()
    with pytest.raises(ExportError, match="freeze_scales"):  # dynamic weight amaxes never written to buffers
        scales_of(student)
    freeze_scales(student)
    for m in quant_linears(student).values():
        m.input_amax.zero_()
    with pytest.raises(ExportError, match="calibrate"):
        scales_of(student)


def test_scales_record_holds_the_exact_amaxes_as_hex():
    student = frozen(make_student())
    scales = scales_of(student)
    record = scales_record(scales, "modelopt")
    assert record["layout"] == "modelopt" and record["scheme"] == "w4a4"
    for name, m in quant_linears(student).items():
        assert torch.tensor(float.fromhex(record["weight_global_amax"][name])) == m.weight_global_amax()
        assert torch.tensor(float.fromhex(record["input_amax"][name])) == m.input_amax
