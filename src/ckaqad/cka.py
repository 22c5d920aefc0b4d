"""Linear CKA between two sets of representations of the same n tokens (docs/method.md#cka). Pure tensor math.

    CKA(X, Y) = ‖Yᵀ X‖_F² / (‖Xᵀ X‖_F · ‖Yᵀ Y‖_F)        X: (n, d1), Y: (n, d2), columns centred

Equivalent Gram form `⟨HKH, HLH⟩ / (‖HKH‖ ‖HLH‖)` with K = XXᵀ, L = YYᵀ; the feature form costs O(n·d²),
the Gram form O(n²·d), and `linear_cka` picks the cheaper. The debiased form uses the unbiased HSIC
estimator (Song et al. 2012) as in Nguyen, Raghu & Kornblith 2021, written without any n×n matrix.

>>> import torch
>>> x = torch.randn(64, 8, dtype=torch.float64)
>>> round(float(linear_cka(x, 3.0 * x)), 6)
1.0
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_EPS = 1e-12


def _centre_and_normalise(x: torch.Tensor) -> torch.Tensor:
    # Scale-normalising first keeps ‖·‖⁴ in range for hidden states with massive activations (CKA is
    # scale-invariant, so this changes nothing else).
    # Dividing by the max magnitude first keeps the norm itself finite (1e20-scale inputs) and away from
    # underflow (1e-100-scale float64 inputs); only an exactly-zero matrix stays zero.
    x = x - x.mean(dim=0, keepdim=True)
    x = x / torch.where(x.abs().amax() > 0, x.abs().amax(), 1.0)
    return x / torch.where(x.norm() > 0, x.norm(), 1.0)


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs (n, d) inputs with the same n, got {tuple(x.shape)}, {tuple(y.shape)}")


def _debiased_dot(xty_sq, rows_x, rows_y, norm_x, norm_y, n: int):
    """Unbiased HSIC (up to a factor n(n-3) that cancels in CKA) from row statistics.

    xty_sq = ‖YᵀX‖², rows_* = per-row squared norms, norm_* = their sums (Kornblith et al.'s helper)."""
    return xty_sq - n / (n - 2.0) * (rows_x @ rows_y) + norm_x * norm_y / ((n - 1.0) * (n - 2.0))


def linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> torch.Tensor:
    """Linear CKA of `x` (n, d1) and `y` (n, d2) as a scalar tensor, differentiable.

    Computed in at least float32 (float64 inputs stay float64). The biased form lies in [0, 1]; the debiased
    form needs n > 3 and can be slightly negative for unrelated inputs.
    """
    _check_pair(x, y)
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    x = _centre_and_normalise(x.to(dtype))
    y = _centre_and_normalise(y.to(dtype))
    n = x.shape[0]
    if debiased:
        if n <= 3:
            raise ValueError(f"debiased CKA needs more than 3 tokens, got {n}")
        return _debiased_feature_cka(x, y)
    if n > max(x.shape[1], y.shape[1]):
        cross = (y.T @ x).square().sum()
        denom = (x.T @ x).norm() * (y.T @ y).norm()
    else:
        k, l = x @ x.T, y @ y.T  # already centred, so HKH = K
        cross = (k * l).sum()
        denom = k.norm() * l.norm()
    return cross / denom.clamp_min(_EPS)


def _debiased_feature_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    rows_x, rows_y = x.square().sum(1), y.square().sum(1)
    norm_x, norm_y = rows_x.sum(), rows_y.sum()
    hsic_xy = _debiased_dot((y.T @ x).square().sum(), rows_x, rows_y, norm_x, norm_y, n)
    hsic_xx = _debiased_dot((x.T @ x).square().sum(), rows_x, rows_x, norm_x, norm_x, n)
    hsic_yy = _debiased_dot((y.T @ y).square().sum(), rows_y, rows_y, norm_y, norm_y, n)
    return hsic_xy / (hsic_xx.clamp_min(_EPS) * hsic_yy.clamp_min(_EPS)).sqrt()


def unbiased_hsic_terms(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(HSIC_u(X,Y), HSIC_u(X,X), HSIC_u(Y,Y)) of one minibatch, each divided by n(n-3) so minibatches of
    different sizes average correctly (Nguyen et al. 2021 average these over minibatches)."""
    _check_pair(x, y)
    n = x.shape[0]
    if n <= 3:
        raise ValueError(f"unbiased HSIC needs more than 3 tokens, got {n}")
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    x, y = x - x.mean(0), y - y.mean(0)
    rows_x, rows_y = x.square().sum(1), y.square().sum(1)
    norm_x, norm_y = rows_x.sum(), rows_y.sum()
    terms = torch.stack([
        _debiased_dot((y.T @ x).square().sum(), rows_x, rows_y, norm_x, norm_y, n),
        _debiased_dot((x.T @ x).square().sum(), rows_x, rows_x, norm_x, norm_x, n),
        _debiased_dot((y.T @ y).square().sum(), rows_y, rows_y, norm_y, norm_y, n),
    ])
    return terms / (n * (n - 3.0))


class CKAAccumulator:
    """Streaming CKA of one layer over many minibatches, in float64.

    `biased()` is the exact full-data linear CKA over every token seen (sufficient statistics Σx, Σy, XᵀX,
    YᵀY, YᵀX, kept about a shift taken from the first batch so the centring does not cancel digits away).
    `debiased()` is the minibatch estimator of Nguyen et al. 2021: mean unbiased HSIC over minibatches.
    Memory: three d×d float64 matrices.
    """

    def __init__(self) -> None:
        self.n = 0
        self.batches = 0
        self._shift: tuple[torch.Tensor, torch.Tensor] | None = None
        self._sums: dict[str, torch.Tensor] = {}
        self._hsic = torch.zeros(3, dtype=torch.float64)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add a minibatch: x (n, d1) student, y (n, d2) teacher, rows paired."""
        _check_pair(x, y)
        x = x.detach().to(torch.float64)
        y = y.detach().to(torch.float64)
        if self._shift is None:
            self._shift = (x.mean(0), y.mean(0))
            d1, d2 = x.shape[1], y.shape[1]
            z = dict(dtype=torch.float64, device=x.device)
            self._sums = {"x": torch.zeros(d1, **z), "y": torch.zeros(d2, **z), "xx": torch.zeros(d1, d1, **z),
                          "yy": torch.zeros(d2, d2, **z), "yx": torch.zeros(d2, d1, **z)}
        xs, ys = x - self._shift[0], y - self._shift[1]
        s = self._sums
        s["x"] += xs.sum(0)
        s["y"] += ys.sum(0)
        s["xx"] += xs.T @ xs
        s["yy"] += ys.T @ ys
        s["yx"] += ys.T @ xs
        self.n += x.shape[0]
        if x.shape[0] > 3:
            self._hsic += unbiased_hsic_terms(x, y).cpu()
            self.batches += 1

    def biased(self) -> float:
        if self.n < 2:
            return float("nan")
        s, n = self._sums, self.n
        mx, my = s["x"] / n, s["y"] / n
        cxx = s["xx"] - n * torch.outer(mx, mx)
        cyy = s["yy"] - n * torch.outer(my, my)
        cyx = s["yx"] - n * torch.outer(my, mx)
        return float(cyx.square().sum() / (cxx.norm() * cyy.norm()).clamp_min(_EPS))

    def debiased(self) -> float:
        if self.batches == 0:
            return float("nan")
        xy, xx, yy = (self._hsic / self.batches).tolist()
        return float(xy / max(xx * yy, _EPS) ** 0.5)


# ------------------------------------------------------------------------------------------ across ranks
# The CKA of a global batch is the CKA of the union of every rank's rows: CKA is a ratio of norms, so the
# mean of per-rank CKAs is another (biased) quantity. The rows are gathered rather than the sufficient
# statistics all-reduced: N·m rows of width d cost less to send than the d² entries of XᵀX, YᵀY and YᵀX once d
# exceeds the rows (d = 576..8192 against 1024 rows a micro-batch), and `linear_cka` then runs on exactly the
# rows one process would see, so every form (feature, Gram, debiased) gives the single-process value.
# The collective is a small autograd function over `dist.all_gather`/`dist.all_reduce`:
# torch.distributed.nn.functional.all_gather does the same but is deprecated in torch 2.13 (for a private API).


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: tuple[int, ...], group) -> torch.Tensor:
        width = max(counts)
        padded = torch.cat([x, x.new_zeros(width - x.shape[0], *x.shape[1:])]) if x.shape[0] < width else x
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.counts, ctx.rank, ctx.group = counts, dist.get_rank(group), group
        return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank computed the same loss from the gathered rows, so each holds the whole gradient; their
        # mean (all_gather's own backward is the sum) is the single-process gradient of every row.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.counts[:ctx.rank])
        return grad[start:start + ctx.counts[ctx.rank]] / len(ctx.counts), None, None


def gather_rows(x: torch.Tensor, counts: list[int], group=None) -> torch.Tensor:
    """Every rank's rows of `x` (n_r, d) concatenated in rank order, differentiable: the gradient that reaches
    this rank's `x` is exactly the single-process gradient of a loss every rank computes from the result.

    `counts[r]` is rank r's number of rows (every rank knows them: the rows are sampled from the global batch);
    ranks with fewer rows are padded for the collective and trimmed after it. Without a process group this
    returns `x`.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return x
    world = dist.get_world_size(group)
    if len(counts) != world or counts[dist.get_rank(group)] != x.shape[0]:
        raise ValueError(f"gather_rows: counts {counts} do not match {world} ranks and {x.shape[0]} local rows")
    return _GatherRows.apply(x, tuple(int(c) for c in counts), group)


def distributed_linear_cka(x: torch.Tensor, y: torch.Tensor, counts: list[int], debiased: bool = False,
                           group=None) -> torch.Tensor:
    """`linear_cka` over the union of every rank's rows (x: this rank's (n_r, d1), y: (n_r, d2)); the same value
    on every rank, and each rank's `x` receives its rows' part of the single-process gradient."""
    return linear_cka(gather_rows(x, counts, group), gather_rows(y, counts, group), debiased=debiased)


def _collective_device(group) -> torch.device:
    """Where a collective's tensors must live: the host for gloo, this rank's GPU for NCCL."""
    if dist.get_backend(group) == "gloo":
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


@torch.no_grad()
def all_reduce_accumulator_(acc: CKAAccumulator, group=None) -> CKAAccumulator:
    """In place, on every rank: `acc` becomes the accumulator of every rank's minibatches, the one a single
    process that saw all of them holds (up to float64 summation order). A sharded evaluation scores whole
    minibatches per rank, so the debiased estimator's per-minibatch terms are those of one process too.

    The sufficient statistics are summed (an evaluation sees thousands of tokens per layer, not one micro-batch
    of rows, so here the d² sums cost less to send than the rows). Each rank's sums are first moved onto one
    shift, the lowest rank's with rows (rank 0's first minibatch: the shift one process takes):
    Σ(x−b) = Σ(x−a) + nδ and Σ(y−b)(x−b)ᵀ = Σ(y−a)(x−a)ᵀ + Σ(y−a)δxᵀ + δy Σ(x−a)ᵀ + n δy δxᵀ, δ = a − b.
    A rank that saw no rows contributes zeros. Without a process group this returns `acc` unchanged."""
    if not (dist.is_available() and dist.is_initialized()):
        return acc
    seen: list = [None] * dist.get_world_size(group)
    dims = (acc._sums["x"].numel(), acc._sums["y"].numel()) if acc._shift is not None else None
    dist.all_gather_object(seen, dims, group=group)
    owner = next((r for r, d in enumerate(seen) if d is not None), None)
    if owner is None:
        return acc
    d1, d2 = seen[owner]
    device = _collective_device(group)
    z = dict(dtype=torch.float64, device=device)
    shift = torch.cat(acc._shift).to(device) if dist.get_rank(group) == owner else torch.zeros(d1 + d2, **z)
    dist.broadcast(shift, group_src=owner, group=group)
    bx, by = shift[:d1], shift[d1:]
    if acc._shift is None:
        x, y = torch.zeros(d1, **z), torch.zeros(d2, **z)
        xx, yy, yx = torch.zeros(d1, d1, **z), torch.zeros(d2, d2, **z), torch.zeros(d2, d1, **z)
    else:
        s, n = {k: v.to(device) for k, v in acc._sums.items()}, acc.n
        dx, dy = acc._shift[0].to(device) - bx, acc._shift[1].to(device) - by
        x, y = s["x"] + n * dx, s["y"] + n * dy
        xx = s["xx"] + torch.outer(s["x"], dx) + torch.outer(dx, s["x"]) + n * torch.outer(dx, dx)
        yy = s["yy"] + torch.outer(s["y"], dy) + torch.outer(dy, s["y"]) + n * torch.outer(dy, dy)
        yx = s["yx"] + torch.outer(s["y"], dx) + torch.outer(dy, s["x"]) + n * torch.outer(dy, dx)
    counts = torch.tensor([acc.n, acc.batches], **z)
    flat = torch.cat([x, y, xx.flatten(), yy.flatten(), yx.flatten(), acc._hsic.to(device), counts])
    dist.all_reduce(flat, group=group)
    parts = flat.split([d1, d2, d1 * d1, d2 * d2, d2 * d1, 3, 2])
    home = acc._sums["x"].device if acc._shift is not None else device
    acc._shift = (bx.to(home), by.to(home))
    acc._sums = {"x": parts[0].to(home), "y": parts[1].to(home), "xx": parts[2].view(d1, d1).to(home),
                 "yy": parts[3].view(d2, d2).to(home), "yx": parts[4].view(d2, d1).to(home)}
    acc._hsic = parts[5].cpu()
    acc.n, acc.batches = int(parts[6][0]), int(parts[6][1])
    return acc
