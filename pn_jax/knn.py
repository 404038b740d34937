"""Exact Euclidean k-nearest-neighbour search against the memory bank (SPEC 2.5).

(Over 450 lines on purpose: every search path and the rounding bounds that prove it are one
idea, read together; splitting the bounds from the paths they guard would hide why each path
is exact.)

What "exact" means. The distance of record is d(q, b) = sqrt(sum((q - b)^2)) in float32,
from the residuals (`exact_distances`: no cancellation error). The k neighbours are the k
smallest (d, index) pairs: exact ties go to the lower bank index. d is a per-row computation:
a pair gets the same bits whatever the shape of the call (tested on XLA:CPU), so every path
below returns these indices and these distances, bit for bit, and proves it per query:

* Dense (`knn`, `knn_indexed`). One matmul per bank block ranks the bank by the
  expanded form T = |b|^2 - 2 q.b (= d^2 - |q|^2) and keeps the n_refine + 1 smallest; the
  n_refine best get residual distances. No entry outside the refined ones can beat the k-th
  refined distance when
      d_(k) < (1 - delta) * sqrt(S_(n_refine + 1) - err),    S = |q|^2 + T,
  (delta bounds the residual distance's own rounding). Queries without that proof (ties
  spread over more than n_refine entries; none in 40k ELPV queries) get a residual brute
  force over the whole bank. The bound is derived under "The bounds" below.
* Dense, bfloat16 ranking (`low_indices`; `prepare_bank(low=True)`, the default on CPUs with
  native bf16 dot products: `pn_jax.hardware`). The same, with the ranking matmul on
  bf16(q - mean) and bf16(b - mean) (float32 accumulation, the norms in three bf16 pieces):
  twice the float32 rate on AVX512-BF16. It refines n_refine_low(k) entries, and the few
  unproven queries take the float32 dense path in compacted chunks. Its bound assumes IEEE
  float32 accumulation of exact bf16 products, which holds on XLA:CPU; GPU tensor cores and
  TPU MXUs accumulate differently (an H200 returned a wrong neighbour set), so it is refused
  on every other backend.

The bounds. U = 2^-24 is float32's unit roundoff (round to nearest); gamma_n = n U / (1 - n U)
bounds the relative error of a float32 sum of n products in any order (Higham, Thm 3.1);
`_gamma(n)` is 1.05 (n + 8) U: the 1.05 covers 1 / (1 - n U) and the +8 absorbs the handful
of single roundings around each sum (one or two U each; named where they occur).

* Float32 dense path. Three float32 quantities meet in S:
    - the stored norm column sq_b = fl(|b|^2), within gamma_D |b|^2 (`augment_rows`);
    - T = fl(sq_b * 1 + sum_i q_i (-2 b_i)), a dot of length D + 1 (-2 b is exact and the
      zero columns add exact zeros), within gamma_(D+1) (sq_b + 2 |q||b|) of sq_b - 2 q.b;
    - |q|^2 = fl(sum q_i^2), within gamma_D |q|^2.
  Adding them, |S - d^2| <= g (1 + g) ((|q| + |b|)^2 + |q|^2 + |b|^2) <= 2 g (1 + g) (|q| + |b|)^2
  with g = gamma_(D + AUG), so with B >= max |b| (`max_norm_bound`, which rounds upwards)
      err = (2 g + 4 U) (|q| + B)^2,
  where 4 U (|q| + B)^2 covers the float32 evaluation of |q|^2 + t - err itself (each of its
  two roundings is at most U (|q| + B)^2, and 2 g (1 + g) <= 2 g + U). The sqrt and the
  products of the final comparison are covered by its (1 - 8 U) factor.
* Residual distance (`_delta`): r = fl(q - b) errs by U |q_i - b_i| per coordinate, the dot of
  length D by gamma_D, the sqrt by U: |d_hat - d| <= (D / 2 + 2) U d / (1 - ...) <= delta d.
* bfloat16 ranking. x = q - mean and y = b - mean are formed in float32 (xf, yf: U |x_i| per
  coordinate) and rounded to bfloat16 (xl, yl). bfloat16 keeps 8 significant bits, so round
  to nearest errs by at most 2^-8 of the value (1 + 2^-8 is the midpoint between 1 and the next
  bf16 number 1 + 2^-7); below bf16's normal range (2^-126) it errs by at most 2^-126 absolute
  (whether or not subnormals are flushed). Hence
      |(xl - yl) - (q - b)| <= EPS_LOW (|xf| + |yf|) + 2 sqrt(D) 2^-126,
  EPS_LOW = 2^-8 + 2^-23 (the 2^-23 = 2 U covers the float32 centring, (1 + U) U <= 2 U).
  The products xl_i yl_i are exact in float32 (8 + 8 significant bits), so the ranking
  matmul T~ = (h + m + l) - 2 xl.yl errs as a float32 dot of length D + 3, and the three bf16
  pieces h + m + l equal fl(|yl|^2) to within U |yl|^2 (the last piece's rounding). As above,
  S~ = |xl|^2 + T~ is within err = 2 g (|xl| + |yl|)^2 + g |xl|^2 of |xl - yl|^2, and
      d(q, b) >= sqrt(S~ - err) - EPS_LOW (|xf| + max |yf|) - 2 sqrt(D) 2^-126.

Tests (tests/test_knn.py) build inputs at these edges: coordinates just above bf16 rounding
midpoints against bf16-exact decoys (a bound of 2^-9 is fooled there), near-ties far from the
origin where the norm column's rounding exceeds the gaps, and exact ties; every path is
compared with a float64 brute force.

Leave-one-image-out (`knn_excluding`): excluded rows rank by T = +inf (an infinite norm column
in a table built per call; + inf added to T for a prepared bank, `excluded_penalty`, the same
values), so they rank last on every path and the proofs hold unchanged.

Measured CPU choices (XLA:CPU, 2 cores, Q = 1024, M = 7000, D = 1024):
* The bank is stored augmented, [-2b, |b|^2, 0...] (exact: -2b only shifts the exponent),
  and the query as [q, 1, 0...], so the matmul itself returns T. With a separate
  `|b|^2 - 2 q.b` epilogue, XLA:CPU adds one or two unfused passes over [Q, M] (20-60 ms
  under load, as much as half the matmul).
* The n smallest of a row come from `smallest` (groups of GROUP entries): XLA:CPU's
  top_k over [1024, 7000] takes 15-25 ms; `smallest` 5-9 ms.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST  # float32 products on every backend (no TF32/bf16 passes)
GROUP = 32                           # entries per group in `smallest` (fastest on CPU, measured)
AUG = 8                              # extra columns of an augmented matrix: [x, norm^2, 0 x 7]
U32 = 2.0 ** -24                     # float32 unit roundoff


def _gamma(n: int) -> float:
    """Worst-case relative error of a float32 sum of n products, any order (Higham's gamma_n),
    with slack for the few roundings around it."""
    return 1.05 * (n + 8) * U32


def _delta(d: int) -> float:
    """|d_hat - d| <= delta * d for the residual distance d_hat over d dimensions."""
    return 1.05 * ((d + 3) / 2 + 2) * U32


def n_refine(k: int) -> int:
    """Entries per query that get a residual distance before the proof: k and a margin for
    near-ties at the k-th rank (k + 3: no unproven query in 40,960 ELPV queries for k = 1, 3,
    9 and banks of 2000 and 7000; k + 1 leaves up to 0.2%)."""
    return k + 3


def n_refine_low(k: int) -> int:
    """n_refine for the bfloat16 ranking, whose bound is ~20x looser: 2k + 6. ELPV test features
    (efficientnet_lite0, 8 images x 1024 queries, greedy-coreset banks of 2000 and 7000; AMD
    EPYC with avx512_bf16) proven by the bf16 bound at k = 1 / 9: 99.5-99.7% / 97.6-99.4% with
    the earlier k + 3 + k // 2 (4 / 16), 100% / 100% with 2k + 6 (8 / 24); the rest take the
    float32 chunks, so this only trades refinement gathers against fallback searches."""
    return 2 * k + 6


# Relative error of one coordinate of bf16(fl(q - mean)) against q - mean: bfloat16 rounds to
# nearest with 8 significant bits (2^-8), after a float32 subtraction (2 U; module docstring).
EPS_LOW = 2.0 ** -8 + 2.0 ** -23
# Absolute error of a coordinate below bfloat16's (= float32's) normal range, flushed or not.
TINY_LOW = 2.0 ** -126
LOW = jnp.bfloat16


def default_low(backend: str | None = None) -> bool:
    """Rank in bfloat16 by default? Only on a CPU with native bf16 dot products
    (`pn_jax.hardware.knn_ranking`, where the choice and its reason are recorded)."""
    from pn_jax import hardware
    return hardware.knn_ranking(backend)["bfloat16"]


def check_low(backend: str | None = None):
    """Refuse the bfloat16 ranking where its bound does not hold (every backend but the CPU)."""
    backend = backend or jax.default_backend()
    if backend != "cpu":
        raise ValueError(
            f"the bfloat16 k-NN ranking (low=True) is proven only for XLA:CPU's float32 "
            f"accumulation of bf16 products; {backend} accumulates differently (tensor cores / "
            f"MXU), so it is refused there: use low=False (the exact float32 search)")


def _check_k(k: int, m: int):
    if k > m:
        raise ValueError(f"k={k} nearest neighbours requested but the memory bank has only {m} entries")


# ----------------------------------------------------------------------------- pieces
def augment_rows(x: jax.Array, excluded: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """x [M, D] -> ([-2x, |x|^2, 0 ...] padded with rows [0, +inf, 0 ...] to a multiple of
    GROUP rows: [Mp, D + AUG] float32, and |x|^2 [M]). One pad of -2x (fused) and an
    in-place column write: a concatenate costs ~3x more on XLA:CPU. `excluded` [M] bool: those
    rows get +inf in the norm column too, so every query ranks them last (as pads)."""
    x = x.astype(jnp.float32)
    m, d = x.shape
    sq = jnp.sum(x * x, axis=-1)
    pad = -m % GROUP
    aug = jnp.pad(-2.0 * x, ((0, pad), (0, AUG)))
    col = sq if excluded is None else jnp.where(excluded, jnp.inf, sq)
    col = jnp.pad(col, (0, pad), constant_values=jnp.inf)
    return aug.at[:, d].set(col), sq


def _augment_queries(q: jax.Array, ones: int = 1) -> jax.Array:
    return jnp.pad(q, ((0, 0), (0, AUG))).at[:, q.shape[1]:q.shape[1] + ones].set(1.0)


class LowBank(NamedTuple):
    """The bank for the bfloat16 ranking (`low_indices`): y~ = bf16(b - mean) stored as
    [-2y~, h, m, l, 0 ...] (bf16 [Mp, D + AUG]) where h + m + l = |y~|^2 to float32 accuracy
    (three bf16 pieces; a single bf16 norm would err by ~|y|^2 / 256), with rows [0, +inf, 0 ...]
    padding to a multiple of GROUP; an excluded row has h = +inf."""
    aug: jax.Array       # [Mp, D + AUG] bfloat16
    mean: jax.Array      # [D] float32
    max_norm: jax.Array  # () >= max |b - mean| (real arithmetic)


def augment_low(bank: jax.Array, mean: jax.Array, excluded: jax.Array | None = None) -> LowBank:
    b = bank.astype(jnp.float32)
    m, d = b.shape
    yf = b - mean
    y = yf.astype(LOW)
    y32 = y.astype(jnp.float32)
    sq = jnp.einsum("md,md->m", y32, y32, precision=HIGHEST)
    hi = sq.astype(LOW)
    mid = (sq - hi.astype(jnp.float32)).astype(LOW)
    lo = (sq - hi.astype(jnp.float32) - mid.astype(jnp.float32)).astype(LOW)
    if excluded is not None:  # T = +inf whatever m and l are
        hi = jnp.where(excluded, jnp.inf, hi)
    pad = -m % GROUP
    cols = jnp.stack([hi, mid, lo], axis=1)
    cols = jnp.pad(cols, ((0, pad), (0, AUG - 3)))
    cols = cols.at[m:, 0].set(jnp.inf)
    aug = jnp.concatenate([jnp.pad(-2 * y, ((0, pad), (0, 0))), cols], axis=1)
    y_sq = jnp.einsum("md,md->m", yf, yf, precision=HIGHEST)
    return LowBank(aug, mean.astype(jnp.float32), max_norm_bound(y_sq, d) * (1.0 + 4 * U32))


def _top_k(x: jax.Array, n: int, barrier: bool = True):
    """lax.top_k behind an optimisation barrier: XLA:CPU keeps its TopK kernel only while the
    outputs feed plain slices; fused into a consumer (a slice of the values, a transpose of
    the indices) the top_k becomes a full sort (50 ms instead of 2.5 on [1024, 512]).
    barrier=False inside shard_map, where XLA's SPMD partitioner rejects the barrier."""
    out = jax.lax.top_k(x, n)
    return jax.lax.optimization_barrier(out) if barrier else out


def smallest(s: jax.Array, n: int, group: int | None = None, barrier: bool = True) -> tuple[jax.Array, jax.Array]:
    """The n smallest (value, index) pairs of each row of s [Q, m], ascending, ties to the lower
    index (= lax.top_k(-s, n)).

    Why the groups suffice: rank groups by (minimum, group index) and keep the first n. If an
    entry e of the answer sat in a group G that was not kept, each kept group would hold an
    entry <= e's value; n of them plus e make n + 1 entries, so one kept entry x is not in the
    answer: x ties with the n-th answer and has a larger index. But x's group comes before G,
    so x's index is below e's, and x ties e: x is in the answer. Contradiction.
    """
    q, m = s.shape
    group = group or GROUP
    n_groups = -(-m // group)
    if n_groups <= 2 * n or n_groups < 8:
        neg, idx = _top_k(-s, n, barrier)
        return -neg, idx.astype(jnp.int32)
    if n_groups * group != m:
        # Materialised: a pad fused into the gather below makes it ~4x slower on the CPU.
        s = jnp.pad(s, ((0, 0), (0, n_groups * group - m)), constant_values=jnp.inf)
        s = jax.lax.optimization_barrier(s) if barrier else s
    s3 = s.reshape(q, n_groups, group)
    _, gid = _top_k(-jnp.min(s3, axis=2), n, barrier)
    gid = jnp.sort(gid, axis=1)  # kept groups in index order: flat position order = index order
    vals = jnp.take_along_axis(s3, gid[:, :, None], axis=1).reshape(q, n * group)
    neg, pos = _top_k(-vals, n, barrier)
    idx = jnp.take_along_axis(gid, pos // group, axis=1) * group + pos % group
    return -neg, idx.astype(jnp.int32)


def _block_bounds(m: int, block: int) -> list[tuple[int, int]]:
    """Near-equal blocks of at most `block` rows (multiples of GROUP but for the last)."""
    nb = max(1, -(-m // max(block, GROUP)))
    size = min(m, -(-(-(-m // nb)) // GROUP) * GROUP)
    return [(s, min(s + size, m)) for s in range(0, m, size)]


def ranked_candidates(q: jax.Array, aug: jax.Array, n: int, block: int, barrier: bool = True,
                      penalty: jax.Array | None = None):
    """The n smallest T = |b|^2 - 2 q.b (the expanded squared distance less the query's |q|^2)
    over an augmented bank [Mp, D + AUG] (`augment_rows`), in blocks of at most `block` rows:
    (T [Q, n] ascending, idx [Q, n]); ties -> lower index. `penalty` [Mp] (0 or +inf) is added
    to every query's T: +inf for excluded rows, as an infinite norm column would give, and
    T + 0 = T for the rest, without a copy of the table per excluded set."""
    qa = _augment_queries(q, 1 if aug.dtype == jnp.float32 else 3).astype(aug.dtype)
    vals, idxs = [], []
    for s0, s1 in _block_bounds(aug.shape[0], block):
        # dot_general on the stored [rows, D] layout: jnp.matmul(qa, aug.T) materialises the
        # transpose for bf16 on XLA:CPU (38 vs 17 ms at [1024, 1032] x [6784, 1032]).
        t = jax.lax.dot_general(qa, aug[s0:s1], (((1,), (1,)), ((), ())), precision=HIGHEST,
                                preferred_element_type=jnp.float32)
        if penalty is not None:
            t = t + penalty[None, s0:s1]
        v, i = smallest(t, min(n, s1 - s0), barrier=barrier)
        vals.append(v)
        idxs.append(i + s0)
    if len(vals) == 1:
        return vals[0], idxs[0]
    # Blocks in index order, each ascending with ties by index: ties -> lower index.
    neg, pos = _top_k(-jnp.concatenate(vals, -1), n, barrier)
    return -neg, jnp.take_along_axis(jnp.concatenate(idxs, -1), pos, -1)


def exact_distances(queries: jax.Array, bank: jax.Array, idx: jax.Array, inv_scale=None) -> jax.Array:
    """||q - bank[idx]|| computed from the residuals. queries [Q,D], idx [Q,k] -> [Q,k].
    With `inv_scale` [D]: the whitened distance ||(q - bank[idx]) * inv_scale||.

    One neighbour rank at a time: XLA's CPU gather of a [Q,k,D] block is ~7x slower than k
    gathers of [Q,D] (measured at Q=1024, k=9, D=1024). The row sums are dot products: ~30%
    faster on the CPU than a reduce, and the same bits (tested)."""
    q = queries.astype(jnp.float32)

    def one_rank(i):
        r = q - jnp.take(bank, i, axis=0).astype(jnp.float32)
        if inv_scale is not None:
            r = r * inv_scale
        return jnp.sqrt(jnp.einsum("qd,qd->q", r, r, precision=HIGHEST))

    return jax.lax.map(one_rank, idx.T).T


def _first_k(d: jax.Array, idx: jax.Array, k: int):
    """The k smallest (d, idx) pairs of short [Q, n] candidate lists (distinct indices, any
    order), sorted. By pairwise ranks: XLA's CPU sort costs ~10x more for these shapes."""
    before = (d[:, None, :] < d[:, :, None]) | ((d[:, None, :] == d[:, :, None]) & (idx[:, None, :] < idx[:, :, None]))
    rank = jnp.sum(before, axis=2)                               # [Q, n] place of entry j
    hit = rank[:, :, None] == jnp.arange(k)[None, None, :]       # [Q, n, k]
    return (jnp.sum(jnp.where(hit, d[:, :, None], 0.0), axis=1),
            jnp.sum(jnp.where(hit, idx[:, :, None], 0), axis=1))


def _bruteforce_rows(q, bank, idx, ok, k, excluded=None, barrier: bool = True):
    """Residual brute force for the rows with ok == False, one query at a time (rare)."""
    rows = jnp.nonzero(~ok, size=ok.shape[0], fill_value=0)[0]

    def body(c):
        t, idx = c
        r = bank.astype(jnp.float32) - q[rows[t]]
        d = jnp.sqrt(jnp.einsum("md,md->m", r, r, precision=HIGHEST))  # = exact_distances
        if excluded is not None:
            d = jnp.where(excluded, jnp.inf, d)
        _, j = _top_k(-d, k, barrier)  # ties -> lower index
        return t + 1, idx.at[rows[t]].set(j.astype(idx.dtype))

    return jax.lax.while_loop(lambda c: c[0] < jnp.sum(~ok), body, (jnp.int32(0), idx))[1]


def dense_indices(q: jax.Array, bank: jax.Array, aug: jax.Array, max_norm: jax.Array,
                  k: int, block: int, excluded: jax.Array | None = None, dist_from=None,
                  barrier: bool = True, penalty: jax.Array | None = None):
    """Exact k-NN indices by the dense path: (idx [Q, k], proven [Q], refined distances
    [Q, k]); `proven` marks the queries settled by the expanded-form bound (the others went
    through the brute force), and for them the refined distances are those of record, sorted.

    q [Q, D] float32 (no gradient); aug = augment_rows(bank, excluded)[0]; max_norm >= max |b|.
    `excluded` [M] bool: rows no query may return (their T is +inf: in `aug`, or by `penalty`,
    `excluded_penalty`, with `aug` = augment_rows(bank)[0]). `dist_from`:
    the (queries, bank) the refined distances are computed from (to differentiate them).
    barrier=False inside shard_map (see `_top_k`)."""
    m, d = bank.shape
    nr = min(n_refine(k), m)
    t, cand = ranked_candidates(q, aug, min(nr + 1, m), block, barrier, penalty)
    dk, idx = _refined(q, bank, t, cand, nr, k, excluded, dist_from)
    if nr == m:
        return idx, jnp.ones(q.shape[:1], bool), dk
    # Every entry outside the refined ones has S = |q|^2 + T >= |q|^2 + t_(nr+1), and its
    # true d^2 >= S - err (err also covers the rounding of the sum below). t_(nr+1) is the
    # largest of the nr + 1 candidates: a max, since slicing top_k's values makes XLA:CPU
    # replace the top_k by a full sort (50 ms on [1024, 512]).
    ok = dk[:, k - 1] < (1.0 - _delta(d)) * dense_lower_bound(q, jnp.max(t, axis=1), max_norm)
    return _bruteforce_rows(q, bank, idx, ok, k, excluded, barrier), ok, dk


def dense_lower_bound(q: jax.Array, t: jax.Array, max_norm: jax.Array) -> jax.Array:
    """A lower bound on d(q, b) for every bank row b whose float32 ranking value T (`aug`'s
    matmul) is >= t: sqrt(|q|^2 + t - err) (module docstring, "The bounds"). q [Q, D], t [Q]
    or [Q, n] (one bound per entry)."""
    d = q.shape[-1]
    q_sq = jnp.sum(q * q, -1)
    if t.ndim == 2:
        q_sq = q_sq[:, None]
    err = _expanded_err(d, jnp.sqrt(q_sq) * (1.0 + _gamma(d)), max_norm)
    return jnp.sqrt(jnp.maximum(q_sq + t - err, 0.0)) * (1.0 - 8 * U32)


def low_lower_bound(xf: jax.Array, t: jax.Array, low: LowBank) -> jax.Array:
    """A lower bound on d(q, b) for every bank row b whose bfloat16 ranking value T~ is >= t;
    xf = q - low.mean in float32 [Q, D], t [Q] or [Q, n] (module docstring, "The bounds")."""
    d = xf.shape[-1]
    x32 = xf.astype(LOW).astype(jnp.float32)
    xl_sq = jnp.einsum("qd,qd->q", x32, x32, precision=HIGHEST)
    x_norm = jnp.sqrt(jnp.einsum("qd,qd->q", xf, xf, precision=HIGHEST)) * (1.0 + _gamma(d)) * (1.0 + 4 * U32)
    if t.ndim == 2:
        xl_sq, x_norm = xl_sq[:, None], x_norm[:, None]
    yl_max = low.max_norm * (1.0 + EPS_LOW)
    g = _gamma(d + AUG)
    err = 2.0 * g * (jnp.sqrt(xl_sq) * (1.0 + g) + yl_max) ** 2 + g * xl_sq
    tiny = 2.0 * math.sqrt(d) * TINY_LOW
    return (jnp.sqrt(jnp.maximum(xl_sq + t - err, 0.0)) * (1.0 - 8 * U32)
            - (EPS_LOW * (x_norm + low.max_norm) + tiny) * (1.0 + 8 * U32))


def low_indices(q: jax.Array, bank: jax.Array, low: LowBank, k: int, block: int,
                aug: jax.Array, max_norm: jax.Array, excluded: jax.Array | None = None,
                chunk: int = 64, dist_from=None, penalty: jax.Array | None = None):
    """Exact k-NN indices with the ranking matmul in bfloat16: (idx [Q, k], proven [Q],
    refined distances [Q, k]) as `dense_indices`; `proven` marks the queries settled by the
    bf16 bound, the others took `dense_indices` (float32, `aug`/`max_norm` as there) in
    compacted chunks.

    The bound (module docstring, "The bounds"). With xf = fl(q - mean), yf = fl(b - mean) and
    their bf16 roundings x~, y~, d(q, b) >= |x~ - y~| - EPS_LOW (|xf| + |yf|) - 2 sqrt(D) TINY_LOW.
    The matmul returns T~ = |y~|^2 - 2 x~.y~ with products exact in float32 and a float32 sum,
    so S = |x~|^2 + T~ is within err = 2 g (|x~| + |y~|)^2 + g |x~|^2 of |x~ - y~|^2. Every entry
    outside the n_refine_low(k) refined ones has T~ >= t_out (the largest of the n + 1 kept), so
        d >= LB = sqrt(|x~|^2 + t_out - err) - EPS_LOW (|xf| + max |yf|) - 2 sqrt(D) TINY_LOW,
    and d_(k) < (1 - delta) LB proves the k refined ones are the answer (delta: the residual
    distance's own rounding, as in the float32 path). `dist_from` as in `dense_indices`."""
    m, d = bank.shape
    nr = min(n_refine_low(k), m)
    xf = q - low.mean
    xl = xf.astype(LOW)
    t, cand = ranked_candidates(xl, low.aug, min(nr + 1, m), block, penalty=penalty)
    dk, idx = _refined(q, bank, t, cand, nr, k, excluded, dist_from)
    if nr == m:
        return idx, jnp.ones(q.shape[:1], bool), dk
    lb = low_lower_bound(xf, jnp.max(t, axis=1), low)
    ok = dk[:, k - 1] < (1.0 - _delta(d)) * lb * (1.0 - 8 * U32)
    return _dense_rows(q, bank, aug, max_norm, idx, ok, k, block, excluded, chunk, penalty), ok, dk


def _refined(q, bank, t, cand, nr, k, excluded, dist_from):
    """The k smallest (residual distance, index) of the first nr candidates, sorted."""
    qd, bd = dist_from if dist_from is not None else (q, bank)
    dc = exact_distances(qd, bd, cand[:, :nr])
    if excluded is not None:  # fewer than nr rows left: excluded rows (T = +inf) reach the list
        dc = jnp.where(jnp.isinf(t[:, :nr]), jnp.inf, dc)
    return _first_k(dc, cand[:, :nr], k)


def settle(queries, bank, found, chunk: int = 64):
    """(distances of record, indices) from a search's (idx, proven, refined distances): the
    refined distances of the proven queries (no second gather of their k rows), `_finish` for
    the others (the few that took a fallback: compacted, `chunk` at a time; all of them when
    more). Differentiable."""
    idx, ok, dk = found
    n_q = idx.shape[0]
    chunk = min(chunk, n_q)
    n_bad = jnp.sum(~ok)

    def few():
        rows = jnp.nonzero(~ok, size=chunk, fill_value=n_q)[0]  # fill: dropped by the scatter
        d_r, i_r = _finish(queries[jnp.minimum(rows, n_q - 1)], bank, idx[jnp.minimum(rows, n_q - 1)])
        return dk.at[rows].set(d_r, mode="drop"), idx.at[rows].set(i_r, mode="drop")

    return jax.lax.cond(n_bad == 0, lambda: (dk, idx),
                        lambda: jax.lax.cond(n_bad <= chunk, few, lambda: _finish(queries, bank, idx)))


def _dense_rows(q, bank, aug, max_norm, idx, ok, k, block, excluded, chunk, penalty=None):
    """`dense_indices` for the rows with ok == False, `chunk` rows at a time (compacted)."""
    n_q = q.shape[0]
    chunk = min(chunk, n_q)
    rows = jnp.nonzero(~ok, size=n_q + chunk, fill_value=n_q)[0]

    def body(c):
        t, idx = c
        r = jax.lax.dynamic_slice_in_dim(rows, t, chunk)
        got = dense_indices(q[jnp.minimum(r, n_q - 1)], bank, aug, max_norm, k, block, excluded,
                            penalty=penalty)[0]
        return t + chunk, idx.at[r].set(got.astype(idx.dtype), mode="drop")

    return jax.lax.while_loop(lambda c: c[0] < jnp.sum(~ok), body, (jnp.int32(0), idx))[1]


def _search(queries, bank, k, block, excluded=None, low=False):
    """(idx [Q, k], proven [Q], refined distances [Q, k]) of the exact search, the bank
    prepared in this call."""
    q = jax.lax.stop_gradient(queries).astype(jnp.float32)
    b = jax.lax.stop_gradient(bank)
    if low:
        check_low()
    aug, sq = augment_rows(b, excluded)
    lb = augment_low(b, jnp.mean(b.astype(jnp.float32), axis=0), excluded) if low else None
    return _dense_search(q, b, aug, max_norm_bound(sq, b.shape[1]), lb, k, block, excluded, (queries, bank))


def _indexed(queries, index: "BankIndex", k, block, excluded=None):
    """`_search` against a prepared bank (dense path; bf16 ranking when the index has it).
    `excluded` rows get +inf added to their ranking values (`excluded_penalty`), not written
    into copies of the stored tables (a copy of both tables per leave-one-image-out image cost
    ~12 ms of a 51 ms search at M = 4,096, D = 1,024 on XLA:CPU, on one core)."""
    q = jax.lax.stop_gradient(queries).astype(jnp.float32)
    ix = jax.tree.map(jax.lax.stop_gradient, index)
    pen = None if excluded is None else excluded_penalty(excluded, ix.aug.shape[0])
    low = ix.low if ix.low.aug.shape[0] else None
    return _dense_search(q, ix.bank, ix.aug, ix.max_norm, low, k, block, excluded, (queries, index.bank), pen)


def excluded_penalty(excluded: jax.Array, rows: int) -> jax.Array:
    """[rows] float32: +inf for excluded rows, 0 for the others and for the pad rows (their
    norm column is +inf already)."""
    return jnp.pad(jnp.where(excluded, jnp.inf, 0.0).astype(jnp.float32), (0, rows - excluded.shape[0]))


def _dense_search(q, bank, aug, max_norm, low: LowBank | None, k, block, excluded, dist_from, penalty=None):
    """The dense search on prepared tables: bf16 ranking when `low` is given, else float32."""
    if low is not None:
        return low_indices(q, bank, low, k, block, aug, max_norm, excluded, dist_from=dist_from, penalty=penalty)
    return dense_indices(q, bank, aug, max_norm, k, block, excluded, dist_from=dist_from, penalty=penalty)


def _finish(queries, bank, idx):
    """Distances of record for the k indices, sorted by (distance, index); differentiable."""
    return _first_k(exact_distances(queries, bank, idx), idx, idx.shape[1])


def max_norm_bound(sq: jax.Array, d: int) -> jax.Array:
    """>= max |b| from float32 squared norms (each within gamma_d of |b|^2): sqrt(1 - g) (1 + g + 4 U)
    (1 - U)^2 >= 1 covers the norms, the sqrt and the product."""
    return jnp.sqrt(jnp.max(sq)) * (1.0 + _gamma(d) + 4 * U32)


def _expanded_err(d: int, q_norm, b_norm):
    """Bound on |S - d^2| for the float32 expanded form S = fl|q|^2 + fl(fl|b|^2 - 2 q.b) in d
    dimensions, q_norm >= |q|, b_norm >= |b| (module docstring, "The bounds")."""
    return (2.0 * _gamma(d + AUG) + 4 * U32) * (q_norm + b_norm) ** 2


# Query rows x bank rows of candidate scores held at once by one search. XLA keeps every bank
# block's [Q, block] scores alive until the blocks are merged: measured on XLA:CPU, Q = 4,096
# against M = 65,536 raised the peak by 1.7 GB, and at 1024 px (Q = 16,384 patches an image)
# a 400-image bank of 65,536 rows took a --max-memory 8 fit to 12 GB. Above this many scores
# the queries are searched in chunks (`lax.map`): each row's search is its own, so the answer
# is the same bits (tested); below it (every run at 256-512 px) nothing changes. The budget is
# shared by the batches the CPU scores at once (`query_budget`).
QUERY_SCORES = 1 << 27


def query_budget() -> int:
    """Candidate scores one search may hold: QUERY_SCORES over the batches searched at once
    (`hardware.cpu_streams`), so two streams hold what one did."""
    from pn_jax import hardware

    return QUERY_SCORES // hardware.cpu_streams()


def query_chunk(q: int, m: int, budget: int | None = None) -> int:
    """Query rows per search chunk: q halved while q x m exceeds `budget` (default
    `query_budget()`; q stays a divisor)."""
    budget = query_budget() if budget is None else budget
    c = q
    while c * m > budget and c % 2 == 0 and c > 256:
        c //= 2
    return c


def by_query_chunks(search: Callable, queries: jax.Array, m: int, budget: int | None = None):
    """search(queries [c, D]) -> pytree of [c, ...], run over chunks of `query_chunk` rows."""
    q = queries.shape[0]
    c = query_chunk(q, m, budget)
    if c == q:
        return search(queries)
    out = jax.lax.map(search, queries.reshape((q // c, c) + queries.shape[1:]))
    return jax.tree.map(lambda x: x.reshape((q,) + x.shape[2:]), out)


@functools.partial(jax.jit, static_argnames=("k", "block", "low"))
def knn(queries: jax.Array, bank: jax.Array, k: int, block: int = 4096, low: bool = False):
    """Exact k-NN: (distances [Q,k] ascending, indices [Q,k]). `block` caps the bank rows per
    matmul ([Q, block] float32 scores are held at once). For repeated searches of one bank,
    `prepare_bank` + `knn_indexed` skip the per-call bank preparation (one pass over it, and
    the bfloat16 ranking where it is faster). `low`: rank in bfloat16 here too (same answer;
    building its table per call costs about as much as the search on XLA:CPU)."""
    _check_k(k, bank.shape[0])
    # Ranking needs no gradient; distances below are differentiable through the gather.
    return by_query_chunks(lambda q: settle(q, bank, _search(q, bank, k, block, low=low)), queries, bank.shape[0])


@functools.partial(jax.jit, static_argnames=("k", "block", "low"))
def knn_excluding(queries: jax.Array, bank, excluded: jax.Array, k: int, block: int = 4096, low: bool = False):
    """Exact k-NN among the bank rows with excluded == False ([M] bool): the same (distances,
    indices into the bank) as `knn` on the bank without those rows. The excluded rows are
    ranked last by an infinite norm, so the search, its proof and its cost are `knn`'s.
    `bank`: an array, or a `BankIndex` (`prepare_bank`, its tables reused; `low` is then the
    index's). Needs at least k rows not excluded (else the last distances are +inf)."""
    rows = bank.bank if isinstance(bank, BankIndex) else bank
    _check_k(k, rows.shape[0])

    def search(q):
        found = (_indexed(q, bank, k, block, excluded) if isinstance(bank, BankIndex)
                 else _search(q, bank, k, block, excluded, low))
        d, idx = settle(q, rows, found)
        return jnp.where(excluded[idx], jnp.inf, d), idx

    return by_query_chunks(search, queries, rows.shape[0])


def knn_batched(features: jax.Array, bank: jax.Array, k: int, block: int = 4096):
    """features [B, N, D] -> (dist [B,N,k], idx [B,N,k])."""
    b, n, d = features.shape
    dist, idx = knn(features.reshape(b * n, d), bank, k=k, block=block)
    return dist.reshape(b, n, k), idx.reshape(b, n, k)


# ----------------------------------------------------------------------------- bank index
class BankIndex(NamedTuple):
    """Per-bank data for `knn_indexed` (a pytree; build it once per bank with `prepare_bank`):
    the dense path's augmented bank and, where the bfloat16 ranking is used, its table. The
    scalars are upper bounds used by the exactness proofs."""
    bank: jax.Array         # [M, D] as given (residual distances)
    aug: jax.Array          # [Mp, D + AUG] augment_rows(bank); Mp = M rounded up to GROUP
    max_norm: jax.Array     # () >= max |b|
    mean: jax.Array         # [D] the bank's mean (the bf16 table's centre)
    low: LowBank            # the bf16 ranking's bank (aug [0, D + AUG] when not used)


@jax.jit
def _bank_tables(bank):
    aug, sq = augment_rows(bank)
    return aug, max_norm_bound(sq, bank.shape[1]), jnp.mean(bank.astype(jnp.float32), axis=0)


_augment_low_jit = jax.jit(augment_low)


def prepare_bank(bank, low: bool | None = None) -> BankIndex:
    """The search index of a bank [M, D], built once per bank. low: rank in bfloat16
    (`low_indices`); None = `default_low()`, chosen by what this machine can do
    (`pn_jax.hardware`). low=True is refused off the CPU (`check_low`).

    (A pruned search by principal-axis lower bounds lived here until issue 24: exact, but
    slower than the dense path on every CPU measured; its figures are in
    docs/bench/bench_knn.json and its code in the git history, commit 1f810c4 and before.)"""
    from pn_jax import ahead

    bank = jnp.asarray(bank)
    d = bank.shape[1]
    ahead.wait(_bank_tables)
    aug, max_norm, mean = _bank_tables(bank)
    use_low = default_low() if low is None else bool(low)
    if use_low:
        check_low()
        ahead.wait(_augment_low_jit)
    lb = (_augment_low_jit(bank, mean) if use_low else
          LowBank(jnp.zeros((0, d + AUG), LOW), mean, jnp.float32(0.0)))
    return BankIndex(bank, aug, max_norm, mean, lb)


def compile_index_ahead(m: int, d: int, low: bool | None = None) -> None:
    """Compile `prepare_bank`'s programs for an [m, d] float32 bank on `pn_jax.ahead`'s thread."""
    from pn_jax import ahead

    bank = jax.ShapeDtypeStruct((m, d), jnp.float32)
    ahead.compile(_bank_tables, (bank,))
    if default_low() if low is None else low:
        ahead.compile(_augment_low_jit, (bank, jax.ShapeDtypeStruct((d,), jnp.float32)))


@functools.partial(jax.jit, static_argnames=("k", "block"))
def knn_indexed(queries: jax.Array, index: BankIndex, k: int, block: int = 8192):
    """Exact k-NN against a prepared bank: the same (distances [Q,k], indices [Q,k]) as
    `knn(queries, index.bank, k)`, bit for bit."""
    _check_k(k, index.bank.shape[0])
    return by_query_chunks(lambda q: settle(q, index.bank, _indexed(q, index, k, block)), queries,
                           index.bank.shape[0])


@functools.partial(jax.jit, static_argnames=("k", "block"))
def search_stats(queries: jax.Array, index: BankIndex, k: int, block: int = 8192) -> dict:
    """Diagnostics of one search (for benchmarks): the fraction of queries settled by the
    float32 bound and, for a bf16 index, by the bf16 bound (the rest take a fallback)."""
    q = queries.astype(jnp.float32)
    out = {"dense_proven": dense_indices(q, index.bank, index.aug, index.max_norm, k, block)[1].mean()}
    if index.low.aug.shape[0]:
        out["low_proven"] = low_indices(q, index.bank, index.low, k, block, index.aug, index.max_norm)[1].mean()
    return out
