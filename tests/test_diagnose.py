"""Tests for `ckaqad.diagnose`: fidelity of a tiny teacher to itself and to an NVFP4 W4A4 student, the
`--layers` parser, and the `diagnose` job end to end (files written atomically, and through the CLI)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

from ckaqad import diagnose
from ckaqad.cli import main
from ckaqad.data import DataConfig
from ckaqad.diagnose import DiagnoseConfig, measure_fidelity, parse_layers, run_diagnose
from ckaqad.errors import ConfigError
from ckaqad.models import decoder_layers
from ckaqad.quantize import QuantConfig, build_student, calibrate

N_LAYERS = 2
BATCH, SEQ, N_BATCHES = 2, 16, 3


def random_batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Byte tokens only (no BOS/EOS/pad), so every position but the sink is a valid CKA token."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(N_BATCHES):
        ids = torch.randint(0, 256, (BATCH, SEQ), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


@pytest.fixture(scope="module")
def teacher():
    return make_tiny_model(seed=0).requires_grad_(False)


@pytest.fixture(scope="module")
def w4a4_student(teacher):
    student, _ = build_student(teacher, QuantConfig(format="nvfp4", scheme="w4a4"))
    calibrate(student, random_batches(seed=1))
    return student.requires_grad_(False)


def numbers(fidelity: dict) -> list[float]:
    """Every number of a Fidelity dict (the per-layer rows flattened), for pytest.approx."""
    rows = [v for row in fidelity["layers"] for v in row.values()]
    return rows + [v for k, v in sorted(fidelity.items()) if isinstance(v, int | float)]


def no_hooks_left(model) -> bool:
    return all(not block._forward_hooks for block in decoder_layers(model))


# ---------------------------------------------------------------------------------------------------------
# measure_fidelity


def test_teacher_against_a_copy_of_itself_is_perfect(teacher):
    results, teacher_stats = measure_fidelity(teacher, {"copy": copy.deepcopy(teacher)}, random_batches(),
                                              progress=False)
    r = results["copy"]
    assert [row["index"] for row in r.layers] == list(range(N_LAYERS))
    for row in r.layers:
        assert row["cka"] == pytest.approx(1.0, abs=1e-6)
        assert row["cka_debiased"] == pytest.approx(1.0, abs=1e-6)
    assert r.mean_cka == pytest.approx(1.0, abs=1e-6) and r.min_cka == pytest.approx(1.0, abs=1e-6)
    assert r.kl_per_token == pytest.approx(0.0, abs=1e-7)
    assert r.top1_agreement == 1.0
    assert r.perplexity == pytest.approx(teacher_stats["perplexity"], rel=1e-6)
    # 1 sink position per sequence is left out of CKA; the last position predicts nothing.
    assert r.cka_tokens == N_BATCHES * BATCH * (SEQ - 1)
    assert r.predicted_tokens == teacher_stats["predicted_tokens"] == N_BATCHES * BATCH * (SEQ - 1)
    assert no_hooks_left(teacher)


def test_the_teacher_object_itself_as_student_is_perfect(teacher):
    # `ckaqad eval --model default` measures the teacher against itself: one module, two sets of hooks, and a
    # last batch smaller than the first (rows left from a bigger batch must not be used).
    batches = random_batches()
    batches[-1] = {k: v[:1] for k, v in batches[-1].items()}
    results, _ = measure_fidelity(teacher, {"self": teacher}, batches, progress=False)
    r = results["self"]
    assert r.kl_per_token == 0.0 and r.top1_agreement == 1.0
    assert r.mean_cka == pytest.approx(1.0, abs=1e-6) and r.min_cka == pytest.approx(1.0, abs=1e-6)
    assert r.cka_tokens == ((N_BATCHES - 1) * BATCH + 1) * (SEQ - 1)
    assert no_hooks_left(teacher)


def test_nvfp4_w4a4_student_drifts_from_the_teacher(teacher, w4a4_student):
    results, teacher_stats = measure_fidelity(teacher, {"nvfp4-w4a4": w4a4_student}, random_batches(),
                                              progress=False)
    r = results["nvfp4-w4a4"]
    assert r.label == "nvfp4-w4a4"
    for row in r.layers:
        assert 0.0 <= row["cka"] < 1.0 - 1e-6
    assert r.mean_cka < 1.0 - 1e-6 and r.min_cka <= r.mean_cka
    assert r.min_cka == min(row["cka"] for row in r.layers)
    assert r.min_cka_layer == min(r.layers, key=lambda row: row["cka"])["index"]
    assert r.kl_per_token > 1e-6
    assert 0.0 <= r.top1_agreement <= 1.0
    assert math.isfinite(r.perplexity) and r.perplexity != pytest.approx(teacher_stats["perplexity"], rel=1e-6)
    assert no_hooks_left(teacher) and no_hooks_left(w4a4_student)


def test_students_are_measured_independently(teacher, w4a4_student):
    together, _ = measure_fidelity(teacher, {"copy": copy.deepcopy(teacher), "q": w4a4_student}, random_batches(),
                                   progress=False)
    alone, _ = measure_fidelity(teacher, {"q": w4a4_student}, random_batches(), progress=False)
    assert numbers(together["q"].to_dict()) == pytest.approx(numbers(alone["q"].to_dict()), rel=1e-6)
    assert together["copy"].mean_cka == pytest.approx(1.0, abs=1e-6)


def test_layer_subset(teacher, w4a4_student):
    results, _ = measure_fidelity(teacher, {"q": w4a4_student}, random_batches(), layers=[1], progress=False)
    full, _ = measure_fidelity(teacher, {"q": w4a4_student}, random_batches(), progress=False)
    assert [row["index"] for row in results["q"].layers] == [1]
    assert results["q"].layers[0] == pytest.approx(full["q"].layers[1])


def test_sinks_padding_and_excluded_tokens_are_left_out_of_cka(teacher):
    batches = random_batches()
    for b in batches:
        b["input_ids"][:, 5] = 256  # a BOS in the middle of each sequence
        b["attention_mask"][0, -4:] = 0  # right padding on one row
    padded = 4 * N_BATCHES
    kwargs = dict(progress=False)
    count = {}
    for n_sink, exclude in ((0, ()), (1, ()), (3, ()), (1, (256,))):
        results, _ = measure_fidelity(teacher, {"s": copy.deepcopy(teacher)}, batches, n_sink=n_sink,
                                      exclude_token_ids=exclude, **kwargs)
        count[n_sink, exclude] = results["s"].cka_tokens
    real = N_BATCHES * BATCH * SEQ - padded
    assert count[0, ()] == real
    assert count[1, ()] == real - N_BATCHES * BATCH
    assert count[3, ()] == real - 3 * N_BATCHES * BATCH
    assert count[1, (256,)] == real - N_BATCHES * BATCH - N_BATCHES * BATCH


# ---------------------------------------------------------------------------------------------------------
# parse_layers


@pytest.mark.parametrize(("spec", "expected"), [
    ("all", [0, 1, 2, 3, 4, 5]), ("", [0, 1, 2, 3, 4, 5]), ("0,1", [0, 1]), ("3", [3]), ("1-3", [1, 2, 3]),
    ("0,2-4", [0, 2, 3, 4]), ("4,0,4,1-2", [0, 1, 2, 4]), ("-1", [5]), ("0,-2", [0, 4]), (" 1 , 3-4 ", [1, 3, 4]),
    ("5-5", [5]),
])
def test_parse_layers(spec, expected):
    assert parse_layers(spec, 6) == expected


@pytest.mark.parametrize("spec", ["6", "0,6", "5-6", "-7", "0-10"])
def test_parse_layers_rejects_out_of_range(spec):
    with pytest.raises(ConfigError, match=r"--layers .*out of range for a model with 6 layers"):
        parse_layers(spec, 6)


@pytest.mark.parametrize("spec", ["first", "1-", "0,,1", "1.5", "a-b"])
def test_parse_layers_rejects_malformed(spec):
    with pytest.raises(ConfigError, match="--layers must be 'all' or a list like 0,4,8-11"):
        parse_layers(spec, 6)


def test_parse_layers_rejects_a_backwards_range():
    with pytest.raises(ConfigError, match="--layers '3-1'.*backwards"):
        parse_layers("3-1", 6)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"format": "nvfp5"}, "--format"), ({"format": "nvfp4,int5"}, "--format"), ({"scheme": "w8a8"}, "--scheme"),
    ({"eval_blocks": 0}, "--eval-blocks"), ({"batch_size": 0}, "--batch-size"), ({"n_sink": -1}, "--n-sink"),
])
def test_diagnose_config_checks_name_the_flag(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DiagnoseConfig(**kwargs)


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


def job(files, out, **overrides):
    fields = dict(teacher=str(files / "teacher"), eval_blocks=4, batch_size=2, device="cpu", out=str(out))
    config = DiagnoseConfig(**{**fields, **overrides})
    return config, DataConfig(data=str(files / "data.txt"), seq_len=32, heldout_fraction=0.25)


def test_run_diagnose_writes_json_markdown_and_plot(files, tmp_path):
    out = tmp_path / "diag"
    config, data_config = job(files, out)
    returned = run_diagnose(config, data_config, {"calib_batches": 1}, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["cka_layers.png", "diagnosis.json", "diagnosis.md"]
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
    assert sum(line.startswith(("| 0 |", "| 1 |")) for line in md.splitlines()) == N_LAYERS
    assert (out / "cka_layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diagnosis_markdown_says_which_layers_a_format_could_not_quantize(files, tmp_path):
    # INT4's group of 128 divides only down_proj's input (intermediate 128), not the hidden size 64.
    out = tmp_path / "diag"
    config, data_config = job(files, out, format="int4", scheme="w4a16", eval_blocks=2)
    run_diagnose(config, data_config, {"calib_batches": 1}, progress=False)
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

    monkeypatch.setattr(diagnose, "plot_cka_layers", broken_plot)  # fails after diagnosis.json is written
    config, data_config = job(files, out, eval_blocks=2)
    with pytest.raises(RuntimeError, match="disk full"):
        run_diagnose(config, data_config, {"calib_batches": 1}, progress=False)
    assert [p.name for p in out.iterdir()] == ["old.txt"]  # the previous DIR is untouched
    assert list(tmp_path.iterdir()) == [out]  # and the half-written temp dir is gone


def test_run_diagnose_checks_out_before_any_work(files, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not be loaded when --out is unusable")

    monkeypatch.setattr("ckaqad.models.load_model", no_loading)
    (tmp_path / "taken").write_text("a file")
    config, data_config = job(files, tmp_path / "taken")
    with pytest.raises(ConfigError, match="--out .*taken exists and is not a directory"):
        run_diagnose(config, data_config, {}, progress=False)


def test_cli_diagnose_two_formats(files, tmp_path, capsys):
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
    code = main(["diagnose", "--teacher", str(files / "teacher"), "--data", str(tmp_path / "missing.txt"),
                 "--device", "cpu", "--out", str(tmp_path / "never")])
    assert code == 2
    assert "ckaqad: error: data path does not exist" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
