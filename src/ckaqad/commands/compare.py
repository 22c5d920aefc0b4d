"""`ckaqad compare DIR...`: one table and plots from several diagnose, eval or demo directories.

Each directory is read through the one results schema (`report.results.read_results`: results.json, or
the eval.json / diagnosis.json / report.json of a directory written by an older version). Writes
compare.md, compare.html, compare.json, metrics.png and (when any model has per-layer CKA) cka_layers.png.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ckaqad.errors import ConfigError
from ckaqad.files import atomic_directory, check_writable, write_json, write_text
from ckaqad.report import html, plots, tables
from ckaqad.report.results import ResultDir, read_results

HELP = "one table and plots from several eval / diagnose / demo directories"


@dataclass
class Config:
    dirs: tuple[str, ...]
    """result directories (of ckaqad diagnose, eval or demo) to compare"""
    out: str = "runs/compare"
    """output directory (compare.md, compare.html, plots)"""

    def __post_init__(self) -> None:
        self.dirs = tuple(self.dirs)
        if not self.dirs:
            raise ConfigError("compare needs at least one result directory")


def collect(dirs: tuple[str, ...]) -> tuple[dict[str, dict[str, float]], dict[str, dict[int, float]]]:
    """({"<label> (<dir name>)": flat metrics}, {same label: {layer: CKA}}) over every model of every dir."""
    metrics, layers = {}, {}
    for d in dirs:
        for model in read_results(d).models:
            label = f"{model.label} ({Path(d).name})"
            metrics[label] = model.metrics()
            layers[label] = model.layer_cka()
    return metrics, layers


def run(config: Config) -> dict[str, dict[str, float]]:
    """Compare; write --out atomically; print the table; return {row label: flat metrics}."""
    out = check_writable(config.out)
    metrics, layers = collect(config.dirs)
    columns = sorted({k for m in metrics.values() for k in m})
    table = tables.comparison_table(metrics, columns)
    curves = {label: sorted(cka.items()) for label, cka in layers.items() if cka}
    with atomic_directory(out) as tmp:
        d = ResultDir(tmp)
        if curves:
            plots.plot_cka_layers(curves, d.cka_layers, "Per-layer CKA to the teacher")
        plots.plot_metric_bars(metrics, columns, d.metrics_png)
        text = "\n".join(["# Comparison", "", *table, "", f"![per-layer CKA]({d.CKA_LAYERS})" if curves else "",
                          "", f"![metrics]({d.metrics_png.name})", "",
                          "Sources: " + ", ".join(f"`{s}`" for s in config.dirs), ""])
        write_text(d.compare_md, text)
        html.write_page(d.compare_html, text, "ckaqad compare")
        write_json(d.compare_json, metrics)
    print("\n".join(table))
    return metrics
