"""The meta-device build and its loaders (parallel/loading.py) in one process: a model built on meta and filled
from its safetensors files is the model `from_pretrained` loads, bit for bit (parameters, rotary buffers,
logits), by both loaders; the PTQ student's skeleton fills the same way. The sharded (2-process) runs are in
test_distributed.py (`build` == "meta", equal to the one-process run)."""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny_teacher
from safetensors.torch import load_file, save_file

from ckaqad.errors import ModelError
from ckaqad.models.load import load_model, load_model_on_meta
from ckaqad.parallel.fsdp import apply_activation_checkpointing
from ckaqad.parallel.loading import file_name, materialize_, missing_weights
from ckaqad.quant.apply import quant_linears
from ckaqad.quant.linear import QuantConfig
from ckaqad.students.spec import ptq_skeleton

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("teacher")
    save_tiny_teacher(directory)
    return directory


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**{file_name(n): p for n, p in model.named_parameters()},
            **{file_name(n): b for n, b in model.named_buffers()}}


@pytest.mark.parametrize("method", ["dcp", "broadcast"])
def test_a_meta_built_teacher_filled_from_its_files_is_the_loaded_teacher(teacher_dir, method):
    loaded = load_model(teacher_dir, device="cpu")
    meta = load_model_on_meta(teacher_dir, torch.float32)
    assert meta.on_meta and all(p.is_meta for p in meta.model.parameters())
    assert meta.model.config._name_or_path == str(teacher_dir)  # the corpus cache key of the loaded teacher
    apply_activation_checkpointing(meta.model)  # the wrapper's names still find the files' tensors
    materialize_(meta.model, meta.model_dir, "cpu", method)
    want, got = state(loaded.model), state(meta.model)
    assert want.keys() == got.keys() and any("inv_freq" in k for k in got)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    ids = torch.arange(1, 17).reshape(2, 8)
    assert torch.equal(meta.model(input_ids=ids).logits, loaded.model(input_ids=ids).logits)


def test_the_ptq_skeleton_fills_to_the_teachers_copy_rounded_through_the_teachers_dtype(teacher_dir):
    meta = load_model_on_meta(teacher_dir, torch.float32)
    student, report = ptq_skeleton(meta.model, QuantConfig())
    amaxes = {n: b for n, b in student.named_buffers() if n.endswith("amax")}
    assert amaxes and all(not b.is_meta and float(b) == 0 for b in amaxes.values())  # set by calibration later
    materialize_(student, meta.model_dir, "cpu", "dcp", round_to=torch.bfloat16)
    files = load_file(str(teacher_dir / "model.safetensors"))
    for name, p in student.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, files[name].to(torch.bfloat16).float()), name
    assert not torch.equal(files["lm_head.weight"], files["lm_head.weight"].bfloat16().float())  # rounding shows
    assert len(quant_linears(student)) == len(report.quantized) == 14


def test_a_model_whose_files_lack_a_weight_is_refused_before_anything_is_filled(teacher_dir, tmp_path):
    for item in teacher_dir.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    meta = load_model_on_meta(tmp_path, torch.float32)
    assert missing_weights(meta.model, tmp_path) == ["model.norm.weight"]
    with pytest.raises(ModelError, match="lack 1 parameters .*model.norm.weight.*--load-method whole"):
        materialize_(meta.model, tmp_path, "cpu", "dcp")
    assert all(p.is_meta for p in meta.model.parameters())
