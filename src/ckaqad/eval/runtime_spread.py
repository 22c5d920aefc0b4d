"""The runtime spread of one NVFP4 export: the same checkpoint under the perturbations a deployment really
has, scored on the same held-out blocks against the teacher. It is the noise floor of W4A4 claims: a recovery
smaller than the spread is not a property of the model but of the runtime that happens to serve it.

Deployment variants (each a faithful execution of the export, none better than another):
- `served`: transformers + compressed-tensors, `from_pretrained(dtype=bfloat16)`, batches of `batch_size`;
- `served-batch1`: the same model, one sequence at a time (other GEMM shapes, other accumulation order);
- `runtime-fp32`: compressed-tensors' arithmetic (`--arithmetic runtime`) on float32 activations, as an
  fp32 runtime would compute it (transformers itself cannot run these exports in fp32);
- `vllm-emulation`: the other reciprocal convention, vLLM's NVFP4 emulation of the checkpoint, in bf16.
`emulated` (ckaqad's reference arithmetic in float32, what training measured) is reported beside them, with
its KL to `served`, but it is not a deployment and is not part of the spread.

Per variant: KL(teacher ‖ variant) and KL(served ‖ variant) in nats/token (float64 from the logits, every
position), next-token perplexity and top-1 agreement with the teacher. The spread of a metric is max − min
over the deployment variants. The blocks are a seeded sample of the held-out split: the same seed gives the
same numbers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ckaqad.errors import ConfigError
from ckaqad.export.reader import load_export, load_served, to_served_dtype
from ckaqad.export.verify import kl_per_token

DEPLOYMENTS = ("served", "served-batch1", "runtime-fp32", "vllm-emulation")
VARIANTS = (*DEPLOYMENTS, "emulated")
METRICS = ("kl_teacher", "kl_served", "perplexity", "top1_agreement")


@dataclass
class _Variant:
    model: nn.Module
    one_at_a_time: bool = False


def _load_variants(export_dir: str | os.PathLike, device: torch.device) -> dict[str, _Variant]:
    served, _ = load_served(export_dir, device)
    runtime, _ = load_export(export_dir, device=device, arithmetic="runtime")
    vllm, _ = load_export(export_dir, device=device, arithmetic="vllm-emulation")
    emulated, _ = load_export(export_dir, device=device)
    return {"served": _Variant(served), "served-batch1": _Variant(served, one_at_a_time=True),
            "runtime-fp32": _Variant(runtime), "vllm-emulation": _Variant(to_served_dtype(vllm)),
            "emulated": _Variant(emulated)}


def sample_blocks(heldout: torch.Tensor, n_blocks: int, seed: int) -> torch.Tensor:
    """`n_blocks` held-out blocks drawn without replacement by `seed`, in held-out order."""
    if n_blocks < 1:
        raise ConfigError(f"the runtime spread needs at least one block, got {n_blocks}")
    n = min(n_blocks, heldout.shape[0])
    index = torch.randperm(heldout.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return heldout[index.sort().values]


class _Totals:
    def __init__(self) -> None:
        self.kl_teacher = self.kl_served = self.nll = 0.0
        self.agree = self.tokens = self.predicted = 0

    def add(self, logits: torch.Tensor, teacher: torch.Tensor, served: torch.Tensor, ids: torch.Tensor) -> None:
        self.kl_teacher += float(kl_per_token(teacher, logits).sum())
        self.kl_served += float(kl_per_token(served, logits).sum())
        self.tokens += logits.shape[0] * logits.shape[1]
        logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
        self.nll -= float(logp.gather(-1, ids[:, 1:, None]).sum())
        self.predicted += ids[:, 1:].numel()
        self.agree += int((logits.argmax(-1) == teacher.argmax(-1)).sum())

    def result(self) -> dict[str, float]:
        return {"kl_teacher": self.kl_teacher / self.tokens, "kl_served": self.kl_served / self.tokens,
                "perplexity": math.exp(self.nll / self.predicted), "top1_agreement": self.agree / self.tokens}


@torch.no_grad()
def runtime_spread(export_dir: str | os.PathLike, teacher: nn.Module, heldout: torch.Tensor, n_blocks: int = 16,
                   batch_size: int = 4, seed: int = 0,
                   progress: Callable[[int, int], None] | None = None) -> dict:
    """Score the export under every variant on `n_blocks` seeded held-out blocks (token ids `[N, L]`).

    Returns {"variants": {name: {metric: value}}, "spread": {metric: {min, max, range}} over DEPLOYMENTS,
    "blocks", "tokens", "seed", "batch_size"}.
    """
    device = next(teacher.parameters()).device
    variants = _load_variants(export_dir, device)
    blocks = sample_blocks(heldout, n_blocks, seed)
    totals = {name: _Totals() for name in variants}
    batches = list(torch.split(blocks, batch_size))
    for i, ids in enumerate(batches):
        ids = ids.to(device)
        teacher_logits = teacher(input_ids=ids).logits.float()
        served_logits = variants["served"].model(input_ids=ids).logits.float()
        for name, variant in variants.items():
            if name == "served":
                logits = served_logits
            elif variant.one_at_a_time:
                logits = torch.cat([variant.model(input_ids=row[None]).logits.float() for row in ids])
            else:
                logits = variant.model(input_ids=ids).logits.float()
            totals[name].add(logits, teacher_logits, served_logits, ids)
        if progress is not None:
            progress(i + 1, len(batches))
    results = {name: t.result() for name, t in totals.items()}
    spread = {}
    for metric in METRICS:
        values = [results[name][metric] for name in DEPLOYMENTS]
        spread[metric] = {"min": min(values), "max": max(values), "range": max(values) - min(values)}
    return {"variants": results, "spread": spread, "blocks": int(blocks.shape[0]),
            "tokens": int(blocks.numel()), "seed": seed, "batch_size": batch_size}
