"""Tests for `ckaqad eval` (commands/eval.py): the fidelity suite checked against an independent computation,
outputs (eval.json, eval.md, results.json), model specs (HF dir, student, run, checkpoint, export, default)
and config checks."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from ckaqad.commands import eval as eval_command
from ckaqad.commands.eval import Config, run, run_of, run_teacher_spec
from ckaqad.data import documents
from ckaqad.data.blocks import DataConfig, load_blocks
from ckaqad.errors import CheckpointError, ConfigError
from ckaqad.eval.suites import SUITES
from ckaqad.models.load import load_model
from ckaqad.paths import CheckpointDir, RunDir
from ckaqad.quant.apply import calibrate, quantize_model_
from ckaqad.quant.linear import QuantConfig
from ckaqad.report.results import flat_metrics, read_results
from ckaqad.students.store import load_student_dir, save_student_dir

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCKS = 4  # held-out blocks of 256 tokens (fidelity_suite's block length)
SEQ = 256
LABEL = "tiny-nvfp4"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Teacher and student directories, with a private cache for the built-in corpus the fidelity suite reads.

    The corpus's teacher answers are canned (generating them is data.py's business, tested there): the tiny
    random teacher would take most of this file's time to write 48 answers of noise.
    """
    from conftest import make_tiny_model, make_tiny_tokenizer

    root = tmp_path_factory.mktemp("evaluate")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CKAQAD_CACHE", str(root / "cache"))
        mp.setattr(documents, "teacher_answers",
                   lambda model, tokenizer, prompts: [f"{p}\nAnswer: {p[::-1]}" for p in prompts])
        teacher, tokenizer = make_tiny_model(), make_tiny_tokenizer()
        teacher.save_pretrained(root / "teacher")
        tokenizer.save_pretrained(root / "teacher")
        student = copy.deepcopy(teacher)
        quantize_model_(student, QuantConfig(format="nvfp4", scheme="w4a4"))
        generator = torch.Generator().manual_seed(1)
        calibrate(student, [{"input_ids": torch.randint(0, 256, (2, 32), generator=generator)} for _ in range(2)])
        save_student_dir(student, root / "student", tokenizer, extra={"label": LABEL})
        yield root


def evaluate_into(workdir, name: str, **kwargs) -> dict:
    config = Config(**{"suite": "fidelity", "eval_blocks": BLOCKS, "batch_size": 2, "device": "cpu",
                           "out": str(workdir / name), **kwargs})
    return run(config)


@pytest.fixture(scope="module")
def teacher_eval(workdir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CKAQAD_CACHE", str(workdir / "cache"))
        return evaluate_into(workdir, "teacher_eval", model=str(workdir / "teacher"),
                             teacher=str(workdir / "teacher"))


@pytest.fixture(scope="module")
def student_eval(workdir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CKAQAD_CACHE", str(workdir / "cache"))
        return evaluate_into(workdir, "student_eval", model=str(workdir / "student"),
                             teacher=str(workdir / "teacher"))


@pytest.fixture(autouse=True)
def _private_cache(workdir, monkeypatch):
    monkeypatch.setenv("CKAQAD_CACHE", str(workdir / "cache"))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Biased linear CKA of (n, d) features, in float64: ‖YᵀX‖² / (‖XᵀX‖ ‖YᵀY‖) after centring."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


def block_outputs(model, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, [output of each decoder block]) for one forward pass."""
    states, hooks = [], []
    for layer in model.model.layers:
        hooks.append(layer.register_forward_hook(
            lambda _m, _i, out: states.append(out[0] if isinstance(out, tuple) else out)))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        for hook in hooks:
            hook.remove()
    return logits, states


# ------------------------------------------------------------------------------------------- fidelity


def test_teacher_against_itself_is_perfectly_faithful(teacher_eval, workdir):
    fid = teacher_eval["fidelity"]
    assert fid["kl_per_token"] == pytest.approx(0.0, abs=1e-7)
    assert fid["top1_agreement"] == 1.0
    assert fid["mean_cka"] == pytest.approx(1.0, abs=1e-9) and fid["min_cka"] == pytest.approx(1.0, abs=1e-9)
    assert [row["index"] for row in fid["layers"]] == [0, 1]
    assert fid["perplexity"] == fid["teacher_perplexity"] and 1 < fid["perplexity"] < 1e4
    assert fid["tokens"] == BLOCKS * (SEQ - 1)  # next-token predictions of every held-out block
    assert teacher_eval["label"] == "teacher" and teacher_eval["teacher"] == str(workdir / "teacher")


def test_student_numbers_match_an_independent_computation(student_eval, workdir):
    fid = student_eval["fidelity"]
    teacher = load_model(workdir / "teacher", device="cpu")
    student, _ = load_student_dir(workdir / "student")
    blocks = load_blocks(DataConfig(seq_len=SEQ), teacher.model, teacher.tokenizer).heldout[:BLOCKS]
    t_logits, t_states = block_outputs(teacher.model, blocks)
    s_logits, s_states = block_outputs(student, blocks)

    t_logp, s_logp = t_logits.double().log_softmax(-1), s_logits.double().log_softmax(-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    agree = (t_logits.argmax(-1) == s_logits.argmax(-1)).double().mean()
    targets = blocks[:, 1:].reshape(-1)
    ppl = math.exp(F.cross_entropy(s_logits[:, :-1].reshape(-1, s_logits.shape[-1]).double(), targets))
    t_ppl = math.exp(F.cross_entropy(t_logits[:, :-1].reshape(-1, t_logits.shape[-1]).double(), targets))
    assert fid["kl_per_token"] == pytest.approx(float(kl), rel=1e-4)
    assert fid["top1_agreement"] == pytest.approx(float(agree), abs=1e-9)
    assert fid["perplexity"] == pytest.approx(ppl, rel=1e-4)
    assert fid["teacher_perplexity"] == pytest.approx(t_ppl, rel=1e-4)

    rows = torch.ones_like(blocks, dtype=torch.bool)  # CKA rows: not the sink (position 0), not BOS
    rows[:, 0] = False
    rows &= blocks != teacher.tokenizer.bos_token_id
    ckas = [linear_cka(s[rows], t[rows]) for s, t in zip(s_states, t_states, strict=True)]
    assert [row["cka"] for row in fid["layers"]] == pytest.approx(ckas, abs=1e-5)
    assert fid["mean_cka"] == pytest.approx(sum(ckas) / 2, abs=1e-5)
    assert fid["min_cka"] == pytest.approx(min(ckas), abs=1e-5) and fid["min_cka_layer"] == ckas.index(min(ckas))
    assert fid["cka_tokens"] == int(rows.sum())
    assert kl > 1e-4 and 0 < min(ckas) < 1  # the 4-bit student really differs from the teacher
    assert student_eval["label"] == LABEL and student_eval["teacher"] == str(workdir / "teacher")


def test_results_json_and_markdown_are_written(student_eval, workdir):
    out = workdir / "student_eval"
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "eval.md", "results.json"]
    saved = json.loads((out / "eval.json").read_text())
    assert saved["fidelity"] == student_eval["fidelity"] and saved["label"] == LABEL
    assert saved["config"] == {**Config().__dict__, "suite": "fidelity", "eval_blocks": BLOCKS, "batch_size": 2,
                               "device": "cpu", "out": str(out), "model": str(workdir / "student"),
                               "teacher": str(workdir / "teacher")}
    md = (out / "eval.md").read_text()
    assert md.startswith(f"# Evaluation: {LABEL}\n")
    for key, value in flat_metrics(saved).items():
        assert f"| {key} | {value:.4f} |" in md
    assert not [p for p in workdir.iterdir() if ".tmp-" in p.name]
    results = read_results(out)  # the one schema: what compare reads
    assert results.kind == "eval" and results.teacher["source"] == str(workdir / "teacher")
    assert results.teacher["perplexity"] == saved["fidelity"]["teacher_perplexity"]
    [model] = results.models
    assert (model.label, model.source) == (LABEL, str(workdir / "student"))
    assert model.layers == saved["fidelity"]["layers"] and model.metrics() == flat_metrics(saved)
    assert results.meta["config"] == saved["config"] and results.meta["data"] == saved["fidelity"]["data"]


def test_run_directory_is_evaluated_against_its_own_teacher(student_eval, workdir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(workdir / "student", run / "student")
    (run / "config.yaml").write_text(f"teacher: {workdir / 'teacher'}\nsteps: 1\n")
    payload = evaluate_into(tmp_path, "out", model=str(run))  # no --teacher: the run's config.yaml names it
    assert payload["teacher"] == str(workdir / "teacher") and payload["label"] == LABEL
    assert payload["fidelity"]["kl_per_token"] == pytest.approx(student_eval["fidelity"]["kl_per_token"], rel=1e-6)


def test_export_directory_is_loaded_back_into_a_student(student_eval, workdir, tmp_path):
    from ckaqad.export.writer import export_student

    teacher = load_model(workdir / "teacher", device="cpu")
    student, _ = load_student_dir(workdir / "student")
    export_student(student, teacher.tokenizer, tmp_path / "exp")
    payload = evaluate_into(tmp_path, "out", model=str(tmp_path / "exp"), teacher=str(workdir / "teacher"))
    assert payload["label"] == "export:exp"
    # The export stores the unquantized tensors in bf16: close to the float32 student, not equal.
    assert payload["fidelity"]["kl_per_token"] == pytest.approx(student_eval["fidelity"]["kl_per_token"], rel=0.2)


def test_failure_while_writing_leaves_the_previous_results(student_eval, workdir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval.json").write_text("previous")

    def broken_write(directory, payload):
        (directory / "eval.json").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(eval_command, "write_eval", broken_write)
    monkeypatch.setitem(SUITES._entries, "fidelity", lambda model, tokenizer, teacher, config: {"kl_per_token": 0.0})
    with pytest.raises(OSError, match="disk full"):
        evaluate_into(tmp_path, "out", model=str(workdir / "teacher"), teacher=str(workdir / "teacher"))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["eval.json"] and (out / "eval.json").read_text() == "previous"


def test_humaneval_suite_joins_nll_and_completion_per_problem(workdir, tmp_path):
    payload = evaluate_into(tmp_path, "out", model=str(workdir / "teacher"), suite="humaneval", limit=2,
                            humaneval_max_tokens=4)
    he = payload["humaneval"]
    assert payload["teacher"] is None and "fidelity" not in payload  # no teacher needed
    assert he["num_problems"] == 2 and len(he["per_problem"]) == 2
    for entry in he["per_problem"]:
        assert math.isfinite(entry["nll"]) and entry["nll"] > 0 and isinstance(entry["completion"], str)
    assert 0 <= he["pass@1"] <= 1 and "pass@10" not in he  # one sample per problem: pass@1 only
    md = (tmp_path / "out" / "eval.md").read_text()
    assert he["prompt_style"] == "completion"  # the tiny tokenizer has no chat template
    assert f"HumanEval (completion prompt): 2 problems, pass@1 {he['pass@1']:.3f}" in md
    assert f"| humaneval.nll_token_mean | {he['nll_token_mean']:.4f} |" in md


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("suite, near", [("fidelty", "fidelity"), ("fidelity,humaneva", "humaneval"),
                                         ("lm_eval", "lm-eval")])
def test_unknown_suite_lists_close_matches(suite, near):
    with pytest.raises(ConfigError, match=rf"unknown suite \(--suite\) .*did you mean: {near}[,?].*; "
                                          r"choose from: fidelity, humaneval, lm-eval"):
        Config(suite=suite)


@pytest.mark.parametrize("kwargs, match", [
    ({"suite": "lm-eval"}, "--suite lm-eval needs --tasks"),
    ({"limit": 0}, "--limit must be at least 1"),
    ({"batch_size": 0}, "--batch-size"),
    ({"eval_blocks": 0}, "--eval-blocks"),
    ({"humaneval_samples": 2}, "--temperature > 0"),
    ({"humaneval_prompt": "chat"}, "--humaneval-prompt must be auto, completion or instruct"),
])
def test_invalid_eval_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Config(**kwargs)


def test_suites_are_split_on_commas():
    assert Config(suite=" fidelity, humaneval ,").suites == ["fidelity", "humaneval"]
    assert Config(suite="humaneval").needs_teacher is False and Config(suite="humaneval,fidelity").needs_teacher
