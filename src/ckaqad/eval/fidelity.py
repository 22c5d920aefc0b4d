"""Fidelity: where a student's hidden states drift from the teacher's, and what it costs in logits.

One pass over held-out blocks runs the teacher once and every student on the same batch, and accumulates:
per-layer linear CKA (biased, exact over all tokens; debiased, Nguyen et al. minibatch estimator) on the
residual-stream output of each decoder block with sinks and padding excluded, KL(teacher ‖ student) per
token, perplexities and top-1 agreement (docs/method.md#evaluation). A student of another depth than the teacher (a
pruned one) is compared block to block through a `capture.LayerMap`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ckaqad.capture import LayerCapture, LayerMap, RouterCapture, router_modules, valid_token_mask
from ckaqad.cka import CKAAccumulator, all_reduce_accumulator_
from ckaqad.errors import ConfigError
from ckaqad.eval.cka_bootstrap import SequenceFeatures, bootstrap_interval
from ckaqad.eval.routing import RoutingStats, routing_summary
from ckaqad.models.arch import num_layers
from ckaqad.objectives.ce import next_token_nll
from ckaqad.objectives.kl import chunked_kl
from ckaqad.parallel.dist import World
from ckaqad.parallel.fsdp import is_sharded
from ckaqad.quant.apply import cached_quantized_weights

# The headline numbers, in table order: what `Fidelity.headline()` returns and `ckaqad compare` shows.
HEADLINE = ("kl_per_token", "perplexity", "top1_agreement", "mean_cka", "min_cka", "min_cka_layer",
            "mean_cka_debiased", "predicted_tokens", "cka_tokens")
# Headline numbers of an MoE model only (routing drift, `eval.routing`), after HEADLINE; absent for dense models.
ROUTING_HEADLINE = ("router_jaccard", "router_kl")
# The subset `ckaqad compare` puts in its table (counts and layer indices are not comparable metrics).
COMPARED = ("kl_per_token", "perplexity", "top1_agreement", "mean_cka", "min_cka")
# The massive-activation check: the share of a layer's squared norm held by its top MASSIVE_TOP_FRACTION of
# tokens (position 0 already excluded). Evenly spread tokens give a little more than that fraction (SmolLM2's
# blocks 10-28: 1.4-2%); a layer where the top 1% hold more than MASSIVE_DOMINANT_SHARE (20x even) is dominated
# by them (SmolLM2's blocks 2-7: 24-38%, from ~20 tokens at 8-11x the median norm; docs/tasks.md).
MASSIVE_TOP_FRACTION = 0.01
MASSIVE_DOMINANT_SHARE = 0.2
MASSIVE_SUGGESTED_FACTOR = 5.0  # the --massive-factor the diagnosis suggests: drops those tokens, few others


@dataclass
class Fidelity:
    """How close one student is to the teacher on the held-out tokens.

    `layers`: one row per compared student block, `{index (student block), teacher_index, cka, cka_debiased}`,
    in student order. `min_cka_layer` is a student block index (-1 when no layer was compared).
    `routing`: one row per MoE layer (`eval.routing.RoutingStats.rows`: top-k Jaccard, router KL, both expert-load
    histograms) and `router_jaccard` / `router_kl` their means (None for a dense model).
    """

    label: str
    layers: list[dict] = field(default_factory=list)
    mean_cka: float = float("nan")
    min_cka: float = float("nan")
    min_cka_layer: int = -1
    mean_cka_debiased: float = float("nan")
    kl_per_token: float = float("nan")
    perplexity: float = float("nan")
    top1_agreement: float = float("nan")
    predicted_tokens: int = 0
    cka_tokens: int = 0
    extra: dict = field(default_factory=dict)
    routing: list[dict] = field(default_factory=list)
    router_jaccard: float | None = None
    router_kl: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def headline(self) -> dict[str, float | int]:
        """The flat headline numbers (HEADLINE, then ROUTING_HEADLINE for an MoE model), without the per-layer
        rows."""
        routing = [key for key in ROUTING_HEADLINE if getattr(self, key) is not None]
        return {key: getattr(self, key) for key in (*HEADLINE, *routing)}


class _StudentStats:
    """Running sums of one student: a CKA accumulator per (student block, teacher block) pair, KL, NLL."""

    def __init__(self, layer_map: LayerMap, bootstrap: bool = False) -> None:
        self.layer_map = layer_map
        self.cka = {s: CKAAccumulator() for s, _ in layer_map.pairs}
        self.features = {s: SequenceFeatures() for s, _ in layer_map.pairs} if bootstrap else {}
        self.kl_sum = 0.0
        self.kl_tokens = 0
        self.nll_sum = 0.0
        self.nll_tokens = 0
        self.agree = 0
        self.routing = RoutingStats()

    def all_reduce_(self) -> None:
        """In place, on every rank: the sums of every rank's batches (rank order, so every rank gets the same)."""
        for accumulator in self.cka.values():
            all_reduce_accumulator_(accumulator)
        names = ("kl_sum", "kl_tokens", "nll_sum", "nll_tokens", "agree")
        parts = _gathered(({name: getattr(self, name) for name in names}, self.routing))
        for name in names:
            setattr(self, name, sum(part[0][name] for part in parts))
        self.routing = RoutingStats()
        for _, routing in parts:
            self.routing.merge(routing)

    def result(self, label: str, teacher_features: dict[int, SequenceFeatures] | None = None,
               resamples: int = 0) -> Fidelity:
        layers = [{"index": s, "teacher_index": t, "cka": self.cka[s].biased(), "cka_debiased": self.cka[s].debiased(),
                   "tokens": self.cka[s].n}
                  for s, t in self.layer_map.pairs]
        if self.features and teacher_features is not None:
            for row in layers:
                interval = bootstrap_interval(self.features[row["index"]], teacher_features[row["teacher_index"]],
                                              resamples)
                row.update({"cka_low": interval["low"], "cka_high": interval["high"],
                            "cka_bootstrap_std": interval["std"], "cka_bootstrap_bias": interval["bias"],
                            "sequences": interval["sequences"]})
        values = [row["cka"] for row in layers]
        worst = min(range(len(values)), key=values.__getitem__) if values else -1
        routing = self.routing.rows()
        summary = routing_summary(routing)
        return Fidelity(
            routing=routing, router_jaccard=summary["router_jaccard"], router_kl=summary["router_kl"],
            label=label, layers=layers,
            mean_cka=sum(values) / len(values) if values else float("nan"),
            min_cka=values[worst] if values else float("nan"),
            min_cka_layer=layers[worst]["index"] if values else -1,
            mean_cka_debiased=sum(r["cka_debiased"] for r in layers) / max(len(layers), 1),
            kl_per_token=self.kl_sum / max(self.kl_tokens, 1),
            perplexity=math.exp(self.nll_sum / max(self.nll_tokens, 1)),
            top1_agreement=self.agree / max(self.kl_tokens, 1),
            predicted_tokens=self.nll_tokens,
            cka_tokens=next(iter(self.cka.values())).n if self.cka else 0,
        )


def layer_maps(teacher: nn.Module, students: dict[str, nn.Module], layers: list[int] | None = None,
               layer_map: LayerMap | None = None) -> dict[str, LayerMap]:
    """{label: LayerMap}: `layer_map` for every student when given, else each student's proportional map (the
    identity at equal depth), restricted to the student blocks in `layers` when given."""
    if layer_map is not None and layers is not None:
        raise ConfigError("give the compared layers either as a layer map or as a list of layers, not both")
    teacher_depth = num_layers(teacher)
    maps = {}
    for label, model in students.items():
        depth = num_layers(model)
        if layer_map is None:
            chosen = LayerMap.parse("proportional", depth, teacher_depth)
            if layers is not None:
                bad = [i for i in layers if not 0 <= i < depth]
                if bad:
                    raise ConfigError(f"layers {bad} are out of range for {label!r} with {depth} layers")
                chosen = LayerMap(tuple(p for p in chosen.pairs if p[0] in set(layers)))
        else:
            if any(s >= depth for s in layer_map.student_layers) or any(t >= teacher_depth
                                                                         for t in layer_map.teacher_layers):
                raise ConfigError(f"the layer map {layer_map.pairs} does not fit {label!r} ({depth} layers) and "
                                  f"the teacher ({teacher_depth} layers)")
            chosen = layer_map
        maps[label] = chosen
    return maps


class _NormShares:
    """Per teacher layer, the squared norm of every token CKA sees (for the massive-activation check)."""

    def __init__(self, layers: list[int]) -> None:
        self.norms: dict[int, list[torch.Tensor]] = {t: [] for t in layers}

    def add(self, layer: int, squared_norms: torch.Tensor) -> None:
        self.norms[layer].append(squared_norms.detach().double().cpu())

    def all_gather_(self) -> None:
        """In place, on every rank: every rank's norms (the rows are sorted before use, so order is moot)."""
        parts = _gathered(self.norms)
        self.norms = {t: [n for part in parts for n in part[t]] for t in self.norms}

    def rows(self) -> list[dict]:
        """Per layer: the share of the squared norm held by the top 1% of tokens and by the top token, and the
        largest token norm over the median one."""
        out = []
        for layer, parts in self.norms.items():
            if not parts:
                continue
            sq = torch.cat(parts).sort(descending=True).values
            k = max(1, math.ceil(MASSIVE_TOP_FRACTION * sq.numel()))
            total = float(sq.sum())
            out.append({"layer": layer, "tokens": sq.numel(), "top_tokens": k,
                        "top_share": float(sq[:k].sum()) / total if total > 0 else math.nan,
                        "top1_share": float(sq[0]) / total if total > 0 else math.nan,
                        "max_over_median_norm": math.sqrt(float(sq[0]) / max(float(sq.median()), 1e-30))})
        return out


def massive_summary(rows: list[dict]) -> dict:
    """The layers the top 1% of tokens dominate (share > MASSIVE_DOMINANT_SHARE) and the largest share."""
    dominated = [r["layer"] for r in rows if r["top_share"] > MASSIVE_DOMINANT_SHARE]
    worst = max(rows, key=lambda r: r["top_share"]) if rows else None
    return {"dominated_layers": dominated, "max_top_share": worst["top_share"] if worst else math.nan,
            "max_top_share_layer": worst["layer"] if worst else -1, "top_fraction": MASSIVE_TOP_FRACTION,
            "dominant_share": MASSIVE_DOMINANT_SHARE}


def _robust_rows(teacher_rows: torch.Tensor, factor: float) -> torch.Tensor:
    """Rows whose teacher norm is at most `factor` × the batch's median norm (all rows when factor is 0)."""
    sq = teacher_rows.float().pow(2).sum(1)
    if factor <= 0:
        return torch.ones_like(sq, dtype=torch.bool)
    return sq <= factor**2 * sq.median()


def _rank_batches(batches, world: World | None) -> Iterator[tuple[dict, bool]]:
    """(batch, counted) for this rank: batches r, r+N, r+2N, ... of the sequence, whole, so each is scored
    exactly as one process scores it. Where the last round has fewer batches than ranks, a rank without one
    gets that round's first batch, not counted: every rank runs the same forwards (a sharded model's per-block
    all-gathers are collectives). One process gets every batch."""
    if world is None or not world.distributed:
        yield from ((batch, True) for batch in batches)
        return
    round_: list[dict] = []
    for batch in batches:
        round_.append(batch)
        if len(round_) == world.size:
            yield round_[world.rank], True
            round_ = []
    if round_:
        yield (round_[world.rank], True) if world.rank < len(round_) else (round_[0], False)


def _gathered(value) -> list:
    """Every rank's `value` (any picklable object), in rank order."""
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


@torch.no_grad()
def measure_fidelity(teacher: nn.Module, students: dict[str, nn.Module], batches, layers: list[int] | None = None,
                     n_sink: int = 1, exclude_token_ids: tuple[int, ...] = (), progress: bool = True,
                     total: int | None = None, layer_map: LayerMap | None = None, bootstrap: int = 0,
                     massive_factor: float = 0.0, world: World | None = None) -> tuple[dict[str, Fidelity], dict]:
    """Fidelity of each student to `teacher` over `batches` (model kwargs on the models' device).

    Returns ({label: Fidelity}, teacher stats {perplexity, predicted_tokens}). CKA uses every valid token
    (not a sample): position < n_sink, padding and `exclude_token_ids` are left out. Block pairs come from
    `layer_map` (one map for every student) or, by default, each student's proportional map restricted to
    the student blocks in `layers`. The students' quantized weights are computed once for the whole pass
    (per forward instead for a student sharded with FSDP2: its weights exist whole only inside a block's forward).

    `bootstrap` > 0: each layer row also gets `cka_low` / `cka_high`, the 95% percentile interval of that many
    resamples of the held-out sequences (`eval.cka_bootstrap`; the features are kept in memory for it).
    `massive_factor` > 0: the robust token selection, leaving out of each layer's CKA the tokens whose teacher
    hidden-state norm exceeds that many times the batch median (KL and perplexity still use every token).
    The teacher stats carry the massive-activation check (`massive`: per layer, the share of the squared norm
    held by the top 1% of tokens; `massive_summary`).

    `world` (a torchrun job; every rank calls this with the same batches): each rank scores its share of the
    batches (`_rank_batches`) with the models as they are, sharded or replicated, and the sums are reduced
    (CKA through `cka.all_reduce_accumulator_`), so every rank returns what one process returns over all the
    batches, up to float64 summation order (docs/distributed.md#sharded-evaluation).
    """
    from tqdm.auto import tqdm

    maps = layer_maps(teacher, students, layers, layer_map)
    if bootstrap < 0 or massive_factor < 0:
        raise ConfigError(f"bootstrap ({bootstrap}) and massive_factor ({massive_factor}) must be >= 0")
    distributed = world is not None and world.distributed
    if distributed and bootstrap > 0:
        raise ConfigError("the bootstrap interval needs every held-out sequence's features in one process; run "
                          "the evaluation in one process (ckaqad eval) for --bootstrap")
    stats = {label: _StudentStats(maps[label], bootstrap > 0) for label in students}
    teacher_layers = sorted({t for m in maps.values() for t in m.teacher_layers})
    teacher_features = {t: SequenceFeatures() for t in teacher_layers} if bootstrap > 0 else {}
    shares = _NormShares(teacher_layers)
    sequences_seen = 0
    teacher_sums = {"nll": 0.0, "tokens": 0}
    captures = {label: LayerCapture(model, maps[label].student_layers, detach=True)
                for label, model in students.items()}
    teacher_capture = LayerCapture(teacher, teacher_layers, detach=True)
    # Routing drift (MoE teachers): router logits and choices at every token, compared at the real ones.
    # A student whose routers sit in other blocks than the teacher's (another depth) gets no routing rows.
    routed = router_modules(teacher)
    router_captures = {label: RouterCapture(model, detach=True) for label, model in students.items()
                       if routed and set(router_modules(model)) == set(routed)}
    teacher_routers = RouterCapture(teacher, detach=True) if routed else None

    def score(batch: dict, stats: dict[str, _StudentStats], shares: _NormShares, teacher_sums: dict) -> None:
        nonlocal sequences_seen
        mask = valid_token_mask(batch["input_ids"], batch.get("attention_mask"), n_sink, exclude_token_ids)
        rows = mask.flatten().nonzero().squeeze(1)
        # Every capture gets this batch's rows before any forward: a student that is the teacher object
        # itself (`ckaqad eval --model default`) has both hooks fire in the teacher's forward.
        for capture in (teacher_capture, *captures.values()):
            capture.rows = rows
        t_logits = teacher(**batch).logits
        teacher_states = teacher_capture.take()
        teacher_routing = teacher_routers.take() if routed else {}
        nll, count = next_token_nll(t_logits, batch["input_ids"], batch.get("attention_mask"))
        teacher_sums["nll"] += float(nll)
        teacher_sums["tokens"] += count
        sequence = rows // batch["input_ids"].shape[1] + sequences_seen
        sequences_seen += batch["input_ids"].shape[0]
        keep = {t: _robust_rows(teacher_states[t], massive_factor) for t in teacher_layers}
        for t in teacher_layers:
            shares.add(t, teacher_states[t].float().pow(2).sum(1))
            if bootstrap > 0:
                teacher_features[t].add(teacher_states[t][keep[t]], sequence[keep[t]])
        real = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        n_real = int(real.sum())
        t_top1 = t_logits.argmax(-1)
        for label, model in students.items():
            st = stats[label]
            s_logits = model(**batch).logits
            student_states = captures[label].take()
            if label in router_captures:
                real_rows = real.flatten().nonzero()[:, 0]
                st.routing.update(router_captures[label].take(), teacher_routing, real_rows)
            st.kl_sum += float(chunked_kl(s_logits, t_logits, real)) * n_real
            st.kl_tokens += n_real
            nll, count = next_token_nll(s_logits, batch["input_ids"], batch.get("attention_mask"))
            st.nll_sum += float(nll)
            st.nll_tokens += count
            st.agree += int(((s_logits.argmax(-1) == t_top1) & real).sum())
            for s, t in st.layer_map.pairs:
                st.cka[s].update(student_states[s][keep[t]], teacher_states[t][keep[t]])
                if bootstrap > 0:
                    st.features[s].add(student_states[s][keep[t]], sequence[keep[t]])

    # A sharded student's weights exist whole only inside its blocks' forwards: quantize them there.
    held = contextlib.nullcontext() if any(is_sharded(m) for m in students.values()) \
        else cached_quantized_weights(*students.values())
    try:
        with held:
            for batch, counted in tqdm(_rank_batches(batches, world), total=total, desc="diagnose",
                                       disable=not progress, unit="batch"):
                if counted:
                    score(batch, stats, shares, teacher_sums)
                else:  # the forwards every rank must run, scored into nothing
                    score(batch, {label: _StudentStats(maps[label]) for label in students},
                          _NormShares(teacher_layers), {"nll": 0.0, "tokens": 0})
    finally:
        teacher_capture.remove()
        for capture in (*captures.values(), *router_captures.values(), *([teacher_routers] if routed else [])):
            capture.remove()
    if distributed:
        for st in stats.values():
            st.all_reduce_()
        shares.all_gather_()
        teacher_sums = {key: sum(part[key] for part in _gathered(teacher_sums)) for key in teacher_sums}
    results = {label: st.result(label, teacher_features, bootstrap) for label, st in stats.items()}
    massive = shares.rows()
    teacher_nll, teacher_tokens = teacher_sums["nll"], teacher_sums["tokens"]
    teacher_stats = {"perplexity": math.exp(teacher_nll / max(teacher_tokens, 1)), "predicted_tokens": teacher_tokens,
                     "massive": massive, "massive_summary": massive_summary(massive), "massive_factor": massive_factor}
    return results, teacher_stats


def token_rule(n_sink: int) -> str:
    """The tokens CKA is computed over, in words (for reports)."""
    return (f"every held-out token except the first {n_sink} position(s) of each sequence (attention sinks), "
            "BOS and padding")
