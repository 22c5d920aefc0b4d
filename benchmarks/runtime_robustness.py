"""Is a CKA-QAD student more robust to runtime perturbations than a KL-QAD student?

For each seed, KL-QAD and CKA-QAD students of the embedded model at the demo's CPU budget (30 steps, batch 4,
seq_len 128, lr 5e-5, W4A4, 256 CKA rows; the default QuantConfig: exact global scales, frozen bf16 norms and
embeddings), each exported in the compressed-tensors layout and scored by `eval.runtime_spread` on 16 held-out
blocks of 256 tokens (seeded sample): KL(emulated ‖ served) (how far the model training measured is from the
one transformers serves), KL(teacher ‖ served), and the spread (max − min) of KL to the teacher and perplexity
over the four deployment variants. Then mean ± std over seeds, and the paired CKA − KL difference per seed.

    OMP_NUM_THREADS=1 python benchmarks/runtime_robustness.py [--seeds 0 1 2] [--steps 30] [--out robustness.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from ckaqad.commands import distill
from ckaqad.data.blocks import DataConfig, load_blocks
from ckaqad.eval.runtime_spread import runtime_spread
from ckaqad.export.writer import export_student
from ckaqad.models.load import load_model
from ckaqad.objectives.compose import ObjectiveConfig
from ckaqad.quant.apply import freeze_scales
from ckaqad.train import trainer
from ckaqad.train.trainer import TrainConfig

LOSSES = {"KL-QAD": "kl", "CKA-QAD": "kl+cka"}
SUMMARY = {
    "kl_emulated_served": lambda s: s["variants"]["emulated"]["kl_served"],
    "kl_teacher_served": lambda s: s["variants"]["served"]["kl_teacher"],
    "perplexity_served": lambda s: s["variants"]["served"]["perplexity"],
    "spread_kl_teacher": lambda s: s["spread"]["kl_teacher"]["range"],
    "spread_perplexity": lambda s: s["spread"]["perplexity"]["range"],
    "spread_top1": lambda s: s["spread"]["top1_agreement"]["range"],
    "max_kl_served": lambda s: max(v["kl_served"] for k, v in s["variants"].items() if k != "emulated"),
}


def train_and_export(loss: str, seed: int, steps: int, teacher, work: Path) -> Path:
    config = distill.Config(
        out=str(work / f"{loss}-{seed}"), device="cpu", objective=ObjectiveConfig(loss=loss),
        train=TrainConfig(steps=steps, lr=5e-5, batch_size=4, cka_tokens=256, eval_every=10_000, eval_blocks=8,
                          seed=seed, progress=False),
        data=DataConfig(seq_len=128))
    trainee, _ = distill.build_trainee(config, teacher)
    trainer.train(trainee)
    student = trainee.student.requires_grad_(False)
    freeze_scales(student)
    out = work / f"{loss}-{seed}-export"
    export_student(student, teacher.tokenizer, out, overwrite=True)
    shutil.rmtree(trainee.run.root)  # its checkpoint (student + optimizer state) is ~1.5 GB
    return out


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    parser.add_argument("--out", type=Path, default=Path("robustness.json"))
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out's .jsonl log")
    args = parser.parse_args()
    teacher = load_model("default", device="cpu")
    heldout = load_blocks(DataConfig(seq_len=256), teacher.model, teacher.tokenizer).heldout
    # One JSON line per finished run, so that an interrupted measurement keeps what it has.
    log = args.out.with_suffix(".jsonl")
    done = [json.loads(line) for line in log.read_text().splitlines()] if args.resume and log.is_file() else []
    if not args.resume:
        log.write_text("")
    runs: dict[str, list[dict]] = {label: [r for r in done if r["label"] == label] for label in LOSSES}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for label in args.losses:
                if any(r["seed"] == seed for r in runs[label]):
                    continue
                start = time.perf_counter()
                export_dir = train_and_export(LOSSES[label], seed, args.steps, teacher, Path(tmp))
                spread = runtime_spread(export_dir, teacher.model, heldout, n_blocks=args.blocks, seed=seed)
                shutil.rmtree(export_dir)
                record = {"label": label, "seed": seed, "seconds": round(time.perf_counter() - start, 1), **spread}
                runs[label].append(record)
                with log.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                row = {k: f(spread) for k, f in SUMMARY.items()}
                print(f"{label} seed {seed}: " + " ".join(f"{k}={v:.4f}" for k, v in row.items()), flush=True)
    paired = [(c, q) for c in runs["CKA-QAD"] for q in runs["KL-QAD"] if c["seed"] == q["seed"]]
    summary = {label: {k: mean_std([f(r) for r in rows]) for k, f in SUMMARY.items()}
               for label, rows in runs.items() if rows}
    if paired:
        summary["CKA-QAD - KL-QAD"] = {k: mean_std([f(c) - f(q) for c, q in paired]) for k, f in SUMMARY.items()}
    for label, metrics in summary.items():
        print(f"{label}: " + " ".join(f"{k}={m['mean']:.4f}±{m['std']:.4f}" for k, m in metrics.items()))
    args.out.write_text(json.dumps({"runs": runs, "summary": summary, "args": vars(args) | {"out": str(args.out)}},
                                   indent=2) + "\n")


if __name__ == "__main__":
    main()
