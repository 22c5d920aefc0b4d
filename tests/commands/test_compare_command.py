"""Tests for `ckaqad compare` (commands/compare.py): one table and plots from eval, diagnose and demo
directories, in the results schema and in the files of older versions."""

from __future__ import annotations

import json

import pytest

from ckaqad.commands.compare import Config, run
from ckaqad.errors import CheckpointError, ConfigError
from ckaqad.eval.fidelity import Fidelity
from ckaqad.report.results import ModelResult, read_results, write_results


def markdown_rows(text: str) -> dict[str, dict[str, str]]:
    """{model: {column: cell}} from the first markdown table in `text`."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return {row[0]: dict(zip(header[1:], row[1:], strict=True)) for row in rows}


def fidelity(kl: float) -> dict:
    return {"kl_per_token": kl, "perplexity": 10.0, "top1_agreement": 0.9, "mean_cka": 0.95, "min_cka": 0.9,
            "layers": [{"index": 0, "cka": 0.9}, {"index": 1, "cka": 1.0}]}


def fidelity_record(label: str, kl: float) -> Fidelity:
    f = fidelity(kl)
    return Fidelity(label=label, **f)


def test_compare_reads_older_diagnosis_and_demo_reports(tmp_path):
    (tmp_path / "diag").mkdir()
    (tmp_path / "diag" / "diagnosis.json").write_text(json.dumps(
        {"variants": [{"label": "nvfp4-w4a4", **fidelity(0.25)}, {"label": "int4-w4a16", **fidelity(0.5)}]}))
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "report.json").write_text(json.dumps({"models": {"CKA-QAD": fidelity(0.125)}}))
    result = run(Config(dirs=(str(tmp_path / "diag"), str(tmp_path / "demo")), out=str(tmp_path / "out")))
    assert {k: v["fidelity.kl_per_token"] for k, v in result.items()} == {
        "nvfp4-w4a4 (diag)": 0.25, "int4-w4a16 (diag)": 0.5, "CKA-QAD (demo)": 0.125}
    table = markdown_rows((tmp_path / "out" / "compare.md").read_text())
    assert table["CKA-QAD (demo)"]["fidelity.kl_per_token"] == "0.1250"


def test_compare_reads_all_three_kinds_of_results_json(tmp_path, capsys):
    names = ("diag", "ev", "demo")
    for name in names:
        (tmp_path / name).mkdir()
    write_results(tmp_path / "diag", "diagnose", [ModelResult.from_fidelity(fidelity_record("nvfp4-w4a4", 0.25)),
                                                  ModelResult.from_fidelity(fidelity_record("mxfp4-w4a4", 0.5))])
    write_results(tmp_path / "ev", "eval", [ModelResult(label="student", humaneval={"pass@1": 0.25},
                                                        lm_eval={"arc": {"acc": 0.5, "acc_stderr": 0.1}})])
    write_results(tmp_path / "demo", "demo", [ModelResult.from_fidelity(fidelity_record("CKA-QAD", 0.125),
                                                                        training={"final_loss": 1.0})])
    out = tmp_path / "out"
    result = run(Config(dirs=tuple(str(tmp_path / n) for n in names), out=str(out)))
    assert list(result) == ["nvfp4-w4a4 (diag)", "mxfp4-w4a4 (diag)", "student (ev)", "CKA-QAD (demo)"]
    assert result["student (ev)"] == {"humaneval.pass@1": 0.25, "lm-eval.arc.acc": 0.5}
    assert result["CKA-QAD (demo)"]["fidelity.mean_cka"] == 0.95
    table = markdown_rows((out / "compare.md").read_text())
    assert table["student (ev)"]["fidelity.kl_per_token"] == "–"  # no fidelity suite in that eval
    assert table["student (ev)"]["humaneval.pass@1"] == "0.2500"
    assert set(table["nvfp4-w4a4 (diag)"]) == {"fidelity.kl_per_token", "fidelity.perplexity",
                                               "fidelity.top1_agreement", "fidelity.mean_cka", "fidelity.min_cka",
                                               "humaneval.pass@1", "lm-eval.arc.acc"}
    assert json.loads((out / "compare.json").read_text()) == result
    assert {p.name for p in out.iterdir()} == {"compare.md", "compare.html", "compare.json", "cka_layers.png",
                                                "metrics.png"}
    assert [read_results(tmp_path / n).kind for n in names] == ["diagnose", "eval", "demo"]
    assert "| model |" in capsys.readouterr().out


def test_compare_without_layers_draws_no_layer_plot(tmp_path):
    (tmp_path / "ev").mkdir()
    write_results(tmp_path / "ev", "eval", [ModelResult(label="m", humaneval={"pass@1": 1.0})])
    run(Config(dirs=(str(tmp_path / "ev"),), out=str(tmp_path / "out")))
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"compare.md", "compare.html", "compare.json",
                                                              "metrics.png"}
    assert "cka_layers.png" not in (tmp_path / "out" / "compare.md").read_text()


def test_compare_errors(tmp_path):
    with pytest.raises(ConfigError, match="at least one result directory"):
        Config(dirs=())
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no results.json, eval.json, diagnosis.json or report.json"):
        run(Config(dirs=(str(tmp_path / "empty"),), out=str(tmp_path / "out")))
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]
