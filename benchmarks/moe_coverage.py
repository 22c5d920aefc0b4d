"""Share of non-embedding parameters a default ckaqad student fake-quantizes, per model family.

Tiny random models from transformers' own config classes (tests/moe_helpers.py: hidden 64, 8 experts top-2,
2-4 blocks), quantized with the default QuantConfig (NVFP4, W4A16: no data needed). Counts: quantized
parameters over all parameters except the input and output embeddings; "outside declared" divides by the
non-embedding parameters no declared rule keeps (routers, norms, biases, conv1d, Mamba A/D/dt, --exclude).
Runs against whichever `ckaqad` is importable, so the same script measures main and a branch:

    PYTHONPATH=/work/main/src:. python benchmarks/moe_coverage.py           # before
    PYTHONPATH=src:. python benchmarks/moe_coverage.py [--json out.json]    # after
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from common import device_header, print_table, write_json  # noqa: E402
from moe_helpers import FAMILIES, make_tiny_moe  # noqa: E402

from ckaqad.quant import apply  # noqa: E402
from ckaqad.quant.linear import QuantConfig, QuantLinear  # noqa: E402


def share(family: str) -> dict:
    model = make_tiny_moe(family)
    report = apply.quantize_model_(model, QuantConfig(scheme="w4a16"))
    embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    total = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
    if hasattr(apply, "quantized_parameters"):
        quantized = apply.quantized_parameters(model)
    else:  # main before issue 19: only Linear layers are quantized
        quantized = [m.weight for m in model.modules() if isinstance(m, QuantLinear)]
    n = sum(p.numel() for p in quantized)
    outside = getattr(report, "share_outside_declared", None)
    return {"family": family, "non_embedding_params": total, "quantized_params": n, "share": n / total,
            "share_outside_declared": outside}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    records = [share(family) for family in FAMILIES]
    header = {**device_header(torch.device("cpu")), "ckaqad": str(Path(apply.__file__).parents[1])}
    rows = [[r["family"], r["non_embedding_params"], r["quantized_params"], f"{r['share']:.1%}",
             "n/a" if r["share_outside_declared"] is None else f"{r['share_outside_declared']:.1%}"] for r in records]
    print_table("Share of non-embedding parameters quantized (NVFP4 W4A16 defaults)", header,
                ["family", "params", "quantized", "share", "outside declared"], rows)
    payload = {"header": header, "results": records}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
