"""What a QAD run's high-precision tensors (norms, the tied embedding/head) cost between the run and its export.

The export stores them in bf16; a run that trains them as float32 masters measures a model nobody serves. For
each policy, a KL-QAD run of the embedded model at the demo's CPU budget (30 steps, batch 4, seq_len 128, lr 5e-5,
W4A4, seed 0), then the same held-out blocks through the run's student and through its compressed-tensors export
(ckaqad `load_export`, reference arithmetic, float32):

* `train`: float32 masters, trained; the export rounds them (the old behaviour);
* `bf16-ste`: float32 masters updated by the optimizer, the forward sees their bf16 values (straight-through:
  the gradient at the rounded point is applied to the master). Implemented here with optimizer step hooks; a
  measurement harness, not a student kind;
* `frozen`: rounded to bf16 when the student is built and not trained (`QuantConfig.high_precision="frozen"`).

    OMP_NUM_THREADS=1 python benchmarks/high_precision_tensors.py [--steps 30] [--seeds 0] [--out high_precision.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ckaqad.commands import distill
from ckaqad.data.blocks import DataConfig, eval_batches
from ckaqad.eval.fidelity import measure_fidelity
from ckaqad.export.reader import load_export
from ckaqad.export.writer import export_student
from ckaqad.models.load import load_model
from ckaqad.objectives.compose import ObjectiveConfig
from ckaqad.quant.apply import freeze_scales
from ckaqad.quant.linear import QuantConfig
from ckaqad.students.spec import high_precision_parameters
from ckaqad.train import trainer
from ckaqad.train.trainer import TrainConfig

POLICIES = ("train", "bf16-ste", "frozen")


class BF16StraightThrough:
    """Forward on bf16 values of `params`, optimizer steps on their float32 masters."""

    def __init__(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        self.params = params
        self.masters = [p.detach().clone() for p in params]
        self.round()
        optimizer.register_step_pre_hook(lambda *_: self.masters_in())
        optimizer.register_step_post_hook(lambda *_: self.masters_out())

    @torch.no_grad()
    def round(self) -> None:
        for p in self.params:
            p.copy_(p.to(torch.bfloat16))

    @torch.no_grad()
    def masters_in(self) -> None:
        for p, m in zip(self.params, self.masters, strict=True):
            p.copy_(m)

    @torch.no_grad()
    def masters_out(self) -> None:
        for p, m in zip(self.params, self.masters, strict=True):
            m.copy_(p)
        self.round()


def run_policy(policy: str, seed: int, steps: int, teacher, work: Path) -> dict:
    quant = QuantConfig(high_precision="frozen" if policy == "frozen" else "train")
    config = distill.Config(
        out=str(work / f"{policy}-{seed}"), device="cpu", quant=quant, objective=ObjectiveConfig(loss="kl"),
        train=TrainConfig(steps=steps, lr=5e-5, batch_size=4, cka_tokens=256, eval_every=10_000, eval_blocks=8,
                          seed=seed, progress=False),
        data=DataConfig(seq_len=128))
    trainee, _ = distill.build_trainee(config, teacher)
    if policy == "bf16-ste":
        BF16StraightThrough(high_precision_parameters(trainee.student), trainee.optimizer)
    start = time.perf_counter()
    trainer.train(trainee)
    seconds = time.perf_counter() - start
    student = trainee.student.requires_grad_(False)
    freeze_scales(student)
    export_dir = work / f"{policy}-{seed}-export"
    export_student(student, teacher.tokenizer, export_dir, overwrite=True)
    exported, _ = load_export(export_dir)
    heldout = eval_batches(trainee.blocks.heldout, 4, torch.device("cpu"), limit=24)
    exclude = tuple(i for i in (teacher.tokenizer.bos_token_id,) if i is not None)
    results, teacher_stats = measure_fidelity(teacher.model, {"run": student, "export": exported}, heldout,
                                              exclude_token_ids=exclude, progress=False)
    row = {"policy": policy, "seed": seed, "train_seconds": round(seconds, 1),
           "teacher_perplexity": teacher_stats["perplexity"]}
    for label, r in results.items():
        row[label] = {"kl_per_token": r.kl_per_token, "perplexity": r.perplexity, "mean_cka": r.mean_cka,
                      "min_cka": r.min_cka, "top1_agreement": r.top1_agreement}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--out", type=Path, default=Path("high_precision.json"))
    args = parser.parse_args()
    teacher = load_model("default", device="cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for policy in args.policies:
                rows.append(run_policy(policy, seed, args.steps, teacher, Path(tmp)))
                r = rows[-1]
                print(f"{policy:9s} seed {seed}: run KL {r['run']['kl_per_token']:.4f} ppl "
                      f"{r['run']['perplexity']:.3f} | export KL {r['export']['kl_per_token']:.4f} ppl "
                      f"{r['export']['perplexity']:.3f} (teacher ppl {r['teacher_perplexity']:.3f}, "
                      f"{r['train_seconds']} s)", flush=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
