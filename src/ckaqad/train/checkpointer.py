"""Checkpoint manager: owns the save policy, `step-N` directories, resume discovery and the completion marker.

A checkpoint `run/checkpoints/step-000050/` holds
    student/                 the student directory (students/store.py), loadable on its own
    optimizer.safetensors    optimizer tensors (`state.<param index>.<name>`)
    rng.safetensors          torch CPU (and CUDA) RNG states
    state.json               step, scheduler state, optimizer param groups and scalar state, data position
    COMPLETE                 written last
It is built in a temp dir and renamed, so a kill mid-write leaves the previous checkpoint the newest complete
one. No pickle anywhere: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ckaqad.errors import CheckpointError, ConfigError
from ckaqad.files import atomic_directory
from ckaqad.paths import CheckpointDir, RunDir
from ckaqad.students.store import check_weights_fit, save_student_dir


@dataclass
class CheckpointConfig:
    save_every: int = 50
    """save a checkpoint every N optimizer steps (and always at the last step)"""
    keep_last: int = 2
    """number of most recent checkpoints kept"""

    def __post_init__(self) -> None:
        if self.save_every < 1 or self.keep_last < 1:
            raise ConfigError("--save-every and --keep-last must be at least 1")


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

    def __init__(self, run_dir: Path, config: CheckpointConfig) -> None:
        self.run = RunDir(Path(run_dir))
        self.root = self.run.checkpoints
        self.config = config

    def should_save(self, step: int, last_step: int) -> bool:
        return step % self.config.save_every == 0 or step == last_step

    def save(self, step: int, student, optimizer, scheduler, extra: dict | None = None) -> Path:
        target = self.run.checkpoint(step)
        with atomic_directory(target.root) as tmp:
            written = CheckpointDir(tmp)
            save_student_dir(student, written.student.root, extra={"step": step})
            tensors, opt_meta = optimizer_to_files(optimizer)
            save_file(tensors, str(written.optimizer))
            save_file(rng_state(), str(written.rng))
            state = {"step": step, "scheduler": scheduler.state_dict(), "optimizer": opt_meta, **(extra or {})}
            written.state.write_text(json.dumps(state, indent=1, default=_json_default))
            written.marker.write_text(str(step))
        self._prune()
        return target.root

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
        device = next(student.parameters()).device
        # Read and check everything before touching the student, optimizer or RNG: a damaged or foreign
        # checkpoint raises CheckpointError and leaves them as they were.
        try:
            weights = load_file(str(latest.student.weights), device=str(device))
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


def _json_default(value):
    if torch.is_tensor(value):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
