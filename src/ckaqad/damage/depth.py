"""Depth pruning: remove decoder blocks, listed or the least important ones on calibration data.

Importance (`--importance`):
- `bi` (default): ShortGPT's Block Influence (Men et al. 2024), BI_i = 1 − mean over tokens of
  cos(x_i, x_{i+1}), the cosine between a block's input and output hidden states; a block that barely turns
  the residual stream matters little. One block-by-block pass over the calibration data.
- `kl`: the direct measurement, KL(model ‖ model without block i) per token on the calibration data, one
  full forward per block and batch.
Both score each block with all others present (ShortGPT removes the k lowest at once).

The removed model is an ordinary HF model of its own depth: the blocks are taken out of the ModuleList,
`num_hidden_layers` and `layer_types` follow, and each attention module's `layer_idx` is renumbered for the
KV cache. Its outputs equal the original model's run with those blocks skipped (`skip_blocks`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ckaqad.capture import valid_token_mask
from ckaqad.damage.blockwise import advance, block_output, first_block_inputs
from ckaqad.errors import ConfigError
from ckaqad.models.arch import decoder_layers, num_layers
from ckaqad.objectives.kl import chunked_kl

IMPORTANCE = ("bi", "kl")


def parse_block_list(spec: str, depth: int) -> list[int]:
    """`3,5,26-29` (negative indices count from the end) as sorted unique block indices, checked: in range
    and not every block."""
    blocks: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        try:
            if "-" in part[1:]:
                lo, hi = (int(v) for v in part.split("-", 1))
                if hi < lo:
                    raise ConfigError(f"--blocks {spec!r}: range {part} runs backwards")
                blocks.extend(range(lo, hi + 1))
            else:
                blocks.append(int(part))
        except ValueError as exc:
            raise ConfigError(f"--blocks must be a list like 3,5,26-29, got {spec!r}") from exc
    blocks = sorted({b + depth if b < 0 else b for b in blocks})
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise ConfigError(f"--blocks {spec!r}: block {bad[0]} is out of range for a model with {depth} blocks "
                          f"(0..{depth - 1})")
    if len(blocks) >= depth:
        raise ConfigError(f"--blocks {spec!r} removes every one of the model's {depth} blocks")
    return blocks


def check_drop_count(k: int, depth: int) -> int:
    if not 1 <= k < depth:
        raise ConfigError(f"--drop must be between 1 and {depth - 1} for a model with {depth} blocks, got {k}")
    return k


def _hidden_of(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def skip_blocks(model: nn.Module, indices: Iterable[int]) -> Iterator[None]:
    """Within the block, the listed decoder blocks pass their input through unchanged."""
    blocks = decoder_layers(model)

    def identity(module, args, kwargs, output):
        hidden = _hidden_of(args, kwargs)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handles = [blocks[i].register_forward_hook(identity, with_kwargs=True) for i in indices]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def block_influence(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], n_sink: int = 1) -> list[float]:
    """ShortGPT's BI_i = 1 − mean cos(input_i, output_i) over the calibration tokens (sinks excluded)."""
    batches = list(batches)
    inputs = first_block_inputs(model, batches)
    masks = [valid_token_mask(b["input_ids"], b.get("attention_mask"), n_sink).flatten() for b in batches]
    scores = []
    for block in decoder_layers(model):
        total, count = 0.0, 0
        for item, mask in zip(inputs, masks, strict=True):
            out = block_output(block, item)
            d = out.shape[-1]
            before, after = item.hidden.reshape(-1, d).float()[mask], out.reshape(-1, d).float()[mask]
            cos = F.cosine_similarity(before, after, dim=-1)
            total += float(cos.sum())
            count += int(mask.sum())
        scores.append(1.0 - total / max(count, 1))
        inputs = advance(block, inputs)
    return scores


@torch.no_grad()
def block_removal_kl(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> list[float]:
    """KL(model ‖ model with block i skipped) per token on the calibration batches, for every block i."""
    batches = list(batches)
    full = [model(**b, use_cache=False).logits for b in batches]
    scores = []
    for i in range(num_layers(model)):
        total, tokens = 0.0, 0
        with skip_blocks(model, [i]):
            for batch, reference in zip(batches, full, strict=True):
                real = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
                n = int(real.sum())
                total += float(chunked_kl(model(**batch, use_cache=False).logits, reference, real)) * n
                tokens += n
        scores.append(total / max(tokens, 1))
    return scores


def least_important(scores: Sequence[float], k: int) -> list[int]:
    """The `k` blocks with the lowest importance, sorted by index (ties: the later block goes first)."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], -i))
    return sorted(order[:k])


def drop_blocks_(model: nn.Module, indices: Sequence[int]) -> list[int]:
    """Remove decoder blocks `indices` in place; returns the original index of each kept block, in order."""
    blocks = decoder_layers(model)
    depth = len(blocks)
    removed = set(indices)
    kept = [i for i in range(depth) if i not in removed]
    if not kept:
        raise ConfigError("cannot remove every decoder block")
    new = nn.ModuleList([blocks[i] for i in kept])
    base = getattr(model, "model", model)
    for name, child in base.named_children():
        if child is blocks:
            setattr(base, name, new)
            break
    for position, block in enumerate(new):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
    config = model.config
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
    return kept


def kept_layer_map(kept: Sequence[int]) -> str:
    """The `--layer-map` pairing each kept student block with the teacher block it was: `0:0,1:1,2:3,...`."""
    return ",".join(f"{s}:{t}" for s, t in enumerate(kept))
