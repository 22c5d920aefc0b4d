"""The fused Triton NVFP4 kernel is bit-exact with the reference.

On CPU the kernel runs under the Triton interpreter (TRITON_INTERPRET=1 must be set before the kernel is
defined, so the comparison runs in a fresh subprocess); on a GPU the same comparison runs natively.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton kernel needs the triton package (dev extra on Linux)")

COMPARE = r"""
import json, sys, torch
sys.path.insert(0, {tests!r})
from strategies import nvfp4_special_cases
from ckaqad.formats import nvfp4, nvfp4_triton
device = {device!r}
INT = {{torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}}
results = []
cases = [(name, x, amax) for name, x, amax in nvfp4_special_cases()]
gen = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    x = torch.randn(48, 128, generator=gen) * torch.logspace(-4, 4, 48)[:, None]
    cases.append((f"random {{dtype}}", x.to(dtype), None))
    cases.append((f"random {{dtype}} calibrated amax", x.to(dtype), float(x.abs().amax()) / 3))
cases.append(("3-D", torch.randn(2, 3, 64, generator=gen), None))
for name, x, amax in cases:
    x = x.to(device)
    ref = nvfp4.fake_quantize_reference(x, amax)
    out = nvfp4_triton.fake_quantize(x, amax)
    bits = INT[x.dtype]
    shaped = out.dtype == ref.dtype and out.shape == ref.shape
    same = shaped and torch.equal(out.view(bits), ref.view(bits))
    results.append([name, bool(same), int((out.view(bits) != ref.view(bits)).sum()) if shaped else -1])
print(json.dumps(results))
"""


def run_comparison(device: str) -> list:
    tests_dir = str(Path(__file__).resolve().parents[1])
    code = COMPARE.format(tests=tests_dir, device=device)
    env = dict(os.environ)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_is_bit_exact_with_the_reference(device):
    results = run_comparison(device)
    assert len(results) > 30
    mismatched = [(name, count) for name, same, count in results if not same]
    assert mismatched == []


def test_kernel_takes_its_rounding_from_e2m1():
    """The E2M1 boundaries and values reach the kernel as arguments generated from `e2m1`, not re-typed."""
    import importlib.util

    from ckaqad.formats import nvfp4_triton
    from ckaqad.formats.e2m1 import E2M1_BOUNDARIES, E2M1_VALUES

    source = Path(importlib.util.find_spec("ckaqad.formats.nvfp4_triton").origin).read_text()
    kernel = source[source.index("def _nvfp4_fake_quant_kernel"):source.index("def fake_quantize")]
    for boundary, _ in E2M1_BOUNDARIES:
        assert str(boundary) not in kernel
    assert "6.0" not in kernel and "448" not in kernel
    assert nvfp4_triton._GRID_ARGS["B6"] == E2M1_BOUNDARIES[6][0] and nvfp4_triton._GRID_ARGS["V7"] == E2M1_VALUES[7]


def test_comparison_detects_a_wrong_kernel(tmp_path):
    """The harness can fail: a kernel that skips the FP8 rounding of the block scale is caught."""
    import importlib.util

    source = Path(importlib.util.find_spec("ckaqad.formats.nvfp4_triton").origin).read_text()
    broken = source.replace("s8 = _e4m3_round(tl.minimum(ratio, FP8_MAX))", "s8 = tl.minimum(ratio, FP8_MAX)")
    assert broken != source
    package = tmp_path / "broken"
    package.mkdir()
    (package / "nvfp4_triton.py").write_text(broken)
    code = (f"import sys, torch; sys.path.insert(0, {str(package)!r}); import nvfp4_triton; "
            "from ckaqad.formats import nvfp4; x = torch.randn(4, 64); "
            "print(torch.equal(nvfp4_triton.fake_quantize(x), nvfp4.fake_quantize_reference(x)))")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"
