"""How far ckaqad's forward of an NVFP4 export is from what the compressed-tensors runtime serves.

For the embedded model (SmolLM2-135M, fp32 on CPU) and each row: PTQ students (`build_ptq_student`, default
QuantConfig, calibrated on the built-in corpus at seq_len 256) in W4A4 and W4A16, a W4A4 one with power-of-two
global scales (`--global-scale pow2`), and a W4A4 CKA-QAD run of 4 steps (batch 4, seq_len 128, lr 5e-5); each
exported in the compressed-tensors layout to `<exports>/<row>`, and one fixed English + Python text (~200 tokens,
`ckaqad.export.verify.AGREEMENT_TEXT`, not from the project's corpus) run through

* `ref`: ckaqad `load_export(dir)` (reference arithmetic, float32),
* `rt`: ckaqad `load_export(dir, arithmetic="runtime")` in bf16 (`to_served_dtype`),
* `served`: transformers `AutoModelForCausalLM.from_pretrained(dir, dtype=bfloat16)` (compressed-tensors).

Reported, in nats per token (mean over the text's positions, and the max): KL(teacher ‖ X) for X in ref, rt,
served, and KL(ckaqad ‖ served) for both ckaqad modes; plus the max |logit| difference to `served` and
whether the logits are bit-identical. Every KL is computed in float64 from the logits.

    OMP_NUM_THREADS=2 python benchmarks/runtime_agreement.py [--exports /tmp/rt] [--out runtime_agreement.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers

from ckaqad.commands import distill
from ckaqad.data.blocks import DataConfig, load_blocks
from ckaqad.export.reader import load_export, to_served_dtype
from ckaqad.export.verify import AGREEMENT_TEXT as TEXT
from ckaqad.export.verify import kl_per_token
from ckaqad.export.writer import export_student
from ckaqad.models.load import load_model
from ckaqad.objectives.compose import ObjectiveConfig
from ckaqad.quant.apply import freeze_scales
from ckaqad.quant.linear import QuantConfig
from ckaqad.students.spec import build_ptq_student
from ckaqad.train import trainer
from ckaqad.train.trainer import TrainConfig


@torch.no_grad()
def run_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


# row -> (scheme, global scale, CKA-QAD steps): PTQ students, a pow2 one, and a short CKA-QAD run.
ROWS = {"w4a4": ("w4a4", "exact", 0), "w4a16": ("w4a16", "exact", 0), "w4a4-pow2": ("w4a4", "pow2", 0),
        "w4a4-cka-qad-4": ("w4a4", "exact", 4)}


def make_student(row: str, loaded, blocks, work: Path):
    scheme, global_scale, steps = ROWS[row]
    quant = QuantConfig(scheme=scheme, global_scale=global_scale)
    if not steps:
        return build_ptq_student(loaded.model, quant, blocks)[0]
    config = distill.Config(out=str(work / f"run-{row}"), device="cpu", quant=quant,
                            objective=ObjectiveConfig(loss="kl+cka"),
                            train=TrainConfig(steps=steps, lr=5e-5, batch_size=4, cka_tokens=256, eval_every=10_000,
                                              eval_blocks=8, progress=False),
                            data=DataConfig(seq_len=128))
    trainee, _ = distill.build_trainee(config, loaded)
    trainer.train(trainee)
    student = trainee.student.requires_grad_(False)
    freeze_scales(student)
    return student


def measure(row: str, loaded, blocks, exports: Path, ids: torch.Tensor, teacher_logits: torch.Tensor) -> dict:
    tokenizer = loaded.tokenizer
    student = make_student(row, loaded, blocks, exports)
    out = exports / row
    export_student(student, tokenizer, out, overwrite=True, teacher_dir=loaded.model_dir)
    del student
    ref, _ = load_export(out)
    logits = {"ref": run_logits(ref, ids)}
    del ref
    rt, _ = load_export(out, arithmetic="runtime")
    logits["rt"] = run_logits(to_served_dtype(rt), ids)
    del rt
    served = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16).eval()
    logits["served"] = run_logits(served, ids)
    del served

    def stats(kl: torch.Tensor) -> dict:
        return {"mean": kl.mean().item(), "max": kl.max().item()}

    row = {f"KL(teacher||{k})": stats(kl_per_token(teacher_logits, v)) for k, v in logits.items()}
    for k in ("ref", "rt"):
        row[f"KL({k}||served)"] = stats(kl_per_token(logits[k], logits["served"]))
        row[f"max|logit {k}-served|"] = (logits[k].float() - logits["served"].float()).abs().max().item()
        row[f"{k} bit-identical to served"] = bool(
            logits[k].dtype == logits["served"].dtype and torch.equal(logits[k], logits["served"]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--exports", type=Path, default=Path("/tmp/rt"))
    parser.add_argument("--out", type=Path, default=Path("runtime_agreement.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model("default", device="cpu")
    teacher, tokenizer = loaded.model, loaded.tokenizer
    blocks = load_blocks(DataConfig(seq_len=256), teacher, tokenizer)
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    teacher_logits = run_logits(teacher, ids)
    results = {"model": loaded.source, "tokens": ids.shape[1], "torch": torch.__version__,
               "transformers": transformers.__version__, "schemes": {}}
    for row in ROWS:
        results["schemes"][row] = measure(row, loaded, blocks, args.exports, ids, teacher_logits)
    args.out.write_text(json.dumps(results, indent=2))

    print(f"{results['model']}, {results['tokens']} tokens; KL in nats/token, mean (max)")
    rows = results["schemes"]
    keys = [k for k in rows["w4a4"] if k.startswith("KL")]
    print(f"{'quantity':<24}" + "".join(f"{s:>30}" for s in rows))
    for k in keys:
        print(f"{k:<24}" + "".join(f"{rows[s][k]['mean']:>18.3e} ({rows[s][k]['max']:.2e})" for s in rows))
    for k in [k for k in rows["w4a4"] if not k.startswith("KL")]:
        print(f"{k:<24}" + "".join(f"{rows[s][k]!s:>30}" for s in rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
