"""Pruning by score: magnitude |W| and Wanda's |W_ij|·‖x_j‖ (Sun et al. 2023), unstructured or N:M.

Every Linear layer inside the decoder blocks is pruned (attention and MLP projections); embeddings, norms,
`lm_head` and MoE routers stay dense, as in SparseGPT and Wanda. Comparison groups: magnitude pruning ranks
each layer's weights together (layer-wise magnitude pruning); Wanda ranks each output row separately (the
paper's choice: it matters for LLMs); N:M keeps the N highest scores of every M consecutive input weights
(2:4 is what sparse tensor cores run). Wanda's activation norms are collected block by block on calibration
data, each block seeing the outputs of the already-pruned blocks before it (the reference implementation).

Masks are computed here in plain torch (a sort or a top-k per group); `torch.ao.pruning`'s
WeightNormSparsifier computes the same magnitude masks (cross-checked in tests/damage/test_pruning.py) but
has no activation-aware score, and llm-compressor's Wanda modifier does not install beside this project's
transformers/compressed-tensors pins (docs/recovery.md#libraries).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ckaqad.damage.blockwise import advance, first_block_inputs
from ckaqad.errors import ConfigError, FormatError
from ckaqad.models.arch import decoder_layers

DENSE_PATTERNS = ("*.router", "*.gate")
SCORES = ("magnitude", "wanda")


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """{module name: Linear} of the Linear layers inside decoder blocks, in model order (routers excluded)."""
    blocks = decoder_layers(model)
    inside = {id(m) for block in blocks for m in block.modules()}
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and id(module) in inside
            and not any(fnmatch.fnmatch(name, p) for p in DENSE_PATTERNS)}


def check_sparsity(sparsity: float) -> float:
    if not 0 < sparsity < 1:
        raise ConfigError(f"--sparsity must be strictly between 0 and 1, got {sparsity}")
    return sparsity


def check_n_m(model: nn.Module, m: int = 4) -> None:
    """FormatError naming the layers whose input dimension is not a multiple of `m` (N:M groups run along it)."""
    bad = [f"{name} ({layer.in_features})" for name, layer in prunable_linears(model).items()
           if layer.in_features % m]
    if bad:
        raise FormatError(f"2:4 pruning needs input dimensions divisible by {m}; not: {', '.join(bad[:4])}"
                          + (f" and {len(bad) - 4} more" if len(bad) > 4 else ""))


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float()


def wanda_score(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖X_j‖₂, with ‖X_j‖₂² = Σ over calibration tokens of the j-th input feature squared."""
    return weight.detach().abs().float() * input_sq_sum.float().sqrt().unsqueeze(0)


def unstructured_mask(score: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Boolean keep-mask removing the `floor(sparsity · group size)` lowest scores of each group: every
    output row (`per_row`) or the whole matrix. Ties break by position (stable sort)."""
    groups = score if per_row else score.reshape(1, -1)
    n_prune = int(sparsity * groups.shape[1])
    keep = torch.ones_like(groups, dtype=torch.bool)
    if n_prune:
        order = torch.sort(groups, dim=1, stable=True).indices[:, :n_prune]
        keep.scatter_(1, order, False)
    return keep.reshape(score.shape)


def n_m_mask(score: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Boolean keep-mask with the `n` highest scores of every `m` consecutive entries of each row."""
    rows, cols = score.shape
    if cols % m:
        raise FormatError(f"N:M pruning needs a dimension divisible by {m}, got {cols}")
    groups = score.reshape(rows, cols // m, m)
    top = torch.topk(groups, n, dim=2).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, top, True)
    return keep.reshape(rows, cols)


def mask_for(score: torch.Tensor, structure: str, sparsity: float, per_row: bool) -> torch.Tensor:
    return n_m_mask(score) if structure == "2:4" else unstructured_mask(score, sparsity, per_row)


@dataclass
class PruneReport:
    """What was pruned: the rule, and the measured fraction of exact zeros per layer and overall."""

    structure: str  # unstructured | 2:4
    score: str  # magnitude | wanda
    target_sparsity: float
    layers: dict[str, float] = field(default_factory=dict)
    sparsity: float = 0.0
    model_sparsity: float = 0.0
    calibration_tokens: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def zero_fraction(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / weight.numel()


def n_m_violations(weight: torch.Tensor, n: int = 2, m: int = 4) -> int:
    """Number of groups of `m` consecutive input weights with more than `n` non-zeros."""
    rows, cols = weight.shape
    if cols % m:
        return -1
    return int(((weight.reshape(rows, cols // m, m) != 0).sum(-1) > n).sum())


def sparsity_pattern(model: nn.Module, names: Iterable[str] | None = None) -> dict:
    """The measured sparsity of a model's prunable layers: per layer the zero fraction and the number of
    2:4 groups with more than two non-zeros (0 for a 2:4 layer), plus totals. What an export records."""
    layers = prunable_linears(model)
    chosen = list(names) if names is not None else list(layers)
    rows = {}
    zeros = total = 0
    for name in chosen:
        weight = layers[name].weight.detach()
        z = int((weight == 0).sum())
        zeros, total = zeros + z, total + weight.numel()
        rows[name] = {"shape": list(weight.shape), "zero_fraction": z / weight.numel(),
                      "groups_over_2_of_4": n_m_violations(weight)}
    all_params = sum(p.numel() for p in model.parameters())
    return {"layers": rows, "zero_fraction": zeros / max(total, 1), "pruned_parameters": zeros,
            "model_zero_fraction": zeros / max(all_params, 1),
            "is_2_4": bool(rows) and all(r["groups_over_2_of_4"] == 0 for r in rows.values())}


@torch.no_grad()
def _apply(layer: nn.Linear, keep: torch.Tensor) -> None:
    layer.weight.mul_(keep.to(layer.weight.device, layer.weight.dtype))


@torch.no_grad()
def wanda_input_sq_sums(block: nn.Module, layers: dict[str, nn.Linear], inputs) -> tuple[dict[str, torch.Tensor], int]:
    """{layer name: Σ x_j² over tokens} (float64) for the Linear layers of one block, on the caught inputs."""
    sums = {name: torch.zeros(layer.in_features, dtype=torch.float64, device=layer.weight.device)
            for name, layer in layers.items()}
    tokens = 0

    def hook(name):
        def accumulate(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] += (x * x).sum(0)
        return accumulate

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        for item in inputs:
            block(item.hidden, *item.args, **item.kwargs)
            tokens += item.hidden.shape[0] * item.hidden.shape[1]
    finally:
        for handle in handles:
            handle.remove()
    return sums, tokens


def prune_(model: nn.Module, structure: str, score: str, sparsity: float,
           batches: Iterable[dict[str, torch.Tensor]] | None = None) -> PruneReport:
    """Prune `model` in place: `structure` unstructured (at `sparsity`) or 2:4; `score` magnitude (no data)
    or wanda (needs calibration `batches`). Returns the measured pattern."""
    if score not in SCORES:
        raise ConfigError(f"--score must be one of {', '.join(SCORES)}, got {score!r}")
    if structure == "2:4":
        check_n_m(model)
        sparsity = 0.5
    else:
        check_sparsity(sparsity)
    layers = prunable_linears(model)
    report = PruneReport(structure=structure, score=score, target_sparsity=sparsity)
    if score == "magnitude":
        # Layer-wise magnitude pruning ranks a whole matrix; N:M groups are within rows anyway.
        for layer in layers.values():
            _apply(layer, mask_for(magnitude_score(layer.weight), structure, sparsity, per_row=False))
    else:
        if batches is None:
            raise ConfigError("Wanda pruning needs calibration data")
        inputs = first_block_inputs(model, batches)
        for block in decoder_layers(model):
            own = {name: layer for name, layer in layers.items()
                   if any(layer is m for m in block.modules())}
            sums, tokens = wanda_input_sq_sums(block, own, inputs)
            for name, layer in own.items():
                _apply(layer, mask_for(wanda_score(layer.weight, sums[name]), structure, sparsity, per_row=True))
            report.calibration_tokens = tokens
            inputs = advance(block, inputs)
    pattern = sparsity_pattern(model)
    report.layers = {name: row["zero_fraction"] for name, row in pattern["layers"].items()}
    report.sparsity = pattern["zero_fraction"]
    report.model_sparsity = pattern["model_zero_fraction"]
    return report
