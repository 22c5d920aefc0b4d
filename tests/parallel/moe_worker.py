"""The 2-process half of tests/parallel/test_moe_distributed.py:

    torchrun --standalone --nproc-per-node 2 tests/parallel/moe_worker.py WORKDIR

Trains WORKDIR/r2, the same distill run as the test's one-process WORKDIR/r1, on a tiny qwen3_moe. One process
group per process: a second `init_process_group` on torchrun's agent store could hang one rank.
"""

from __future__ import annotations

import sys
from pathlib import Path

from moe_distributed_runs import config

from ckaqad.commands import distill

if __name__ == "__main__":
    root = Path(sys.argv[1])
    distill.run(config(root, root / "r2"))
