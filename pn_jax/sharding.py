"""Memory bank and greedy coreset sharded across devices (SPEC 2.9).

The bank [M, D] (or the coreset's projected points [N, P]) is split along its rows over a
1-D device mesh. Each device works on its own rows inside `jax.shard_map`; the small
per-shard results are all-gathered and merged, so the answers equal the single-device
`knn.knn` / `coreset.greedy_select` ones: the same formulas per row, the same tie rule
(smallest global index).

k-NN: each shard runs the exact search (`knn.dense_indices`, with its per-query proof) over
its rows and returns its k nearest by the distance of record; the shards merge on (distance,
global index). The global k nearest are among the union of the shards' k nearest, and the
residual distance of a pair has the same bits in every call shape, so the result is
`knn.knn`'s, near-ties and exact ties included (tests/test_sharding.py).

Coreset: XLA's row reductions and matmuls round differently for different array shapes (last
ulp), so where two min-distances are equal to within float rounding (e.g. duplicated feature
vectors) either may win, on one device as on several.

Rows are padded to a multiple of the device count. Pad rows are never selected: the k-NN
gives them an infinite norm (excluded rows of the exact search), and the coreset gives them
min-distance -inf.

A distributed fit never holds the bank whole: `place_bank` builds the same array from each
process's own rows (`distributed.ProcessFeatures.bank`, and a checkpoint loaded by a
distributed test, `checkpoint.load(mesh=...)`), and `shard_bank` passes it through.

    mesh = make_bank_mesh()
    sb = shard_bank(bank, mesh)
    dist, idx = knn_sharded(queries, sb, k=9, mesh=mesh)   # == knn.knn(queries, bank, 9)
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pn_jax import coreset, knn


class ShardedBank(NamedTuple):
    """Padded bank rows [n_dev * m_local, D], sharded along rows; `n_valid` real rows (M)."""
    rows: jax.Array
    n_valid: int


def make_bank_mesh(devices: Sequence[jax.Device] | None = None, axis: str = "bank") -> Mesh:
    """A 1-D mesh over `devices` (default: all devices) with one axis named `axis`."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices, dtype=object), (axis,))


def _axis(mesh: Mesh) -> str:
    if len(mesh.axis_names) != 1:
        raise ValueError(f"expected a 1-D mesh, got axes {mesh.axis_names}")
    return mesh.axis_names[0]


def _pad_rows(x: jax.Array, n_dev: int, align: int = 1) -> jax.Array:
    """Zero-pad rows so each of the n_dev shards gets the same multiple of `align` rows."""
    per = -(-x.shape[0] // n_dev)
    per = -(-per // align) * align
    pad = per * n_dev - x.shape[0]
    return jnp.pad(x, ((0, pad), (0, 0))) if pad else x


def _place(x: jax.Array, mesh: Mesh) -> jax.Array:
    return jax.device_put(x, NamedSharding(mesh, P(_axis(mesh), None)))


def shard_bank(bank, mesh: Mesh) -> ShardedBank:
    """Pad the bank [M, D] with zero rows to a multiple of the device count and shard it along M.
    A `ShardedBank` (a distributed fit's, `place_bank`) is returned as it is: never gathered."""
    if isinstance(bank, ShardedBank):
        return bank
    bank = jnp.asarray(bank)
    if bank.ndim != 2:
        raise ValueError(f"bank must be [M, D], got shape {bank.shape}")
    return ShardedBank(_place(_pad_rows(bank, mesh.size), mesh), int(bank.shape[0]))


def n_rows(bank) -> int:
    """The real rows M of a bank: [M, D] or a `ShardedBank`."""
    return bank.n_valid if isinstance(bank, ShardedBank) else int(bank.shape[0])


def bank_layout(n_valid: int, mesh: Mesh) -> "RowLayout":
    """Where `shard_bank` puts bank row i of M: position i, shard i // ceil(M / n_dev)."""
    return uniform_layout(n_valid, mesh.size)


def place_bank(n_valid: int, dim: int, mesh: Mesh, rows_of, dtype=np.float32) -> ShardedBank:
    """`shard_bank`'s ShardedBank of an M-row bank that no process holds whole: each device of
    this process gets `rows_of(lo, hi)` (bank rows [lo, hi), [hi - lo, D] `dtype`) and zero
    pads (`place_rows`). The same array as `shard_bank(<the whole bank>, mesh)`."""
    return ShardedBank(place_rows(bank_layout(n_valid, mesh), mesh, rows_of, dim, dtype), int(n_valid))


def padded_owners(bank_owner, n_padded: int) -> np.ndarray:
    """bank_owner [M] padded with -1 to the rows of a sharded bank (pads belong to no image)."""
    o = np.asarray(bank_owner, np.int32)
    return np.concatenate([o, np.full(n_padded - len(o), -1, np.int32)])


# ----------------------------------------------------------------------------- k-NN
@functools.partial(jax.jit, static_argnames=("k", "block", "n_valid", "mesh"))
def _knn_sharded(queries, rows, k: int, block: int, n_valid: int, mesh: Mesh):
    axis = _axis(mesh)
    n_dev = mesh.size
    m_local = rows.shape[0] // n_dev
    k_local = min(k, m_local)

    def per_shard(q, b):
        offset = jax.lax.axis_index(axis) * m_local
        pads = offset + jnp.arange(m_local) >= n_valid
        qf = jax.lax.stop_gradient(q).astype(jnp.float32)
        # The exact search of this shard's rows (knn.dense_indices with its proof), pad rows
        # excluded by an infinite norm: the distances of record and indices of its k nearest.
        aug, sq = knn.augment_rows(b, pads)
        max_norm = knn.max_norm_bound(jnp.where(pads, 0.0, sq), b.shape[1])
        found = knn.dense_indices(qf, b, aug, max_norm, k_local, block, pads, dist_from=(q, b),
                                   barrier=False)
        d, li = knn.settle(q, b, found)
        d = jnp.where(pads[li], jnp.inf, d)
        # The global k nearest are among the shards' k nearest: merge on (distance, global
        # index), the single-device tie rule. The distances are per-row computations with the
        # same bits in every shard and on one device (tests/test_knn.py checks shape-independence).
        all_d = jax.lax.all_gather(d, axis, axis=1, tiled=True)                 # [Q, n_dev * k_local]
        all_i = jax.lax.all_gather(li + offset, axis, axis=1, tiled=True)
        order = jnp.lexsort((all_i, all_d), axis=-1)[:, :k]
        return jnp.take_along_axis(all_d, order, -1), jnp.take_along_axis(all_i, order, -1)

    # check_vma=False: the search's loop carries start replicated and become per-shard; the
    # outputs are replicated by construction (all_gather).
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), P(axis, None)),
                         out_specs=(P(), P()), check_vma=False)(queries, rows)


def knn_sharded(queries, bank_sharded: ShardedBank, k: int, mesh: Mesh, block: int = 4096):
    """Exact k-NN against a sharded bank: (distances [Q,k] ascending, global indices [Q,k]).

    Same result as `knn.knn(queries, bank, k, block)` on one device.
    """
    if k > bank_sharded.n_valid:
        raise ValueError(f"k={k} nearest neighbours requested but the memory bank has only "
                         f"{bank_sharded.n_valid} entries")
    return _knn_sharded(jnp.asarray(queries), bank_sharded.rows, k=k, block=block,
                        n_valid=bank_sharded.n_valid, mesh=mesh)


def knn_sharded_batched(features, bank_sharded: ShardedBank, k: int, mesh: Mesh, block: int = 4096):
    """features [B, N, D] -> (dist [B,N,k], idx [B,N,k]) against a sharded bank."""
    b, n, d = features.shape
    dist, idx = knn_sharded(jnp.reshape(features, (b * n, d)), bank_sharded, k, mesh, block)
    return dist.reshape(b, n, k), idx.reshape(b, n, k)


def knn_excluding_fn(k: int, block: int, n_valid: int, mesh: Mesh):
    """`(queries [Q, D], rows, excluded [n_dev * m_local] bool) -> (dist [Q, k], idx [Q, k])`,
    for use inside jit: `knn_sharded` without the rows marked `excluded` (sharded as the rows;
    leave-one-image-out scoring: `bank_owner == owner`), the same result as
    `knn.knn_excluding` on one device."""
    axis = _axis(mesh)

    def search(queries, rows, excluded):
        m_local = rows.shape[0] // mesh.size
        k_local = min(k, m_local)

        def per_shard(q, b, ex):
            offset = jax.lax.axis_index(axis) * m_local
            pads = offset + jnp.arange(m_local) >= n_valid
            excl = pads | ex
            aug, sq = knn.augment_rows(b, excl)
            max_norm = knn.max_norm_bound(jnp.where(pads, 0.0, sq), b.shape[1])
            found = knn.dense_indices(jax.lax.stop_gradient(q).astype(jnp.float32), b, aug, max_norm, k_local, block,
                                      excl, dist_from=(q, b), barrier=False)
            d, li = knn.settle(q, b, found)
            d = jnp.where(excl[li], jnp.inf, d)
            all_d = jax.lax.all_gather(d, axis, axis=1, tiled=True)
            all_i = jax.lax.all_gather(li + offset, axis, axis=1, tiled=True)
            order = jnp.lexsort((all_i, all_d), axis=-1)[:, :k]
            return jnp.take_along_axis(all_d, order, -1), jnp.take_along_axis(all_i, order, -1)

        return jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), P(axis, None), P(axis)),
                             out_specs=(P(), P()), check_vma=False)(queries, rows, excluded)

    return search


def shard_owners(bank_owner, mesh: Mesh) -> jax.Array:
    """The training image of each bank row [M] (`fitting.FitReport.bank_owner`), padded with -1
    and sharded as `shard_bank` shards the rows (pads are excluded by the search anyway)."""
    per = -(-len(bank_owner) // mesh.size)
    return jax.device_put(padded_owners(bank_owner, per * mesh.size), NamedSharding(mesh, P(_axis(mesh))))


@functools.partial(jax.jit, static_argnames=("k", "block", "n_valid", "mesh"))
def _knn_sharded_excluding(feats, owners, rows, row_owner, k: int, block: int, n_valid: int, mesh: Mesh):
    search = knn_excluding_fn(k, block, n_valid, mesh)
    return jax.lax.map(lambda a: search(a[0], rows, row_owner == a[1]), (feats, owners))


def knn_sharded_excluding(feats, owners, bank_sharded: ShardedBank, row_owner: jax.Array, k: int, mesh: Mesh,
                          block: int = 4096):
    """Leave-one-image-out exact k-NN against a sharded bank: image c's patches feats[c] [N, D]
    searched without the bank rows whose owner (`shard_owners`) is owners[c] (-1: none).
    (dist [C, N, k], global indices [C, N, k]): `detector.knn_excluding` on one device, image
    by image. Each shard excludes its own rows of the image (by the owner it holds, no table of
    the whole bank); the shards merge on (distance, global index) as `knn_sharded`. Needs k
    rows outside each image (`detector.check_loo_bank`)."""
    if k > bank_sharded.n_valid:
        raise ValueError(f"k={k} nearest neighbours requested but the memory bank has only "
                         f"{bank_sharded.n_valid} entries")
    return _knn_sharded_excluding(jnp.asarray(feats), jnp.asarray(owners, jnp.int32), bank_sharded.rows, row_owner,
                                  k=k, block=block, n_valid=bank_sharded.n_valid, mesh=mesh)


# ----------------------------------------------------------------------------- coreset
class RowLayout(NamedTuple):
    """Where the coreset's rows live on a 1-D mesh: device shard q holds `counts[q]` real rows,
    flat rows [first[q], first[q] + counts[q]), as a prefix of its `per` rows (the rest pads).
    Shards are in flat order (`first` ascending), so ordering by global position orders the real
    rows as their flat indices: the smallest-index tie rule is the same."""
    per: int
    counts: np.ndarray
    first: np.ndarray

    def to_global(self, flat) -> np.ndarray:
        """Flat row indices -> positions in the padded global array."""
        flat = np.asarray(flat, np.int64)
        # Shards sharing a `first` are empty but the last: side="right" picks that one.
        q = np.searchsorted(self.first, flat, side="right") - 1
        return q * self.per + (flat - self.first[q])

    def to_flat(self, pos) -> np.ndarray:
        pos = np.asarray(pos, np.int64)
        return self.first[pos // self.per] + pos % self.per


def uniform_layout(n: int, n_dev: int, align: int = 1) -> RowLayout:
    """`_pad_rows`'s layout: shard q holds flat rows [q * per, (q + 1) * per) (position = index)."""
    per = -(-n // n_dev)
    per = max(1, -(-per // align) * align)
    first = np.arange(n_dev, dtype=np.int64) * per
    return RowLayout(per, np.clip(n - first, 0, per), first)


def process_layout(mesh: Mesh, rows_per_process: Sequence[int], align: int = 128,
                   process_of: Sequence[int] | None = None) -> RowLayout:
    """Rows that stay with the process that extracted them: process p holds flat rows
    [F_p, F_p+1) (F: the cumulative `rows_per_process`), split in contiguous blocks (sizes
    differing by at most one) over its devices in mesh order. The mesh must list the
    processes' devices in process order (`process_mesh`). `process_of`: each mesh device's
    process (default: `device.process_index`; tests simulate processes on one)."""
    devs = list(mesh.devices.reshape(-1))
    proc = np.asarray([d.process_index for d in devs] if process_of is None else process_of, np.int64)
    if np.any(np.diff(proc) < 0):
        raise ValueError("the mesh must list the processes' devices in process order (sharding.process_mesh)")
    start = np.concatenate([[0], np.cumsum(rows_per_process)]).astype(np.int64)
    counts, first = np.zeros(len(devs), np.int64), np.zeros(len(devs), np.int64)
    for p, n_p in enumerate(rows_per_process):
        qs = np.flatnonzero(proc == p)
        if not len(qs):
            if n_p:
                raise ValueError(f"process {p} holds {n_p} rows but none of the mesh's devices")
            continue
        sizes = np.asarray([n_p // len(qs) + (i < n_p % len(qs)) for i in range(len(qs))], np.int64)
        counts[qs], first[qs] = sizes, start[p] + np.concatenate([[0], np.cumsum(sizes)[:-1]])
    # Devices of processes beyond rows_per_process (none in a run) hold nothing, after the end.
    first[proc >= len(rows_per_process)] = start[-1]
    per = max(1, int(counts.max()))
    return RowLayout(-(-per // align) * align, counts, first)


def process_mesh(axis: str = "bank") -> Mesh:
    """A 1-D mesh over every device of every process, in process order (`process_layout`)."""
    return make_bank_mesh(sorted(jax.devices(), key=lambda d: (d.process_index, d.id)), axis)


def place_rows(layout: RowLayout, mesh: Mesh, rows_of, width: int, dtype=np.float32) -> jax.Array:
    """The global [n_dev * per, width] array (`dtype`, float32 by default) of `layout` from host
    pieces: each device of this process gets `rows_of(lo, hi)` (flat rows [lo, hi),
    [hi - lo, width]) and zero pads; no process sees another's rows."""
    shards = []
    for q, dev in enumerate(mesh.devices.reshape(-1)):
        if dev.process_index != jax.process_index():
            continue
        x = np.zeros((layout.per, width), dtype)
        c = int(layout.counts[q])
        if c:
            x[:c] = rows_of(int(layout.first[q]), int(layout.first[q]) + c)
        shards.append(jax.device_put(x, dev))
    return jax.make_array_from_single_device_arrays((mesh.size * layout.per, width),
                                                    NamedSharding(mesh, P(_axis(mesh), None)), shards)


@functools.partial(jax.jit, static_argnames=("n_select", "mesh", "n_cand"))
def _greedy_sharded(rows, starts, counts, n_select: int, mesh: Mesh, n_cand: int):
    axis = _axis(mesh)
    n_local = rows.shape[0] // mesh.size

    def per_shard(x, starts, counts):
        offset = jax.lax.axis_index(axis) * n_local
        sq = jnp.sum(x * x, axis=-1)
        # Start rows: each start is owned by one shard; psum of it and zeros is exact.
        loc = starts - offset
        own = (loc >= 0) & (loc < n_local)
        start_rows = jax.lax.psum(
            jnp.where(own[:, None], x[jnp.clip(loc, 0, n_local - 1)], 0.0), axis)
        start_d = jax.vmap(lambda c: coreset.dist_to(x, sq, c))(start_rows)   # [S, n_local]
        real = jnp.arange(n_local) < counts[jax.lax.axis_index(axis)]  # a shard's real rows are a prefix
        min_d = jnp.where(real, jnp.mean(start_d, axis=0), -jnp.inf)

        def global_argmax(min_d):
            # (value, global index) of each shard's local argmax -> the global one.
            li = coreset.first_argmax(min_d)
            vals = jax.lax.all_gather(min_d[li], axis)                  # [n_dev]
            idxs = jax.lax.all_gather(li + offset, axis)
            return idxs[jnp.argmax(vals)]  # first max -> lowest shard -> smallest global index

        def refresh(min_d):
            # Global top-n_cand of min_d: each shard's top, all-gathered (shard order = index
            # order, so ties resolve as on one device), then the centre rows' local columns.
            v, li = jax.lax.top_k(min_d, min(n_cand, n_local))
            all_v = jax.lax.all_gather(v, axis, tiled=True)
            all_i = jax.lax.all_gather(li.astype(jnp.int32) + offset, axis, tiled=True)
            all_x = jax.lax.all_gather(x[li], axis, tiled=True)
            _, pos = jax.lax.top_k(all_v, n_cand)
            return coreset.candidates_for(all_i[pos], all_x[pos], x)

        sel0 = jnp.zeros((n_select,), jnp.int32)
        _, sel, _ = coreset.run_candidate_steps(min_d, sel0, 0, n_select, coreset.empty_candidates(n_cand, n_local),
                                                sq, refresh, global_argmax)
        return sel

    # check_vma=False: `sel` is replicated by construction (every shard picks the same winner
    # from the all-gathered candidates).
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(P(axis, None), P(), P()),
                         out_specs=P(), check_vma=False)(rows, starts, counts)


def greedy_select_sharded(projected, starts, n_select: int, mesh: Mesh, align: int = 128,
                          n_cand: int = coreset.N_CAND) -> jax.Array:
    """Approximate greedy k-center with the points [N, P] sharded over `mesh`.

    Selects the same indices [n_select] (int32) as `coreset.greedy_select` on one device
    (argmax ties -> smallest global index). Each shard is padded to a multiple of `align`
    rows (pads get min-distance -inf), which keeps XLA on the same vectorised code path for
    every row; only ulp-level near-ties can still resolve differently (see module doc).
    Each step all-gathers one (value, index) pair per device; each candidate batch (see
    `coreset`) all-gathers every shard's top candidates and their rows.
    """
    projected = jnp.asarray(projected, jnp.float32)
    n = projected.shape[0]
    layout = uniform_layout(n, mesh.size, align)  # positions = flat indices
    rows = _place(_pad_rows(projected, mesh.size, align), mesh)
    return _greedy_sharded(rows, jnp.asarray(starts, jnp.int32), jnp.asarray(layout.counts, jnp.int32),
                           n_select=n_select, mesh=mesh, n_cand=coreset.n_candidates(n, n_cand))


def coreset_indices_sharded(key: jax.Array, features, ratio: float, proj_dim: int = 128,
                            n_starts: int = 10, mesh: Mesh | None = None) -> jax.Array:
    """`coreset.coreset_indices` with the greedy loop sharded over `mesh` (same indices)."""
    mesh = make_bank_mesh() if mesh is None else mesh
    n, d = features.shape
    n_select = coreset.n_coreset(n, ratio)
    if n_select >= n:
        return jnp.arange(n, dtype=jnp.int32)
    projected = coreset.projected_rows(key, features, proj_dim)
    starts = jax.random.choice(jax.random.split(key)[1], n, (min(n_starts, n),), replace=False)
    return greedy_select_sharded(projected, starts, n_select, mesh)


def coreset_indices_by_process(key: jax.Array, rows_of, rows_per_process: Sequence[int], dim: int, ratio: float,
                               proj_dim: int = 128, n_starts: int = 10, mesh: Mesh | None = None,
                               align: int = 128, process_of: Sequence[int] | None = None) -> np.ndarray:
    """`coreset_indices_sharded` of features that no process holds whole: process p holds the
    flat rows of its block (`process_layout`) and `rows_of(lo, hi)` reads this process's rows
    [lo, hi) [hi - lo, dim]. Each device's rows are projected where they are and placed
    (`place_rows`); the greedy loop is `_greedy_sharded`'s. Returns the flat indices (numpy).

    The same indices as one process: the same projection key, starts and greedy loop. The
    projection of a row is the same matmul row whatever rows share its call (numpy's sgemm on
    CPUs, XLA's dot elsewhere: the same K-order accumulation per row; tests/test_sharding.py
    checks pieces of several sizes)."""
    mesh = process_mesh() if mesh is None else mesh
    n = int(np.sum(rows_per_process))
    n_select = coreset.n_coreset(n, ratio)
    if n_select >= n:
        return np.arange(n, dtype=np.int32)
    k_proj, k_start = jax.random.split(key)
    proj = coreset.random_projection(k_proj, dim, proj_dim) if proj_dim < dim else None
    layout = process_layout(mesh, rows_per_process, align, process_of)

    def projected(lo, hi):
        x = rows_of(lo, hi)
        return np.asarray(coreset.project_chunked(np.asarray(x, np.float32), proj)) if proj is not None else x

    rows = place_rows(layout, mesh, projected, proj_dim if proj is not None else dim)
    starts = np.asarray(jax.random.choice(k_start, n, (min(n_starts, n),), replace=False))
    sel = _greedy_sharded(rows, jnp.asarray(layout.to_global(starts), jnp.int32),
                          jnp.asarray(layout.counts, jnp.int32), n_select=n_select, mesh=mesh,
                          n_cand=coreset.n_candidates(n, coreset.N_CAND))
    return layout.to_flat(np.asarray(sel)).astype(np.int32)
