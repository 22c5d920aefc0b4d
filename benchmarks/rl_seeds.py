"""GRPO vs ABC-GRPO over seeds on the embedded model: the same `ckaqad rl` job per (algorithm, seed), then the
held-out accuracy, entropy and KL curves with their spread, and what the clip bounds did.

Each run is an ordinary `ckaqad rl` run directory under OUT/<algo>-s<seed>; a run whose summary.json exists
is reused (an interrupted measurement resumes). The base model's step-0 evaluation is made once per algorithm
(its first seed, so each curve starts at the base; the other seeds pass --no-eval-at-start: they start from
the same model and evaluate the same problems greedily, and that evaluation draws no random numbers).
Prints a table (mean ± sample std, [min, max] over seeds) and writes OUT/rl_seeds.json and the curves
OUT/rl_seeds_curves.png (mean line, min..max band).

    OMP_NUM_THREADS=1 python benchmarks/rl_seeds.py --out runs/rl_seeds [--seeds 0 1 2] [-- RL FLAGS...]

Flags after `--` go to every `ckaqad rl` (the default: the CPU budget of docs/results.md §13, run B).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from ckaqad import cli
from ckaqad.paths import RLRunDir
from ckaqad.rl.plots import plot_runs
from ckaqad.train.metrics import read_metrics

ALGOS = ("grpo", "abc-grpo")
DEFAULT_FLAGS = ["--task", "arithmetic", "--steps", "8", "--prompts-per-step", "4", "--group-size", "4",
                 "--epochs", "2", "--minibatches", "2", "--lr", "1e-4", "--eval-every", "4", "--eval-problems",
                 "32", "--device", "cpu", "--no-progress"]
# Final held-out evaluation, and the mean over the run's RL steps of what the clip bounds did.
EVAL_KEYS = ("heldout_accuracy", "heldout_entropy", "heldout_kl_ref", "heldout_length")
TRAIN_KEYS = ("reward_mean", "entropy", "clipped", "grpo_unbounded", "ratio_mean", "skipped")


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def run_summary(run: Path) -> dict:
    train, evals = read_metrics(run)
    final = evals[-1]
    row = {k: float(final[k]) for k in EVAL_KEYS}
    for key in TRAIN_KEYS:
        values = [float(r[key]) for r in train if key in r]
        row[f"mean_{key}"] = statistics.fmean(values) if values else float("nan")
    return row


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else None
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=list(ALGOS))
    parser.add_argument("--out", type=Path, default=Path("runs/rl_seeds"))
    args = parser.parse_args(argv)
    flags = DEFAULT_FLAGS if extra is None else extra
    runs: dict[str, list[Path]] = {algo: [] for algo in args.algos}
    seconds = {}
    for seed in args.seeds:
        for algo in args.algos:
            run = args.out / f"{algo}-s{seed}"
            first = not runs[algo]
            runs[algo].append(run)
            if RLRunDir(run).summary.is_file():
                continue
            start = time.perf_counter()
            code = cli.main(["rl", "--algo", algo, "--seed", str(seed), "--out", str(run), *flags,
                             *([] if first else ["--no-eval-at-start"])])
            if code != 0:
                raise SystemExit(code)
            seconds[run.name] = round(time.perf_counter() - start, 1)
    rows = {algo: {run.name: run_summary(run) for run in algo_runs} for algo, algo_runs in runs.items()}
    table = {algo: {key: spread([r[key] for r in by_run.values()]) for key in next(iter(by_run.values()))}
             for algo, by_run in rows.items()}
    base = next((r for runs_ in runs.values() for run in runs_ for r in read_metrics(run)[1] if r["step"] == 0),
                None)
    print("| | " + " | ".join(next(iter(table.values()))) + " |")
    if base is not None:
        print("| base (step 0) | " + " | ".join(f"{base[k]:.3f}" if k in base else "–"
                                               for k in next(iter(table.values()))) + " |")
    for algo, metrics in table.items():
        print(f"| {algo} (n={len(runs[algo])}) | " + " | ".join(
            f"{m['mean']:.3f} ± {m['std']:.3f} [{m['min']:.3f}, {m['max']:.3f}]" for m in metrics.values()) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    plot_runs(runs, args.out / "rl_seeds_curves.png", title="GRPO vs ABC-GRPO, embedded model, arithmetic")
    (args.out / "rl_seeds.json").write_text(json.dumps(
        {"flags": flags, "seeds": args.seeds, "base": base, "runs": rows, "summary": table, "seconds": seconds},
        indent=2) + "\n")


if __name__ == "__main__":
    main()
