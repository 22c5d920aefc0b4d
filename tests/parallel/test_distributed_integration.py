"""The embedded SmolLM2-135M-Instruct: 2 steps of CKA-QAD in one process and under torchrun with 2 processes
give the same logged losses, KL, CKA term, λ and per-layer CKA, the same evaluation and the same student.

Tolerances as in test_distributed.py, except the gradient norm: torch's fp32 `clip_grad_norm_` is itself
~3e-5 away from the float64 norm on this model's 210 gradients of up to 885k elements (the two layouts
round differently; their gradients agree to 3e-7 per tensor), so grad_norm is compared at 1e-4.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.integration

FLAGS = ["--teacher", "default", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--cka-tokens", "16",
         "--eval-every", "0", "--eval-blocks", "2", "--calib-batches", "2", "--calib-batch-size", "1",
         "--save-every", "100", "--device", "cpu", "--no-progress"]


def environment() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def records(run: Path, kind: str) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in lines if r["kind"] == kind]


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Iterator[tuple[Path, Path]]:
    """Both runs (each writes a ~1.5 GB step-2 checkpoint of the 135M student and its AdamW state, removed
    after the module)."""
    root = tmp_path_factory.mktemp("embedded")
    one = subprocess.run([sys.executable, "-m", "ckaqad", "distill", *FLAGS, "--out", str(root / "one")],
                         env=environment(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
                          "-m", "ckaqad", "distill", *FLAGS, "--out", str(root / "two")],
                         env=environment(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    yield root / "one", root / "two"
    shutil.rmtree(root, ignore_errors=True)


def test_two_processes_train_the_embedded_model_as_one_does(pair):
    one, two = pair
    # the embedded teacher (tied head, GGUF cache) is built on meta under torchrun, each rank reading its shards
    assert [json.loads((r / "summary.json").read_text())["build"] for r in (one, two)] == ["whole", "meta"]
    a, b = records(one, "train"), records(two, "train")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "kl", "cka_term", "cka_weight", "lr"):
            assert y[key] == pytest.approx(x[key], rel=2e-6), (x["step"], key)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
        assert len(x["cka_layers"]) == 30
        for layer, value in x["cka_layers"].items():
            assert y["cka_layers"][layer] == pytest.approx(value, rel=2e-6, abs=1e-9)
    (ea,), (eb,) = records(one, "eval"), records(two, "eval")
    for key in ("kl_per_token", "perplexity", "top1_agreement", "mean_cka", "min_cka"):
        assert eb[key] == pytest.approx(ea[key], rel=1e-5), key
    wa = load_file(str(one / "student" / "model.safetensors"))
    wb = load_file(str(two / "student" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa) <= 1e-6
    assert all(torch.equal(wa[k], wb[k]) for k in wa if k.endswith("input_amax"))
