"""What a run logs: `metrics.jsonl` (one line per step and per evaluation) and TensorBoard scalars."""

from __future__ import annotations

import json
from pathlib import Path

from ckaqad.paths import RunDir


class MetricsLog:
    """Appends records to `metrics.jsonl` and TensorBoard; on resume drops what a killed run logged after its
    last checkpoint, so the file reads as one uninterrupted run."""

    def __init__(self, run: RunDir, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.path = run.metrics
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.writer = SummaryWriter(str(run.tensorboard), purge_step=start_step + 1 if start_step else None)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        prefix = record.get("kind", "train")
        for key, value in record.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and key != "step":
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        for layer, value in (record.get("cka_layers") or {}).items():
            self.writer.add_scalar(f"{prefix}_cka_layer/{int(layer):02d}", value, step)

    def close(self) -> None:
        self.writer.close()


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a run's metrics.jsonl."""
    path = RunDir(Path(run_dir)).metrics
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in lines if r.get("kind") == "train"], [r for r in lines if r.get("kind") == "eval"]
