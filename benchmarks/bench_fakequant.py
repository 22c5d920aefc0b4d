"""NVFP4 fake-quant throughput: GB/s (read + write) and fraction of the measured copy bandwidth.

Timed: one quantize-dequantize of a 2-D tensor (weights and activations take the same path), median over
repeats, against `x.clone()` on the same tensor as the copy-bandwidth reference. Backends: the torch
reference (`nvfp4.fake_quantize_reference`), the fused Triton kernel (CUDA, or the interpreter is too slow
to time), and NVIDIA ModelOpt's NVFP4 fake quant when `modelopt` is importable. A backend that is not
available on this machine is reported as n/a.

    python benchmarks/bench_fakequant.py [--json out.json]          # GPU: LLM shapes; CPU: small shapes
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_header, print_table, time_fn, write_json  # noqa: E402

from ckaqad.formats import nvfp4  # noqa: E402


@dataclass(frozen=True)
class Shape:
    rows: int
    cols: int
    name: str


GPU_SHAPES = (Shape(8192, 8192, "square 8k"), Shape(4096, 14336, "Llama-8B MLP"), Shape(16384, 2048, "1B act"))
CPU_SHAPES = (Shape(576, 1536, "SmolLM2 up_proj"), Shape(1024, 576, "act 1024 tok"))


def backends(device: torch.device) -> dict[str, Callable | None]:
    out: dict[str, Callable | None] = {"torch reference": nvfp4.fake_quantize_reference}
    triton_fn = None
    if device.type == "cuda":
        try:
            from ckaqad.formats import nvfp4_triton

            triton_fn = nvfp4_triton.fake_quantize
        except ImportError:
            triton_fn = None
    out["triton fused"] = triton_fn
    out["modelopt"] = modelopt_backend(device)
    return out


def modelopt_backend(device: torch.device) -> Callable | None:
    """ModelOpt's NVFP4 fake quant (Triton on GPU) if its wheel is installed; None otherwise."""
    if device.type != "cuda":
        return None
    try:
        from modelopt.torch.quantization.triton import fp4_fake_quant_block  # type: ignore
    except ImportError:
        try:
            from modelopt.torch.quantization.triton.fp4_kernel_hopper import fp4_fake_quant_block  # type: ignore
        except ImportError:
            return None

    def run(x: torch.Tensor) -> torch.Tensor:
        return fp4_fake_quant_block(x, x.abs().amax().float())

    return run


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    header = {**device_header(device), "dtype": args.dtype}
    rows, records = [], []
    for shape in shapes:
        x = torch.randn(shape.rows, shape.cols, device=device, dtype=dtype)
        moved = 2 * x.numel() * x.element_size()
        copy_s = time_fn(lambda x=x: x.clone(), device, repeats=args.repeats)
        copy_gbs = moved / copy_s / 1e9
        for name, fn in backends(device).items():
            if fn is None:
                rows.append([shape.name, f"{shape.rows}x{shape.cols}", name, "n/a", "n/a", "n/a"])
                records.append({**asdict(shape), "backend": name, "available": False})
                continue
            seconds = time_fn(lambda fn=fn, x=x: fn(x), device, repeats=args.repeats)
            gbs = moved / seconds / 1e9
            rows.append([shape.name, f"{shape.rows}x{shape.cols}", name, seconds * 1e3, gbs, gbs / copy_gbs])
            records.append({**asdict(shape), "backend": name, "available": True, "ms": seconds * 1e3, "gb_s": gbs,
                            "copy_gb_s": copy_gbs, "fraction_of_copy": gbs / copy_gbs})
        rows.append([shape.name, f"{shape.rows}x{shape.cols}", "copy (clone)", copy_s * 1e3, copy_gbs, 1.0])
    print_table("NVFP4 fake-quant throughput", header, ["shape", "size", "backend", "ms", "GB/s", "of copy"], rows)
    payload = {"header": header, "results": records}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
