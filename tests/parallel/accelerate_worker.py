"""`accelerate launch --multi_gpu --num_processes 2 accelerate_worker.py ROOT`: the distributed_runs job, launched
by accelerate instead of torchrun. accelerate's multi-process launcher wraps `torch.distributed.run`, so
ckaqad sees torchrun's variables and joins the same gloo group; run by tests/parallel/test_distributed.py."""

from __future__ import annotations

import sys
from pathlib import Path

from distributed_runs import config

from ckaqad.commands import distill

root = Path(sys.argv[1])
distill.run(config(root, root / "r-accelerate"))
