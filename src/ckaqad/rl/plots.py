"""The PNG curves of RL runs (matplotlib, imported lazily, Agg backend): reward, held-out accuracy, entropy, KL
to the reference, clipped fraction and completion length, one line (mean) and band (min..max) per label over
its runs (the seeds of one configuration; one run is a label of its own)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ckaqad.train.metrics import read_metrics

PANELS = (("train", "reward_mean", "training reward (mean of the groups)"),
          ("eval", "heldout_accuracy", "held-out accuracy (greedy)"),
          ("train", "entropy", "policy entropy (nats/token, rollouts)"),
          ("eval", "heldout_kl_ref", "KL to the reference (exact, held-out, nats/token)"),
          ("train", "clipped", "tokens clipped (updates after the first)"),
          ("train", "completion_length", "completion length (tokens)"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve(run_dir: Path, kind: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of one metric of one run."""
    train, evals = read_metrics(run_dir)
    return [(r["step"], float(r[key])) for r in (train if kind == "train" else evals) if key in r]


def mean_and_spread(curves: Sequence[list[tuple[int, float]]]) -> list[tuple[int, float, float, float]]:
    """(step, mean, min, max) over the runs that have the step (a step-0 evaluation made by one run of a
    configuration, `--no-eval-at-start` in the others, stands for all of them: they start from one model)."""
    by_run = [dict(c) for c in curves]
    steps = sorted(set().union(*(set(c) for c in by_run))) if by_run else []
    rows = []
    for step in steps:
        values = [c[step] for c in by_run if step in c]
        rows.append((step, sum(values) / len(values), min(values), max(values)))
    return rows


def plot_runs(groups: dict[str, Sequence[Path]], path: Path, title: str = "") -> None:
    """One panel per metric; one line (mean) and band (min..max) per label over its runs."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (kind, key, label) in zip(axes.flat, PANELS, strict=True):
        for name, runs in groups.items():
            rows = mean_and_spread([curve(Path(r), kind, key) for r in runs])
            if not rows:
                continue
            steps, mean, low, high = zip(*rows, strict=True)
            line, = ax.plot(steps, mean, marker="o", markersize=3, label=f"{name} (n={len(runs)})")
            if len(runs) > 1:
                ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
