"""The PNG plots: each renderer writes a PNG; `plot_run` reads a run's metrics.jsonl."""

from __future__ import annotations

import json

from ckaqad.paths import RunDir
from ckaqad.report.plots import plot_cka_layers, plot_loss_comparison, plot_metric_bars, plot_run

PNG = b"\x89PNG\r\n\x1a\n"


def write_metrics(run: RunDir, with_eval: bool = True) -> None:
    run.root.mkdir(parents=True, exist_ok=True)
    rows = [{"kind": "train", "step": s, "loss": 1.0 / s, "kl": 1.0 / s, "cka_term": 0.1 / s if s > 1 else None}
            for s in range(1, 5)]
    if with_eval:
        rows += [{"kind": "eval", "step": s, "kl_per_token": 0.5 / s, "mean_cka": 0.9,
                  "cka_layers": {"0": 0.9, "1": 0.8}} for s in (2, 4)]
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_run_writes_loss_curves_and_drift(tmp_path):
    run = RunDir(tmp_path / "run")
    write_metrics(run)
    assert plot_run(run.root) == [run.loss_curves, run.cka_drift]
    assert run.loss_curves.read_bytes()[:8] == PNG and run.cka_drift.read_bytes()[:8] == PNG


def test_plot_run_without_evaluations_draws_only_the_losses(tmp_path):
    run = RunDir(tmp_path / "run")
    write_metrics(run, with_eval=False)
    assert plot_run(run.root) == [run.loss_curves]
    assert not run.cka_drift.exists()


def test_other_plots_write_pngs(tmp_path):
    plot_cka_layers({"a": [(0, 0.9), (1, 0.8)], "empty": []}, tmp_path / "cka.png", "title")
    plot_metric_bars({"a": {"x": 1.0}, "b": {}}, ["x", "y"], tmp_path / "bars.png")
    runs = {}
    for name in ("kl", "kl-cka"):
        write_metrics(RunDir(tmp_path / name))
        runs[name] = tmp_path / name
    plot_loss_comparison(runs, tmp_path / "losses.png")
    for name in ("cka.png", "bars.png", "losses.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
