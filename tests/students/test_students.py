"""Tests for `ckaqad.students`: a student directory carries its own config (it loads with no teacher, at its
own depth), the PTQ kind is built and calibrated in one place, and the `load` kind accepts models that are
not copies of the teacher (only the vocabulary must match)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_tiny_model

from ckaqad.data.blocks import build_blocks
from ckaqad.errors import CheckpointError, ConfigError
from ckaqad.paths import StudentDir, detect
from ckaqad.quant.apply import calibrate, quant_linears
from ckaqad.quant.linear import QuantConfig
from ckaqad.students.spec import (
    build_ptq_student,
    calibration_batches,
    high_precision_parameters,
    load_student,
    make_trainable,
)
from ckaqad.students.store import load_student_dir, save_student_dir

pytestmark = pytest.mark.usefixtures("one_thread")


def blocks(tokenizer, seq_len: int = 16):
    docs = [f"document {i}: " + "the quick brown fox jumps over the lazy dog " * 3 for i in range(40)]
    return build_blocks(docs, tokenizer, seq_len)


def ids(seed: int = 0, rows: int = 2, seq: int = 12):
    x = torch.randint(0, 256, (rows, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": x, "attention_mask": torch.ones_like(x)}


def test_ptq_student_is_calibrated_on_the_first_training_blocks(tiny_model, tiny_tokenizer):
    data = blocks(tiny_tokenizer)
    quant = QuantConfig(calib_batches=2, calib_batch_size=3, high_precision="train")
    student, report = build_ptq_student(tiny_model, quant, data)
    assert report.quantized and all(p.requires_grad for p in student.parameters())
    # the same amaxes as calibrating a fresh copy by hand on blocks 0..5
    by_hand = copy.deepcopy(tiny_model).float()
    from ckaqad.quant.apply import quantize_model_

    quantize_model_(by_hand, quant)
    calibrate(by_hand, [{"input_ids": data.train[i:i + 3], "attention_mask": torch.ones_like(data.train[i:i + 3])}
                        for i in (0, 3)])
    for name, layer in quant_linears(student).items():
        assert torch.equal(layer.input_amax, quant_linears(by_hand)[name].input_amax), name
    assert sum(b["input_ids"].shape[0] for b in calibration_batches(data, quant, "cpu")) == 6
    assert not quant_linears(tiny_model)  # the teacher is untouched


def test_frozen_high_precision_tensors_are_the_exported_bf16_values_and_do_not_train(tiny_model, tiny_tokenizer):
    data = blocks(tiny_tokenizer)
    quant = QuantConfig(calib_batches=2, calib_batch_size=3)
    assert quant.high_precision == "frozen"
    student, _ = build_ptq_student(tiny_model, quant, data)
    quantized = {id(m.weight) for m in quant_linears(student).values()}
    high = high_precision_parameters(student)
    assert {id(p) for p in student.parameters()} == quantized | {id(p) for p in high}
    assert {id(student.model.norm.weight), id(student.lm_head.weight)} <= {id(p) for p in high}  # untied head too
    for p in high:
        assert not p.requires_grad and p.dtype == torch.float32 and torch.equal(p, p.bfloat16().float())
    assert all(m.weight.requires_grad for m in quant_linears(student).values())
    # Rounded before calibration: the amaxes are those of the served (bf16) norms and embeddings.
    by_hand = copy.deepcopy(tiny_model).float()
    with torch.no_grad():
        for p in by_hand.parameters():
            if "proj" not in next(n for n, q in by_hand.named_parameters() if q is p):
                p.copy_(p.bfloat16())
    from ckaqad.quant.apply import quantize_model_

    quantize_model_(by_hand, quant)
    calibrate(by_hand, calibration_batches(data, quant, "cpu"))
    for name, layer in quant_linears(student).items():
        assert torch.equal(layer.input_amax, quant_linears(by_hand)[name].input_amax), name
    # make_trainable keeps the policy for a loaded student, and trains every tensor of an unquantized one.
    assert not any(p.requires_grad for p in high_precision_parameters(make_trainable(student)))
    assert all(p.requires_grad for p in make_trainable(copy.deepcopy(tiny_model)).parameters())


def test_ptq_w4a4_needs_data_and_a_quantizable_layer(tiny_model):
    with pytest.raises(ConfigError, match="calibration data"):
        build_ptq_student(tiny_model, QuantConfig(), None)
    with pytest.raises(ConfigError, match="no Linear layer"):
        build_ptq_student(tiny_model, QuantConfig(exclude=("*",), scheme="w4a16"), None)


def test_student_dir_round_trip_without_a_teacher(tmp_path, tiny_model, tiny_tokenizer):
    student, _ = build_ptq_student(tiny_model, QuantConfig(), blocks(tiny_tokenizer))
    save_student_dir(student, tmp_path / "s", tiny_tokenizer, extra={"label": "x"})
    loaded, meta = load_student_dir(tmp_path / "s")
    assert meta["label"] == "x" and meta["quant"]["scheme"] == "w4a4"
    assert sorted(meta["quantized"]) == sorted(quant_linears(student))
    with torch.no_grad():
        assert torch.equal(loaded(**ids()).logits, student(**ids()).logits)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert detect(tmp_path / "s") == "student"


def test_an_unquantized_student_of_another_depth_loads_through_the_load_kind(tmp_path, tiny_model, tiny_tokenizer):
    """A pruned model (the teacher with its last block removed), saved as an HF directory, is a student."""
    pruned = copy.deepcopy(tiny_model)
    pruned.model.layers = pruned.model.layers[:1]
    pruned.config.num_hidden_layers = 1
    pruned.save_pretrained(tmp_path / "pruned")
    tiny_tokenizer.save_pretrained(tmp_path / "pruned")
    loaded = load_student(tmp_path / "pruned", tiny_model)
    assert loaded.kind == "model" and len(loaded.model.model.layers) == 1
    with torch.no_grad():
        assert torch.allclose(loaded.model(**ids()).logits, pruned(**ids()).logits, atol=1e-6)
    # and it round-trips as a student directory with its own (1-block) config
    save_student_dir(loaded.model, tmp_path / "s", tiny_tokenizer)
    again, meta = load_student_dir(tmp_path / "s")
    assert meta["quant"] is None and again.config.num_hidden_layers == 1


def test_a_student_with_another_vocabulary_is_refused(tmp_path, tiny_model, tiny_tokenizer):
    other = make_tiny_model(vocab_size=300)
    other.save_pretrained(tmp_path / "other")
    tiny_tokenizer.save_pretrained(tmp_path / "other")
    with pytest.raises(CheckpointError, match="vocabulary of 300 tokens, the teacher 259"):
        load_student(tmp_path / "other", tiny_model)


def test_not_a_student_is_a_clear_error(tmp_path, tiny_model):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_student(tmp_path / "missing", tiny_model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is not a run, student, export or HF model directory"):
        load_student(tmp_path / "empty", tiny_model)


def test_damaged_student_weights_are_a_checkpoint_error(tmp_path, tiny_model, tiny_tokenizer):
    student, _ = build_ptq_student(tiny_model, QuantConfig(scheme="w4a16"), None)
    save_student_dir(student, tmp_path / "s", tiny_tokenizer)
    StudentDir(tmp_path / "s").weights.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_student_dir(tmp_path / "s")


def test_weights_of_another_architecture_are_a_checkpoint_error(tmp_path, tiny_model, tiny_tokenizer):
    student, _ = build_ptq_student(tiny_model, QuantConfig(scheme="w4a16"), None)
    save_student_dir(student, tmp_path / "s", tiny_tokenizer)
    meta = StudentDir(tmp_path / "s").meta
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "quant": None}))  # claims to be unquantized
    with pytest.raises(CheckpointError, match="weights do not fit the student"):
        load_student_dir(tmp_path / "s")


def test_a_student_dir_in_several_files_round_trips_bit_exact(tmp_path, tiny_model, tiny_tokenizer):
    """A large student's directory: shards plus model.safetensors.index.json (`export.shards`). It is a student
    directory to `detect` and to `load_student` (what diagnose, eval and export read), bit for bit; a missing
    shard is a CheckpointError."""
    student, _ = build_ptq_student(tiny_model, QuantConfig(), blocks(tiny_tokenizer))
    save_student_dir(student, tmp_path / "s", tiny_tokenizer, shard_size_bytes=50_000)
    shards = sorted((tmp_path / "s").glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and StudentDir(tmp_path / "s").shard_index.is_file()
    assert not StudentDir(tmp_path / "s").weights.exists() and detect(tmp_path / "s") == "student"
    loaded = load_student(tmp_path / "s", tiny_model)
    assert loaded.kind == "student"
    want = student.state_dict()
    got = loaded.model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with torch.no_grad():
        assert torch.equal(loaded.model(**ids()).logits, student(**ids()).logits)
    shards[1].unlink()
    with pytest.raises(CheckpointError, match="cannot read the weights"):
        load_student_dir(tmp_path / "s")
