"""A bootstrap interval over sequences for a layer's linear CKA, exact for every resample.

Tokens of one sequence are not independent, so the resampling unit is the sequence: a resample draws B of
the B held-out sequences with replacement, i.e. gives sequence a a count w_a. With per-sequence sums
s_a = Σx, t_a = Σy, n_a and cross-products M_a = XᵀY, the centred cross-covariance of a resample is
C = Σ w_a M_a − (Σ w_a s_a)(Σ w_b t_b)ᵀ / Σ w_a n_a, so

    ‖C‖² = wᵀPw − 2/N · Σ_abc w_a w_b w_c T_abc + (wᵀGˣw)(wᵀGʸw)/N²,

with P_ab = ⟨M_a, M_b⟩, T_abc = s_bᵀ M_a t_c and G the Gram matrices of the s (and t). Those B×B(×B) arrays
are computed once per layer from the stored features; every resample is then a few small contractions,
so 1000 resamples cost less than one pass over the features. The interval is cka ± z·(the resamples' std)
(see `bootstrap_interval` for why not their percentiles). The same formula with all w = 1 is the
full-data biased CKA (what `cka.CKAAccumulator.biased` computes).

Features are kept per row as float16 of the row divided by its max-abs (the scale in float32): no overflow
on massive activations, relative error ~5e-4 per element, far below the intervals' width.
"""

from __future__ import annotations

import math

import torch

DEFAULT_RESAMPLES = 1000
CONFIDENCE = 0.95


class SequenceFeatures:
    """Rows of one model's layer, with the held-out sequence each row belongs to."""

    def __init__(self, dtype: torch.dtype = torch.float16) -> None:
        self.dtype = dtype
        self._rows: list[torch.Tensor] = []
        self._scales: list[torch.Tensor] = []
        self._seq: list[torch.Tensor] = []

    def add(self, rows: torch.Tensor, sequence: torch.Tensor) -> None:
        """rows (n, d) and their sequence ids (n,), any device."""
        rows = rows.detach().float().cpu()
        if self.dtype == torch.float16:
            scale = rows.abs().amax(1, keepdim=True).clamp_min(1e-30)
            self._rows.append((rows / scale).half())
            self._scales.append(scale)
        else:
            self._rows.append(rows.to(self.dtype))
            self._scales.append(torch.ones(rows.shape[0], 1))
        self._seq.append(sequence.detach().cpu().long())

    def matrix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows as float64 (N, d), sequence ids (N,))."""
        x = torch.cat(self._rows).double() * torch.cat(self._scales).double()
        return x, torch.cat(self._seq)


class _Side:
    """Per-sequence statistics of one side (x or y) of the pairs, centred on the full-data mean."""

    def __init__(self, x: torch.Tensor, seq: torch.Tensor, sequences: torch.Tensor) -> None:
        self.x = x - x.mean(0)  # CKA is shift invariant; the shift keeps the centring terms small
        self.index = torch.searchsorted(sequences, seq)
        self.sums = torch.zeros(len(sequences), x.shape[1], dtype=torch.float64).index_add_(0, self.index, self.x)
        self.gram = self.sums @ self.sums.T


def _pair_terms(a: _Side, b: _Side, n_seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """P (B, B) and T (B, B, B) of the cross-products XᵀY per sequence."""
    m = torch.zeros(n_seq, a.x.shape[1], b.x.shape[1], dtype=torch.float64)
    for s in range(n_seq):
        rows = a.index == s
        m[s] = a.x[rows].T @ b.x[rows]
    flat = m.reshape(n_seq, -1)
    p = flat @ flat.T
    t = torch.einsum("bi,aij,cj->abc", a.sums, m, b.sums)
    return p, t


def _hsic(p: torch.Tensor, t: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor, w: torch.Tensor,
          n: torch.Tensor) -> torch.Tensor:
    """‖centred cross-covariance‖² for each row of weights w (R, B); n (R,) the weighted row counts."""
    quad = torch.einsum("ra,ab,rb->r", w, p, w)
    n_seq = w.shape[1]  # Σ_abc w_a w_b w_c T_abc as two matrix products (einsum's own path is ~40x slower)
    u = (t.reshape(n_seq * n_seq, n_seq) @ w.T).T.reshape(-1, n_seq, n_seq)
    cross = ((u @ w.unsqueeze(2)).squeeze(2) * w).sum(1)
    s1 = torch.einsum("ra,ab,rb->r", w, g1, w)
    s2 = torch.einsum("ra,ab,rb->r", w, g2, w)
    return quad - 2.0 * cross / n + s1 * s2 / n**2


def weighted_cka(x: torch.Tensor, x_seq: torch.Tensor, y: torch.Tensor, y_seq: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
    """Biased linear CKA of paired rows x (N, d1), y (N, d2) for each row of `weights` (R, B): sequence b of
    the sorted unique ids counted weights[r, b] times. Rows must be paired and carry the same ids."""
    if not torch.equal(x_seq, y_seq):
        raise ValueError("x and y rows must belong to the same sequences, in the same order")
    sequences = torch.unique(x_seq)
    sx, sy = _Side(x.double(), x_seq, sequences), _Side(y.double(), y_seq, sequences)
    n_seq = len(sequences)
    counts = torch.bincount(sx.index, minlength=n_seq).double()
    w = weights.double()
    n = w @ counts
    p_xy, t_xy = _pair_terms(sx, sy, n_seq)
    p_xx, t_xx = _pair_terms(sx, sx, n_seq)
    p_yy, t_yy = _pair_terms(sy, sy, n_seq)
    xy = _hsic(p_xy, t_xy, sx.gram, sy.gram, w, n)
    xx = _hsic(p_xx, t_xx, sx.gram, sx.gram, w, n)
    yy = _hsic(p_yy, t_yy, sy.gram, sy.gram, w, n)
    return xy / torch.sqrt(xx.clamp_min(0) * yy.clamp_min(0))


def resample_weights(n_seq: int, resamples: int, seed: int = 0) -> torch.Tensor:
    """(resamples, n_seq) counts of sequences drawn with replacement (each row sums to n_seq)."""
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(n_seq, (resamples, n_seq), generator=gen)
    return torch.zeros(resamples, n_seq, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(resamples, n_seq, dtype=torch.float64))


def bootstrap_interval(x: SequenceFeatures, y: SequenceFeatures, resamples: int = DEFAULT_RESAMPLES,
                       confidence: float = CONFIDENCE, seed: int = 0) -> dict:
    """`{cka (full data, from the stored rows), low, high, std (of the resamples), bias, sequences, resamples}`
    for one layer pair.

    The interval is the normal one around the full-data value, cka ± z·std. Biased CKA rises as the number
    of distinct samples falls, and a resample holds only ~63% distinct sequences, so the resamples sit above
    the full-data value (`bias`: their mean minus it, reported) and a percentile interval can miss the very
    estimate it should bracket (two random tiny models: all 300 resamples above it). Subtracting `bias`
    over-corrects at small samples (it excluded the estimate on the tiny models). Compared methods share the
    held-out tokens, hence the bias; the spread is what separates them. In simulation (sequences of 20
    correlated tokens, CKA 0.80) this interval covered the population CKA in 82% of 16-sequence and 88% of
    32-sequence samples (nominal 95%: the estimator's own small-sample bias)."""
    xm, xs = x.matrix()
    ym, ys = y.matrix()
    n_seq = len(torch.unique(xs))
    resamples = resamples if n_seq >= 2 else 0
    # Row 0: every sequence once (the full data); then the resamples, all from one set of per-sequence terms.
    weights = torch.cat([torch.ones(1, n_seq, dtype=torch.float64), resample_weights(n_seq, resamples, seed)])
    both = weighted_cka(xm, xs, ym, ys, weights)
    full, values = both[0], both[1:]
    if resamples < 1:
        return {"cka": float(full), "low": math.nan, "high": math.nan, "std": math.nan, "bias": math.nan,
                "sequences": n_seq, "resamples": 0}
    std = float(values.std())
    half = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.5 + confidence / 2))) * std
    return {"cka": float(full), "low": float(full) - half, "high": float(full) + half, "std": std,
            "bias": float(values.mean() - full), "sequences": n_seq, "resamples": resamples}
