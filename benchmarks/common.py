"""Shared timing and reporting for the benchmark scripts."""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def device_header(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeats: int = 10,
            clock: Callable[[], float] | None = None) -> float:
    """Median seconds per call (CUDA events on GPU, `clock` on CPU: wall time, or `time.thread_time`, the
    CPU time of this thread, which a one-thread run on a shared machine is not charged for while preempted;
    default `time.perf_counter`)."""
    clock = clock or time.perf_counter
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = clock()
            fn()
            times.append(clock() - t0)
    return statistics.median(times)


def print_table(title: str, header: dict, columns: list[str], rows: list[list]) -> None:
    print(f"# {title}")
    print("# " + ", ".join(f"{k}={v}" for k, v in header.items()))
    widths = [max(len(str(c)), *(len(_fmt(r[i])) for r in rows)) for i, c in enumerate(columns)]
    print("  ".join(str(c).rjust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(_fmt(v).rjust(w) for v, w in zip(row, widths, strict=True)))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def json_safe(value):
    """`value` with NaN/inf (n/a cells, such as peak memory on CPU) as None, so the file is standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False))
        print(f"wrote {path}")


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int = 1,
                     rounds: int = 5, clock: Callable[[], float] | None = None) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternating rounds (a, b, c, a, b, c, ...) so that a
    load change on a shared machine hits every candidate alike; the ratios between them are the result."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_fn(fn, device, warmup=0, repeats=1, clock=clock))
    return {name: statistics.median(values) for name, values in times.items()}
