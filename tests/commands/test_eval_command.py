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
from ckaqad.commands.eval import Config, run
from ckaqad.data import documents
from ckaqad.data.blocks import DataConfig, load_blocks
from ckaqad.errors import CheckpointError, ConfigError
from ckaqad.eval.suites import SUITES
from ckaqad.models.load import load_model
from ckaqad.paths import CheckpointDir, RunDir, run_teacher_spec
from ckaqad.paths import owning_run as run_of
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


def test_a_run_whose_student_is_in_several_files_gives_the_same_numbers(student_eval, workdir, tmp_path):
    """A sharded run's student/ in shards with model.safetensors.index.json (a large model's) is evaluated as
    the one-file student is: the same weights, the same numbers."""
    run = tmp_path / "run"
    student, meta = load_student_dir(workdir / "student")
    save_student_dir(student, run / "student", extra={"label": meta["label"]}, shard_size_bytes=50_000)
    assert (run / "student" / "model.safetensors.index.json").is_file()
    (run / "config.yaml").write_text(f"teacher: {workdir / 'teacher'}\nsteps: 1\n")
    payload = evaluate_into(tmp_path, "out", model=str(run))
    assert payload["fidelity"]["kl_per_token"] == student_eval["fidelity"]["kl_per_token"]
    assert payload["fidelity"]["mean_cka"] == student_eval["fidelity"]["mean_cka"]


def make_run(root, workdir, teacher: str) -> RunDir:
    """A run directory with a final student and one complete checkpoint (copies of the saved student)."""
    run = RunDir(root)
    shutil.copytree(workdir / "student", run.student.root)
    checkpoint = run.checkpoint(1)
    shutil.copytree(workdir / "student", checkpoint.student.root)
    checkpoint.marker.write_text("")
    run.config.write_text(f"teacher: {teacher}\nsteps: 1\n")
    return run


def test_a_checkpoint_student_is_evaluated_against_its_runs_teacher(student_eval, workdir, tmp_path):
    run = make_run(tmp_path / "run", workdir, str(workdir / "teacher"))
    payload = evaluate_into(tmp_path, "out", model=str(run.checkpoint(1).student.root))
    assert payload["teacher"] == str(workdir / "teacher") and payload["label"] == LABEL
    assert payload["fidelity"]["kl_per_token"] == pytest.approx(student_eval["fidelity"]["kl_per_token"], rel=1e-6)


def test_run_of_finds_the_run_through_the_path_classes(workdir, tmp_path):
    run = make_run(tmp_path / "run", workdir, "some/teacher")
    resolved = RunDir(run.root.resolve())
    for member in (run.root, run.student.root, run.checkpoint(1).root, run.checkpoint(1).student.root):
        assert run_of(member) == resolved
        assert run_teacher_spec(member) == "some/teacher"
    assert run_of(workdir / "student") is None and run_teacher_spec(workdir / "student") is None
    (run.root / "notes").mkdir()
    assert run_of(run.root / "notes") is None  # inside a run, but not one of its students
    incomplete = CheckpointDir(run.checkpoints / CheckpointDir.name_for(2))
    shutil.copytree(workdir / "student", incomplete.student.root)
    assert run_of(incomplete.student.root) is None  # a checkpoint without its COMPLETE marker
    run.config.write_text("teacher: [unclosed\n")
    with pytest.raises(CheckpointError, match="cannot read"):
        run_teacher_spec(run.student.root)


def test_default_model_is_measured_against_itself(workdir, tmp_path, monkeypatch):
    # `--model default` is the embedded teacher: stand a saved tiny model in for it (loading SmolLM2 is the
    # integration tests' business). It is loaded once and is its own teacher.
    loads = []

    def fake_load(spec, device=None, dtype=None):
        loads.append(spec)
        loaded = load_model(workdir / "teacher", device=device)
        loaded.source = str(spec)
        return loaded

    monkeypatch.setattr(eval_command, "load_model", fake_load)
    monkeypatch.setattr(documents, "teacher_answers",
                        lambda model, tokenizer, prompts: [f"{p}\nAnswer: {p[::-1]}" for p in prompts])
    payload = evaluate_into(tmp_path, "out", model="default")
    assert loads == ["default"]
    assert payload["label"] == "teacher" and payload["teacher"] == "default"
    fid = payload["fidelity"]
    assert fid["kl_per_token"] == 0.0 and fid["top1_agreement"] == 1.0
    assert fid["mean_cka"] == pytest.approx(1.0, abs=1e-6) and fid["perplexity"] == fid["teacher_perplexity"]


def test_a_model_of_another_vocabulary_is_refused(workdir, tmp_path):
    from conftest import make_tiny_model, make_tiny_tokenizer

    make_tiny_model(vocab_size=300).save_pretrained(tmp_path / "other")
    make_tiny_tokenizer().save_pretrained(tmp_path / "other")
    with pytest.raises(CheckpointError, match="vocabulary of 300 tokens, the teacher 259"):
        evaluate_into(tmp_path, "out", model=str(tmp_path / "other"), teacher=str(workdir / "teacher"))
    assert not (tmp_path / "out").exists()


def test_export_directory_is_loaded_back_into_a_student(student_eval, workdir, tmp_path):
    from ckaqad.export.writer import export_student

    teacher = load_model(workdir / "teacher", device="cpu")
    student, _ = load_student_dir(workdir / "student")
    export_student(student, teacher.tokenizer, tmp_path / "exp")
    payload = evaluate_into(tmp_path, "out", model=str(tmp_path / "exp"), teacher=str(workdir / "teacher"),
                            runtime="ckaqad")
    assert payload["label"] == "export:exp" and payload["runtime"] == "ckaqad"
    # The export stores the unquantized tensors in bf16: close to the float32 student, not equal.
    assert payload["fidelity"]["kl_per_token"] == pytest.approx(student_eval["fidelity"]["kl_per_token"], rel=0.2)


def test_transformers_runtime_scores_the_export_as_runtime_arithmetic_in_bf16(workdir, tmp_path, monkeypatch):
    """`--runtime transformers` evaluates what from_pretrained serves; ckaqad's runtime arithmetic in bf16
    computes the same logits, so the fidelity numbers agree (up to the metric accumulation's rounding)."""
    from ckaqad.export.reader import load_export, to_served_dtype
    from ckaqad.export.writer import export_student

    teacher = load_model(workdir / "teacher", device="cpu")
    student, _ = load_student_dir(workdir / "student")
    export_student(student, teacher.tokenizer, tmp_path / "exp")
    served = evaluate_into(tmp_path, "served", model=str(tmp_path / "exp"), teacher=str(workdir / "teacher"),
                           runtime="transformers")
    assert served["runtime"] == "transformers" and served["label"] == "export:exp (transformers)"
    assert read_results(tmp_path / "served").meta["runtime"] == "transformers"
    assert "(runtime transformers)" in (tmp_path / "served" / "eval.md").read_text()

    def runtime_arithmetic(export_dir, device):
        model, tokenizer = load_export(export_dir, device=device, arithmetic="runtime")
        return to_served_dtype(model), tokenizer

    monkeypatch.setattr(eval_command, "load_served", runtime_arithmetic)
    ours = evaluate_into(tmp_path, "ours", model=str(tmp_path / "exp"), teacher=str(workdir / "teacher"),
                         runtime="transformers")
    for key in ("kl_per_token", "perplexity", "top1_agreement"):
        assert served["fidelity"][key] == pytest.approx(ours["fidelity"][key], rel=1e-6, abs=1e-9), key
    assert served["fidelity"]["kl_per_token"] > 0


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
                                          r"choose from: fidelity, gsm-sem, humaneval, lm-eval"):
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


def test_an_export_is_measured_as_served_by_default_and_anything_else_as_the_student(workdir, tmp_path):
    """`--runtime auto` (the default): a compressed-tensors export is the model transformers serves, a ModelOpt
    export (which transformers does not load) and a student directory are ckaqad's students."""
    from ckaqad.export.writer import export_student

    teacher = load_model(workdir / "teacher", device="cpu")
    student, _ = load_student_dir(workdir / "student")
    export_student(student, teacher.tokenizer, tmp_path / "ct")
    export_student(student, teacher.tokenizer, tmp_path / "mo", layout="modelopt")
    assert Config(model=str(tmp_path / "ct")).resolved_runtime == "transformers"
    assert Config(model=str(tmp_path / "ct"), runtime="ckaqad").resolved_runtime == "ckaqad"
    assert Config(model=str(tmp_path / "mo")).resolved_runtime == "ckaqad"
    assert Config(model=str(workdir / "student")).resolved_runtime == "ckaqad"
    assert Config().resolved_runtime == "ckaqad"
    payload = evaluate_into(tmp_path, "out", model=str(tmp_path / "ct"), teacher=str(workdir / "teacher"))
    assert payload["runtime"] == "transformers" and payload["label"] == "export:ct (transformers)"


def test_transformers_runtime_is_for_export_directories_only(workdir):
    with pytest.raises(ConfigError, match="--runtime must be auto, ckaqad or transformers, got 'vllm'"):
        Config(runtime="vllm")
    for model in ("default", str(workdir / "teacher"), str(workdir / "student")):
        with pytest.raises(ConfigError, match="--runtime transformers evaluates export directories only"):
            Config(model=model, runtime="transformers")


def test_suites_are_split_on_commas():
    assert Config(suite=" fidelity, humaneval ,").suites == ["fidelity", "humaneval"]
    assert Config(suite="humaneval").needs_teacher is False and Config(suite="humaneval,fidelity").needs_teacher


# ----------------------------------------------------------------------------------- eval -> compare


def markdown_rows(text: str) -> dict[str, dict[str, str]]:
    """{model: {column: cell}} from the first markdown table in `text`."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return {row[0]: dict(zip(header[1:], row[1:], strict=True)) for row in rows}


def test_compare_puts_both_results_in_one_table(teacher_eval, student_eval, workdir, tmp_path):
    from ckaqad.commands import compare

    out = tmp_path / "cmp"
    result = compare.run(compare.Config(dirs=(str(workdir / "teacher_eval"), str(workdir / "student_eval")),
                                        out=str(out)))
    teacher_row, student_row = "teacher (teacher_eval)", f"{LABEL} (student_eval)"
    assert result == {teacher_row: flat_metrics(teacher_eval), student_row: flat_metrics(student_eval)}
    table = markdown_rows((out / "compare.md").read_text())
    assert set(table) == {teacher_row, student_row}
    for row, payload in ((teacher_row, teacher_eval), (student_row, student_eval)):
        fid = payload["fidelity"]
        for key in ("kl_per_token", "perplexity", "top1_agreement", "mean_cka", "min_cka"):
            assert table[row][f"fidelity.{key}"] == f"{fid[key]:.4f}"
    assert table[student_row]["fidelity.kl_per_token"] != "0.0000"
    assert json.loads((out / "compare.json").read_text()) == result
    assert {p.name for p in out.iterdir()} == {"compare.md", "compare.html", "compare.json", "cka_layers.png",
                                                "metrics.png"}
    assert "<table>" in (out / "compare.html").read_text()

    # A directory written before results.json existed (eval.json only) compares the same.
    old = tmp_path / "student_eval"
    shutil.copytree(workdir / "student_eval", old)
    (old / "results.json").unlink()
    again = compare.run(compare.Config(dirs=(str(old),), out=str(tmp_path / "cmp2")))
    assert again == {student_row: result[student_row]}
