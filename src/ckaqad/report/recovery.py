"""The recovery report (`recovery.md`, `recovery.html`, `recovery.json`, a layer × step CKA heatmap per run,
a recovery-vs-CKA scatter): one recovery run (`ckaqad recover`) or a study of several damage kinds and
objectives (`ckaqad demo --recovery`).

Per evaluation step: the recovery fraction `(m_damaged − m_now)/(m_damaged − m_teacher)` of KL to the
teacher, perplexity, top-1 agreement and (for a forgetting) the narrow corpus's perplexity, with mean, min
and per-layer CKA. Then the correlation between recovery and CKA over every evaluation point of every run
(and within each damage kind with enough points): Pearson and Spearman with 95% bootstrap intervals
(`damage.recovery.correlate`), each said in words — weak, or an interval that includes zero, is written
as such.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ckaqad.damage.recovery import correlate, recovery_curve
from ckaqad.files import write_json, write_text
from ckaqad.paths import RecoveryDir
from ckaqad.report.html import write_page
from ckaqad.report.plots import plot_cka_drift

# (recovery of, against CKA of): the pairs whose correlation the report gives.
CORRELATED = (("kl_per_token", "mean_cka"), ("perplexity", "mean_cka"), ("kl_per_token", "min_cka"),
              ("perplexity", "min_cka"))
MIN_POINTS_PER_KIND = 4
METRIC_NAMES = {"kl_per_token": "KL", "perplexity": "ppl", "top1_agreement": "top-1", "mean_cka": "mean CKA",
                "narrow_perplexity": "narrow ppl"}


@dataclass
class RecoveryRun:
    """One recovery run: its evaluation rows (step 0 = the damaged model) and the teacher's reference values."""

    label: str
    damage: str
    loss: str
    run: str
    teacher: dict
    rows: list[dict] = field(default_factory=list)
    runtime_s: float = float("nan")

    def curve(self) -> list[dict]:
        return recovery_curve(self.rows, self.teacher)

    def to_dict(self) -> dict:
        return {**asdict(self), "recovery": self.curve()}


def points(runs: list[RecoveryRun]) -> list[dict]:
    """Every evaluation point of every run: {run, damage, loss, step, mean_cka, min_cka, recovery: {...}}."""
    out = []
    for run in runs:
        for row, rec in zip(run.rows, run.curve(), strict=True):
            out.append({"run": run.label, "damage": run.damage, "loss": run.loss, "step": row["step"],
                        "mean_cka": row["mean_cka"], "min_cka": row["min_cka"], "recovery": rec})
    return out


def correlations(runs: list[RecoveryRun], seed: int = 0) -> list[dict]:
    """Pearson and Spearman (with intervals) of recovery vs CKA over all points, then per damage kind."""
    all_points = points(runs)
    scopes = {"all": all_points}
    kinds = sorted({p["damage"] for p in all_points})
    for kind in kinds if len(kinds) > 1 else ():  # with one kind its rows would repeat "all"
        chosen = [p for p in all_points if p["damage"] == kind]
        if len(chosen) >= MIN_POINTS_PER_KIND:
            scopes[f"{kind} only"] = chosen
    rows = []
    for scope, chosen in scopes.items():
        for metric, cka in CORRELATED:
            x = [p[cka] for p in chosen]
            y = [p["recovery"].get(metric, float("nan")) for p in chosen]
            rows.append({"scope": scope, "recovery_of": metric, "cka": cka,
                         "pearson": correlate(x, y, "pearson", seed).to_dict(),
                         "spearman": correlate(x, y, "spearman", seed).to_dict()})
    return rows


def _f(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def step_table(run: RecoveryRun) -> list[str]:
    metrics = [m for m in ("kl_per_token", "perplexity", "top1_agreement", "narrow_perplexity") if m in run.rows[0]]
    head = ["step"] + [f"{METRIC_NAMES[m]} (recovered)" for m in metrics] + ["mean CKA", "min CKA"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, rec in zip(run.rows, run.curve(), strict=True):
        cells = [str(row["step"])] + [f"{_f(row[m], 4 if m != 'top1_agreement' else 3)} ({_f(rec.get(m), 2)})"
                                      for m in metrics]
        lines.append("| " + " | ".join(cells + [_f(row["mean_cka"]), _f(row["min_cka"])]) + " |")
    return lines


def layer_table(run: RecoveryRun) -> list[str]:
    """Per-layer CKA of the damaged model and after recovery."""
    first, last = run.rows[0]["cka_layers"], run.rows[-1]["cka_layers"]
    lines = ["| student block | damaged | recovered | change |", "|---|---|---|---|"]
    for key in sorted(first, key=int):
        a, b = first[key], last.get(key, last.get(str(key), float("nan")))
        lines.append(f"| {key} | {_f(a)} | {_f(b)} | {b - a:+.4f} |")
    return lines


def kind_table(runs: list[RecoveryRun]) -> list[str]:
    """Per damage kind: teacher / damaged / recovered with each objective (final evaluation)."""
    lines = []
    for kind in dict.fromkeys(r.damage for r in runs):
        chosen = [r for r in runs if r.damage == kind]
        narrow = "narrow_perplexity" in chosen[0].rows[0]
        head = "| model | KL/token | ppl | top-1 agree | mean CKA | min CKA |" + (" narrow ppl |" if narrow else "")
        lines += [f"### {kind}", "", head, "|---|---|---|---|---|---|" + ("---|" if narrow else "")]
        damaged = chosen[0].rows[0]
        teacher_narrow = f" {_f(chosen[0].teacher.get('narrow_perplexity'), 3)} |" if narrow else ""
        lines.append(f"| teacher | 0 | {_f(damaged['teacher_perplexity'], 3)} | 1 | 1 | 1 |{teacher_narrow}")
        for label, row in [("damaged", damaged)] + [(f"recovered {r.loss}", r.rows[-1]) for r in chosen]:
            extra = f" {_f(row.get('narrow_perplexity'), 3)} |" if narrow else ""
            lines.append(f"| {label} | {_f(row['kl_per_token'])} | {_f(row['perplexity'], 3)} | "
                         f"{_f(row['top1_agreement'], 3)} | {_f(row['mean_cka'])} | {_f(row['min_cka'])} |{extra}")
        lines.append("")
    return lines


def correlation_lines(rows: list[dict]) -> list[str]:
    lines = ["| points | recovery of | vs | Pearson r [95% CI] | Spearman ρ [95% CI] | n |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        p, s = row["pearson"], row["spearman"]
        lines.append(f"| {row['scope']} | {METRIC_NAMES[row['recovery_of']]} | {row['cka'].replace('_', ' ')} | "
                     f"{_f(p['value'], 3)} [{_f(p['low'], 3)}, {_f(p['high'], 3)}] | "
                     f"{_f(s['value'], 3)} [{_f(s['low'], 3)}, {_f(s['high'], 3)}] | {p['n']} |")
    lines += ["", "In words:", ""]
    for row in rows:
        lines.append(f"- {row['scope']}, recovery of {METRIC_NAMES[row['recovery_of']]} vs "
                     f"{row['cka'].replace('_', ' ')}: {row['pearson']['verdict']}; Spearman: "
                     f"{row['spearman']['verdict']}.")
    return lines


def plot_scatter(runs: list[RecoveryRun], path) -> None:
    """Recovery of KL and of perplexity against mean CKA, one colour per damage kind, one marker per loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    kinds = list(dict.fromkeys(r.damage for r in runs))
    losses = list(dict.fromkeys(r.loss for r in runs))
    markers = "osD^vP*X"
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for run in runs:
        xs = [row["mean_cka"] for row in run.rows]
        curve = run.curve()
        for ax, metric in zip(axes, ("kl_per_token", "perplexity"), strict=True):
            ax.plot(xs, [c.get(metric, float("nan")) for c in curve], linestyle=":", linewidth=0.8,
                    marker=markers[losses.index(run.loss) % len(markers)],
                    color=colours[kinds.index(run.damage) % len(colours)], label=f"{run.damage} {run.loss}")
    for ax, metric in zip(axes, ("KL to the teacher", "perplexity"), strict=True):
        ax.set_xlabel("held-out mean CKA to the teacher")
        ax.set_ylabel(f"recovery fraction of {metric}")
        ax.axhline(0, color="grey", linewidth=0.6)
        ax.axhline(1, color="grey", linewidth=0.6, linestyle="--")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def heatmap_name(directory: RecoveryDir, run: RecoveryRun, several: bool):
    if not several:
        return directory.heatmap
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in run.label)
    return directory.root / f"recovery_cka_{safe}.png"


def write_recovery_report(directory: RecoveryDir, runs: list[RecoveryRun], meta: dict, seed: int = 0) -> dict:
    """Write the report files into `directory.root`; returns the JSON payload."""
    directory.root.mkdir(parents=True, exist_ok=True)
    several = len(runs) > 1
    corr = correlations(runs, seed)
    for run in runs:
        plot_cka_drift(run.rows, heatmap_name(directory, run, several))
    plot_scatter(runs, directory.scatter)
    payload = {"schema": "ckaqad.recovery/1", "meta": meta, "runs": [r.to_dict() for r in runs],
               "correlations": corr}
    md = ["# Recovery by self-distillation", "",
          f"Teacher `{meta.get('teacher')}`; data: {meta.get('data')}. Step 0 is the damaged model; the recovery "
          "fraction (in parentheses) is (m_damaged − m_now)/(m_damaged − m_teacher): 0 damaged, 1 back at the "
          "teacher, negative worse. For a forgetting, the recovery of the narrow perplexity is the new skill "
          "being lost.", ""]
    if several:
        md += ["## Per damage kind (final evaluation)", "", *kind_table(runs)]
    for run in runs:
        md += [f"## {run.label}: {run.damage}, {run.loss}", "", f"Run `{run.run}`.", "", *step_table(run), "",
               f"![CKA by layer and step]({heatmap_name(directory, run, several).name})", "",
               "<details><summary>per-layer CKA</summary>", "", *layer_table(run), "", "</details>", ""]
    md += ["## Recovery vs CKA", "",
           f"Over every evaluation point (steps included, the damaged model's step 0 too) of {len(runs)} run(s); "
           "95% percentile bootstrap over points, 2000 resamples, seed 0. Points of one run are not independent, "
           "so the interval is optimistic; a pooled correlation across damage kinds can come from the kinds' "
           "differences alone (see the per-kind rows).", "", *correlation_lines(corr), "",
           f"![recovery vs CKA]({directory.scatter.name})", ""]
    if "runtime_s" in meta:
        md.append(f"Run time {meta['runtime_s']:.0f} s.")
    text = "\n".join(md) + "\n"
    write_text(directory.md, text)
    write_page(directory.html, text, "ckaqad recovery")
    write_json(directory.json, payload)
    return payload


def read_recovery_runs(directory) -> list[RecoveryRun]:
    """The runs of a written recovery report (a recover run or a study), to report several studies as one."""
    payload = json.loads(RecoveryDir(Path(directory)).json.read_text())
    names = {f.name for f in dataclasses.fields(RecoveryRun)}
    return [RecoveryRun(**{k: v for k, v in run.items() if k in names}) for run in payload["runs"]]
