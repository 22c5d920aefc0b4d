"""The one results schema: write_results then read_results gives the same content; the result files of older
versions (eval.json, diagnosis.json, report.json) read into the same shape; bad files are CheckpointErrors."""

from __future__ import annotations

import json

import pytest

from ckaqad.errors import CheckpointError
from ckaqad.eval.fidelity import HEADLINE, Fidelity
from ckaqad.report.results import SCHEMA, ModelResult, ResultDir, Results, flat_metrics, read_results, write_results


def fidelity(label: str, kl: float) -> Fidelity:
    layers = [{"index": 0, "teacher_index": 0, "cka": 0.875, "cka_debiased": 0.75},
              {"index": 1, "teacher_index": 1, "cka": 0.5, "cka_debiased": 0.25}]
    return Fidelity(label=label, layers=layers, mean_cka=0.6875, min_cka=0.5, min_cka_layer=1, mean_cka_debiased=0.5,
                    kl_per_token=kl, perplexity=12.5, top1_agreement=0.75, predicted_tokens=60, cka_tokens=58)


def test_round_trip(tmp_path):
    models = [ModelResult.from_fidelity(fidelity("nvfp4-w4a4", 0.25), quantization={"quantized": ["a", "b"]},
                                        training={"final_loss": 1.5}),
              ModelResult(label="teacher", source="/models/t", humaneval={"pass@1": 0.5, "nll_token_mean": 1.25},
                          lm_eval={"arc": {"acc": 0.75, "acc_stderr": 0.01}})]
    written = write_results(tmp_path, "diagnose", models, teacher={"source": "default", "perplexity": 10.0},
                            meta={"device": "cpu", "runtime_s": 1.5})
    raw = json.loads(ResultDir(tmp_path).results.read_text())
    assert raw["schema"] == SCHEMA == "ckaqad.results/1" and raw["kind"] == "diagnose"
    assert list(raw) == ["schema", "kind", "teacher", "models", "meta"]
    assert list(raw["models"][0]["fidelity"]) == list(HEADLINE)
    assert raw["models"][0]["layers"][1] == {"index": 1, "teacher_index": 1, "cka": 0.5, "cka_debiased": 0.25}
    back = read_results(tmp_path)
    assert back == written
    assert back.models[0].layer_cka() == {0: 0.875, 1: 0.5}
    assert back.models[0].metrics() == {"fidelity.kl_per_token": 0.25, "fidelity.perplexity": 12.5,
                                        "fidelity.top1_agreement": 0.75, "fidelity.mean_cka": 0.6875,
                                        "fidelity.min_cka": 0.5}
    assert back.models[1].metrics() == {"humaneval.nll_token_mean": 1.25, "humaneval.pass@1": 0.5,
                                        "lm-eval.arc.acc": 0.75}


def test_results_json_wins_over_older_files(tmp_path):
    (tmp_path / "eval.json").write_text(json.dumps({"label": "old", "model": "m"}))
    write_results(tmp_path, "eval", [ModelResult(label="new")])
    assert [m.label for m in read_results(tmp_path).models] == ["new"]


def test_older_eval_diagnosis_and_demo_files_are_read(tmp_path):
    fid = {**fidelity("x", 0.125).to_dict(), "teacher_perplexity": 9.0}
    eval_dir, diag_dir, demo_dir = (tmp_path / name for name in ("eval", "diag", "demo"))
    for d in (eval_dir, diag_dir, demo_dir):
        d.mkdir()
    (eval_dir / "eval.json").write_text(json.dumps({
        "model": "/runs/a", "label": "a", "teacher": "default", "device": "cpu", "runtime_s": 3.0, "config": {},
        "fidelity": fid, "humaneval": {"pass@1": 0.25, "nll_token_mean": 2.0, "per_problem": [{"task_id": "t"}]},
        "lm_eval": {"arc": {"acc": 0.5}}}))
    (diag_dir / "diagnosis.json").write_text(json.dumps({
        "teacher": {"source": "default", "perplexity": 9.0}, "device": "cpu",
        "variants": [fidelity("nvfp4-w4a4", 0.25).to_dict(), fidelity("int4-w4a16", 0.5).to_dict()],
        "quantization": {"nvfp4-w4a4": {"quantized": ["q"]}}}))
    (demo_dir / "report.json").write_text(json.dumps({
        "teacher": {"perplexity": 9.0}, "models": {"CKA-QAD": fidelity("CKA-QAD", 0.0625).to_dict()},
        "training": {"CKA-QAD": {"final_loss": 0.5}}, "device": "cpu"}))

    ev = read_results(eval_dir)
    assert ev.kind == "eval" and ev.teacher == {"source": "default", "perplexity": 9.0}
    [model] = ev.models
    assert (model.label, model.source) == ("a", "/runs/a")
    assert model.metrics()["fidelity.kl_per_token"] == 0.125 and model.metrics()["lm-eval.arc.acc"] == 0.5
    assert "per_problem" not in model.humaneval and model.humaneval["pass@1"] == 0.25

    diag = read_results(diag_dir)
    assert diag.kind == "diagnose" and diag.meta == {"device": "cpu"}
    assert [(m.label, m.fidelity["kl_per_token"]) for m in diag.models] == [("nvfp4-w4a4", 0.25), ("int4-w4a16", 0.5)]
    assert diag.models[0].quantization == {"quantized": ["q"]} and diag.models[1].quantization == {}

    demo = read_results(demo_dir)
    assert demo.kind == "demo" and demo.models[0].training == {"final_loss": 0.5}
    assert demo.models[0].layer_cka() == {0: 0.875, 1: 0.5}


def test_unreadable_and_foreign_files_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="has no results.json, eval.json, diagnosis.json or report.json"):
        read_results(tmp_path)
    ResultDir(tmp_path).results.write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_results(tmp_path)
    ResultDir(tmp_path).results.write_text(json.dumps({"schema": "ckaqad.results/9", "kind": "eval"}))
    with pytest.raises(CheckpointError, match="not a ckaqad.results/1 results file"):
        read_results(tmp_path)
    ResultDir(tmp_path).results.write_text(json.dumps({"schema": SCHEMA, "kind": "train", "models": []}))
    with pytest.raises(CheckpointError, match="unknown results kind 'train'"):
        read_results(tmp_path)
    ResultDir(tmp_path).results.write_text(json.dumps({"schema": SCHEMA, "kind": "eval", "models": [{"lbl": 1}]}))
    with pytest.raises(CheckpointError, match="does not fit"):
        read_results(tmp_path)
    ResultDir(tmp_path).results.unlink()
    (tmp_path / "diagnosis.json").write_text(json.dumps({"teacher": {}}))
    with pytest.raises(CheckpointError, match="does not look like a ckaqad result file"):
        read_results(tmp_path)
    with pytest.raises(ValueError, match="kind"):
        write_results(tmp_path, "train", [])


def test_results_dict_shape():
    results = Results(kind="demo", models=[ModelResult(label="m")])
    assert Results.from_dict(results.to_dict()) == results


def test_flat_metrics_keeps_headline_numbers_only():
    payload = {"fidelity": {"kl_per_token": 0.5, "perplexity": 9.0, "layers": [], "tokens": 10},
               "humaneval": {"nll_token_mean": 1.5, "pass@1": 0.25, "per_problem": []},
               "lm_eval": {"arc": {"acc": 0.7, "acc_stderr": 0.01, "samples": 100}}}
    assert flat_metrics(payload) == {"fidelity.kl_per_token": 0.5, "fidelity.perplexity": 9.0,
                                     "humaneval.nll_token_mean": 1.5, "humaneval.pass@1": 0.25,
                                     "lm-eval.arc.acc": 0.7}
