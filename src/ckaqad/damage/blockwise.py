"""Running a model one decoder block at a time on calibration data, as SparseGPT and Wanda do.

The inputs of the first block are caught once (hidden states and the keyword arguments the model passes
every block: position embeddings, attention mask, ...); each block is then run on them in order, so block i
sees the outputs of the already-modified blocks before it. The embedded model's calibration set (16 blocks
of 128 tokens) holds a few MB of hidden states, far less than keeping every block's activations.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ckaqad.errors import ModelError
from ckaqad.models.arch import decoder_layers


class _StopForward(Exception):
    """Raised in the first block's pre-hook: the rest of the forward is not needed."""


@dataclass
class BlockInput:
    """One calibration batch at the input of a decoder block: hidden states (B, T, d) and the other arguments."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict


def first_block_inputs(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> list[BlockInput]:
    """The inputs of decoder block 0 for every batch (the embeddings and the shared block arguments)."""
    blocks = decoder_layers(model)
    caught: list[BlockInput] = []

    def catch(module, args, kwargs):
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        caught.append(BlockInput(hidden.detach(), rest, dict(kwargs)))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(**batch, use_cache=False)
                except _StopForward:
                    continue
    finally:
        handle.remove()
    if not caught:
        raise ModelError("no calibration batch reached the first decoder block")
    return caught


def block_output(block: nn.Module, item: BlockInput) -> torch.Tensor:
    """The residual-stream output of `block` on one caught input."""
    output = block(item.hidden, *item.args, **item.kwargs)
    return output[0] if isinstance(output, tuple) else output


def advance(block: nn.Module, inputs: list[BlockInput]) -> list[BlockInput]:
    """The inputs of the next block: `block` run on every caught input (the other arguments are shared)."""
    with torch.no_grad():
        return [BlockInput(block_output(block, item).detach(), item.args, item.kwargs) for item in inputs]
