"""Tests for `ckaqad diagnose` (commands/diagnose.py): config checks, the job end to end (files written
atomically: diagnosis.json/.md/.html, cka_layers.png, results.json), PTQ and loaded students, and the CLI."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import textwrap

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

from ckaqad.commands import diagnose
from ckaqad.commands.diagnose import Config, PTQOptions, run
from ckaqad.data.blocks import DataConfig
from ckaqad.errors import ConfigError
from ckaqad.quant.linear import QuantConfig
from ckaqad.report.results import read_results
from ckaqad.students.spec import build_ptq_student
from ckaqad.students.store import save_student_dir

pytestmark = pytest.mark.usefixtures("one_thread")

N_LAYERS = 2
OUT_FILES = ["cka_layers.png", "diagnosis.html", "diagnosis.json", "diagnosis.md", "results.json"]


def numbers(fidelity: dict) -> list[float]:
    """Every number of a Fidelity dict (the per-layer rows flattened), for pytest.approx."""
    rows = [v for row in fidelity["layers"] for v in row.values()]
    return rows + [v for k, v in sorted(fidelity.items()) if isinstance(v, int | float)]


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {node.target.id: nxt.value.value for node, nxt in zip(body, body[1:], strict=False)
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)}


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"format": "nvfp5"}, "--format"), ({"format": "nvfp4,int5"}, "--format"), ({"scheme": "w8a8"}, "--scheme"),
    ({"eval_blocks": 0}, "--eval-blocks"), ({"batch_size": 0}, "--batch-size"), ({"n_sink": -1}, "--n-sink"),
])
def test_diagnose_config_checks_name_the_flag(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Config(**kwargs)


def test_nested_quantization_options_check_their_flags_too():
    with pytest.raises(ConfigError, match="--weight-global"):
        Config(quant=PTQOptions(weight_global="static"))
    with pytest.raises(ConfigError, match="--calib-batches"):
        Config(quant=PTQOptions(calib_batches=0))


def test_ptq_options_are_quant_config_without_format_and_scheme():
    ours = {f.name: f.default for f in dataclasses.fields(PTQOptions)}
    theirs = {f.name: f.default for f in dataclasses.fields(QuantConfig) if f.name not in ("format", "scheme")}
    assert ours == theirs  # same names, same defaults
    docs = field_docs(QuantConfig)
    assert field_docs(PTQOptions) == {name: docs[name] for name in ours}  # and the same --help
    assert PTQOptions(exclude=["lm_head"]).quant("mxfp4", "w4a16") == QuantConfig(
        format="mxfp4", scheme="w4a16", exclude=("lm_head",))


def test_config_fields_and_flat_record():
    names = [f.name for f in dataclasses.fields(Config)]
    assert names == ["teacher", "student", "format", "scheme", "eval_blocks", "batch_size", "n_sink", "bootstrap",
                     "massive_factor", "device", "seed", "out", "quant", "data"]
    assert all(field_docs(Config).get(n) for n in names if n not in ("quant", "data"))
    flat = Config(format="nvfp4,mxfp4").flat()
    assert flat["format"] == "nvfp4,mxfp4" and flat["calib_batches"] == 4 and flat["seq_len"] == 256
    assert flat["exclude"] == list(QuantConfig().exclude)
    assert Config(format=" nvfp4, mxfp4 ,", scheme="w4a4,w4a16").formats == ["nvfp4", "mxfp4"]


# ---------------------------------------------------------------------------------------------------------
# run_diagnose and the CLI


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny teacher (model + tokenizer) and a local .txt data file."""
    root = tmp_path_factory.mktemp("diagnose")
    make_tiny_model(seed=0).save_pretrained(root / "teacher")
    make_tiny_tokenizer().save_pretrained(root / "teacher")
    gen = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "kappa", "lambda"]
    docs = [" ".join(words[i] for i in torch.randint(0, len(words), (30,), generator=gen).tolist())
            for _ in range(24)]
    (root / "data.txt").write_text("\n\n".join(docs))
    return root


def job(files, out, calib_batches: int = 1, **overrides) -> Config:
    fields = dict(teacher=str(files / "teacher"), eval_blocks=4, batch_size=2, device="cpu", out=str(out),
                  quant=PTQOptions(calib_batches=calib_batches),
                  data=DataConfig(data=str(files / "data.txt"), seq_len=32, heldout_fraction=0.25))
    return Config(**{**fields, **overrides})


def test_run_diagnose_writes_json_markdown_and_plot(files, tmp_path):
    out = tmp_path / "diag"
    returned = run(job(files, out), progress=False)
    assert sorted(p.name for p in out.iterdir()) == OUT_FILES
    assert list(tmp_path.iterdir()) == [out]  # no temp directory left beside it

    report = json.loads((out / "diagnosis.json").read_text())
    assert {"teacher", "variants", "data", "device", "cka_tokens", "token_rule", "eval_blocks", "seq_len",
            "runtime_s", "quantization", "config"} <= report.keys()
    assert report["teacher"]["source"] == str(files / "teacher")
    assert math.isfinite(report["teacher"]["perplexity"])
    assert report["eval_blocks"] == 4 and report["seq_len"] == 32 and report["device"] == "cpu"
    assert report["cka_tokens"] == 4 * (32 - 1)  # 4 held-out blocks, sink excluded, no BOS in the data
    assert report["config"]["calib_batches"] == 1 and report["config"]["format"] == "nvfp4"
    [variant] = report["variants"]
    assert variant["label"] == "nvfp4-w4a4"
    assert report["quantization"]["nvfp4-w4a4"]["quantized"]
    assert [row["index"] for row in variant["layers"]] == list(range(N_LAYERS))
    assert all(0.0 <= row["cka"] <= 1.0 for row in variant["layers"])
    assert variant["mean_cka"] < 1.0 and variant["kl_per_token"] > 0
    assert numbers(variant) == pytest.approx(numbers(returned["results"]["nvfp4-w4a4"].to_dict()))

    md = (out / "diagnosis.md").read_text()
    assert md.startswith(f"# Diagnosis: {files / 'teacher'}")
    assert "| nvfp4-w4a4 | " in md and "![per-layer CKA](cka_layers.png)" in md
    # A row per layer in the CKA table, the bootstrap-interval table and the massive-activation table.
    assert sum(line.startswith(("| 0 |", "| 1 |")) for line in md.splitlines()) == 3 * N_LAYERS
    assert "95% bootstrap intervals" in md and "## Massive activations (teacher)" in md
    assert all(row["cka_low"] <= row["cka"] <= row["cka_high"] for row in variant["layers"])
    assert [row["layer"] for row in report["teacher"]["massive"]] == list(range(N_LAYERS))
    assert (out / "cka_layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "diagnosis.html").read_text()
    assert page.startswith("<!doctype html>") and "<table>" in page and 'src="cka_layers.png"' in page

    results = read_results(out)  # the one schema: what compare reads
    assert results.kind == "diagnose" and results.teacher == report["teacher"]
    [model] = results.models
    assert model.label == "nvfp4-w4a4" and model.layers == variant["layers"]
    assert model.fidelity == returned["results"]["nvfp4-w4a4"].headline()
    assert model.quantization == report["quantization"]["nvfp4-w4a4"]
    assert results.meta["cka_tokens"] == report["cka_tokens"] and "quantization" not in results.meta


def test_diagnosis_markdown_says_which_layers_a_format_could_not_quantize(files, tmp_path):
    # INT4's group of 128 divides only down_proj's input (intermediate 128), not the hidden size 64.
    out = tmp_path / "diag"
    run(job(files, out, format="int4", scheme="w4a16", eval_blocks=2), progress=False)
    [line] = [ln for ln in (out / "diagnosis.md").read_text().splitlines() if ln.startswith("- int4-w4a16:")]
    assert line.startswith(f"- int4-w4a16: {N_LAYERS} Linear layers quantized (")
    assert f"{6 * N_LAYERS} × input dim 64 is not a multiple of the int4 block 128" in line
    assert "1 × excluded by pattern 'lm_head'" in line


def test_run_diagnose_is_atomic_on_failure(files, tmp_path, monkeypatch):
    out = tmp_path / "diag"
    out.mkdir()
    (out / "old.txt").write_text("previous result")

    def broken_plot(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(diagnose.plots, "plot_cka_layers", broken_plot)  # fails after diagnosis.json is written
    with pytest.raises(RuntimeError, match="disk full"):
        run(job(files, out, eval_blocks=2), progress=False)
    assert [p.name for p in out.iterdir()] == ["old.txt"]  # the previous DIR is untouched
    assert list(tmp_path.iterdir()) == [out]  # and the half-written temp dir is gone


def test_run_diagnose_checks_out_before_any_work(files, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not be loaded when --out is unusable")

    monkeypatch.setattr(diagnose, "load_model", no_loading)
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(ConfigError, match="--out .*taken exists and is not a directory"):
        run(job(files, tmp_path / "taken"), progress=False)


def test_cli_diagnose_two_formats(files, tmp_path, capsys):
    from ckaqad.cli import main

    out = tmp_path / "cli"
    code = main(["diagnose", "--teacher", str(files / "teacher"), "--data", str(files / "data.txt"),
                 "--seq-len", "32", "--heldout-fraction", "0.25", "--eval-blocks", "2", "--batch-size", "2",
                 "--device", "cpu", "--format", "nvfp4,mxfp4", "--calib-batches", "1", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "diagnosis.json").read_text())
    assert [v["label"] for v in report["variants"]] == ["nvfp4-w4a4", "mxfp4-w4a4"]
    assert all(len(v["layers"]) == N_LAYERS for v in report["variants"])
    assert "wrote" in capsys.readouterr().out


def test_cli_diagnose_user_error_exits_2(files, tmp_path, capsys):
    from ckaqad.cli import main

    code = main(["diagnose", "--teacher", str(files / "teacher"), "--data", str(tmp_path / "missing.txt"),
                 "--device", "cpu", "--out", str(tmp_path / "never")])
    assert code == 2
    assert "ckaqad: error: data path does not exist" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_a_saved_student_is_diagnosed_like_the_ptq_student_it_was_saved_from(files, tmp_path, capsys):
    from ckaqad.data.blocks import load_blocks
    from ckaqad.models.load import load_model

    config = job(files, tmp_path / "ptq")
    teacher = load_model(config.teacher, device="cpu")
    blocks = load_blocks(config.data, teacher.model, teacher.tokenizer)
    student, _ = build_ptq_student(teacher.model, config.quant.quant("nvfp4", "w4a4"), blocks)
    save_student_dir(student, tmp_path / "student", teacher.tokenizer, extra={"label": "mine"})

    ptq = run(config, progress=False)["results"]["nvfp4-w4a4"]
    loaded = run(job(files, tmp_path / "loaded", student=str(tmp_path / "student")), progress=True)
    mine = loaded["results"]["mine"]
    assert list(loaded["results"]) == ["mine"]
    assert numbers({**mine.to_dict(), "label": None}) == pytest.approx(numbers({**ptq.to_dict(), "label": None}),
                                                                       rel=1e-5)
    assert loaded["meta"]["quantization"]["mine"]["quantized"]  # the student's own record of its layers
    printed = capsys.readouterr().out
    assert "Fidelity to the teacher" in printed and "wrote" in printed
    assert torch.isfinite(torch.tensor(mine.kl_per_token)) and math.isfinite(mine.perplexity)
