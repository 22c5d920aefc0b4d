"""Checkpoint manager (filled in with the distillation loop)."""

from __future__ import annotations

from pathlib import Path

COMPLETE_MARKER = "COMPLETE"


def latest_checkpoint(root: Path) -> Path | None:
    """The newest `step-N` directory under `root` that has its completion marker."""
    if not root.is_dir():
        return None
    steps = sorted((p for p in root.glob("step-*") if (p / COMPLETE_MARKER).exists()),
                   key=lambda p: int(p.name.split("-")[1]))
    return steps[-1] if steps else None
