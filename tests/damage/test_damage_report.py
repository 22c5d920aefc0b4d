"""The recovery report over several runs: per-kind tables, pooled and per-kind correlations said in words,
a heatmap per run and the scatter, and a JSON that reads back into the same runs."""

from __future__ import annotations

import json

import pytest

from ckaqad.damage.recovery import correlate, teacher_reference
from ckaqad.paths import RecoveryDir
from ckaqad.report.recovery import RecoveryRun, correlations, read_recovery_runs, write_recovery_report


def synthetic_run(damage: str, loss: str, start_kl: float, speed: float) -> RecoveryRun:
    rows = []
    for k, step in enumerate((0, 2, 4, 6)):
        kl = start_kl * (1 - speed) ** k
        cka = 0.9 + 0.09 * (1 - kl / start_kl)
        rows.append({"step": step, "kl_per_token": kl, "perplexity": 10 + 5 * kl, "teacher_perplexity": 10.0,
                     "top1_agreement": 1 - kl / 4, "mean_cka": cka, "min_cka": cka - 0.05,
                     "cka_layers": {"0": cka + 0.01, "1": cka - 0.05}})
    return RecoveryRun(label=f"{damage} {loss}", damage=damage, loss=loss, run=f"runs/{damage}-{loss}",
                       teacher=teacher_reference(), rows=rows, runtime_s=1.0)


def test_report_over_two_kinds(tmp_path):
    runs = [synthetic_run("wanda", "kl", 1.0, 0.2), synthetic_run("wanda", "kl+cka", 1.0, 0.3),
            synthetic_run("2:4", "kl", 0.5, 0.1), synthetic_run("2:4", "kl+cka", 0.5, 0.15)]
    payload = write_recovery_report(RecoveryDir(tmp_path), runs, {"teacher": "t", "data": "d"})
    scopes = {row["scope"] for row in payload["correlations"]}
    assert scopes == {"all", "2:4 only", "wanda only"}
    pooled = next(r for r in payload["correlations"] if r["scope"] == "all" and r["recovery_of"] == "kl_per_token"
                  and r["cka"] == "mean_cka")
    # Recovery is a monotone function of CKA here by construction: Spearman exactly 1.
    x = [row["mean_cka"] for run in runs for row in run.rows]
    y = [1 - row["kl_per_token"] / run.rows[0]["kl_per_token"] for run in runs for row in run.rows]
    assert pooled["pearson"]["value"] == pytest.approx(correlate(x, y).value)
    assert pooled["spearman"]["value"] == pytest.approx(1.0) and pooled["pearson"]["n"] == 16
    text = RecoveryDir(tmp_path).md.read_text()
    assert "### wanda" in text and "| recovered kl+cka |" in text and "strong positive" in text
    for name in ("wanda-kl", "wanda-kl-cka", "2-4-kl", "2-4-kl-cka"):
        assert (tmp_path / f"recovery_cka_{name}.png").is_file()
    assert RecoveryDir(tmp_path).scatter.is_file() and RecoveryDir(tmp_path).html.is_file()
    back = read_recovery_runs(tmp_path)
    assert [r.label for r in back] == [r.label for r in runs] and back[2].rows == json.loads(json.dumps(runs[2].rows))
    assert correlations(back) == payload["correlations"]
