"""The meta-device build and its loaders (parallel/loading.py) in one process: a model built on meta and filled
from its safetensors files is the model `from_pretrained` loads, bit for bit (parameters, rotary buffers,
logits), by both loaders; the PTQ student's skeleton fills the same way. Tiny MoE checkpoints saved per expert
(qwen3_moe, mixtral, nemotron_h) fill the fused experts expert by expert. The sharded (2-process) runs are in
test_distributed.py (`build` == "meta", equal to the one-process run)."""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny_teacher
from safetensors.torch import load_file, save_file

from ckaqad.errors import ModelError
from ckaqad.models.load import load_model, load_model_on_meta
from ckaqad.parallel.fsdp import apply_activation_checkpointing
from ckaqad.parallel.loading import (
    file_name,
    fill_expert_rows_,
    materialize_,
    meta_unreadable,
    missing_weights,
    stored_weights,
)
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


@pytest.mark.parametrize("method", ["dcp", "broadcast"])
def test_a_tied_head_is_one_tensor_on_meta_as_from_pretrained_loads_it(tmp_path, method):
    """tie_word_embeddings (SmolLM2, the embedded teacher): the files hold the embedding only; the head stays the
    embedding's tensor through the build (accelerate's meta init) and `to_empty` (outside FSDP2: a replicated
    teacher)."""
    import json

    save_tiny_teacher(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_model(tmp_path, device="cpu").model
    meta = load_model_on_meta(tmp_path, torch.float32).model
    assert meta.lm_head.weight is meta.model.embed_tokens.weight and not missing_weights(meta, tmp_path)
    materialize_(meta, tmp_path, "cpu", method)
    assert meta.lm_head.weight is meta.model.embed_tokens.weight
    assert torch.equal(meta.lm_head.weight, loaded.lm_head.weight)


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
    with pytest.raises(ModelError, match=r"lack 1 parameters \(model\.norm\.weight\)$"):
        materialize_(meta.model, tmp_path, "cpu", "dcp")
    assert all(p.is_meta for p in meta.model.parameters())


# --- Mixture-of-experts checkpoints: per-expert tensors, renamed keys ----------------------------------------------
# Saved by transformers' save_pretrained, as hub MoE checkpoints are: each expert's matrices apart (mixtral's
# w1/w2/w3 under `block_sparse_moe`, nemotron_h under `backbone.`), which from_pretrained fuses on load.
MOE = ("qwen3_moe", "mixtral", "nemotron_h")


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    from conftest import make_tiny_tokenizer
    from moe_helpers import make_tiny_moe

    dirs = {}
    for family in MOE:
        model = make_tiny_moe(family)
        for name, buffer in model.named_buffers():  # a router's score correction: in the files, not computed
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=torch.Generator().manual_seed(1)))
        dirs[family] = tmp_path_factory.mktemp(family)
        model.save_pretrained(dirs[family])
        make_tiny_tokenizer().save_pretrained(dirs[family])
    return dirs


def fused_experts(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in state(model).items() if n.endswith(("experts.gate_up_proj", "experts.up_proj",
                                                                 "experts.down_proj"))}


@pytest.mark.parametrize("method", ["dcp", "broadcast"])
@pytest.mark.parametrize("family", MOE)
def test_a_meta_built_moe_filled_from_per_expert_files_is_the_loaded_model(moe_dirs, family, method):
    directory = moe_dirs[family]
    files = load_file(str(directory / "model.safetensors"))
    loaded = load_model(directory, device="cpu")
    experts = fused_experts(loaded.model)
    assert len(experts) == 4 and not any(k in files for k in experts)  # stored per expert: the merge is exercised
    assert any(".experts.3." in k for k in files)
    if family == "nemotron_h":  # renamed on load, as mixtral's routers: found with transformers' own mapping
        assert all(k.startswith(("backbone.", "lm_head.")) for k in files)
        assert {loaded.model.config.hybrid_override_pattern} == {"ME*E"}
    meta = load_model_on_meta(directory, torch.float32)
    apply_activation_checkpointing(meta.model)
    stored = stored_weights(meta.model, directory)
    assert set(stored.experts) == set(experts) and not stored.missing and not stored.converted
    materialize_(meta.model, directory, "cpu", method)
    want, got = state(loaded.model), state(meta.model)
    assert want.keys() == got.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    routers = [k for k in got if k.endswith("e_score_correction_bias")]
    assert (family == "nemotron_h") == bool(routers) and all(bool(got[k].abs().sum() > 0) for k in routers)


@pytest.mark.parametrize("family", MOE)
def test_the_expert_reader_fills_a_row_range_of_the_fused_parameter(moe_dirs, family):
    """Experts [3, 6) of 8 (rank 1's rows when 3 ranks shard 8 experts 3, 3, 2), read one at a time."""
    directory = moe_dirs[family]
    loaded = load_model(directory, device="cpu")
    meta = load_model_on_meta(directory, torch.float32)
    stored = stored_weights(meta.model, directory)
    for name, param in fused_experts(loaded.model).items():
        assert param.shape[0] == 8
        out = torch.full((3, *param.shape[1:]), float("nan"), dtype=torch.bfloat16)
        fill_expert_rows_(out, stored.experts[name], stored.files, (3, 0, 0))
        assert torch.equal(out, param[3:6].bfloat16()), name


def test_the_moe_ptq_skeleton_fills_to_the_skeleton_of_the_loaded_teacher(moe_dirs):
    """The student's fused experts are QuantExperts (their class subclassed), filled by the same reader."""
    directory = moe_dirs["qwen3_moe"]
    want, _ = ptq_skeleton(load_model(directory, device="cpu").model, QuantConfig())
    meta = load_model_on_meta(directory, torch.float32)
    student, report = ptq_skeleton(meta.model, QuantConfig())
    materialize_(student, directory, "cpu", "dcp")
    assert len(fused_experts(student)) == 4 and len(report.quantized_experts) == 2
    want = dict(want.named_parameters())
    assert all(torch.equal(p, want[n]) for n, p in student.named_parameters())


def test_a_bf16_teachers_student_rounds_each_tensor_through_the_teachers_own_dtype(moe_dirs):
    """build_sharded's `round_to` on a GPU: a bf16 nemotron_h teacher keeps its routers (gate.weight and the score
    correction buffer) in float32 (`_keep_in_fp32_modules_strict`), so the student copies those unrounded and the
    rest rounded through bf16, as `ptq_skeleton` of the loaded bf16 teacher does."""
    directory = moe_dirs["nemotron_h"]
    want, _ = ptq_skeleton(load_model(directory, device="cpu", dtype=torch.bfloat16).model, QuantConfig())
    teacher = load_model_on_meta(directory, torch.bfloat16).model
    dtypes = {file_name(n): t.dtype for n, t in [*teacher.named_parameters(), *teacher.named_buffers()]}
    assert dtypes["model.layers.1.mixer.gate.weight"] == torch.float32 != dtypes["model.layers.1.mixer.experts.up_proj"]
    student, _ = ptq_skeleton(load_model_on_meta(directory, torch.float32).model, QuantConfig())
    materialize_(student, directory, "cpu", "dcp", round_to=dtypes)
    got = state(student)
    for name, tensor in state(want).items():
        assert torch.equal(got[name], tensor), name
    gate = got["model.layers.1.mixer.gate.weight"]
    assert not torch.equal(gate, gate.bfloat16().float())  # unrounded: a single dtype would have rounded it


def test_a_missing_expert_tensor_is_refused_by_name(moe_dirs, tmp_path):
    for item in moe_dirs["mixtral"].iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    meta = load_model_on_meta(tmp_path, torch.float32)
    assert meta_unreadable(meta.model, tmp_path) is None  # distill builds it on meta, and materialize_ refuses it
    assert missing_weights(meta.model, tmp_path) == [
        "model.layers.1.mlp.experts.gate_up_proj (model.layers.1.block_sparse_moe.experts.5.w3.weight)"]
    with pytest.raises(ModelError, match=r"lack 1 parameters .*experts\.gate_up_proj "
                                         r"\(model\.layers\.1\.block_sparse_moe\.experts\.5\.w3\.weight\)"):
        materialize_(meta.model, tmp_path, "cpu", "dcp")


def test_checkpoints_meta_cannot_read_are_left_to_the_whole_build(moe_dirs, tmp_path):
    """A .bin-only directory, and quantized weights (gpt-oss's MXFP4 experts) that transformers dequantizes."""
    (tmp_path / "config.json").write_bytes((moe_dirs["qwen3_moe"] / "config.json").read_bytes())
    meta = load_model_on_meta(moe_dirs["qwen3_moe"], torch.float32)
    assert meta_unreadable(meta.model, moe_dirs["qwen3_moe"]) is None
    assert meta_unreadable(meta.model, tmp_path) == "it has no safetensors weight files"
    with pytest.raises(ModelError, match="no safetensors weight files; load it with --load-method whole"):
        materialize_(meta.model, tmp_path, "cpu", "dcp")
    meta.model.config.quantization_config = {"quant_method": "mxfp4"}
    assert "quantized (mxfp4)" in meta_unreadable(meta.model, moe_dirs["qwen3_moe"])
