"""Tests for `ckaqad.commands.demo`: one tiny demo (2-layer teacher saved as an HF directory, a local text file, 4 steps
per method on CPU) and its report: files, sections, and numbers that agree with the run directories."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_teacher

from ckaqad.commands import demo as demo_command
from ckaqad.commands.demo import METHODS
from ckaqad.commands.demo import Config as DemoConfig
from ckaqad.errors import ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = 4
RUN_DIRS = {"KL-QAD": "kl", "CKA-QAD": "kl-cka"}


def corpus_text() -> str:
    """About 6 KB of varied deterministic text in 40 documents (prose, arithmetic, code)."""
    words = ["scale", "block", "tensor", "layer", "token", "student", "teacher", "gradient", "round", "store"]
    docs = []
    for d in range(40):
        if d % 3 == 0:
            docs.append("\n".join(f"def g{d}_{i}(x):\n    return x + {d * i}" for i in range(3)))
        elif d % 3 == 1:
            docs.append(" ".join(f"{d + i} * {i} = {(d + i) * i}." for i in range(9)))
        else:
            docs.append(" ".join(f"The {words[(d + i) % 10]} {words[(3 * d + i) % 10]}s the {words[(d * i) % 10]}."
                                 for i in range(8)))
    return "\n\n".join(docs) + "\n"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo_inputs")
    save_tiny_teacher(root / "teacher")
    (root / "data.txt").write_text(corpus_text())
    return root


def demo_config(inputs: Path, out: Path, **overrides) -> DemoConfig:
    # eval_blocks <= 8 and a multiple of batch_size: the runs' final evaluation (min(8, eval_blocks) blocks)
    # and the report's diagnosis then see the same held-out batches.
    fields = dict(teacher=str(inputs / "teacher"), steps=STEPS, lr=1e-4, batch_size=2, seq_len=32, cka_tokens=32,
                  eval_blocks=6, data=str(inputs / "data.txt"), device="cpu", out=str(out))
    return DemoConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def demo(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    result = demo_command.run(demo_config(inputs, out))
    return out, result


def read_json(path: Path):
    return json.loads(path.read_text())


def run_rows(run_dir: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["kind"] == kind]


def table_rows(markdown: str, header: str) -> dict[str, list[str]]:
    """{first cell: other cells} of the markdown table whose header row starts with `header`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


# ------------------------------------------------------------------------------------------------ files


def test_demo_writes_report_and_both_runs(demo):
    out, _ = demo
    for name in ("report.md", "report.html", "report.json"):
        assert (out / name).stat().st_size > 500, name
    for name in ("cka_layers.png", "loss_curves.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC), name
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(RUN_DIRS.values())
    assert set(METHODS) == set(RUN_DIRS)
    for label, run in RUN_DIRS.items():
        run_dir = out / "runs" / run
        assert (run_dir / "student" / "model.safetensors").is_file(), label
        assert (run_dir / "cka_drift.png").read_bytes().startswith(PNG_MAGIC), label
        assert [r["step"] for r in run_rows(run_dir, "train")] == list(range(1, STEPS + 1))
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step-{STEPS:06d}"]
        assert read_json(run_dir / "summary.json")["loss"] == METHODS[label]


def test_markdown_has_the_sections_and_every_model(demo):
    out, _ = demo
    md = (out / "report.md").read_text()
    assert md.startswith("# ckaqad demo: NVFP4 PTQ vs KL-QAD vs CKA-QAD\n")
    headings = [line for line in md.splitlines() if line.startswith("#")]
    assert headings == ["# ckaqad demo: NVFP4 PTQ vs KL-QAD vs CKA-QAD", "## Fidelity to the teacher (held out)",
                        "## Per-layer CKA"]
    fidelity = table_rows(md, "| model |")
    assert list(fidelity) == ["teacher (BF16/FP32)", "PTQ", "KL-QAD", "CKA-QAD"]
    layers = table_rows(md, "| layer |")
    assert list(layers) == ["0", "1"]
    assert all(len(cells) == 3 for cells in layers.values())  # PTQ, KL-QAD, CKA-QAD
    assert f"train {STEPS} steps of 2×32 tokens" in md and "seed 0" in md and "on 32 sampled tokens" in md
    assert "Held-out evaluation on 6 blocks" in md
    # every linked image exists
    for link in re.findall(r"\]\(([^)]+\.png)\)", md):
        assert (out / link).read_bytes().startswith(PNG_MAGIC), link


def test_html_renders_the_markdown(demo):
    out, _ = demo
    html = (out / "report.html").read_text()
    assert html.startswith("<!doctype html>") and html.rstrip().endswith("</html>")
    assert html.count("<table>") == 2
    assert "<h2>Fidelity to the teacher (held out)</h2>" in html and "<h2>Per-layer CKA</h2>" in html
    assert '<img alt="per-layer CKA" src="cka_layers.png"' in html
    models = read_json(out / "report.json")["models"]
    for label, model in models.items():
        assert f"<td>{label}</td>" in html
        assert f"<td>{model['kl_per_token']:.4f}</td>" in html and f"<td>{model['mean_cka']:.4f}</td>" in html


# -------------------------------------------------------------------------------------- consistent numbers


def test_json_final_kl_and_cka_equal_the_runs_final_eval(demo):
    out, result = demo
    report = read_json(out / "report.json")
    assert list(report["models"]) == ["PTQ", "KL-QAD", "CKA-QAD"]
    for label, run in RUN_DIRS.items():
        run_dir = out / "runs" / run
        final_eval = run_rows(run_dir, "eval")[-1]
        assert final_eval["step"] == STEPS
        assert final_eval == read_json(run_dir / "summary.json")["final"]
        model = report["models"][label]
        # the same student on the same held-out blocks and tokens: the same numbers
        for key in ("kl_per_token", "perplexity", "top1_agreement", "mean_cka", "min_cka"):
            assert model[key] == pytest.approx(final_eval[key], rel=1e-9, abs=1e-12), (label, key)
        assert {str(row["index"]): row["cka"] for row in model["layers"]} == pytest.approx(final_eval["cka_layers"])
        assert report["teacher"]["perplexity"] == pytest.approx(final_eval["teacher_perplexity"], rel=1e-12)
        assert result["results"][label].kl_per_token == model["kl_per_token"]
    # the trained students moved away from the PTQ start
    ptq = report["models"]["PTQ"]
    assert all(report["models"][label]["kl_per_token"] != ptq["kl_per_token"] for label in RUN_DIRS)


def test_json_training_stats_come_from_the_runs_metrics(demo):
    out, _ = demo
    report = read_json(out / "report.json")
    for label, run in RUN_DIRS.items():
        rows = run_rows(out / "runs" / run, "train")
        stats = report["training"][label]
        assert stats["final_loss"] == rows[-1]["loss"]
        # the first step (warm-up) is left out of the median step time
        assert stats["median_step_s"] == statistics.median(r["step_time_s"] for r in rows[1:])
        assert stats["tokens_per_s"] == statistics.median(r["tokens_per_s"] for r in rows)
        assert stats["peak_memory_mb"] == 0.0  # CPU
    assert report["config"]["steps"] == STEPS and report["config"]["lr"] == 1e-4
    assert report["device"] == "cpu" and report["eval_blocks"] == 6
    assert report["data"].endswith("held-out blocks of 32 tokens")


def test_markdown_numbers_match_the_json(demo):
    out, _ = demo
    md = (out / "report.md").read_text()
    report = read_json(out / "report.json")
    fidelity = table_rows(md, "| model |")
    assert fidelity["teacher (BF16/FP32)"][:2] == ["0", f"{report['teacher']['perplexity']:.3f}"]
    for label, model in report["models"].items():
        cells = fidelity[label]
        assert cells[:5] == [f"{model['kl_per_token']:.4f}", f"{model['perplexity']:.3f}",
                             f"{model['top1_agreement']:.3f}", f"{model['mean_cka']:.4f}",
                             f"{model['min_cka']:.4f} ({model['min_cka_layer']})"]
        if label in report["training"]:
            t = report["training"][label]
            assert cells[5:] == [f"{t['median_step_s'] * 1000:.0f} ms", f"{t['tokens_per_s']:.0f}", "n/a (CPU)"]
        else:
            assert cells[5:] == ["–", "–", "–"]
    layers = table_rows(md, "| layer |")
    for i, cells in layers.items():
        assert cells == [f"{m['layers'][int(i)]['cka']:.4f}" for m in report["models"].values()]


# ------------------------------------------------------------------------------------------------ config


def test_resolved_defaults_depend_on_the_device():
    cpu = DemoConfig().resolved(torch.device("cpu"))
    assert (cpu.steps, cpu.lr, cpu.batch_size, cpu.seq_len) == (30, 5e-5, 4, 128)
    gpu = DemoConfig().resolved(torch.device("cuda"))
    assert (gpu.steps, gpu.lr, gpu.batch_size, gpu.seq_len) == (400, 1e-5, 16, 512)
    explicit = DemoConfig(steps=3, lr=2e-4, batch_size=2, seq_len=64).resolved(torch.device("cuda"))
    assert (explicit.steps, explicit.lr, explicit.batch_size, explicit.seq_len) == (3, 2e-4, 2, 64)


@pytest.mark.parametrize("field", ["steps", "batch_size", "seq_len", "lr"])
def test_negative_sizes_are_config_errors(field):
    with pytest.raises(ConfigError, match="must be >= 0"):
        DemoConfig(**{field: -1})


def test_nonempty_out_fails_before_loading_anything(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not empty"):
        demo_command.run(DemoConfig(teacher=str(tmp_path / "no-teacher"), out=str(tmp_path)))


def test_unknown_format_fails_before_loading_the_teacher(tmp_path):
    with pytest.raises(ConfigError, match="unknown format"):
        demo_command.run(DemoConfig(teacher=str(tmp_path / "no-teacher"), format="nvfp5", out=str(tmp_path / "out")))


def test_too_many_cka_tokens_fails_before_the_first_run(inputs, tmp_path):
    out = tmp_path / "out"
    # 1 block x (16 - 1 sink) = 15 valid tokens per step, fewer than the 32 asked for
    with pytest.raises(ConfigError, match="--cka-tokens 32 is larger than the 15 valid tokens"):
        demo_command.run(demo_config(inputs, out, batch_size=1, seq_len=16))
    assert not (out / "runs").exists()  # the KL-QAD run did not train first
