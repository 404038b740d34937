"""What a fit measures on normal images that are not scored against themselves: their k-NN
(held-out images, or training images leave-one-image-out), the importance dims S, and the
signal statistics that normalise every score (SPEC 3.4). `fitting` decides which images these
are; this module holds the maths, jitted.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pn_jax import ahead, calibration, detector
from pn_jax import influence as influence_lib
from pn_jax import knn as knn_lib
from pn_jax import noising
from pn_jax import precision as precision_lib
from pn_jax import tilebank, transfer
from pn_jax.config import Config


@functools.partial(jax.jit, static_argnames=("k", "block"))
def _holdout_knn(feats, index, *, k, block):
    return jax.lax.map(lambda f: knn_lib.knn_indexed(f, index, k=k, block=block), feats)


def holdout_neighbours(cfg: Config, bank, holdout_feats) -> tuple[jax.Array, jax.Array]:
    """The K-NN of every held-out patch, searched once for all fit-time statistics:
    (dist [h,N,K], idx [h,N,K]). The bank is prepared once (not once per image). With a bank
    per tile position, each tile's patches against their position's rows (idx into the whole bank)."""
    from pn_jax import sharding

    if isinstance(bank, sharding.ShardedBank):  # a distributed fit's bank: searched where its rows are
        mesh = bank.rows.sharding.mesh
        dist, idx = sharding.knn_sharded_batched(np.asarray(holdout_feats), bank, cfg.noising.k, mesh,
                                                 cfg.bank.knn_block)
        return jnp.asarray(np.asarray(dist)), jnp.asarray(np.asarray(idx))

    def search(b, feats):
        index = knn_lib.prepare_bank(b)
        ahead.wait(_holdout_knn)
        parts = _image_map(cfg, lambda _, f: _holdout_knn(transfer.to_device(f), index, k=cfg.noising.k,
                                                          block=cfg.bank.knn_block), feats)  # as `compile_ahead`
        return _joined(parts)
    return _per_position(cfg, bank, holdout_feats, lambda bs, fs: search(_cut(bank, bs), _view(holdout_feats, fs)))


def _joined(parts):
    """The (dist, idx) of image batches, joined in order."""
    return _joined_rows(tuple(p[0] for p in parts)), _joined_rows(tuple(p[1] for p in parts))


def image_batch(cfg: Config, n_images: int) -> int:
    """Images per program of the statistics' searches and influence (`_image_map`): an eighth of
    the sample, 2 to `cfg.batch_size` (32 calibration images: 4 per call, so two streams
    overlap for 7 of the 8 calls)."""
    return min(max(2, cfg.batch_size), max(2, -(-n_images // 8)))


def _image_map(cfg: Config, fn, feats) -> list:
    """[fn(slice of the images, their features [b, N, D])] over `image_batch` images at a time
    (`streaming.image_batches`; a streamed sample's own batches), waited for, the CPU's
    `batches.in_flight` streams at once: every image's bits are those of one `lax.map` over all
    of them (tests/test_streaming.py), and on a 2-core CPU one batch's single-threaded top-k
    and gathers run beside the other's matmul."""
    from pn_jax import batches, streaming

    chunks = feats.chunks() if hasattr(feats, "chunks") else (
        (sl, feats[sl]) for sl in streaming.image_batches(len(feats), image_batch(cfg, len(feats))))
    return [out for _, out in batches.in_flight(chunks, lambda c: jax.block_until_ready(fn(*c)),
                                                batches.streams_for(cfg))]


def _view(feats, cols: slice):
    """Patches `cols` of every image of feats [n, N, D] (an array or a `streaming.Subset`)."""
    if cols == slice(None):
        return feats
    return feats.view(cols) if hasattr(feats, "chunks") else feats[:, cols]


def _cut(x, s: slice, axis: int = 0):
    """x[s] along `axis`, or x itself for the whole (no copy on the shared bank's path)."""
    return x if s == slice(None) else x[(slice(None),) * axis + (s,)]


def _per_position(cfg, bank, feats, search):
    """search(bank rows, patch columns) -> (dist, idx into those rows), over the whole bank,
    or per tile position (`tilebank`) laid end to end with idx into the whole bank."""
    n_pos = tilebank.n_positions(cfg)
    if not n_pos:
        return search(slice(None), slice(None))
    parts = [(search(bs, fs), bs.start) for bs, fs in tilebank.slices(bank.shape[0], feats.shape[1], n_pos)]
    return (tilebank.join([p[0] for p, _ in parts]),
            tilebank.join([p[1] for p, _ in parts], offsets=[o for _, o in parts]))


def select_dims(cfg: Config, key, dim: int, holdout_feats=None, bank=None, neighbours=None) -> jax.Array:
    """The influence dims S: random (PRNG key) or by importance on held-out normal patches."""
    s = detector.n_influence_dims(cfg, dim)
    if cfg.noising.dim_selection == "random" or holdout_feats is None:
        return jnp.sort(jax.random.choice(key, dim, (s,), replace=False)).astype(jnp.int32)
    # importance: mean influence of each dim over held-out normal patches (all D dims)
    dist, idx = neighbours if neighbours is not None else holdout_neighbours(cfg, bank, holdout_feats)
    f = transfer.to_device(holdout_feats).reshape(-1, dim)
    k = cfg.noising.k
    imp = _importance(f, bank, dist.reshape(-1, k), idx.reshape(-1, k), cfg.noising.eps)
    return jnp.sort(jax.lax.top_k(imp, s)[1]).astype(jnp.int32)


IMPORTANCE_CHUNK = 512  # held-out patches per step: [chunk, K, D] floats (~19 MB at K=9, D=1024)


@functools.partial(jax.jit, static_argnames=("chunk",))
def _importance(f, bank, dist, idx, eps, chunk: int = IMPORTANCE_CHUNK):
    """Mean fd_fixed influence of every dim over the patches f [P, D]: [D]. Streamed over
    chunks of patches, since the residuals of all patches at once are [P, K, D] (~0.8 GB at
    bottle size); the sum runs over the chunks, then one division by P."""
    p, d = f.shape
    chunk = min(chunk, p)
    n = -(-p // chunk)
    pad = n * chunk - p
    valid = (jnp.arange(n * chunk) < p).reshape(n, chunk)
    # pad rows get distance 1 (no 0/0) and are masked out of the sum
    f_c = jnp.pad(f, ((0, pad), (0, 0))).reshape(n, chunk, d)
    dist_c = jnp.pad(dist, ((0, pad), (0, 0)), constant_values=1.0).reshape(n, chunk, -1)
    idx_c = jnp.pad(idx, ((0, pad), (0, 0))).reshape(n, chunk, -1)
    all_dims = jnp.arange(d)

    def step(acc, xs):
        fc, dc, ic, vc = xs
        infl = influence_lib.fd_fixed(fc, bank, dc, ic, all_dims, eps, bank_s=bank)  # [chunk, D]
        return acc + jnp.sum(jnp.where(vc[:, None], infl, 0.0), axis=0), None

    total, _ = jax.lax.scan(step, jnp.zeros((d,), jnp.float32), (f_c, dist_c, idx_c, valid))
    return total / p


def fit_stats(cfg: Config, params, bank, dims, holdout_feats: np.ndarray, neighbours=None, *,
              exclude=None) -> noising.Stats:
    """Normalisation statistics from held-out normal images (never the batch being scored).
    `neighbours`: their (dist, idx) from `holdout_neighbours`, when already searched.
    `exclude`: (bank_owner [M], owners [h]) when the images are training images scored
    leave-one-image-out (`loo_neighbours`): image i's search, `fd`'s re-search included, then
    never returns the bank rows that came from training image owners[i]."""
    if holdout_feats is None or len(holdout_feats) == 0:
        return noising.identity_stats()
    n = cfg.noising
    if exclude is not None and neighbours is None:
        neighbours = loo_neighbours(cfg, bank, exclude[0], holdout_feats, exclude[1])
    dist, idx = neighbours if neighbours is not None else holdout_neighbours(cfg, bank, holdout_feats)
    from pn_jax import sharding

    n_valid, owners_m = None, None if exclude is None else exclude[0]
    if isinstance(bank, sharding.ShardedBank):  # its padded rows; the pads are kept out of fd's re-search
        n_valid, bank = bank.n_valid, bank.rows
        owners_m = None if exclude is None else sharding.padded_owners(exclude[0], bank.shape[0])
    owner_of = (None, None) if exclude is None else (transfer.to_device(owners_m, np.int32),
                                                     transfer.to_device(exclude[1], np.int32))

    def infl_on(bs, fs, offset=0):  # the influence against bank rows bs of patch columns fs: per image batch
        static = dict(method=n.influence, eps=n.eps, precision=precision_lib.of(cfg), n_valid=n_valid)
        b_, pp = _cut(bank, bs), params.get("predictor")
        bo = None if owner_of[0] is None else _cut(owner_of[0], bs)
        d_, i_ = _cut(dist, fs, 1), _cut(idx, fs, 1)
        i_ = i_ - offset if offset else i_
        # positional, as `compile_ahead` lowers it; each batch's rows are sliced inside the program
        return tuple(_image_map(cfg, lambda sl, f: _holdout_influence(
            transfer.to_device(f), b_, d_, i_, np.int32(sl.start), dims, pp, bo, owner_of[1], **static),
            _view(holdout_feats, fs)))

    ahead.wait(_holdout_influence)
    ahead.wait(_stats_from)
    n_pos = tilebank.n_positions(cfg)
    if n_pos:  # each tile's patches against their position's bank, laid end to end
        infl = (tilebank.join([_joined_rows(infl_on(bs, fs, bs.start))
                               for bs, fs in tilebank.slices(bank.shape[0], holdout_feats.shape[1], n_pos)]),)
    else:
        infl = infl_on(slice(None), slice(None))
    # Wait for the result: dispatch is asynchronous, and whatever touched the state next (the
    # checkpoint save, issue 15) would otherwise be timed with this whole held-out search.
    return jax.block_until_ready(_stats_from(params, dims, dist, infl, std_range=(n.noise_std_min, n.noise_std_max)))


def _joined_rows(parts: tuple):
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


@functools.partial(jax.jit, static_argnames=("method", "eps", "precision", "n_valid"))
def _holdout_influence(feats, bank, dist, idx, start, dims, predictor_params, bank_owner, owners, *, method, eps,
                       precision=precision_lib.HIGHEST, n_valid=None):
    """The influence of image batch feats [b, N, D], images start..start + b of the sample
    whose (dist, idx) [c, N, K] and owners [c] are given whole (sliced here, not by a program
    of their own per batch)."""
    cut = lambda x: None if x is None else jax.lax.dynamic_slice_in_dim(x, start, feats.shape[0])  # noqa: E731
    dist, idx, owners = cut(dist), cut(idx), cut(owners)
    bank_s = influence_lib.bank_columns(bank, dims)
    if method == "predictor":
        from pn_jax.research import predictor

        return jax.lax.map(lambda a: predictor.influence(predictor_params, a[0], bank, a[1], a[2], dims, eps, bank_s),
                           (feats, dist, idx))
    # owners None: held-out images, nothing excluded
    # n_valid: a sharded bank's real rows (the rest are zero pads); None: all rows are real
    return jax.lax.map(lambda a: influence_lib.influence(method, a[0], bank, a[1], a[2], dims, eps, bank_s,
                                                         n_valid=n_valid, excluded=None if a[3] is None else bank_owner == a[3],
                                                         precision=precision),
                       (feats, dist, idx, owners))


@functools.partial(jax.jit, static_argnames=("std_range",))
def _stats_from(params, dims, dist, infl_parts, std_range):
    # infl_parts: the influence [b, N, S] of each image batch, in order (joined here)
    infl = infl_parts[0] if len(infl_parts) == 1 else jnp.concatenate(infl_parts)
    # Pass 1: influence and distance statistics (the noise proposal needs them).
    infl_w = infl * params["influence_weight"][dims]
    dsig = jnp.mean(dist, axis=-1)
    std = lambda x: jnp.maximum(jnp.std(x), 1e-12)  # noqa: E731
    stats = noising.identity_stats()._replace(infl_mean=jnp.mean(infl_w), infl_std=std(infl_w),
                                              dist_mean=jnp.mean(dsig), dist_std=std(dsig))
    # Pass 2: patch-level signal statistics for the optional z-normalisation.
    sig, _ = noising.signals_from(params, dims, stats, dist, infl, std_range)
    parts = jnp.stack([sig[name].reshape(-1) for name in noising.SIGNALS])
    return stats._replace(signal_mean=parts.mean(-1), signal_std=jnp.maximum(parts.std(-1), 1e-12))


@functools.partial(jax.jit, static_argnames=("k", "block"))
def _loo_knn(feats, owners, index, bank_owner, *, k, block):
    return jax.lax.map(lambda a: detector.knn_excluding(a[0], index, bank_owner, a[1], k=k, block=block), (feats, owners))


def loo_neighbours(cfg: Config, bank, bank_owner, feats, owners) -> tuple[jax.Array, jax.Array]:
    """Leave-one-image-out K-NN: patches of training image owners[i] (feats [c, N, D], or a
    `streaming.Subset` read batch by batch) searched against the bank without the entries that
    came from that image: (dist [c,N,K], idx). `cfg.devices` > 1: on the bank sharded over
    those devices (`sharding.knn_sharded_excluding`, the same result; no --max-memory and no
    --tile-bank per-position there, both refuse --devices)."""
    owners, bank_owner = np.asarray(owners), np.asarray(bank_owner)
    if cfg.devices > 1:  # the search over the bank sharded on the run's devices (every process's, if several)
        from pn_jax import sharding

        detector.check_loo_bank(bank_owner, owners, cfg.noising.k)
        mesh = sharding.make_bank_mesh(jax.devices()[:cfg.devices])
        dist, idx = sharding.knn_sharded_excluding(
            np.asarray(feats), owners, sharding.shard_bank(bank, mesh), sharding.shard_owners(bank_owner, mesh),
            cfg.noising.k, mesh, cfg.bank.knn_block)
        # Replicated on the mesh; what follows runs beside the host bank on this process's first device.
        return jnp.asarray(np.asarray(dist)), jnp.asarray(np.asarray(idx))

    def one(bs, fs):
        detector.check_loo_bank(_cut(bank_owner, bs), owners, cfg.noising.k)
        index, bo = knn_lib.prepare_bank(_cut(bank, bs)), jnp.asarray(_cut(bank_owner, bs), jnp.int32)
        k, block = cfg.noising.k, cfg.bank.knn_block
        ahead.wait(_loo_knn)
        # positional, as `compile_ahead` lowers it: a keyword argument would be another cache entry
        return _joined(_image_map(cfg, lambda sl, f: _loo_knn(transfer.to_device(f), transfer.to_device(owners[sl], np.int32),
                                                              index, bo, k=k, block=block), _view(feats, fs)))

    return _per_position(cfg, bank, feats, one)


def compile_ahead(cfg: Config, m: int, dim: int, n_patch: int, n_images: int, *, loo: bool) -> None:
    """Compile on `pn_jax.ahead`'s thread what `fit_stats` will run for `n_images` calibration
    images of `n_patch` patches (leave-one-image-out or held out) against an m-row bank: their
    searches, influence and statistics (issue 25: their tracing and lowering, ~0.8 s on one core
    with a warm compilation cache, then overlaps the coreset). Single-device fits with one bank only."""
    from pn_jax import distributed, streaming

    if cfg.devices > 1 or distributed.active() or tilebank.n_positions(cfg) or cfg.noising.influence == "predictor":
        return
    n = cfg.noising
    k, block, f32, i32 = n.k, cfg.bank.knn_block, jnp.float32, jnp.int32
    s = detector.n_influence_dims(cfg, dim)
    bank = jax.ShapeDtypeStruct((m, dim), f32)
    index = jax.eval_shape(knn_lib.prepare_bank, bank)
    knn_lib.compile_index_ahead(m, dim)
    sizes = [sl.stop - sl.start for sl in streaming.image_batches(n_images, image_batch(cfg, n_images))]
    whole = (jax.ShapeDtypeStruct((n_images, n_patch, k), f32), jax.ShapeDtypeStruct((n_images, n_patch, k), i32))
    for b in sorted(set(sizes)):
        feats = jax.ShapeDtypeStruct((b, n_patch, dim), f32)
        if loo:
            ahead.compile(_loo_knn, (feats, jax.ShapeDtypeStruct((b,), i32), index, jax.ShapeDtypeStruct((m,), i32)),
                          k=k, block=block)
        else:
            ahead.compile(_holdout_knn, (feats, index), k=k, block=block)
        owners = (jax.ShapeDtypeStruct((m,), i32), jax.ShapeDtypeStruct((n_images,), i32)) if loo else (None, None)
        ahead.compile(_holdout_influence, (feats, bank) + whole + (jax.ShapeDtypeStruct((), i32),
                                                                   jax.ShapeDtypeStruct((s,), i32), None) + owners,
                      method=n.influence, eps=n.eps, precision=precision_lib.of(cfg), n_valid=None)
    c = (n_images, n_patch, k)
    ahead.compile(calibration.noise_scale_program, (bank, jax.ShapeDtypeStruct((n_images * n_patch, dim), f32),
                                                    whole[1], n.noise_shrinkage, n.noise_floor))
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), detector.init_params(dim))
    ahead.compile(_stats_from, (params, jax.ShapeDtypeStruct((s,), i32), jax.ShapeDtypeStruct(c, f32),
                                tuple(jax.ShapeDtypeStruct((b, n_patch, s), f32) for b in sizes)),
                  std_range=(n.noise_std_min, n.noise_std_max))

