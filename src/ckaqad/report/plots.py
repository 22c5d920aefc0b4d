"""The PNG plots of every command (matplotlib, imported lazily, Agg backend): per-layer CKA curves, metric
bars, a run's loss curves and CKA drift heatmap, and the loss curves of several runs side by side."""

from __future__ import annotations

from pathlib import Path

from ckaqad.paths import RunDir
from ckaqad.train.metrics import read_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cka_layers(curves: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    """One line per variant: (student) decoder block index vs CKA to the teacher."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, points in curves.items():
        xs, ys = zip(*points, strict=True) if points else ((), ())
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--", label="teacher (CKA = 1)")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("linear CKA to teacher (sinks excluded)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_metric_bars(rows: dict[str, dict[str, float]], columns: list[str], path: Path) -> None:
    """One bar chart per metric column, one bar per model (NaN where a model lacks the metric)."""
    plt = _pyplot()
    labels = list(rows)
    n = max(len(columns), 1)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False)
    for ax, column in zip(axes[0], columns, strict=False):
        values = [rows[label].get(column, float("nan")) for label in labels]
        ax.bar(range(len(labels)), values, color=[f"C{i}" for i in range(len(labels))])
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=6)
        ax.set_title(column, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss_curves(train_rows: list[dict], eval_rows: list[dict], path: Path) -> None:
    """Train KL and CKA term per step, with the held-out KL and 1 − mean CKA at the evaluation steps."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = [r["step"] for r in train_rows]
    for key, ax in (("kl", axes[0]), ("cka_term", axes[1])):
        values = [r.get(key) for r in train_rows]
        if any(v is not None for v in values):
            ax.plot(steps, [v if v is not None else float("nan") for v in values], label=f"train {key}")
        ax.set_xlabel("step")
        ax.set_title("KL(teacher‖student) per token" if key == "kl" else "mean (1 − CKA) over layers")
        ax.grid(alpha=0.3)
    if eval_rows:
        axes[0].plot([r["step"] for r in eval_rows], [r["kl_per_token"] for r in eval_rows], "o-", label="held-out")
        axes[1].plot([r["step"] for r in eval_rows], [1 - r["mean_cka"] for r in eval_rows], "o-", label="held-out")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cka_drift(eval_rows: list[dict], path: Path) -> None:
    """Heatmap of held-out CKA: decoder block (rows) × evaluation step (columns). `eval_rows` must not be empty."""
    plt = _pyplot()
    layers = sorted({int(k) for r in eval_rows for k in r["cka_layers"]})
    # metrics.jsonl keys are strings after a JSON round trip, ints in memory
    grid = [[r["cka_layers"].get(str(i), r["cka_layers"].get(i, float("nan"))) for r in eval_rows] for i in layers]
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(eval_rows) + 2), 0.18 * len(layers) + 2))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
    ax.set_xticks(range(len(eval_rows)), [str(r["step"]) for r in eval_rows])
    ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=6)
    ax.set_xlabel("step")
    ax.set_ylabel("decoder block")
    ax.set_title("held-out CKA to the teacher")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_run(run_dir: str | Path) -> list[Path]:
    """A run's loss_curves.png and (once it has evaluated) cka_drift.png, from its metrics.jsonl.

    Returns the paths written. Called by `ckaqad distill` after training.
    """
    run = RunDir(Path(run_dir))
    train_rows, eval_rows = read_metrics(run.root)
    plot_loss_curves(train_rows, eval_rows, run.loss_curves)
    written = [run.loss_curves]
    if eval_rows:
        plot_cka_drift(eval_rows, run.cka_drift)
        written.append(run.cka_drift)
    return written


def plot_loss_comparison(runs: dict[str, str | Path], path: Path) -> None:
    """Several runs side by side (the demo's KL-QAD vs CKA-QAD): train and held-out KL, held-out mean CKA."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, run_dir in runs.items():
        train_rows, eval_rows = read_metrics(Path(run_dir))
        axes[0].plot([r["step"] for r in train_rows], [r["kl"] if r["kl"] is not None else float("nan")
                                                       for r in train_rows], label=f"{label} train KL", alpha=0.7)
        if eval_rows:
            axes[0].plot([r["step"] for r in eval_rows], [r["kl_per_token"] for r in eval_rows], "o-",
                         label=f"{label} held-out KL")
            axes[1].plot([r["step"] for r in eval_rows], [r["mean_cka"] for r in eval_rows], "o-",
                         label=f"{label} held-out mean CKA")
    axes[0].set_title("KL(teacher‖student) per token")
    axes[1].set_title("mean layer CKA to the teacher")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
