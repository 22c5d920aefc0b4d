"""Markdown tables and lines of the reports: fidelity table, per-layer CKA table, quantization coverage,
metric tables (eval, compare). Each returns a list of lines."""

from __future__ import annotations

from collections import Counter

from ckaqad.eval.fidelity import Fidelity


def fidelity_table(results: dict[str, Fidelity], teacher_ppl: float) -> list[str]:
    """One row per student (and the teacher's): mean / min / debiased CKA, KL per token, perplexity, top-1."""
    lines = ["| model | mean CKA | min CKA (layer) | debiased mean CKA | KL/token | ppl | top-1 agree |",
             "|---|---|---|---|---|---|---|",
             f"| teacher | 1 | 1 | 1 | 0 | {teacher_ppl:.3f} | 1 |"]
    for r in results.values():
        lines.append(f"| {r.label} | {r.mean_cka:.4f} | {r.min_cka:.4f} ({r.min_cka_layer}) | "
                     f"{r.mean_cka_debiased:.4f} | {r.kl_per_token:.4f} | {r.perplexity:.3f} | "
                     f"{r.top1_agreement:.3f} |")
    return lines


def layer_table(results: dict[str, Fidelity]) -> list[str]:
    """One row per student block (of the first student), one column per student: its CKA to the teacher.

    A row names the teacher block too (`3 → 5`) where the layer map pairs blocks of different index.
    """
    labels = list(results)
    lines = ["| layer | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    by_index = {label: {row["index"]: row for row in r.layers} for label, r in results.items()}
    for row in next(iter(results.values())).layers:
        index, teacher_index = row["index"], row.get("teacher_index", row["index"])
        name = str(index) if teacher_index == index else f"{index} → {teacher_index}"
        cells = [f"{by_index[lb][index]['cka']:.4f}" if index in by_index[lb] else "–" for lb in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def coverage_lines(quantization: dict[str, dict]) -> list[str]:
    """One line per student: how many Linear layers were quantized, and why the others were not.

    A format whose block does not divide the model's widths (INT4's 128 on a 576-wide model) quantizes
    only a few layers, and its fidelity numbers mean little without this line.
    """
    lines = []
    for label, q in quantization.items():
        reasons = Counter(q.get("excluded", {}).values())
        kept = "; ".join(f"{n} × {why}" for why, n in reasons.most_common())
        share = q.get("quantized_params", 0) / max(q.get("total_linear_params", 0), 1)
        lines.append(f"- {label}: {len(q.get('quantized', []))} Linear layers quantized ({share:.0%} of Linear "
                     f"parameters); kept in high precision: {kept or 'none'}")
    return lines


def cell(value) -> str:
    """A table cell: floats with 4 decimals, anything else as text, a dash for a missing value."""
    if value is None:
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def metric_lines(metrics: dict[str, object]) -> list[str]:
    """A two-column `| metric | value |` table."""
    return ["| metric | value |", "|---|---|", *(f"| {k} | {cell(v)} |" for k, v in metrics.items())]


def comparison_table(rows: dict[str, dict[str, float]], columns: list[str]) -> list[str]:
    """One row per model, one column per metric (a dash where a model lacks the metric)."""
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for label, metrics in rows.items():
        lines.append(f"| {label} | " + " | ".join(cell(metrics.get(c)) for c in columns) + " |")
    return lines


def spread_table(spread: dict) -> list[str]:
    """The runtime-spread suite's result: one row per runtime variant and the spread (max − min) over the
    deployments."""
    columns = list(next(iter(spread["variants"].values())))
    lines = [f"Runtime spread: {spread['blocks']} held-out blocks ({spread['tokens']} tokens, seed {spread['seed']}).",
             "", *comparison_table(spread["variants"], columns)]
    lines.append("| spread (max − min over deployments) | "
                 + " | ".join(cell(spread["spread"][c]["range"]) for c in columns) + " |")
    return lines


def block_kind_summary(layers: list[dict], kinds: list[str]) -> dict[str, dict]:
    """Per block kind (mamba, attention, moe, mlp, attention+moe...): mean and min CKA over its blocks.
    `layers`: a Fidelity's per-layer rows (`index`, `cka`); `kinds[i]`: the kind of block i."""
    out: dict[str, dict] = {}
    for row in layers:
        index = row["index"]
        if not 0 <= index < len(kinds):
            continue
        entry = out.setdefault(kinds[index], {"layers": [], "values": []})
        entry["layers"].append(index)
        entry["values"].append(row["cka"])
    return {kind: {"mean": sum(e["values"]) / len(e["values"]), "min": min(e["values"]), "layers": e["layers"]}
            for kind, e in out.items()}


def block_kind_lines(summaries: dict[str, dict[str, dict]]) -> list[str]:
    """`| block kind | blocks | <label> mean (min) ... |`: the CKA of every block type, per student."""
    labels = list(summaries)
    kinds = list(dict.fromkeys(k for s in summaries.values() for k in s))
    if not kinds:
        return []
    lines = ["| block kind | blocks | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for kind in kinds:
        first = next(s[kind] for s in summaries.values() if kind in s)
        cells = [f"{s[kind]['mean']:.4f} ({s[kind]['min']:.4f})" if kind in s else "–" for s in summaries.values()]
        lines.append(f"| {kind} | {len(first['layers'])} | " + " | ".join(cells) + " |")
    return lines
