"""`ckaqad study` on the tiny teacher: the grid becomes run directories and one aggregate; a second run skips
every finished cell; a cell with other settings, an unknown key and a stopped run are handled as documented."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import save_tiny_teacher

from ckaqad import cli
from ckaqad.commands import study
from ckaqad.errors import ConfigError
from ckaqad.paths import RunDir, StudyDir

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_teacher")
    save_tiny_teacher(directory)
    return directory


def spec(tmp_path, teacher, **overrides) -> str:
    body = {"name": "tiny", "models": [str(teacher)], "methods": ["ptq", "kl", "kl+cka"], "seeds": [0, 1],
            "budgets": [1], "train": {"batch_size": 2, "lr": 1.0e-3, "cka_tokens": 16, "warmup_steps": 0,
                                      "eval_every": 0, "eval_blocks": 2},
            "data": {"seq_len": 16}, "eval": {"eval_blocks": 4, "seq_len": 16, "batch_size": 2, "bootstrap": 50}}
    body.update(overrides)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(body))
    return str(path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, teacher):
    root = tmp_path_factory.mktemp("study")
    config = study.Config(spec=spec(root, teacher), out=str(root / "out"), device="cpu")
    return config, study.run(config)


def test_the_grid_becomes_run_directories_and_one_aggregate(finished):
    config, result = finished
    out = StudyDir(config.out and __import__("pathlib").Path(config.out))
    for path in (out.json, out.md, out.html, out.layers_plot, out.root / StudyDir.metric_plot_name("mean_cka")):
        assert path.is_file(), path
    cells = study.parse_study(config.spec, config.out).cells()
    assert len(cells) == 1 + 1 + 2 * 2  # teacher, ptq, two methods x two seeds
    for cell in cells:
        directory = out.cells / cell.relative()
        assert (directory / StudyDir.CELL).is_file()
        if cell.trains:
            assert RunDir(directory).summary.is_file() and RunDir(directory).student.exists()
    saved = json.loads(out.json.read_text())
    assert saved["cells"] == 6 and saved["trained"] == 4 and saved["evaluated"] == 6
    (paired,) = saved["paired"]
    assert paired["seeds"] == [0, 1] and (paired["a"], paired["b"]) == ("kl+cka", "kl")
    kl = next(g for g in saved["groups"] if g["method"] == "kl")
    records = [json.loads((out.cells / c.relative() / StudyDir.CELL).read_text()) for c in cells if c.method == "kl"]
    assert kl["metrics"]["mean_cka"]["mean"] == pytest.approx(sum(r["metrics"]["mean_cka"] for r in records) / 2)
    layer = records[0]["layers"][0]
    assert layer["cka_low"] <= layer["cka"] <= layer["cka_high"]  # the bootstrap interval of each layer
    assert "CKA-QAD − KL-QAD" in out.md.read_text()


def test_a_second_run_skips_every_finished_cell(finished, monkeypatch):
    config, _ = finished

    def no_work(*args, **kwargs):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(study.distill, "run", no_work)
    monkeypatch.setattr(study, "measure_fidelity", no_work)
    again = study.run(config)
    assert again["meta"]["trained"] == 0 and again["meta"]["evaluated"] == 0 and again["meta"]["cells"] == 6


def test_a_cell_without_its_record_is_evaluated_again_not_retrained(finished, monkeypatch):
    config, _ = finished
    parsed = study.parse_study(config.spec, config.out)
    cell = next(c for c in parsed.cells() if c.method == "kl+cka" and c.seed == 1)
    record = StudyDir(parsed.out).cells / cell.relative() / StudyDir.CELL
    before = json.loads(record.read_text())
    record.unlink()
    assert study.cell_state(parsed, cell) == "trained"
    monkeypatch.setattr(study.distill, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    again = study.run(config)
    assert again["meta"]["evaluated"] == 1 and again["meta"]["trained"] == 0
    assert json.loads(record.read_text())["metrics"] == before["metrics"]  # same student, same held-out tokens


def test_other_settings_for_a_finished_cell_are_refused(finished, tmp_path, teacher):
    config, _ = finished
    changed = spec(tmp_path, teacher, eval={"eval_blocks": 4, "seq_len": 16, "batch_size": 2, "bootstrap": 60})
    with pytest.raises(ConfigError, match="other settings"):
        study.run(study.Config(spec=changed, out=config.out, device="cpu"))


def test_a_stopped_run_with_a_checkpoint_is_partial(tmp_path, teacher):
    parsed = study.parse_study(spec(tmp_path, teacher, methods=["kl"], seeds=[0]), tmp_path / "out")
    cell = next(c for c in parsed.cells() if c.trains)
    directory = StudyDir(parsed.out).cells / cell.relative()
    assert study.cell_state(parsed, cell) == "new"
    checkpoint = RunDir(directory).checkpoint(1)
    checkpoint.root.mkdir(parents=True)
    RunDir(directory).config.write_text("{}")
    checkpoint.marker.write_text("")
    assert study.cell_state(parsed, cell) == "partial"


def test_served_runtime_scores_each_students_export_as_transformers_serves_it(tmp_path, teacher):
    """eval.runtimes [ckaqad, transformers]: each PTQ and trained cell is exported, and that export, loaded by
    transformers (bf16), gets the same fidelity pass under `served.` metrics, aggregated and paired like the
    emulated ones. The served numbers are those of the export itself, not of the fake-quant student."""
    from ckaqad.data.blocks import DataConfig, eval_batches, load_blocks
    from ckaqad.eval.fidelity import measure_fidelity
    from ckaqad.export.reader import load_served
    from ckaqad.models.load import load_model

    evaluation = {"eval_blocks": 4, "seq_len": 16, "batch_size": 2, "bootstrap": 0,
                  "runtimes": ["ckaqad", "transformers"]}
    config = study.Config(spec=spec(tmp_path, teacher, seeds=[0, 1], eval=evaluation), out=str(tmp_path / "out"),
                          device="cpu")
    result = study.run(config)
    out = StudyDir(tmp_path / "out")
    parsed = study.parse_study(config.spec, config.out)
    records = {c: json.loads((out.cells / c.relative() / StudyDir.CELL).read_text()) for c in parsed.cells()}
    teacher_cell = next(c for c in records if c.method == "teacher")
    assert not any(k.startswith("served.") for k in records[teacher_cell]["metrics"])
    loaded = load_model(teacher, device="cpu")
    blocks = load_blocks(DataConfig(seq_len=16), loaded.model, loaded.tokenizer).heldout
    for cell, record in records.items():
        if cell.method == "teacher":
            continue
        export = out.exports / cell.relative()
        assert record["served_export"] == str(export) and (export / "config.json").is_file()
        served, _ = load_served(export)
        direct, _ = measure_fidelity(loaded.model, {"s": served}, eval_batches(blocks, 2, "cpu", limit=4),
                                     exclude_token_ids=(loaded.tokenizer.bos_token_id,), progress=False)
        metrics = record["metrics"]
        for key in ("kl_per_token", "perplexity", "top1_agreement", "mean_cka"):
            assert metrics[f"served.{key}"] == pytest.approx(getattr(direct["s"], key), rel=1e-6), (cell, key)
        # bf16 served W4A4 is another computation than the fp32 fake-quant student: a mislabelled model shows.
        assert metrics["served.kl_per_token"] != metrics["kl_per_token"]
    saved = result["result"]
    assert saved["metrics"][:5] == ["mean_cka", "min_cka", "kl_per_token", "perplexity", "top1_agreement"]
    assert "served.kl_per_token" in saved["metrics"]
    (paired,) = saved["paired"]
    assert paired["metrics"]["served.kl_per_token"]["n"] == 2
    text = out.md.read_text()
    assert "Served (the student's compressed-tensors export" in text and "| served.kl_per_token |" in text


@pytest.mark.parametrize(("overrides", "match"), [
    ({"eval": {"runtimes": ["transformers"]}}, "eval.runtimes must be"),
    ({"eval": {"runtimes": ["ckaqad", "vllm"]}}, "eval.runtimes must be"),
    ({"eval": {"runtimes": ["ckaqad", "transformers"]}, "formats": ["mxfp4"]}, "NVFP4 exports only"),
    ({"colour": 1}, "unknown keys"),
    ({"train": {"steps": 5}}, "the grid sets them"),
    ({"train": {"batch_sise": 5}}, "unknown or grid-set key 'batch_sise'"),
    ({"eval": {"limit": 0}}, "eval.limit"),
    ({"methods": ["kl", "kl+nope"]}, "nope"),
    ({"pairs": [["kl+cka", "ce"]]}, "not among the methods"),
    ({"eval": {"tasks": "arc"}}, "unknown task"),
    ({"train": {"cka_tokens": 999}}, "exceeds"),
])
def test_bad_study_configs_fail_before_anything_is_written(tmp_path, teacher, overrides, match):
    with pytest.raises(ConfigError, match=match):
        study.run(study.Config(spec=spec(tmp_path, teacher, **overrides), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_train_only_trains_every_cell_and_a_later_run_only_evaluates(tmp_path, teacher, monkeypatch):
    config = study.Config(spec=spec(tmp_path, teacher, methods=["ptq", "kl"], seeds=[0]), out=str(tmp_path / "out"),
                          device="cpu", train_only=True)
    first = study.run(config)
    assert first["trained"] == 1
    assert sorted(first["cells"].values()) == ["new", "new", "trained"]  # teacher and PTQ train nothing
    assert not StudyDir(Path(config.out)).json.exists()

    def no_training(*args, **kwargs):
        raise AssertionError("a trained cell was trained again")

    monkeypatch.setattr(study.distill, "run", no_training)
    second = study.run(study.Config(spec=config.spec, out=config.out, device="cpu"))
    assert second["meta"]["trained"] == 0 and second["meta"]["evaluated"] == 3


def test_cli_dry_run_lists_the_cells(finished, capsys):
    config, _ = finished
    assert cli.main(["study", config.spec, "--out", config.out, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and all(line.startswith("done") for line in lines)


@pytest.mark.parametrize("spec", sorted((Path(__file__).parents[2] / "docs").glob("study_*.yaml")),
                         ids=lambda p: p.name)
def test_the_documented_studies_parse_into_their_grid(spec):
    """Each docs/study_*.yaml (the results tables' commands) is a valid study: teacher, PTQ, and 3 seeds each of
    KL-QAD and CKA-QAD (and, in issue 22's, the hidden-state baselines), every cell's distill config buildable."""
    parsed = study.parse_study(spec, out="unused")
    cells = parsed.cells()
    assert [c.method for c in cells].count("teacher") == len(parsed.models)
    assert {"teacher", "ptq", "kl", "kl+cka"} <= {c.method for c in cells}  # issue 22 adds the baselines
    assert sorted(c.seed for c in cells if c.method == "kl+cka") == [0, 1, 2]
    for cell in cells:
        assert parsed.cell_settings(cell)["cell"]["model"] in parsed.models


def test_gsm_sem_scores_every_cell_and_is_its_metrics(tmp_path, teacher):
    """eval.gsm_sem: each cell (teacher and PTQ here) is scored on the variants, the same numbers as
    `gsm_sem.score.evaluate` on that model, under `gsm_sem.*` metrics; without it the settings are unchanged."""
    from ckaqad.eval.gsm_sem import score
    from ckaqad.models.load import load_model
    from tests.eval.gsm_sem_helpers import released_row, write_released

    released = write_released(tmp_path / "rel", {"SEM.jsonl": [released_row("s1")]})
    evaluation = {"eval_blocks": 2, "seq_len": 16, "batch_size": 2, "bootstrap": 0, "gsm_sem": str(released),
                  "gsm_sem_level": "max", "gsm_sem_max_tokens": 2}
    config = study.Config(spec=spec(tmp_path, teacher, methods=["ptq"], seeds=[0], eval=evaluation),
                          out=str(tmp_path / "out"), device="cpu")
    study.run(config)
    parsed = study.parse_study(config.spec, config.out)
    records = {c.method: json.loads((StudyDir(tmp_path / "out").cells / c.relative() / StudyDir.CELL).read_text())
               for c in parsed.cells()}
    loaded = load_model(teacher, device="cpu")
    direct = score.evaluate(loaded.model, loaded.tokenizer, str(released), "max", max_new_tokens=2, batch_size=2,
                            progress=False)
    assert records["teacher"]["gsm_sem"]["variants"] == direct["variants"]
    for record in records.values():
        assert set(score.headline(direct["metrics"])) <= set(record["metrics"])
    plain = study.parse_study(spec(tmp_path, teacher, methods=["ptq"], seeds=[0]), config.out)
    assert "gsm_sem" not in plain.cell_settings(plain.cells()[0])["eval"]
