"""The aggregate of a `ckaqad study`: cells grouped over seeds (mean ± std, t 95% interval per metric and per
layer's CKA), the paired per-seed differences of two methods, and study.json / study.md / study.html with a
plot per metric (error bars: the 95% interval) and the per-layer CKA curves with their bands.

A cell record is `{model, format, scheme, method, seed, steps, metrics: {name: value}, layers: [{index, cka}]}`;
`method` is `teacher`, `ptq` or a distillation objective (`kl`, `kl+cka`, ...).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ckaqad.files import write_json, write_text
from ckaqad.paths import StudyDir
from ckaqad.report import html
from ckaqad.report.statistics import Summary, format_interval, format_summary, paired_difference, summarize

METHOD_LABELS = {"teacher": "teacher", "ptq": "PTQ", "kl": "KL-QAD", "kl+cka": "CKA-QAD",
                 "kl+hidden-cosine": "KL+cosine", "kl+hidden-mse": "KL+MSE"}
# Metrics where lower is better, by their last dotted part (`served.kl_per_token`, `lambada.perplexity`);
# every other one: higher is better.
LOWER_IS_BETTER = ("kl_per_token", "perplexity", "router_kl")
FIDELITY_METRICS = ("mean_cka", "min_cka", "kl_per_token", "perplexity", "top1_agreement", "router_jaccard",
                    "router_kl")
GROUP_FIELDS = ("model", "format", "scheme", "method", "steps")
# Metrics of a student's served export (commands/study.py, eval.runtimes) carry this prefix.
SERVED_PREFIX = "served."


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def lower_is_better(metric: str) -> bool:
    return metric.rsplit(".", 1)[-1] in LOWER_IS_BETTER


def group_key(cell: dict) -> tuple:
    return tuple(cell.get(f) for f in GROUP_FIELDS)


def group_label(group: dict) -> str:
    parts = [method_label(group["method"])]
    if group.get("format"):
        parts.append(f"{group['format']} {group['scheme']}")
    if group.get("steps"):
        parts.append(f"{group['steps']} steps")
    return " · ".join(parts)


def metric_names(cells: Sequence[dict]) -> list[str]:
    """Fidelity metrics first, then the rest in first-seen order; the served form's metrics after all of the
    emulated ones, in the same order."""
    seen: list[str] = [m for m in FIDELITY_METRICS if any(m in c["metrics"] for c in cells)]
    for cell in cells:
        for name in cell["metrics"]:
            if name not in seen and not name.startswith(SERVED_PREFIX):
                seen.append(name)
    present = {name for cell in cells for name in cell["metrics"]}
    served = [SERVED_PREFIX + name for name in seen if SERVED_PREFIX + name in present]
    return seen + served + sorted(n for n in present if n.startswith(SERVED_PREFIX) and n not in served)


def aggregate(cells: Sequence[dict], pairs: Sequence[tuple[str, str]] = (("kl+cka", "kl"),)) -> dict:
    """`{metrics, groups: [{model, format, scheme, method, steps, seeds, metrics: {name: Summary dict},
    layers: [{index, ...Summary dict}]}], paired: [{model, format, scheme, steps, a, b, seeds, metrics:
    {name: Summary dict of a − b, verdict}}]}` (paired over the seeds both methods have)."""
    names = metric_names(cells)
    grouped: dict[tuple, list[dict]] = {}
    for cell in cells:
        grouped.setdefault(group_key(cell), []).append(cell)
    groups = []
    for key, members in grouped.items():
        members = sorted(members, key=lambda c: (c.get("seed") is None, c.get("seed")))
        layer_index = sorted({row["index"] for c in members for row in c.get("layers", [])})
        layers = []
        for index in layer_index:
            values = [row["cka"] for c in members for row in c.get("layers", []) if row["index"] == index]
            layers.append({"index": index, **summarize(values).to_dict()})
        groups.append({**dict(zip(GROUP_FIELDS, key, strict=True)), "seeds": [c.get("seed") for c in members],
                       "metrics": {n: summarize([c["metrics"][n] for c in members if n in c["metrics"]]).to_dict()
                                   for n in names},
                       "layers": layers})
    paired = []
    for a, b in pairs:
        for key, members in grouped.items():
            fields = dict(zip(GROUP_FIELDS, key, strict=True))
            if fields["method"] != a:
                continue
            other = grouped.get(tuple(b if f == "method" else fields[f] for f in GROUP_FIELDS))
            if not other:
                continue
            by_seed_a = {c["seed"]: c["metrics"] for c in members}
            by_seed_b = {c["seed"]: c["metrics"] for c in other}
            seeds = sorted(set(by_seed_a) & set(by_seed_b))
            metrics = {}
            for name in names:
                diff = paired_difference({s: by_seed_a[s][name] for s in seeds if name in by_seed_a[s]},
                                         {s: by_seed_b[s][name] for s in seeds if name in by_seed_b[s]})
                metrics[name] = {**diff.to_dict(), "verdict": diff.verdict(not lower_is_better(name))}
            paired.append({**{f: fields[f] for f in GROUP_FIELDS if f != "method"}, "a": a, "b": b,
                           "seeds": seeds, "metrics": metrics})
    return {"metrics": names, "groups": groups, "paired": paired}


def _summary(d: dict) -> Summary:
    return Summary(**{k: d[k] for k in ("n", "mean", "std", "low", "high")})


def _digits(metric: str) -> int:
    return 3 if metric.endswith("perplexity") or metric.endswith("above_chance") else 4


def study_lines(result: dict, meta: dict) -> list[str]:
    """study.md: per model the mean ± std table, the 95% intervals, and the paired differences."""
    names = result["metrics"]
    lines = [f"# Study: {meta.get('name', 'ckaqad study')}", "",
             f"{meta.get('cells', 0)} cells ({meta.get('trained', 0)} trained and {meta.get('evaluated', 0)} "
             f"evaluated in this invocation, the rest reused); run time {meta.get('runtime_s', 0):.0f} s on "
             f"{meta.get('device')}. Mean ± sample std over seeds; intervals are Student-t 95% intervals of the "
             "mean (n = 1: the one value). Fidelity on "
             f"{meta.get('fidelity_data', '?')}; tasks 0-shot, scored by lm-eval ({meta.get('tasks_note', '')}).",
             ""]
    emulated = [n for n in names if not n.startswith(SERVED_PREFIX)]
    served = [n for n in names if n.startswith(SERVED_PREFIX)]
    sections = [("", emulated)]
    if served:
        sections = [("Emulated (ckaqad's fake-quant student, what training optimised):", emulated),
                    ("Served (the student's compressed-tensors export loaded by transformers in bf16, what users "
                     "run; KL, CKA and agreement against the same fp32 teacher):", served)]
    for model in dict.fromkeys(g["model"] for g in result["groups"]):
        groups = [g for g in result["groups"] if g["model"] == model]
        lines += [f"## {model}", ""]
        for title, section in sections:
            lines += [title, ""] if title else []
            lines += ["| model | seeds | " + " | ".join(section) + " |", "|---|---|" + "---|" * len(section)]
            for g in groups:
                cells = [format_summary(_summary(g["metrics"][n]), _digits(n)) for n in section]
                lines.append(f"| {group_label(g)} | {len(g['seeds'])} | " + " | ".join(cells) + " |")
            lines += ["", "95% intervals of the mean:", "", "| model | " + " | ".join(section) + " |",
                      "|---|" + "---|" * len(section)]
            for g in groups:
                cells = [format_interval(_summary(g["metrics"][n]), _digits(n)).replace("+", "") for n in section]
                lines.append(f"| {group_label(g)} | " + " | ".join(cells) + " |")
            lines.append("")
        for p in (p for p in result["paired"] if p["model"] == model):
            lines += ["", f"Paired per-seed difference {method_label(p['a'])} − {method_label(p['b'])} "
                      f"({p['format']} {p['scheme']}, {p['steps']} steps, seeds {p['seeds']}): "
                      "`wins` / `loses` when the 95% interval excludes 0, else `ties`.", "",
                      "| metric | mean difference | std | 95% interval | verdict |", "|---|---|---|---|---|"]
            for n in names:
                d = p["metrics"][n]
                s = _summary(d)
                lines.append(f"| {n} | {s.mean:+.{_digits(n)}f} | {s.std:.{_digits(n)}f} | "
                             f"{format_interval(s, _digits(n))} | {d['verdict']} |")
        lines.append("")
    lines += [f"![per-layer CKA]({StudyDir.LAYERS_PLOT})", ""]
    lines += [f"![{n}]({StudyDir.metric_plot_name(n)})" for n in names]
    return lines + [""]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric(result: dict, metric: str, path: Path) -> None:
    """Bars of the metric's mean per group (all models), error bars its 95% interval."""
    plt = _pyplot()
    groups = [g for g in result["groups"] if g["metrics"][metric]["n"] > 0]
    labels = [f"{g['model']}\n{group_label(g)}" for g in groups]
    means = [g["metrics"][metric]["mean"] for g in groups]
    err = [[m - g["metrics"][metric]["low"] if math.isfinite(g["metrics"][metric]["low"]) else 0 for m, g in
            zip(means, groups, strict=True)],
           [g["metrics"][metric]["high"] - m if math.isfinite(g["metrics"][metric]["high"]) else 0 for m, g in
            zip(means, groups, strict=True)]]
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(groups)), 3.6))
    ax.bar(range(len(groups)), means, yerr=err, capsize=4, color=[f"C{i % 10}" for i in range(len(groups))])
    ax.set_xticks(range(len(groups)), labels, rotation=45, ha="right", fontsize=6)
    ax.set_title(f"{metric} (mean, 95% interval over seeds)", fontsize=9)
    finite = [v for v in means if math.isfinite(v)]
    if finite and metric in ("mean_cka", "min_cka", "top1_agreement"):
        lows = [g["metrics"][metric]["low"] for g in groups]
        bottom = min([v for v in finite + lows if math.isfinite(v)])
        ax.set_ylim(max(0.0, bottom - 0.02), 1.0 + 0.002)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_layers(result: dict, path: Path) -> None:
    """Per-layer CKA of each group (mean over seeds) with its 95% band, one panel per model."""
    plt = _pyplot()
    models = list(dict.fromkeys(g["model"] for g in result["groups"]))
    fig, axes = plt.subplots(1, len(models), figsize=(8 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for i, g in enumerate(g for g in result["groups"] if g["model"] == model and g["layers"]):
            xs = [row["index"] for row in g["layers"]]
            ax.plot(xs, [row["mean"] for row in g["layers"]], marker="o", markersize=3, color=f"C{i % 10}",
                    label=group_label(g))
            if all(math.isfinite(row["low"]) for row in g["layers"]):
                ax.fill_between(xs, [row["low"] for row in g["layers"]], [row["high"] for row in g["layers"]],
                                color=f"C{i % 10}", alpha=0.2)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_title(f"{model}: per-layer CKA to the teacher (mean, 95% band over seeds)", fontsize=9)
        ax.set_xlabel("decoder block")
        ax.set_ylabel("linear CKA")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_study(directory: Path, result: dict, meta: dict) -> None:
    """study.json (the aggregate and `meta`), study.md / study.html and the plots into `directory`."""
    d = StudyDir(Path(directory))
    write_json(d.json, {**meta, **result})
    plot_layers(result, d.layers_plot)
    for name in result["metrics"]:
        plot_metric(result, name, d.root / StudyDir.metric_plot_name(name))
    text = "\n".join(study_lines(result, meta))
    write_text(d.md, text)
    html.write_page(d.html, text, f"ckaqad study: {meta.get('name', '')}")
