"""Tests for `ckaqad export` (commands/export.py): its config, finding a run's teacher, and end to end on a
tiny teacher saved as an HF directory."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from conftest import save_tiny_teacher

from ckaqad import paths
from ckaqad.commands import distill, export
from ckaqad.data.blocks import DataConfig, eval_batches, load_blocks
from ckaqad.errors import CheckpointError, ConfigError, ExportError
from ckaqad.eval.fidelity import measure_fidelity
from ckaqad.export.reader import is_export_dir, load_export
from ckaqad.models.load import load_model
from ckaqad.objectives.compose import ObjectiveConfig
from ckaqad.paths import RunDir
from ckaqad.quant.apply import quant_linears
from ckaqad.quant.linear import QuantConfig
from ckaqad.students.spec import build_ptq_student
from ckaqad.students.store import save_student_dir
from ckaqad.train.checkpointer import CheckpointConfig
from ckaqad.train.trainer import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("teacher")
    save_tiny_teacher(directory)
    return directory


def corpus(path):
    path.write_text("\n\n".join(f"document {i}: the student reads sixteen values and rounds them. " * 4
                                for i in range(12)))
    return path


def test_config_fields_defaults_and_validation():
    names = [f.name for f in dataclasses.fields(export.Config)]
    assert names == ["run", "student", "teacher", "format", "scheme", "ptq", "layout", "out", "overwrite",
                     "shard_size_mb", "verify", "device", "data"]
    config = export.Config(ptq=True)
    assert (config.layout, config.out, config.shard_size_mb, config.verify) == (
        "compressed-tensors", "exports/student", 2048, True)
    assert isinstance(config.data, DataConfig)
    with pytest.raises(ConfigError, match="exactly one of --run DIR, --student DIR or --ptq"):
        export.Config()
    with pytest.raises(ConfigError, match="exactly one of"):
        export.Config(ptq=True, run="r")
    with pytest.raises(ConfigError, match="--layout.*did you mean: modelopt"):
        export.Config(ptq=True, layout="modelop")
    with pytest.raises(ConfigError, match="--scheme"):
        export.Config(ptq=True, scheme="w8a8")
    with pytest.raises(ConfigError, match="--shard-size-mb"):
        export.Config(ptq=True, shard_size_mb=0)


def make_run(root, teacher: str):
    run = RunDir(root)
    root.mkdir(parents=True)
    run.config.write_text(yaml.safe_dump({"teacher": teacher, "seed": 0}))
    run.student.root.mkdir()
    step = run.checkpoint(50)
    step.student.root.mkdir(parents=True)
    step.marker.write_text("50")
    return run


def test_run_of_walks_up_from_a_student_dir_explicitly(tmp_path):
    run = make_run(tmp_path / "run", "some/teacher")
    step = run.checkpoint(50)
    for path in (run.root, run.student.root, step.root, step.student.root):
        assert paths.owning_run(path) == RunDir(run.root.resolve()), path
        assert paths.run_teacher_spec(path) == "some/teacher"
    # directories that are not a run, its student or a checkpoint's student belong to no run
    for path in (run.checkpoints, tmp_path, tmp_path / "elsewhere" / "student"):
        path.mkdir(parents=True, exist_ok=True)
        assert paths.owning_run(path) is None, path
    (run.root / "student" / "nested").mkdir()
    assert paths.owning_run(run.root / "student" / "nested") is None
    run.config.write_text(": : not yaml [")
    with pytest.raises(CheckpointError, match="cannot read"):
        paths.run_teacher_spec(run.student.root)


def test_ptq_export_calibrates_on_the_data_and_verifies(tmp_path, teacher_dir, capsys):
    data = corpus(tmp_path / "docs.txt")
    out = tmp_path / "out"
    config = export.Config(ptq=True, teacher=str(teacher_dir), out=str(out), device="cpu",
                           data=DataConfig(data=str(data), seq_len=16))
    summary = export.run(config)
    printed = capsys.readouterr().out
    assert "bits / quantized param" in printed and f"wrote {out}" in printed
    assert "verified 14 quantized layers" in printed and "bit-exact on 14/14" in printed
    assert summary.quantized_layers == 14 and is_export_dir(out)
    # the PTQ student is the one place's: calibrated on the first blocks of --data, not the built-in corpus
    teacher = load_model(teacher_dir, device="cpu")
    blocks = load_blocks(DataConfig(data=str(data), seq_len=16), teacher.model, teacher.tokenizer)
    want, _ = build_ptq_student(teacher.model, QuantConfig(), blocks)
    loaded, _ = load_export(out)
    for name, m in quant_linears(loaded).items():
        assert torch.equal(m.input_amax, quant_linears(want)[name].input_amax), name
    with pytest.raises(ExportError, match="already exists"):
        export.run(config)


def test_run_export_finds_the_teacher_in_the_runs_config(tmp_path, teacher_dir, capsys):
    teacher = load_model(teacher_dir, device="cpu")
    student, _ = build_ptq_student(teacher.model, QuantConfig(scheme="w4a16"), None)
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.config.write_text(yaml.safe_dump({"teacher": str(teacher_dir)}))
    save_student_dir(student, run.checkpoint(3).student.root, teacher.tokenizer)
    run.checkpoint(3).marker.write_text("")
    for i, source in enumerate((dict(run=str(run.root)), dict(student=str(run.checkpoint(3).student.root)))):
        out = tmp_path / f"out{i}"
        summary = export.run(export.Config(**source, out=str(out), layout="modelopt", device="cpu"))
        assert summary.layout == "modelopt" and summary.scheme == "w4a16"
        assert "verified 14 quantized layers" in capsys.readouterr().out


def test_a_run_whose_student_is_in_several_files_exports_and_verifies(tmp_path, teacher_dir, capsys):
    """A large run's student/ (shards + model.safetensors.index.json, as a sharded run streams it) is read like
    a one-file student: the export holds the student's weights and verifies."""
    teacher = load_model(teacher_dir, device="cpu")
    student, _ = build_ptq_student(teacher.model, QuantConfig(scheme="w4a16"), None)
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.config.write_text(yaml.safe_dump({"teacher": str(teacher_dir)}))
    save_student_dir(student, run.student.root, teacher.tokenizer, shard_size_bytes=50_000)
    assert run.student.shard_index.is_file() and not run.student.weights.exists()
    export.run(export.Config(run=str(run.root), out=str(tmp_path / "out"), device="cpu"))
    assert "verified 14 quantized layers" in capsys.readouterr().out
    loaded, _ = load_export(tmp_path / "out")
    for name, m in quant_linears(loaded).items():
        assert torch.equal(m.quantized_weight(), quant_linears(student)[name].quantized_weight().detach()), name


def test_missing_or_empty_sources_fail_before_any_loading(tmp_path):
    missing, empty = tmp_path / "no-run", tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=f"{missing} is not a directory"):
        export.run(export.Config(run=str(missing), out=str(tmp_path / "out")))
    with pytest.raises(CheckpointError, match=f"{empty} has no student checkpoint"):
        export.run(export.Config(student=str(empty), teacher="/nowhere", out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("policy", ["frozen", "train"])
def test_a_trained_run_and_its_export_give_the_same_heldout_numbers(tmp_path, teacher_dir, policy):
    """With the high-precision tensors frozen at their bf16 values (the default) the run's final held-out
    numbers are the export's, to the last bit; with float32 masters (`train`) the export is another model."""
    data = corpus(tmp_path / "docs.txt")
    data_config = DataConfig(data=str(data), seq_len=16)
    train = TrainConfig(steps=3, lr=1e-3, warmup_steps=1, batch_size=2, cka_tokens=16, eval_every=100,
                        eval_blocks=2, progress=False)
    config = distill.Config(teacher=str(teacher_dir), out=str(tmp_path / "run"), device="cpu", train=train,
                            objective=ObjectiveConfig(loss="kl"),
                            quant=QuantConfig(calib_batch_size=2, high_precision=policy), data=data_config,
                            checkpoint=CheckpointConfig(save_every=100))
    final = distill.run(config)["final"]
    export.run(export.Config(run=str(tmp_path / "run"), out=str(tmp_path / "export"), device="cpu"))
    teacher = load_model(teacher_dir, device="cpu")
    blocks = load_blocks(data_config, teacher.model, teacher.tokenizer)
    exported, _ = load_export(tmp_path / "export")
    results, _ = measure_fidelity(teacher.model, {"export": exported},
                                  eval_batches(blocks.heldout, 2, torch.device("cpu"), limit=2),
                                  exclude_token_ids=(teacher.tokenizer.bos_token_id,), progress=False)
    served = results["export"]
    same = [final[k] == getattr(served, k) for k in ("kl_per_token", "perplexity", "top1_agreement", "mean_cka")]
    if policy == "frozen":
        assert all(same), (final, served.headline())
    else:
        assert not all(same)
