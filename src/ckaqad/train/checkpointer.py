"""Checkpoint manager: owns the save policy, `step-N` directories, resume discovery and the completion marker.

A checkpoint `run/checkpoints/step-000050/` holds
    student/                 the student directory (students/store.py), loadable on its own
    optimizer.safetensors    optimizer tensors (`state.<param index>.<name>`)
    rng.safetensors          torch CPU (and CUDA) RNG states
    state.json               step, scheduler state, optimizer param groups and scalar state, data position
    COMPLETE                 written last
It is built in a temp dir and renamed, so a kill mid-write leaves the previous checkpoint the newest complete
one. No pickle anywhere: tensors go to safetensors, everything else to JSON.

Under torchrun (a process group) every rank writes its shards with torch.distributed.checkpoint instead
(`paths.ShardedCheckpointDir`: `dcp/` with the student's and AdamW's DTensor shards under their parameter
names, from `get_state_dict`), into one temp dir that rank 0 names; after a barrier rank 0 writes state.json,
the RNG and the student's architecture, then COMPLETE, then renames. Either kind resumes at any number of
processes: DCP reshards a sharded checkpoint onto the new layout (a plain process included, without a process
group), and a one-process checkpoint loads as a full state dict that `set_state_dict` scatters to the shards.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ckaqad.errors import CheckpointError, ConfigError, DiskFullError
from ckaqad.files import atomic_directory, is_out_of_space, ordinary_permissions
from ckaqad.parallel.dist import World, barrier, broadcast_text
from ckaqad.paths import CheckpointDir, RunDir, ShardedCheckpointDir
from ckaqad.students.store import check_weights_fit, read_student_weights, save_architecture, save_student_dir


@dataclass
class CheckpointConfig:
    save_every: int = 50
    """save a checkpoint every N optimizer steps (and always at the last step)"""
    keep_last: int = 2
    """number of most recent checkpoints kept"""
    shard_size_mb: int = 2048
    """largest safetensors file of a student directory (final student, one-process checkpoints) in MiB"""

    def __post_init__(self) -> None:
        if self.save_every < 1 or self.keep_last < 1:
            raise ConfigError("--save-every and --keep-last must be at least 1")
        if self.shard_size_mb < 1:
            raise ConfigError(f"--shard-size-mb must be at least 1, got {self.shard_size_mb}")

    @property
    def shard_size_bytes(self) -> int:
        return self.shard_size_mb * 2**20


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able rest."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda{i}"] = s
    return states


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    cuda = [states[k] for k in sorted(states) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


class CheckpointManager:
    """`save(step, ...)` when the policy says so, `load()` the newest complete checkpoint."""

    def __init__(self, run_dir: Path, config: CheckpointConfig, world: World | None = None) -> None:
        self.run = RunDir(Path(run_dir))
        self.root = self.run.checkpoints
        self.config = config
        self.world = world or World()

    def should_save(self, step: int, last_step: int) -> bool:
        return step % self.config.save_every == 0 or step == last_step

    def save(self, step: int, student, optimizer, scheduler, extra: dict | None = None) -> Path:
        if self.world.distributed:
            return self._save_sharded(step, student, optimizer, scheduler, extra)
        target = self.run.checkpoint(step)
        with atomic_directory(target.root) as tmp:
            written = CheckpointDir(tmp)
            save_student_dir(student, written.student.root, extra={"step": step},
                             shard_size_bytes=self.config.shard_size_bytes)
            tensors, opt_meta = optimizer_to_files(optimizer)
            save_file(tensors, str(written.optimizer))
            save_file(rng_state(), str(written.rng))
            state = {"step": step, "scheduler": scheduler.state_dict(), "optimizer": opt_meta, **(extra or {})}
            written.state.write_text(json.dumps(state, indent=1, default=_json_default))
            written.marker.write_text(str(step))
        self._prune()
        return target.root

    def _save_sharded(self, step: int, student, optimizer, scheduler, extra: dict | None) -> Path:
        """Every rank writes its shards into rank 0's temp dir; rank 0 finishes it after a barrier."""
        target = self.run.checkpoint(step).root
        tmp = None
        if self.world.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=self.root)
        written = ShardedCheckpointDir(Path(broadcast_text(tmp)))
        try:
            model_state, optimizer_state = get_state_dict(student, optimizer)
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(written.dcp))
            barrier()  # every rank's shards are on disk
            if self.world.is_main:
                save_architecture(student, written.architecture.root, extra={"step": step})
                save_file(rng_state(), str(written.rng))
                state = {"step": step, "scheduler": scheduler.state_dict(), "world_size": self.world.size,
                         "format": "torch.distributed.checkpoint", **(extra or {})}
                written.state.write_text(json.dumps(state, indent=1, default=_json_default))
                written.marker.write_text(str(step))
                ordinary_permissions(written.root)
                if target.exists():
                    old = target.with_name(f".{target.name}.old-{os.getpid()}")
                    os.replace(target, old)
                    os.replace(written.root, target)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(written.root, target)
                self._prune()
        except BaseException as exc:
            if self.world.is_main:
                shutil.rmtree(written.root, ignore_errors=True)
            if is_out_of_space(exc):
                raise DiskFullError(f"no space left on the device while writing {target}") from exc
            raise
        barrier()  # nobody moves on (or prunes) before the checkpoint is complete
        return target

    def _prune(self) -> None:
        for old in self.run.complete_checkpoints()[: -self.config.keep_last]:
            shutil.rmtree(old.root, ignore_errors=True)
        # Our own temp dir was renamed already, so any left are from a writer that was killed.
        for stale in self.run.stale_temp_dirs():
            shutil.rmtree(stale, ignore_errors=True)

    def latest(self) -> Path | None:
        latest = self.run.latest_checkpoint()
        return latest.root if latest is not None else None

    def load(self, student, optimizer, scheduler) -> dict:
        """Restore student weights, optimizer, scheduler and RNG from the newest checkpoint; return state.json."""
        latest = self.run.latest_checkpoint()
        if latest is None:
            raise CheckpointError(f"no complete checkpoint under {self.root}")
        if ShardedCheckpointDir(latest.root).is_sharded():
            return self._load_sharded(ShardedCheckpointDir(latest.root), student, optimizer, scheduler)
        if self.world.distributed:
            return self._load_full_into_shards(latest, student, optimizer, scheduler)
        device = next(student.parameters()).device
        # Read and check everything before touching the student, optimizer or RNG: a damaged or foreign
        # checkpoint raises CheckpointError and leaves them as they were.
        try:
            weights = read_student_weights(latest.student, device)
            state = json.loads(latest.state.read_text())
            tensors = load_file(str(latest.optimizer), device=str(device))
            rng = load_file(str(latest.rng))
            optimizer_state = optimizer_from_files(tensors, state["optimizer"])
            scheduler_state = state["scheduler"]
        except (OSError, ValueError, KeyError, SafetensorError) as exc:  # JSONDecodeError is a ValueError
            raise CheckpointError(f"{latest.root} is damaged and cannot be read ({type(exc).__name__}: {exc}); "
                                  "delete it to resume from the previous checkpoint") from exc
        check_weights_fit(student, weights, latest.root)
        try:
            optimizer.load_state_dict(optimizer_state)
            scheduler.load_state_dict(scheduler_state)
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{latest.root}: the optimizer state does not fit the student ({exc})") from exc
        student.load_state_dict(weights, strict=False)
        set_rng_state(rng)
        return state


    def _load_sharded(self, latest: ShardedCheckpointDir, student, optimizer, scheduler) -> dict:
        """A DCP checkpoint, resharded onto this run's layout (N processes, or one plain process)."""
        try:
            state = json.loads(latest.state.read_text())
            rng = load_file(str(latest.rng))
            scheduler_state = state["scheduler"]
            model_state, optimizer_state = get_state_dict(student, optimizer)
            loaded = {"model": model_state, "optimizer": optimizer_state}
            with warnings.catch_warnings():  # a plain process loading shards is the intent, not an accident
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(loaded, checkpoint_id=str(latest.dcp))
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError, dcp.CheckpointException) as exc:
            raise CheckpointError(f"{latest.root} cannot be resumed ({type(exc).__name__}: "
                                  f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); delete it "
                                  "to resume from the previous checkpoint") from exc
        set_state_dict(student, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
        scheduler.load_state_dict(scheduler_state)
        set_rng_state(rng)
        return state

    def _load_full_into_shards(self, latest: CheckpointDir, student, optimizer, scheduler) -> dict:
        """A one-process checkpoint resumed under torchrun: every rank reads the full tensors and
        `set_state_dict` keeps its shards of them."""
        try:
            weights = read_student_weights(latest.student)
            state = json.loads(latest.state.read_text())
            tensors = load_file(str(latest.optimizer))
            rng = load_file(str(latest.rng))
            by_index = optimizer_from_files(tensors, state["optimizer"])
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            raise CheckpointError(f"{latest.root} is damaged and cannot be read ({type(exc).__name__}: {exc}); "
                                  "delete it to resume from the previous checkpoint") from exc
        check_weights_fit(student, weights, latest.root)
        names = parameter_names(student, optimizer)
        by_name = {"state": {names[int(i)]: entries for i, entries in by_index["state"].items()},
                   "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                                    for g in by_index["param_groups"]]}
        set_state_dict(student, optimizer, model_state_dict=weights, optim_state_dict=by_name,
                       options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(rng)
        return state


def parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The state-dict name of each optimizer parameter, in the optimizer's index order (a one-process
    checkpoint numbers them; an activation-checkpoint wrapper is not part of a name)."""
    by_id = {id(p): n.replace(_CHECKPOINT_PREFIX, "") for n, p in model.named_parameters()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _json_default(value):
    if torch.is_tensor(value):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
