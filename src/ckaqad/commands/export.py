"""`ckaqad export`: write a trained (or PTQ) NVFP4 student as a deployable checkpoint — compressed-tensors
for vLLM or modelopt for TensorRT-LLM — and read it back to check it (`export.verify`).

The student is a run's (its final student, else its newest checkpoint), a student directory, or the
teacher's calibrated PTQ student (`--ptq`, calibrated on `--data` blocks of `--seq-len` tokens). The run's
teacher comes from its config.yaml unless `--teacher` is given. Nothing is loaded before the output
directory has been checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ckaqad.data.blocks import DataConfig, load_blocks
from ckaqad.errors import CheckpointError, ConfigError
from ckaqad.export.layouts import LAYOUTS
from ckaqad.export.verify import verify_export
from ckaqad.export.writer import ExportSummary, check_out_dir, export_student
from ckaqad.files import check_writable
from ckaqad.models.load import load_model
from ckaqad.paths import RunDir, detect, run_teacher_spec
from ckaqad.quant.apply import coverage_of
from ckaqad.quant.linear import QuantConfig
from ckaqad.students.spec import build_ptq_student, load_student, run_student_source

HELP = "write a deployable NVFP4 checkpoint (compressed-tensors for vLLM, modelopt for TensorRT-LLM)"


@dataclass
class Config:
    run: str | None = None
    """a distillation run directory (its final student, else its newest checkpoint)"""
    student: str | None = None
    """a student directory (or any run/student directory) instead of --run"""
    teacher: str | None = None
    """teacher the student was built from (default: the run's teacher, else the embedded model)"""
    format: str = "nvfp4"
    """PTQ format when exporting the teacher's PTQ student (--ptq)"""
    scheme: str = "w4a4"
    """PTQ scheme when exporting the teacher's PTQ student (--ptq)"""
    ptq: bool = False
    """export the calibrated PTQ student of --teacher (no training) instead of a run"""
    layout: str = "compressed-tensors"
    """compressed-tensors (vLLM) or modelopt (TensorRT-LLM)"""
    out: str = "exports/student"
    """export directory"""
    overwrite: bool = False
    """replace an existing export at --out"""
    shard_size_mb: int = 2048
    """largest safetensors shard in MiB"""
    verify: bool = True
    """read the export back (compressed-tensors' decompressor, ckaqad's loader, transformers) and compare"""
    device: str | None = None
    """cpu or cuda (default: cuda when available)"""
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        LAYOUTS.check(self.layout)
        if self.ptq:
            QuantConfig(format=self.format, scheme=self.scheme)  # validates both names before any work
        sources = sum(bool(x) for x in (self.run, self.student, self.ptq))
        if sources != 1:
            raise ConfigError("give exactly one of --run DIR, --student DIR or --ptq")
        if self.shard_size_mb < 1:
            raise ConfigError(f"--shard-size-mb must be at least 1, got {self.shard_size_mb}")






def _check_source(source: Path) -> None:
    """CheckpointError unless `source` is a student directory or a run holding one (before any loading)."""
    if not source.is_dir():
        raise CheckpointError(f"{source} is not a directory")
    kind = detect(source)
    has_student = kind == "student" or (kind == "run" and run_student_source(RunDir(source)) is not None)
    if not has_student:
        raise CheckpointError(f"{source} has no student checkpoint (no student/ and no complete checkpoint)")


def _runtime_kl_text(kl: dict | None) -> str:
    """The verify line's fixed-text comparison with the transformers runtime ("" when there is none)."""
    if kl is None:
        return ""
    return (f"; KL(ckaqad \u2016 transformers runtime) = {kl['kl_mean']:.3e} nats/token "
            f"(max {kl['kl_max']:.3e}) on {kl['tokens']} tokens")


def run(config: Config) -> ExportSummary:
    """Rebuild the student on its teacher's architecture, write the export, print its summary and check it."""
    out_dir = Path(config.out).expanduser()
    check_out_dir(out_dir, config.overwrite)
    check_writable(out_dir)  # before any work: a file in the way of a parent, or a read-only parent
    source = None if config.ptq else Path(config.run or config.student).expanduser()
    if source is not None:
        _check_source(source)
    teacher_spec = config.teacher or (run_teacher_spec(source) if source is not None else None) or "default"
    teacher = load_model(teacher_spec, device=config.device)
    if config.ptq:
        quant = QuantConfig(format=config.format, scheme=config.scheme)
        blocks = load_blocks(config.data, teacher.model, teacher.tokenizer) if quant.quantize_inputs else None
        student, _ = build_ptq_student(teacher.model, quant, blocks)
    else:
        student = load_student(source, teacher.model).model
    print(coverage_of(student).coverage_line())
    summary = export_student(student, teacher.tokenizer, out_dir, config.layout, overwrite=config.overwrite,
                             teacher_dir=teacher.model_dir, shard_size_bytes=config.shard_size_mb * 2**20)
    print(summary.table())
    print(f"wrote {out_dir}")
    if config.verify:
        check = verify_export(out_dir, student)
        worst = check["max_relative_weight_difference"]
        print(f"verified {check['layers']} quantized layers: codes and FP8 block scales equal the student's; "
              f"{check['reader']} {check['reader_agreement']} (max relative difference {worst:.2e}); "
              f"ckaqad.export.reader.load_export bit-exact on {check['load_bit_exact_layers']}/{check['layers']}"
              + _runtime_kl_text(check["runtime_kl"]))
    return summary
