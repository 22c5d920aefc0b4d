"""Which tokens CKA looks at, and capturing decoder-block outputs at just those tokens.

Sink positions (the first `n_sink` real tokens of each sequence, where LLMs park massive activations),
BOS tokens and padding are excluded by default: with them, CKA on SmolLM2 reads 0.999 flat and hides drift
(METHOD.md §4). Student and teacher always use the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ckaqad.models import decoder_layers


def valid_token_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, n_sink: int = 1,
                     exclude_token_ids: Sequence[int] = ()) -> torch.Tensor:
    """(B, T) bool: real tokens at position >= n_sink within their sequence and not in `exclude_token_ids`.

    Positions count real tokens only, so left- and right-padded batches give the same answer.
    """
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    position = real.long().cumsum(dim=1) - 1
    mask = real & (position >= n_sink)
    for token_id in exclude_token_ids:
        mask &= input_ids != token_id
    return mask


def select_rows(mask: torch.Tensor, m: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flat indices into the (B*T) token rows where `mask` is true; a sorted random subset of `m` if given."""
    rows = mask.flatten().nonzero().squeeze(1)
    if m is not None and m < rows.numel():
        pick = torch.randperm(rows.numel(), generator=generator, device="cpu")[:m].to(rows.device)
        rows = rows[pick].sort().values
    return rows


class LayerCapture:
    """Forward hooks that keep the residual-stream output of chosen decoder blocks at chosen token rows.

    Set `rows` (flat indices into B*T, or None for every token) before each forward; afterwards
    `states[i]` is an (len(rows), d) tensor for layer i. Gathering inside the hook means the full
    (B, T, d) activations of the teacher are never kept, so the CKA term adds almost no memory.
    With `detach`, states are detached (teacher); otherwise they carry the graph (student).
    """

    def __init__(self, model: nn.Module, layers: Sequence[int], detach: bool = False) -> None:
        self.layers = list(layers)
        self.rows: torch.Tensor | None = None
        self.detach = detach
        self.states: dict[int, torch.Tensor] = {}
        blocks = decoder_layers(model)
        self._handles = [blocks[i].register_forward_hook(self._hook(i)) for i in self.layers]

    def _hook(self, index: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output  # (B, T, d)
            flat = hidden.reshape(-1, hidden.shape[-1])
            if self.rows is not None:
                flat = flat.index_select(0, self.rows)
            self.states[index] = flat.detach() if self.detach else flat

        return hook

    def clear(self) -> None:
        self.states = {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> LayerCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
