"""Checking an export against the student it was written from, the way serving stacks read it
(`verify_export`), and how far the student's forward is from what transformers serves for it
(`runtime_agreement`, on the fixed text `AGREEMENT_TEXT`; also used by benchmarks/runtime_agreement.py)."""

from __future__ import annotations

import os

import torch
from torch import nn

from ckaqad.errors import ExportError
from ckaqad.export.compress import CheckpointNames, check_nvfp4_student, checkpoint_names
from ckaqad.export.reader import inspect_export, load_export, load_served, read_tensors
from ckaqad.formats import nvfp4
from ckaqad.formats.e2m1 import e2m1_grid
from ckaqad.quant.apply import cached_quantized_weights, quant_experts, quant_linears

# A fixed English + Python text (~200 tokens for a BPE tokenizer; written for this, not from the project's
# corpus) that `runtime_agreement` runs through the student and the served model.
AGREEMENT_TEXT = '''\
The lighthouse keeper wrote in his log every evening, whether or not anything had happened. On calm nights
the entries were short: wind from the west, sea slight, lamp lit at dusk. When a storm came through, he wrote
longer, describing the colour of the sky and the sound the waves made against the rocks below the tower.

def moving_average(values, window):
    """Return the running mean of `values` over `window` items."""
    if window <= 0:
        raise ValueError("window must be positive")
    total = 0.0
    out = []
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out

print(moving_average([3, 1, 4, 1, 5, 9, 2, 6], 3))
'''


def kl_per_token(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) at every position, float64, nats."""
    logp = torch.log_softmax(p_logits.double(), dim=-1)
    logq = torch.log_softmax(q_logits.double(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).flatten()


@torch.no_grad()
def runtime_agreement(export_dir: str | os.PathLike, student: nn.Module) -> dict:
    """KL(student ‖ transformers runtime) per token on `AGREEMENT_TEXT`, tokenized by the export's tokenizer
    (at most the model's `max_position_embeddings` tokens): the student as given (as trained: its own
    arithmetic and dtype) against `load_served(export_dir)` (bf16, compressed-tensors), both on the student's
    device without autocast. Returns the mean and max KL (nats/token) and the token count."""
    device = next(student.parameters()).device
    served, tokenizer = load_served(export_dir, device)
    ids = tokenizer(AGREEMENT_TEXT, return_tensors="pt")["input_ids"]
    limit = getattr(served.config, "max_position_embeddings", None)
    ids = ids[:, :limit].to(device) if limit else ids.to(device)
    served_logits = served(input_ids=ids).logits
    del served
    was_training = student.training
    student.eval()
    try:
        student_logits = student(input_ids=ids).logits
    finally:
        student.train(was_training)
    kl = kl_per_token(student_logits, served_logits)
    return {"kl_mean": kl.mean().item(), "kl_max": kl.max().item(), "tokens": int(ids.shape[1])}


def _agrees(dense: torch.Tensor, reference: torch.Tensor, exact: bool) -> bool:
    """Equal (`exact`), else every element equal to the reference or its float neighbour in dense's dtype."""
    if exact:
        return torch.equal(dense, reference)
    reference = reference.to(dense.dtype)
    return bool(((dense == reference) | (torch.nextafter(dense, reference) == reference)).all())


def verify_export(export_dir: str | os.PathLike, student: nn.Module) -> dict:
    """Read an export back the way serving stacks do and compare it with the student it was written from.

    For every quantized layer: the codes (through compressed-tensors' own FP4 unpacker) and FP8 block scales
    must equal those of the student's weights, and the weight the layout's serving reader dequantizes
    (compressed-tensors' `NVFP4PackedCompressor`, what transformers and llm-compressor call: within one ulp
    of its dtype; ModelOpt's `code · s8 · g`: exact) must match the student's fake-quantized weight. Then
    `load_export` must give back the student's quantized weights bit for bit. For a compressed-tensors
    export, `runtime_agreement` then measures KL(student ‖ transformers runtime) on a fixed text
    (`runtime_kl`: mean, max, tokens; None for ModelOpt). Returns the counts and worst differences;
    ExportError if any check fails.
    """
    from compressed_tensors.compressors.nvfp4 import unpack_fp4_from_uint8

    info = inspect_export(export_dir)
    tensors = read_tensors(info.weight_files)
    layers = check_nvfp4_student(student)
    layout, names = info.layout, info.layout.names
    qconfig = info.config.get("quantization_config") or {}
    grid = e2m1_grid()
    worst_rel, failures, reader_dtype = 0.0, [], ""
    reloaded, _ = load_export(info.root)
    reloaded_layers = quant_linears(reloaded)
    saved = checkpoint_names(student)  # the export holds the model's save_pretrained names
    with cached_quantized_weights(student, reloaded):
        for name, m in layers.items():
            prefix = saved.module(name)
            local = {k: tensors[f"{prefix}.{k}"] for k in names.of(info.w4a4) if f"{prefix}.{k}" in tensors}
            if any(f"{prefix}.{k}" not in tensors for k in names.of(False)):
                failures.append(f"{prefix}: missing tensors")
                continue
            want = nvfp4.quantize(m.weight.detach().float().cpu(), m.weight_global_amax().cpu())
            values = unpack_fp4_from_uint8(local[names.packed], m.out_features, m.in_features, dtype=torch.float32)
            if not torch.equal(values, grid[want.codes.long()]):
                failures.append(f"{name}: codes differ")
            if not torch.equal(local[names.block_scales].view(torch.uint8), want.block_scales.view(torch.uint8)):
                failures.append(f"{name}: block scales differ")
            student_weight = m.quantized_weight().detach().float().cpu()
            dense = layout.serving_weight(local, qconfig)
            reader_dtype = str(dense.dtype).removeprefix("torch.")
            if not _agrees(dense, student_weight, layout.serving_exact):
                failures.append(f"{name}: {layout.serving_reader} dequantizes "
                                + ("a different weight" if layout.serving_exact else f"beyond one {reader_dtype} ulp"))
            nonzero = student_weight != 0
            rel = (dense.float() - student_weight).abs()[nonzero] / student_weight.abs()[nonzero]
            worst_rel = max(worst_rel, float(rel.max()) if rel.numel() else 0.0)
        exact = sum(name in reloaded_layers and torch.equal(reloaded_layers[name].quantized_weight().cpu(),
                                                            m.quantized_weight().detach().float().cpu())
                    for name, m in layers.items())
        expert_checks = _verify_experts(student, reloaded, tensors, info, saved, failures)
        worst_rel = max(worst_rel, expert_checks["max_relative_weight_difference"])
    if exact != len(layers):
        failures.append(f"load: {len(layers) - exact} layers' quantized weights differ from the student's")
    if failures:
        raise ExportError(f"{info.root} does not match the student: {'; '.join(failures[:3])}")
    runtime_kl = runtime_agreement(info.root, student) if layout.name == "compressed-tensors" else None
    return {"runtime_kl": runtime_kl, "layers": len(layers), "codes_and_block_scales_equal": len(layers),
            "reader": layout.serving_reader,
            "reader_agreement": "exact" if layout.serving_exact else f"within one {reader_dtype} ulp",
            "max_relative_weight_difference": worst_rel, "load_bit_exact_layers": exact,
            "expert_projections": expert_checks["projections"],
            "expert_load_bit_exact_modules": expert_checks["load_bit_exact_modules"]}


def _verify_experts(student: nn.Module, reloaded: nn.Module, tensors: dict[str, torch.Tensor], info,
                    names: CheckpointNames, failures: list[str]) -> dict:
    """`verify_export`'s checks for every expert of every quantized experts module: codes (compressed-tensors'
    unpacker) and FP8 block scales equal the student's, the layout's serving reader (compressed-tensors'
    `NVFP4PackedCompressor`, or ModelOpt's `code · s8 · g`) dequantizes the student's fake-quantized expert,
    and `load_export` gives back every fused expert tensor bit for bit. Appends to `failures`."""
    from compressed_tensors.compressors.nvfp4 import unpack_fp4_from_uint8

    experts = quant_experts(student)
    if not experts:
        return {"projections": 0, "load_bit_exact_modules": 0, "max_relative_weight_difference": 0.0}
    layout, local = info.layout, info.layout.names
    qconfig = info.config.get("quantization_config") or {}
    grid = e2m1_grid()
    reloaded_experts = quant_experts(reloaded)
    checked, exact_modules, worst_rel = 0, 0, 0.0
    for name, m in experts.items():
        prefixes = names.experts[name][1]
        amaxes = {p: a.detach().float().cpu() for p, a in m.weight_global_amaxes().items()}
        quantized = {proj: w for param in m.layout.fused
                     for proj, w in m.layout.split(param, m.quantized_weight(param).detach().float().cpu()).items()}
        for proj, weights in m.canonical_weights().items():
            for e in range(weights.shape[0]):
                prefix = prefixes[(e, proj)]
                stored = {k: tensors.get(f"{prefix}.{k}") for k in local.of(info.w4a4)}
                if any(t is None for t in stored.values()):
                    failures.append(f"{prefix}: missing tensors")
                    continue
                want = nvfp4.quantize(weights[e].float().cpu(), amaxes[proj][e])
                out_features, in_features = weights[e].shape
                values = unpack_fp4_from_uint8(stored[local.packed], out_features, in_features, dtype=torch.float32)
                if not torch.equal(values, grid[want.codes.long()]):
                    failures.append(f"{prefix}: codes differ")
                if not torch.equal(stored[local.block_scales].view(torch.uint8), want.block_scales.view(torch.uint8)):
                    failures.append(f"{prefix}: block scales differ")
                dense = layout.serving_weight(stored, qconfig)
                if not _agrees(dense, quantized[proj][e], layout.serving_exact):
                    failures.append(f"{prefix}: {layout.serving_reader} dequantizes a different weight")
                nonzero = quantized[proj][e] != 0
                rel = (dense.float() - quantized[proj][e]).abs()[nonzero] / quantized[proj][e].abs()[nonzero]
                worst_rel = max(worst_rel, float(rel.max()) if rel.numel() else 0.0)
                checked += 1
        back = reloaded_experts.get(name)
        if back is not None and all(torch.equal(back.quantized_weight(p).cpu(), m.quantized_weight(p).detach().cpu())
                                    for p in m.layout.fused):
            exact_modules += 1
        else:
            failures.append(f"load: {name}'s quantized experts differ from the student's")
    return {"projections": checked, "load_bit_exact_modules": exact_modules,
            "max_relative_weight_difference": worst_rel}
