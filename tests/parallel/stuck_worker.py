"""A rank that stops answering: rank 1 joins the process group (ckaqad's `init_world`, 2 s timeout) and then
sleeps; rank 0's next collective must fail after the timeout as one `LostPeerError`. Rank 0 writes what it saw
to OUT.json and ends as `cli.main` does after a lost peer (`exit_without_teardown(2)`): a plain exit here can
die of SIGABRT while gloo's thread still waits on rank 1. Launched by tests/parallel/test_distributed.py with
torchrun's variables and no agent."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from ckaqad.errors import LostPeerError
from ckaqad.parallel.dist import all_reduce_, exit_without_teardown, init_world, peer_failures_as_errors

# Both ranks finish importing before either joins: the 2 s timeout also bounds the rendezvous, and a loaded
# machine can start one interpreter seconds after the other.
out = Path(sys.argv[1])
rank = os.environ["RANK"]
(out.parent / f"ready-{rank}").touch()
while not all((out.parent / f"ready-{r}").exists() for r in ("0", "1")):
    time.sleep(0.01)
world, _ = init_world("cpu", 2.0)
all_reduce_(torch.ones(1))  # both ranks are in
if world.rank == 1:
    time.sleep(20)  # stuck: alive, sockets open, never answering
    sys.exit(0)
start = time.monotonic()
try:
    with peer_failures_as_errors(world):
        all_reduce_(torch.ones(1))
    seen = {"error": None}
except LostPeerError as exc:
    seen = {"error": str(exc)}
seen["elapsed_s"] = time.monotonic() - start
out.write_text(json.dumps(seen))
exit_without_teardown(2)
