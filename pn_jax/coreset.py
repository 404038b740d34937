"""Approximate greedy k-center coreset (PatchCore's ApproximateGreedyCoresetSampler).

1. Project features to `proj_dim` with a random Gaussian matrix (explicit key).
2. Pick `n_starts` random points; the min-distance vector starts as each point's mean
   distance to them (the starts themselves are not selected).
3. `n_select` times: take the argmax of the min-distance vector, then lower the vector with
   the distances to the new centre.

Step 3 is the whole cost. Done literally, each step reads all N projected points ([N, 128]
float32, ~360 MB for 700k points) for one matrix-vector product. Two exact reformulations
select exactly the same points (same argmax, same tie rule, same distance formula):

* *Deferred batches* (`greedy_select`, the default). Take the `n_batch` points with the
  largest min-distance. Every other point's min-distance is <= the (n_batch+1)-th value
  `bound`, and min-distances only fall, so while the largest candidate min-distance stays
  above `bound` the argmax is a candidate: the steps run on the candidates alone (their
  [C, C] distances), O(C) work per step. When the argmax may leave the batch, the batch's
  selected centres are applied to all N points in one pass: a matmul against the selected
  rows and a min over them, chunk by chunk so the [chunk, C] block stays in cache
  (136 GFLOP/s vs ~70 for the whole [C, N] product, measured). The batch's first step is
  always the global argmax (the top of the batch), so every batch makes progress.
* *Candidate batching* (`greedy_select_stepwise`, kept for the sharded loop and as the
  reference in tests and benchmarks): the dot products of the top-64 points with all points
  in one [64, N] product, then a pass over [N] vectors per step.

Why not prune with bounds (skip groups of points whose min-distance cannot change, by the
triangle inequality)? On efficientnet_lite0 ELPV features projected to 128 dims, distances
concentrate: k-means groups of 256 points have radius ~120 against a covering radius of
~150 at 1%, and 96% of the groups fail the test at every step; per-point lower bounds from
the top 32 (64) principal axes still leave 79% (45%) of the points active per batch while
only 17% actually change. The FLOP floor of the exact loop is n_select * N * 2 * proj_dim.

The loop is a `lax.while_loop` on the device, in a few chunks so that a progress bar can
move; nothing but the chunk bounds crosses to the host.

Every matmul takes `precision` (`pn_jax.precision`): HIGHEST by default, float32 on every
backend; None (the "fast" policy) leaves TF32 / bf16 passes to an accelerator, where the two
loops' dot products may then round differently.

(Over 450 lines on purpose: the greedy, its two exact reformulations, the projection every
path shares and the two-stage pre-selection are one algorithm, read against each other.)
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from pn_jax import knn, projection

# Candidate columns held at once: [n_cand, N] float32. 64 amortises the pass over the
# points well on a CPU; the cap keeps the block under CAND_BYTES for very large N.
N_CAND = 64
CAND_BYTES = 256 << 20
# Deferred batches: candidates per batch, and points per chunk of the pass that applies a
# batch (a [FLUSH_CHUNK, N_BATCH] float32 block, 8 MB, stays in the 32 MB L3).
N_BATCH = 256
FLUSH_CHUNK = 8192
FLUSH_WIDTH = 64  # see _sq_block
HIGHEST = jax.lax.Precision.HIGHEST


def n_coreset(n: int, ratio: float) -> int:
    return max(1, int(n * ratio))


def n_candidates(n: int, n_cand: int = N_CAND) -> int:
    """Candidates per batch for N points: at most `n_cand`, N, and CAND_BYTES of columns."""
    return int(max(1, min(n_cand, n, CAND_BYTES // (4 * max(n, 1)))))


def random_projection(key: jax.Array, dim_in: int, dim_out: int) -> jax.Array:
    return jax.random.normal(key, (dim_in, dim_out), jnp.float32) / np.sqrt(dim_out)


def dist_to(points: jax.Array, sq: jax.Array, centre: jax.Array, precision=HIGHEST) -> jax.Array:
    # sqrt(|x|^2 - 2 x.c + |c|^2); clamp before sqrt, as PatchCore does.
    return jnp.sqrt(jnp.maximum(sq - 2.0 * jnp.matmul(points, centre, precision=precision)
                                + jnp.dot(centre, centre, precision=precision), 0.0))


def first_argmax(v: jax.Array) -> jax.Array:
    """argmax with ties to the smallest index (= jnp.argmax) as two vectorised reductions;
    XLA's CPU argmax (a variadic reduce) is ~3x slower on [N]."""
    iota = jnp.arange(v.shape[0], dtype=jnp.int32)
    return jnp.min(jnp.where(v == jnp.max(v), iota, v.shape[0])).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("precision",))
def _init_min_distance(projected, starts, precision=HIGHEST):
    sq = jnp.sum(projected * projected, axis=-1)
    start_d = jax.vmap(lambda i: dist_to(projected, sq, projected[i], precision))(starts)  # [S, N]
    return jnp.mean(start_d, axis=0)


class Candidates(NamedTuple):
    """A candidate batch: global indices [C] (-1: none), the dot products of each candidate
    with every (local) point [C, n], and the candidates' squared norms [C]. The distance
    column is formed per step with `dist_to`'s formula, so it equals the plain loop's."""
    index: jax.Array
    dots: jax.Array
    sq: jax.Array


def candidates_for(index: jax.Array, centres: jax.Array, points: jax.Array, precision=HIGHEST) -> Candidates:
    """The batch for centre rows [C, P] (one matmul over the points [n, P])."""
    return Candidates(index, jnp.matmul(centres, points.T, precision=precision), jnp.sum(centres * centres, -1))


def empty_candidates(c: int, n: int) -> Candidates:
    return Candidates(jnp.full((c,), -1, jnp.int32), jnp.zeros((c, n), jnp.float32), jnp.zeros((c,), jnp.float32))


def run_candidate_steps(min_d, sel, t, t1, cand: Candidates, sq, refresh, global_argmax=first_argmax):
    """Greedy steps t..t1-1 with candidate batching (shared by the one-device and sharded loops).

    sq [n] squared norms of the (local) points; refresh(min_d) -> a new `Candidates` batch;
    global_argmax(min_d) -> the step's winner (a global index). Returns (min_d, sel, cand).
    """
    def steps(carry, cand):
        def cond(c):
            _, _, t, i = c
            return (t < t1) & jnp.any(cand.index == i)

        def body(c):
            min_d, sel, t, i = c
            pos = jnp.argmax(cand.index == i)
            dot = jax.lax.dynamic_index_in_dim(cand.dots, pos, 0, keepdims=False)
            col = jnp.sqrt(jnp.maximum(sq - 2.0 * dot + cand.sq[pos], 0.0))  # = dist_to
            min_d = jnp.minimum(min_d, col)
            return min_d, sel.at[t].set(i), t + 1, global_argmax(min_d)

        min_d, sel, t = carry
        min_d, sel, t, _ = jax.lax.while_loop(cond, body, (min_d, sel, t, global_argmax(min_d)))
        return min_d, sel, t

    # Use the candidates carried in from the previous chunk, then batch after batch.
    min_d, sel, t = steps((min_d, sel, t), cand)

    def batch(c):
        min_d, sel, t, _ = c
        cand = refresh(min_d)
        min_d, sel, t = steps((min_d, sel, t), cand)
        return min_d, sel, t, cand

    min_d, sel, _, cand = jax.lax.while_loop(lambda c: c[2] < t1, batch, (min_d, sel, t, cand))
    return min_d, sel, cand


@functools.partial(jax.jit, donate_argnums=(1, 2, 4), static_argnames=("precision",))
def _greedy_steps(projected, min_d, sel, t0, cand, t1, precision=HIGHEST):
    """Greedy steps t0..t1-1 (traced bounds: one compilation serves every chunk)."""
    sq = jnp.sum(projected * projected, axis=-1)

    def refresh(min_d):
        _, c = jax.lax.top_k(min_d, cand.index.shape[0])  # ties -> smaller index first
        return candidates_for(c.astype(jnp.int32), projected[c], projected, precision)

    return run_candidate_steps(min_d, sel, t0, t1, cand, sq, refresh)


class Batch(NamedTuple):
    """A deferred batch: the candidates' global indices [C], their rows [C, P] and squared
    norms [C], their current min-distances [C], their pairwise distance columns [C, C], the
    bound on every other point's min-distance, which candidates were selected [C], and
    whether the batch is spent (its next argmax may lie outside)."""
    index: jax.Array
    rows: jax.Array
    sq: jax.Array
    min_d: jax.Array
    cols: jax.Array
    bound: jax.Array
    used: jax.Array
    spent: jax.Array


def _sq_block(x, sq, rows, csq, precision=HIGHEST):
    """|x|^2 - 2 x.c + |c|^2 for points x [n, P] and centres rows [w, P] -> [n, w], in
    `dist_to`'s order of operations. The dots come from an [n, P] x [P, w] product: on
    XLA:CPU its values are bit-identical to the candidate batching's [64, P] x [P, N] for
    any n > 1 and w a multiple of 64 (tested), so both loops select the same points even at
    float32 near-ties (a matrix-vector product rounds differently)."""
    return sq[:, None] - 2.0 * jnp.matmul(x, rows.T, precision=precision) + csq[None, :]


def _empty_batch(c: int, p: int) -> Batch:
    z = jnp.zeros((c,), jnp.float32)
    return Batch(jnp.zeros((c,), jnp.int32), jnp.zeros((c, p), jnp.float32), z, z,
                 jnp.zeros((c, c), jnp.float32), jnp.float32(-jnp.inf), jnp.zeros((c,), bool),
                 jnp.bool_(True))


def _new_batch(points, sq, min_d, c: int, precision=HIGHEST) -> Batch:
    n = points.shape[0]
    # The top c, descending, ties -> smaller index first (= top_k). XLA:CPU's top_k over [N]
    # sorts the whole vector (65 ms at N = 645k); `knn.smallest` looks at group minima first.
    neg, idx = knn.smallest(-min_d[None, :], c)
    vals, idx = -neg[0], idx[0]
    # Every other point's min-distance is <= bound (a max over the rest: slicing a (c+1)-th
    # value off top_k's output makes XLA:CPU sort instead).
    bound = jnp.max(min_d.at[idx].set(-jnp.inf)) if c < n else jnp.float32(-jnp.inf)
    rows = points[idx]
    csq = sq[idx]
    cols = jnp.sqrt(jnp.maximum(_sq_block(rows, csq, rows, csq, precision), 0.0))  # [i, j] = d(cand i, cand j)
    return Batch(idx, rows, csq, vals, cols, bound, jnp.zeros((c,), bool), jnp.bool_(False))


def _batch_steps(batch: Batch, sel, t, t1):
    """Greedy steps on the candidates alone until t1 or until the argmax may leave the batch.

    The argmax is the largest candidate min-distance (ties -> smallest global index); it is
    the global one when it exceeds `bound`, or on the batch's first step (the batch's top is
    then the global argmax by top_k's tie rule)."""
    big = jnp.iinfo(jnp.int32).max

    def pick(b: Batch):
        top = jnp.max(b.min_d)
        j = jnp.argmin(jnp.where(b.min_d == top, b.index, big))
        return j, (top > b.bound) | ~jnp.any(b.used)

    def cond(c):
        b, _, t, _ = c
        return (t < t1) & ~b.spent

    def body(c):
        b, sel, t, _ = c
        j, ok = pick(b)

        def take(_):
            nb = b._replace(min_d=jnp.minimum(b.min_d, b.cols[:, j]), used=b.used.at[j].set(True))
            return nb, sel.at[t].set(b.index[j]), t + 1

        b2, sel2, t2 = jax.lax.cond(ok, take, lambda _: (b._replace(spent=jnp.bool_(True)), sel, t), None)
        return b2, sel2, t2, None

    batch, sel, t, _ = jax.lax.while_loop(cond, body, (batch, sel, t, None))
    return batch, sel, t


def _chunk_size(n: int, chunk: int) -> int:
    """A chunk of at most `chunk` points (a multiple of 64) that divides n when one >= chunk/4
    exists (n is usually images x 1024): no tail block to compile a second time."""
    for c in range(chunk, chunk // 4 - 1, -64):
        if n % c == 0:
            return c
    return chunk


def _apply_centres(points, sq, min_d, rows, csq, chunk: int, precision=HIGHEST):
    """min_d = min(min_d, distance to the nearest of the centres rows [w, P]), chunk by chunk
    of points so that each [chunk, w] block stays in cache."""
    n = points.shape[0]
    chunk = _chunk_size(n, chunk)

    def apply(x, s, m):
        # min over centres before the sqrt: the same values (sqrt is monotone), one sqrt per point.
        return jnp.minimum(m, jnp.sqrt(jnp.maximum(jnp.min(_sq_block(x, s, rows, csq, precision), axis=1), 0.0)))

    n_full = n // chunk
    if n_full:
        def body(i, m):
            lo = i * chunk
            x = jax.lax.dynamic_slice_in_dim(points, lo, chunk)
            s = jax.lax.dynamic_slice_in_dim(sq, lo, chunk)
            mm = jax.lax.dynamic_slice_in_dim(m, lo, chunk)
            return jax.lax.dynamic_update_slice_in_dim(m, apply(x, s, mm), lo, 0)

        min_d = jax.lax.fori_loop(0, n_full, body, min_d)
    if n_full * chunk < n:
        lo = n_full * chunk
        min_d = min_d.at[lo:].set(apply(points[lo:], sq[lo:], min_d[lo:]))
    return min_d


def _flush(points, sq, min_d, batch: Batch, chunk: int = FLUSH_CHUNK, precision=HIGHEST):
    """Apply the batch's selected centres to every point; the candidates then take the
    min-distances tracked in the batch (the same formula: the steps' argmax and the stored
    vector agree bit for bit).

    Only the selected rows go through the matmul: they are moved to the front and the
    product runs at the smallest width in FLUSH_WIDTH steps that holds them (one compiled
    branch per width): about a quarter of a batch's candidates go unselected."""
    c = batch.index.shape[0]
    order = jnp.argsort(~batch.used, stable=True)                # selected first
    rows, csq = batch.rows[order], jnp.where(batch.used, batch.sq, jnp.inf)[order]
    widths = sorted({min(c, w) for w in range(FLUSH_WIDTH, c + FLUSH_WIDTH, FLUSH_WIDTH)})
    branches = [functools.partial(lambda w, m: _apply_centres(points, sq, m, rows[:w], csq[:w], chunk, precision), w)
                for w in widths]
    n_used = jnp.sum(batch.used)
    which = jnp.searchsorted(jnp.asarray(widths), n_used)  # first width >= n_used
    min_d = jax.lax.switch(which, branches, min_d)
    # Unused slots may repeat an index (never for c <= n); write the used ones last.
    keep = jnp.where(batch.used, batch.min_d, min_d[batch.index])
    return min_d.at[batch.index].set(keep)


@functools.partial(jax.jit, donate_argnums=(1, 2), static_argnames=("precision",))
def _deferred_steps(projected, min_d, sel, t0, batch: Batch, t1, precision=HIGHEST):
    """Greedy steps t0..t1-1 by deferred batches (traced bounds: one compilation). The last
    batch is never applied: only the selection is returned."""
    sq = jnp.sum(projected * projected, axis=-1)
    c = batch.index.shape[0]

    def cond(s):
        return s[2] < t1

    def body(s):
        min_d, sel, t, b = s

        def renew(args):
            md, bb = args
            md = jax.lax.cond(jnp.any(bb.used), lambda m: _flush(projected, sq, m, bb, precision=precision),
                              lambda m: m, md)
            return md, _new_batch(projected, sq, md, c, precision)

        min_d, b = jax.lax.cond(b.spent, renew, lambda a: a, (min_d, b))
        b, sel, t = _batch_steps(b, sel, t, t1)
        return min_d, sel, t, b

    min_d, sel, _, batch = jax.lax.while_loop(cond, body, (min_d, sel, t0, batch))
    return min_d, sel, batch


def greedy_select(projected: jax.Array, starts: jax.Array, n_select: int, progress: bool = False,
                  chunks: int = 8, n_cand: int = N_BATCH, precision=HIGHEST) -> jax.Array:
    """projected [N, P], starts [S] indices -> selected indices [n_select] (int32), by deferred
    batches of `n_cand` candidates (see the module docstring).

    The loop runs on the device in `chunks` pieces so a progress bar can advance between them
    (a batch carries over from one piece to the next)."""
    projected = jnp.asarray(projected, jnp.float32)
    n, p = projected.shape
    c = int(max(1, min(n_cand, n)))
    min_d = _init_min_distance(projected, jnp.asarray(starts), precision)
    sel = jnp.zeros((n_select,), jnp.int32)
    steps = functools.partial(_deferred_steps, precision=precision)
    return _in_chunks(steps, projected, (min_d, sel, _empty_batch(c, p)), n_select, chunks, progress)


def _in_chunks(steps, projected, carry, n_select: int, chunks: int, progress: bool) -> jax.Array:
    """Greedy steps [0, n_select) in `chunks` pieces, a progress bar advancing between them:
    steps(projected, min_d, sel, t0, state, t1) -> (min_d, sel, state), carry = the first
    (min_d, sel, state) (`_deferred_steps` or `_greedy_steps`). Returns sel."""
    step = max(1, -(-n_select // chunks))
    bar = tqdm(total=n_select, desc="coreset", unit="pt", leave=False, disable=not progress)
    for t0 in range(0, n_select, step):
        t1 = min(t0 + step, n_select)
        carry = steps(projected, carry[0], carry[1], t0, carry[2], t1)
        if progress:
            carry[1].block_until_ready()
        bar.update(t1 - t0)
    bar.close()
    return carry[1]


def greedy_select_stepwise(projected: jax.Array, starts: jax.Array, n_select: int, progress: bool = False,
                  chunks: int = 20, n_cand: int = N_CAND, precision=HIGHEST) -> jax.Array:
    """Candidate batching (see the module docstring): the same indices as `greedy_select`.

    projected [N, P], starts [S] indices -> selected indices [n_select] (int32). The loop runs
    on the device in `chunks` pieces so a progress bar can advance between them.
    """
    projected = jnp.asarray(projected, jnp.float32)
    n = projected.shape[0]
    c = n_candidates(n, n_cand)
    min_d = _init_min_distance(projected, jnp.asarray(starts), precision)
    sel = jnp.zeros((n_select,), jnp.int32)
    steps = functools.partial(_greedy_steps, precision=precision)
    return _in_chunks(steps, projected, (min_d, sel, empty_candidates(c, n)), n_select, chunks, progress)


def coreset_indices(key: jax.Array, features: jax.Array, ratio: float, proj_dim: int = 128,
                    n_starts: int = 10, progress: bool = False, select=None, precision=HIGHEST,
                    preselect: float = 0.0) -> jax.Array:
    """Indices of the approximate greedy coreset of features [N, D]. `select`: the greedy
    loop (default `greedy_select`; `greedy_select_stepwise` picks the same points).
    `precision`: of the projection and every distance matmul (`pn_jax.precision`).
    `preselect` > 0: the two-stage coreset (`preselect_chunk`), not the exact greedy."""
    n, d = features.shape
    if n_coreset(n, ratio) >= n:
        return jnp.arange(n, dtype=jnp.int32)
    projected = projected_rows(key, features, proj_dim, precision)
    c = PRESELECT_CHUNK
    survivors = np.concatenate([i + preselect_chunk(key, i // c, np.asarray(projected[i:i + c]), ratio, preselect,
                                                    n_starts, precision) for i in range(0, n, c)]) if preselect else None
    projected = projected if survivors is None else np.asarray(projected)[survivors]
    return select_projected(key, projected, ratio, n_starts, progress=progress, select=select, precision=precision,
                            n_total=n, survivors=survivors)


def select_projected(key: jax.Array, projected, ratio: float, n_starts: int = 10, progress: bool = False,
                     select=None, precision=HIGHEST, n_total: int | None = None, survivors=None) -> jax.Array:
    """The greedy part of `coreset_indices` on points projected with `key`'s projection (a
    streamed fit, `pn_jax.streaming`). `survivors`: the global indices of `projected`'s rows
    after a pre-selection of `n_total` points (the bank keeps int(n_total * ratio))."""
    n = projected.shape[0]
    n_select = min(n, n_coreset(n if n_total is None else n_total, ratio))
    if n_select >= n:
        sel = jnp.arange(n, dtype=jnp.int32)
    else:
        _, k_start = jax.random.split(key)
        starts = jax.random.choice(k_start, n, (min(n_starts, n),), replace=False)
        sel = (select or greedy_select)(jnp.asarray(projected, jnp.float32), starts, n_select, progress=progress,
                                        precision=precision)
    return sel if survivors is None else jnp.asarray(np.asarray(survivors)[np.asarray(sel)], jnp.int32)


# Two-stage coreset (`bank.coreset_preselect`, issue 26): the exact greedy is quadratic in the
# patches (16x the patches at 1024 px: 256x the cost). Each chunk of PRESELECT_CHUNK rows (the
# projection's chunks, so streamed and in-memory fits agree) keeps its own greedy coreset of
# `factor` x the ratio; the global greedy runs on those. Its cost: README "Resolution and tiles".
PRESELECT_CHUNK = 32768


def n_preselect(n_rows: int, ratio: float, factor: float) -> int:  # survivors of a chunk of n_rows
    return min(n_rows, max(1, int(np.ceil(factor * ratio * n_rows))))


def preselect_chunk(key, i: int, projected_chunk, ratio: float, factor: float, n_starts: int = 10,
                    precision=HIGHEST) -> np.ndarray:
    """Sorted local indices of chunk i's greedy coreset of `factor` x `ratio` of its rows."""
    n = projected_chunk.shape[0]
    keep = n_preselect(n, ratio, factor)
    if keep >= n:
        return np.arange(n)
    k = jax.random.fold_in(jax.random.fold_in(key, 0x5e1ec7), i)
    starts = jax.random.choice(k, n, (min(n_starts, n),), replace=False)
    return np.sort(np.asarray(greedy_select(jnp.asarray(projected_chunk, jnp.float32), starts, keep,
                                            precision=precision)))


def projection_key(key: jax.Array) -> jax.Array:  # the key of coreset_indices(key, ...)'s projection
    return jax.random.split(key)[0]


def projected_rows(key: jax.Array, features, proj_dim: int, precision=HIGHEST) -> jax.Array:
    """The greedy's view of features [N, D] in `coreset_indices(key, ...)`: their random
    projection to proj_dim (`project_chunked`), or the features themselves when proj_dim >= D."""
    d = features.shape[1]
    if proj_dim >= d:
        return jnp.asarray(features, jnp.float32)
    return project_chunked(features, random_projection(projection_key(key), d, proj_dim), precision=precision)


@functools.partial(jax.jit, static_argnames=("precision",))
def project(features: jax.Array, proj: jax.Array, precision=HIGHEST) -> jax.Array:
    return jnp.matmul(features.astype(jnp.float32), proj, precision=precision)


def project_chunked(features, proj: jax.Array, chunk: int = 32768, precision=HIGHEST) -> jax.Array:
    """Project host features chunk by chunk, so only the [N, proj_dim] result lives on device.

    On the CPU backend, host features are projected by numpy's BLAS, which is ~2x faster than
    XLA's dot for this tall-skinny shape on a CPU (0.40 vs 0.77 s for [192512,1024]x[1024,128],
    measured) and needs no host-to-device copy of the features. numpy's sgemm is float32 whatever
    `precision` says (a CPU computes the same float32 under both policies anyway)."""
    if isinstance(features, np.ndarray) and jax.default_backend() == "cpu":
        p = np.asarray(proj, np.float32)
        out = np.empty((len(features), p.shape[1]), np.float32)
        for i in range(0, len(features), chunk):
            out[i:i + chunk] = projection.project_host(features[i:i + chunk], p)
        return jnp.asarray(out)
    parts = [project(jnp.asarray(features[i:i + chunk]), proj, precision) for i in range(0, len(features), chunk)]
    return jnp.concatenate(parts, axis=0)
