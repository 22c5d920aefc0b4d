"""The process group of a `torchrun` launch: who this process is, collectives the loop needs, and what a lost
peer turns into.

`torchrun --nproc-per-node N -m ckaqad distill ...` (one node) or with `--nnodes M --rdzv-endpoint HOST:PORT`
(several) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_world` joins that group
(NCCL on CUDA, gloo on CPU) with a timeout, so a collective that waits on a dead or stuck peer raises instead of
hanging, and `lost_peer_error` turns that into one `ckaqad: error:` line (exit 2) on every survivor. Without
those variables (a plain `ckaqad distill`) there is no process group and `World()` is the single process:
nothing here changes what a one-process run computes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist
from transformers.utils import logging as transformers_logging

from ckaqad.errors import ConfigError, LostPeerError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank, world size, local rank (the GPU it drives on its node)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, draws progress bars and writes run files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True under a process group (torchrun), also at world size 1; False for a plain process."""
        return group_is_joined()

    def device(self, requested: str | None) -> str:
        """The device this rank computes on: `cuda:LOCAL_RANK` for CUDA, else the requested one."""
        wanted = requested or ("cuda" if torch.cuda.is_available() else "cpu")
        if wanted.startswith("cuda") and self.distributed:
            return f"cuda:{self.local_rank}"
        return wanted


def launched_by_torchrun(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return all(name in env for name in TORCHRUN_VARIABLES)


def group_is_joined() -> bool:
    """Whether this process is in a process group (torchrun, or a caller's own `init_process_group`)."""
    return dist.is_available() and dist.is_initialized()


def current_world() -> World:
    """The world of the process group already joined, or the single process."""
    if not group_is_joined():
        return World()
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def init_world(device: str | None, timeout_s: float) -> tuple[World, bool]:
    """(world, whether this call created the process group). Joins the torchrun group when the launch set its
    variables and no group exists yet; a plain process gets `World()` and no group."""
    if group_is_joined():
        return current_world(), False
    if not launched_by_torchrun():
        return World(), False
    if timeout_s <= 0:
        raise ConfigError(f"--dist-timeout must be positive, got {timeout_s}")
    if not torch.distributed.is_available():
        raise ConfigError("launched by torchrun, but this torch build has no torch.distributed")
    wanted = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if wanted.startswith("cuda") else "gloo"
    local_rank = int(os.environ["LOCAL_RANK"])
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    world = current_world()
    quiet_other_ranks(world)
    return world, True


def quiet_other_ranks(world: World) -> None:
    """Only rank 0 logs, warns and draws library progress bars: N copies of a message say no more than one.
    Errors still reach every rank's stderr."""
    if world.is_main:
        return
    logging.getLogger("ckaqad").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def shutdown(created: bool) -> None:
    """Leave the process group if this process created it (a caller that made its own keeps it)."""
    if created and group_is_joined():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- collectives


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place, not differentiable: the sum or max of `tensor` over ranks (identity without a group)."""
    if group_is_joined():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor


def barrier() -> None:
    if group_is_joined():
        dist.barrier()


def broadcast_text(text: str | None) -> str:
    """Rank 0's string on every rank (a temp directory name that every rank must write into)."""
    if not group_is_joined():
        return text or ""
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def max_reduce_buffers_(model: torch.nn.Module, names: tuple[str, ...] = ("input_amax", "weight_amax")) -> int:
    """Max-reduce the named buffers of every submodule over ranks, in place: calibration amaxes observed on
    each rank's share of the calibration batches become the amax of all of them (max is exact, so this equals
    calibrating every batch in one process). A buffer matches by its last name or a `_<name>` suffix (fused
    experts' `gate_up_proj_input_amax`, per-expert `down_proj_weight_amax` [E]). Returns how many buffers
    were reduced."""
    buffers = [b for n, b in model.named_buffers()
               if any(n.rsplit(".", 1)[-1] == name or n.endswith(f"_{name}") for name in names)]
    if not buffers or not group_is_joined():
        return len(buffers)
    flat = torch.cat([b.detach().float().reshape(-1) for b in buffers])
    all_reduce_(flat, "max")
    for buffer, value in zip(buffers, flat.split([b.numel() for b in buffers]), strict=True):
        buffer.copy_(value.reshape(buffer.shape))
    return len(buffers)


# ----------------------------------------------------------------------------------------- lost peers


def is_collective_failure(exc: BaseException) -> bool:
    """A collective that failed because a peer died, closed its connection or did not answer in time."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out",
                            "Broken pipe", "NCCL communicator was aborted", "ProcessGroupGloo", "gloo"))


def lost_peer_error(world: World, exc: BaseException) -> LostPeerError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return LostPeerError(f"rank {world.rank} of {world.size}: lost contact with the other processes "
                         f"({first_line[:160]}); resume from the newest complete checkpoint with --resume")


@contextlib.contextmanager
def peer_failures_as_errors(world: World) -> Iterator[None]:
    """Inside, a collective that fails on a lost peer raises `LostPeerError` (one line, exit 2)."""
    try:
        yield
    except Exception as exc:
        if world.distributed and is_collective_failure(exc):
            raise lost_peer_error(world, exc) from exc
        raise


@contextlib.contextmanager
def joined_world(device: str | None, timeout_s: float) -> Iterator[World]:
    """`init_world` for the duration of a command: a lost peer inside raises `LostPeerError`, and the group
    this call created is left on the way out, except after a lost peer: `destroy_process_group` would wait on
    the peer's unfinished collective, so that process ends through `exit_without_teardown` instead."""
    world, created = init_world(device, timeout_s)
    try:
        with peer_failures_as_errors(world):
            yield world
    except LostPeerError:
        raise
    except BaseException:
        shutdown(created)
        raise
    shutdown(created)


def exit_without_teardown(code: int) -> NoReturn:
    """End the process now with `code`, after flushing stdout and stderr, skipping interpreter teardown.

    After a peer stops answering, a gloo (or NCCL) thread of this process can still be blocked on it; a normal
    exit then destroys that joinable thread and the process dies of SIGABRT ("terminate called without an
    active exception", exit -6) instead of returning `code`. Files are already closed by then: the error
    unwound through every `with` block that held one."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
