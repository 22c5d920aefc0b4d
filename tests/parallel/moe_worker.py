"""The 2-process half of tests/parallel/test_moe_distributed.py:

    torchrun --standalone --nproc-per-node 2 tests/parallel/moe_worker.py WORKDIR

Trains WORKDIR/r2, the same distill run as the test's one-process WORKDIR/r1, on a tiny qwen3_moe (built on meta,
each rank reading its experts with DCP's method). Then fills the teacher built on meta by rank 0's broadcasts
(the other load method) and writes whether it equals `from_pretrained` to WORKDIR/broadcast-RANK.json. One process
group per process, made here (distill joins it and leaves it): a second `init_process_group` on torchrun's agent
store could hang one rank.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from moe_distributed_runs import config

from ckaqad.commands import distill
from ckaqad.models.load import load_model, load_model_on_meta
from ckaqad.parallel.fsdp import shard_model
from ckaqad.parallel.loading import file_name, materialize_


def broadcast_load(root: Path) -> dict:
    """The teacher built on meta, sharded, filled by `--load-method broadcast`: equal to from_pretrained?"""
    directory = root / "teacher"
    want = dict(load_model(directory, device="cpu").model.named_parameters())
    model = load_model_on_meta(directory, torch.float32).model
    shard_model(model, "cpu", trainable=False)
    materialize_(model, directory, "cpu", "broadcast")
    params = {file_name(n): p for n, p in model.named_parameters()}
    experts = [p for n, p in params.items() if n.endswith("experts.down_proj")]
    return {"equal": all(torch.equal(p.full_tensor(), want[n]) for n, p in params.items()),
            "expert_rows": sorted({p.to_local().shape[0] for p in experts})}


if __name__ == "__main__":
    root = Path(sys.argv[1])
    dist.init_process_group("gloo")
    try:
        distill.run(config(root, root / "r2"))
        result = broadcast_load(root)
        (root / f"broadcast-{dist.get_rank()}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
