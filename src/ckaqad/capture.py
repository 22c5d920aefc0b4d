"""Which tokens CKA looks at, and capturing decoder-block outputs at just those tokens.

Sink positions (the first `n_sink` real tokens of each sequence, where LLMs park massive activations),
BOS tokens and padding are excluded by default: with them, CKA on SmolLM2 reads 0.999 flat and hides drift
(docs/method.md#cka). Student and teacher always use the same rows. A `LayerMap` pairs student blocks with
teacher blocks, so a student of another depth (a pruned one) is compared block to block. Under torchrun the
rows are sampled on the global batch and each rank keeps its share (`rank_rows`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ckaqad.errors import ConfigError, ModelError
from ckaqad.models.arch import decoder_layers


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """`all` or a comma list of indices / ranges (`0,4,8-11`), checked against the model's depth."""
    if spec in ("all", ""):
        return list(range(n_layers))
    layers: list[int] = []
    for part in spec.split(","):
        try:
            if "-" in part.strip()[1:]:
                lo, hi = (int(v) for v in part.split("-", 1))
                if hi < lo:  # an empty range would silently select no layer
                    raise ConfigError(f"--layers {spec!r}: range {part.strip()} runs backwards")
                layers.extend(range(lo, hi + 1))
            else:
                layers.append(int(part))
        except ValueError as exc:
            raise ConfigError(f"--layers must be 'all' or a list like 0,4,8-11, got {spec!r}") from exc
    layers = [i + n_layers if i < 0 else i for i in layers]
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(f"--layers {spec!r}: layer index out of range for a model with {n_layers} layers")
    return sorted(set(layers))


@dataclass(frozen=True)
class LayerMap:
    """Pairs (student block, teacher block) whose outputs CKA compares, in student order."""

    pairs: tuple[tuple[int, int], ...]

    @property
    def student_layers(self) -> list[int]:
        return sorted({s for s, _ in self.pairs})

    @property
    def teacher_layers(self) -> list[int]:
        return sorted({t for _, t in self.pairs})

    @classmethod
    def parse(cls, spec: str, student_depth: int, teacher_depth: int, layers: str = "all") -> LayerMap:
        """`proportional` (default; the identity at equal depth) or explicit `s:t,s:t,...` pairs; `layers`
        (`--layers`) picks which student blocks take part.

        Proportional maps student block i of S to teacher block round((i + 1)·T/S) − 1: block ends align,
        so the last student block always meets the teacher's last block.
        """
        chosen = parse_layers(layers, student_depth)
        if spec in ("proportional", ""):
            pairs = [(i, max(0, round((i + 1) * teacher_depth / student_depth) - 1)) for i in chosen]
            return cls(tuple(pairs))
        pairs = []
        for part in spec.split(","):
            try:
                s, t = (int(v) for v in part.split(":"))
            except ValueError as exc:
                raise ConfigError(f"--layer-map must be 'proportional' or pairs like 0:0,1:2, got {spec!r}") from exc
            if not (0 <= s < student_depth and 0 <= t < teacher_depth):
                raise ConfigError(f"--layer-map pair {part!r} is out of range for a {student_depth}-block student "
                                  f"and a {teacher_depth}-block teacher")
            pairs.append((s, t))
        if len({s for s, _ in pairs}) != len(pairs):
            raise ConfigError(f"--layer-map {spec!r} maps a student block twice")
        return cls(tuple(p for p in pairs if p[0] in chosen))


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


class ForwardHooks:
    """Forward hooks held in `_handles`, removed by `remove()` or on leaving a `with` block."""

    _handles: list

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class LayerCapture(ForwardHooks):
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
        self.active = True
        self.states: dict[int, torch.Tensor] = {}
        blocks = decoder_layers(model)
        self._handles = [blocks[i].register_forward_hook(self._hook(i)) for i in self.layers]

    def _hook(self, index: int):
        def hook(module, args, output):
            if not self.active:
                return
            hidden = output[0] if isinstance(output, tuple) else output  # (B, T, d)
            flat = hidden.reshape(-1, hidden.shape[-1])
            if self.rows is not None:
                flat = flat.index_select(0, self.rows)
            self.states[index] = flat.detach() if self.detach else flat

        return hook

    def clear(self) -> None:
        self.states = {}

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No capture during the block (a held-out evaluation between steps: its batches have other shapes
        than the training rows index), and nothing kept from it."""
        self.active = False
        try:
            yield
        finally:
            self.active = True
            self.states = {}

    def take(self) -> dict[int, torch.Tensor]:
        """The states of the last forward, and clear them."""
        states, self.states = self.states, {}
        return states



def rank_rows(rows: torch.Tensor, rank: int, world: int, rows_per_rank: int) -> tuple[torch.Tensor, list[int]]:
    """(this rank's rows as indices into its own slice, every rank's row count) from sorted flat `rows` of the
    global batch, whose rank slices hold `rows_per_rank` token rows each (b·T). The rows are sampled on the
    global batch, so they are a pure function of (seed, step, micro) and each rank's share of (…, rank); in
    rank order the shares are the global rows."""
    owner = torch.div(rows, rows_per_rank, rounding_mode="floor")
    counts = torch.bincount(owner, minlength=world).tolist()
    return rows[owner == rank] - rank * rows_per_rank, counts


# ----------------------------------------------------------------------------------------- router logits

# How a family turns router logits into expert probabilities (docs/moe_export.md#routing-drift): softmax
# (qwen3_moe, mixtral, gpt_oss) or independent sigmoids (deepseek_v3, nemotron_h: the routers that carry an
# `e_score_correction_bias`, which shifts only the choice of experts, never their weights).
ROUTER_KINDS = ("softmax", "sigmoid")


def is_router(module: nn.Module) -> bool:
    """A transformers 5 MoE router: it has `top_k`, `num_experts` and a 2-D `[num_experts, hidden]` weight, and
    its forward returns `(router_logits (N, E), routing weights (N, k), chosen experts (N, k))` — the shared
    contract of Qwen3Moe/Mixtral/GptOss `TopKRouter` and DeepseekV3/NemotronH `TopkRouter`."""
    weight = getattr(module, "weight", None)
    return (hasattr(module, "top_k") and hasattr(module, "num_experts") and isinstance(weight, torch.Tensor)
            and weight.dim() == 2 and weight.shape[0] == module.num_experts)


def router_kind(module: nn.Module) -> str:
    """`sigmoid` for routers with a score-correction bias (DeepSeek-V3 style), else `softmax`."""
    return "sigmoid" if hasattr(module, "e_score_correction_bias") else "softmax"


def router_modules(model: nn.Module) -> dict[int, nn.Module]:
    """{decoder block index: its router}, for the blocks that have one (empty for a dense model). ModelError
    for a block with two routers (ckaqad would not know which one routes the block)."""
    found: dict[int, nn.Module] = {}
    for index, block in enumerate(decoder_layers(model)):
        routers = [m for m in block.modules() if is_router(m)]
        if len(routers) > 1:
            raise ModelError(f"decoder block {index} has {len(routers)} routers; expected at most one")
        if routers:
            found[index] = routers[0]
    return found


@dataclass
class RouterStates:
    """One router forward at the kept token rows: logits `(m, E)` and the experts it chose `(m, k)` (after the
    correction bias and grouped top-k where the family has them: exactly the model's choice)."""

    logits: torch.Tensor
    chosen: torch.Tensor
    kind: str


class RouterCapture(ForwardHooks):
    """Forward hooks on every router of a model that keep its logits and chosen experts at `rows` (flat indices
    into B*T, or None for all tokens), like `LayerCapture`; `states[block index]` after each forward. With
    `detach` the logits are detached (teacher, evaluation); otherwise they carry the graph (the `router-kl`
    term). A router called twice in one forward keeps its last call."""

    def __init__(self, model: nn.Module, detach: bool = False) -> None:
        self.rows: torch.Tensor | None = None
        self.detach = detach
        self.active = True
        self.states: dict[int, RouterStates] = {}
        self.routers = router_modules(model)
        self._handles = [router.register_forward_hook(self._hook(i, router_kind(router)))
                         for i, router in self.routers.items()]

    def _hook(self, index: int, kind: str):
        def hook(module, args, output):
            if not self.active:
                return
            logits, chosen = output[0], output[2]  # (B*T, E), (B*T, k)
            if self.rows is not None:
                logits, chosen = logits.index_select(0, self.rows), chosen.index_select(0, self.rows)
            self.states[index] = RouterStates(logits.detach() if self.detach else logits, chosen.detach(), kind)

        return hook

    def take(self) -> dict[int, RouterStates]:
        states, self.states = self.states, {}
        return states

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.active = False
        try:
            yield
        finally:
            self.active = True
            self.states = {}

