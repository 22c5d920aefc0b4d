"""What power-of-two NVFP4 global scales cost: PTQ students of the embedded model with `--global-scale exact`
(G = 2688/amax, every peer's choice) and `pow2` (amax rounded up to 2688·2^-k, so G = 2^k), W4A4 and W4A16.

For each: held-out KL, perplexity, top-1 agreement, mean and min CKA on the demo's 24 held-out blocks (seq_len
128, built-in corpus; ckaqad's reference arithmetic, float32), and, through a compressed-tensors export, the
served model's KL to the teacher and KL(ckaqad bf16 ‖ served) on the same blocks (`eval.runtime_spread`'s
`emulated` is the fp32 reference, so the bf16 reference is scored here directly).

    OMP_NUM_THREADS=1 python benchmarks/global_scale_cost.py [--blocks 24] [--out global_scale_cost.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ckaqad.data.blocks import DataConfig, eval_batches, load_blocks
from ckaqad.eval.fidelity import measure_fidelity
from ckaqad.export.reader import load_export, load_served, to_served_dtype
from ckaqad.export.verify import kl_per_token
from ckaqad.export.writer import export_student
from ckaqad.models.load import load_model
from ckaqad.quant.apply import freeze_scales
from ckaqad.quant.linear import QuantConfig
from ckaqad.students.spec import build_ptq_student


@torch.no_grad()
def served_kl(export_dir: Path, teacher, heldout: torch.Tensor, batch_size: int = 4) -> dict:
    """KL(teacher ‖ served) and KL(ckaqad reference in bf16 ‖ served), nats/token over every position."""
    served, _ = load_served(export_dir)
    reference, _ = load_export(export_dir)
    reference = to_served_dtype(reference)
    sums = {"kl_teacher_served": 0.0, "kl_reference_bf16_served": 0.0}
    tokens = 0
    for ids in torch.split(heldout, batch_size):
        s = served(input_ids=ids).logits.float()
        sums["kl_teacher_served"] += float(kl_per_token(teacher(input_ids=ids).logits.float(), s).sum())
        sums["kl_reference_bf16_served"] += float(kl_per_token(reference(input_ids=ids).logits.float(), s).sum())
        tokens += ids.numel()
    return {k: v / tokens for k, v in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path("global_scale_cost.json"))
    args = parser.parse_args()
    teacher = load_model("default", device="cpu")
    blocks = load_blocks(DataConfig(seq_len=128), teacher.model, teacher.tokenizer)
    heldout = blocks.heldout[: args.blocks]
    exclude = tuple(i for i in (teacher.tokenizer.bos_token_id,) if i is not None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in ("w4a4", "w4a16"):
            for global_scale in ("exact", "pow2"):
                start = time.perf_counter()
                # high_precision "train" keeps the teacher's fp32 norms: only the global scales differ.
                student, _ = build_ptq_student(teacher.model, QuantConfig(scheme=scheme, global_scale=global_scale,
                                                                          high_precision="train"), blocks)
                student.requires_grad_(False)
                results, _ = measure_fidelity(teacher.model, {"s": student},
                                              eval_batches(heldout, 4, torch.device("cpu")),
                                              exclude_token_ids=exclude, progress=False)
                r = results["s"]
                freeze_scales(student)
                out = Path(tmp) / f"{scheme}-{global_scale}"
                export_student(student, teacher.tokenizer, out)
                row = {"scheme": scheme, "global_scale": global_scale, "kl_per_token": r.kl_per_token,
                       "perplexity": r.perplexity, "top1_agreement": r.top1_agreement, "mean_cka": r.mean_cka,
                       "min_cka": r.min_cka, **served_kl(out, teacher.model, heldout),
                       "seconds": round(time.perf_counter() - start, 1)}
                rows.append(row)
                print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      flush=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
