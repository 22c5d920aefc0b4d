"""The 2-process half of tests/parallel/test_moe_distributed.py:

    torchrun --standalone --nproc-per-node 2 tests/parallel/moe_worker.py WORKDIR

Trains WORKDIR/r2 (the same distill run as the test's one-process WORKDIR/r1, on a tiny qwen3_moe) and writes
WORKDIR/moe-worker-RANK.json: the local shapes FSDP2 gave the fused 3-D expert parameters of a sharded student.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from moe_distributed_runs import config

from ckaqad.commands import distill
from ckaqad.models.load import load_model
from ckaqad.parallel.fsdp import shard_model
from ckaqad.quant.linear import QuantConfig
from ckaqad.students.spec import build_ptq_student


def main(root: Path) -> None:
    distill.run(config(root, root / "r2"))
    rank = int(os.environ["RANK"])  # distill.run has ended its process group; FSDP below starts its own
    teacher = load_model(str(root / "teacher"), device="cpu").model
    student, _ = build_ptq_student(teacher, QuantConfig(scheme="w4a16"), None)
    shard_model(student, "cpu", trainable=True)
    experts = student.model.layers[0].mlp.experts
    shapes = {name: {"local": list(experts._parameters[name].to_local().shape),
                     "global": list(experts._parameters[name].shape),
                     "placements": [str(p) for p in experts._parameters[name].placements]}
              for name in ("gate_up_proj", "down_proj")}
    (root / f"moe-worker-{rank}.json").write_text(json.dumps(shapes))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
