"""Fit a memory bank (+ fit-time statistics) and score images: the orchestration layer.

    images -> backbone -> patch features -+- fit:   coreset -> bank, dims S, statistics
                                          +- score: k-NN -> influence -> noise -> scores -> maps

State is an explicit pytree (`DetectorState`); the config travels beside it. Batches are
padded to a fixed batch size so the compiled scorer is traced once per configuration.
"""
from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from typing import Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from pn_jax import calibration
from pn_jax import coreset as coreset_lib
from pn_jax import features as features_lib
from pn_jax import influence as influence_lib
from pn_jax import knn as knn_lib
from pn_jax import maps as maps_lib
from pn_jax import noising
from pn_jax import precision as precision_lib
from pn_jax import tiles
from pn_jax.config import Config


class DetectorState(NamedTuple):
    bank: jax.Array  # [M, D] memory bank of normal patch features
    dims: jax.Array  # [S] int32, the influence dims S
    params: dict  # learnable: influence_weight [D], distance_weight [1]
    stats: noising.Stats  # fit-time normalisation statistics (held-out normal images)


def init_params(dim: int) -> dict:
    """Learnable parameters: the note's influence_weight [D] and distance_weight [1], and the
    calibrated noise model's per-dim scale s [D] (set from held-out normals by `fit`)."""
    return {"influence_weight": jnp.ones((dim,), jnp.float32),
            "distance_weight": jnp.ones((1,), jnp.float32),
            "noise_scale": jnp.ones((dim,), jnp.float32)}


def n_influence_dims(cfg: Config, dim: int) -> int:
    return max(1, int(round(cfg.noising.influence_ratio * dim)))


def map_size(cfg: Config) -> tuple[int, int]:
    s = cfg.data.crop_size if cfg.data.resize_mode == "patchcore" else cfg.data.image_size
    return s, s


# ----------------------------------------------------------------------------- features
class FeatureExtractor:
    """Backbone + PatchCore aggregation: normalised images [B,H,W,3] -> [B, N, D].

    The jitted backbone and aggregation are shared by every extractor of the same model
    settings (a run over several categories, or a second run in one process, compiles them
    once). `timings` accumulates the seconds spent in the backbone and in the aggregation
    (each waited for), so a run can report the share of everything after the backbone."""

    def __init__(self, cfg: Config, backbone_fn: Callable | None = None):
        m = cfg.model
        self.layers = tuple(m.layers)
        if backbone_fn is None:
            key = ("backbone", m.backbone, m.weights, self.layers, m.precision)
            if key not in _EXTRACTORS:
                from pn_jax import backbones

                _EXTRACTORS[key] = backbones.create(m.backbone, weights=m.weights, layers=self.layers,
                                                    precision=precision_lib.of(cfg))
            backbone_fn = _EXTRACTORS[key]
        self.backbone = backbone_fn
        key = ("aggregate", m.pretrain_embed_dimension, m.target_embed_dimension, m.patchsize, m.precision)
        if key not in _EXTRACTORS:
            _EXTRACTORS[key] = jax.jit(lambda maps: features_lib.aggregate(
                maps, m.pretrain_embed_dimension, m.target_embed_dimension, m.patchsize, precision_lib.of(cfg)))
        self._aggregate = _EXTRACTORS[key]
        self.grid: tuple[int, int] | None = None
        self.dim = m.target_embed_dimension
        self.timings = {"backbone_s": 0.0, "aggregate_s": 0.0, "batches": 0}

    def __call__(self, images) -> jax.Array:
        t0 = time.perf_counter()
        out = jax.block_until_ready(self.backbone(jnp.asarray(images, jnp.float32)))
        t1 = time.perf_counter()
        missing = [l for l in self.layers if l not in out]
        if missing:
            raise KeyError(f"backbone returned no stage(s) {missing}; it returned {sorted(out)}")
        maps = [out[l] for l in self.layers]
        self.grid = tuple(maps[0].shape[1:3])
        feats = jax.block_until_ready(self._aggregate(maps))
        self.timings["backbone_s"] += t1 - t0
        self.timings["aggregate_s"] += time.perf_counter() - t1
        self.timings["batches"] += 1
        return feats


# (kind, settings) -> jitted backbone / aggregation, shared across FeatureExtractors.
_EXTRACTORS: dict = {}


def pad_batch(x, size: int):
    """Zero-pad the batch axis to `size`, so the compiled functions see one shape. Host arrays
    stay on the host and device arrays on the device."""
    if x.shape[0] == size:
        return x
    widths = ((0, size - x.shape[0]),) + ((0, 0),) * (x.ndim - 1)
    return jnp.pad(x, widths) if isinstance(x, jax.Array) else np.pad(x, widths)


_pad_batch = pad_batch  # old name, until every caller has moved to the public pipeline


def extract_all(extractor: FeatureExtractor, batches: Iterable[dict], batch_size: int,
                desc: str = "features", keep: Callable | None = None):
    """Run the extractor over batches (padded to `batch_size`); returns [n_images, N, D] host float32."""
    out = []
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
        n = len(batch["image"])
        feats = extractor(_pad_batch(np.asarray(batch["image"]), batch_size))
        feats = np.asarray(feats[:n])
        out.append(keep(feats) if keep else feats)
    if not out:
        raise ValueError(f"no images to extract features from ({desc})")
    return np.concatenate(out, axis=0)


# ----------------------------------------------------------------------------- scoring
def make_signal_fn(cfg: Config, need_influence: bool = True, on_trace: Callable | None = None,
                   calibrated: bool = False, jit: bool = True, knn_fn: Callable | None = None,
                   rerank: bool = False, n_valid: int | None = None, loo: bool = False):
    """(params, bank, dims, stats, feats [B,N,D]) -> dict of per-patch signals [B,N] (jitted).

    `calibrated`: also the whitened-search scores; `rerank`: the calibrated score over the
    Euclidean K-NN. `knn_fn(f, bank) -> (dist, idx)` overrides every K-NN search, the whitened
    one included (sharded banks); `n_valid`: the real rows of a zero-padded bank, so the
    literal `fd` re-search never picks a pad. `loo`: the function takes a sixth argument
    (bank_owner [M], owners [B]) and scores image b leave-one-image-out: every search returns
    the K nearest rows not from image owners[b] (`knn_excluding`)."""
    n = cfg.noising
    knn_fn = knn_fn or (lambda f, b: knn_lib.knn(f, b, k=n.k, block=cfg.bank.knn_block))
    kw = dict(k=n.k, influence=n.influence, eps=n.eps,
              std_range=(n.noise_std_min, n.noise_std_max), block=cfg.bank.knn_block,
              calibrated=calibrated, rerank=rerank, n_valid=n_valid, precision=precision_lib.of(cfg))

    def per_image(params, bank, dims, stats, f, bank_s, knn, excluded=None):
        if not need_influence:
            dist, idx = knn(f, bank)
            z = jnp.zeros(f.shape[:1], jnp.float32)
            sig = {"influence": z, "distance": dist.mean(-1), "noise": z, "nearest": dist[:, 0]}
            if calibrated:
                sig.update(calibration.calibrated_signals(f, bank, params["noise_scale"], n.k,
                                                          cfg.bank.knn_block, knn)[0])
            if rerank:
                sig.update(calibration.rerank_signals(f, bank, params["noise_scale"], idx))
            return sig
        return noising.patch_signals(params, bank, dims, f, stats, bank_s=bank_s, knn_fn=knn, excluded=excluded,
                                     **kw)

    def signals(params, bank, dims, stats, feats, exclude=None):
        if on_trace:
            on_trace()
        main_knn, index = knn_fn, None
        if isinstance(bank, knn_lib.BankIndex):  # a prepared bank: its search skips the per-call bank pass
            index, bank = bank, bank.bank
            # The main search is against `bank` itself; the whitened one (`calibrated`) gets a
            # scaled bank and the plain search.
            main_knn = lambda f, b: (knn_lib.knn_indexed(f, index, k=n.k, block=cfg.bank.knn_block)  # noqa: E731
                                     if b is bank else knn_fn(f, b))
        bank_s = influence_lib.bank_columns(bank, dims) if need_influence else None  # once, not per image
        if not loo:
            return jax.lax.map(lambda f: per_image(params, bank, dims, stats, f, bank_s, main_knn), feats)
        bank_owner, owners = exclude

        def one(a):
            excluded = bank_owner == a[1]  # the same rows for every search, fd's re-search included
            # The main search uses the prepared index (when given); the whitened one its own bank.
            knn = lambda q, b: knn_lib.knn_excluding(  # noqa: E731
                q, index if (b is bank and index is not None) else b, excluded, k=n.k, block=cfg.bank.knn_block)
            return per_image(params, bank, dims, stats, a[0], bank_s, knn, excluded)

        return jax.lax.map(one, (feats, owners))

    return jax.jit(signals) if jit else signals


def knn_excluding(q, bank, bank_owner, owner, *, k: int, block: int):
    """The K nearest bank rows that did not come from image `owner` (exact: `knn.knn` on the
    bank without that image's rows, same distances, indices into the whole bank). `bank`: an
    array or a prepared `knn.BankIndex`."""
    return knn_lib.knn_excluding(q, bank, bank_owner == owner, k=k, block=block)


def check_loo_bank(bank_owner, owners, k: int) -> None:
    """Refuse leave-one-image-out scoring where an image leaves fewer than k bank rows."""
    bank_owner = np.asarray(bank_owner)
    owned = np.bincount(bank_owner, minlength=int(np.max(owners, initial=0)) + 1)
    for o in np.unique(np.asarray(owners)):
        if o >= 0 and len(bank_owner) - owned[o] < k:
            raise ValueError(f"leave-one-image-out: without training image {o}'s entries the memory bank "
                             f"has {len(bank_owner) - owned[o]} rows but k={k}; raise --coreset-ratio or lower --k")


def default_variant(cfg: Config) -> str:
    return "patchcore" if cfg.noising.method == "patchcore" else cfg.noising.score


def patch_score(cfg: Config, signals: dict, stats: noising.Stats, variant: str | None = None):
    """The per-patch anomaly score for `variant` (default: the configured method)."""
    variant = variant or default_variant(cfg)
    if variant == "patchcore":
        return signals["nearest"]
    if variant == "seed":
        return noising.combine(signals, cfg.noising.score_weights, stats, cfg.noising.znorm_signals)
    if variant == "seed_z":
        return noising.combine(signals, cfg.noising.score_weights, stats, True)
    if variant in noising.SIGNALS or variant in calibration.CALIBRATED_SCORES + calibration.RERANK_SCORES:
        return signals[variant]
    raise ValueError(f"unknown score variant {variant!r}")


# cfg.noising.image_score -> what it computes (the exported model's metadata states it).
IMAGE_SCORE_RULES = {"blurred_max": "max of the blurred map", "patch_max": "max of the patch scores (no upsampling, no blur)"}


def image_scores(cfg: Config, patch, amap) -> jax.Array:
    """Image scores [B] of patch scores [B, N] and their maps [B, H, W], as
    cfg.noising.image_score says: max of the blurred map, or the raw max over patches. Every
    path that makes image scores (Scorer, the exported model) calls this one function."""
    if cfg.noising.image_score == "patch_max":
        return jnp.max(patch, axis=-1)
    return maps_lib.image_scores(amap)


# Scores computed without the influence (`proposed` whitens with the influence-driven noise).
NO_INFLUENCE = (("patchcore", "distance") + tuple(v for v in calibration.CALIBRATED_SCORES if v != "proposed")
                + calibration.RERANK_SCORES)


class Needs(NamedTuple):
    influence: bool  # the influence (and noise) signals
    calibrated: bool  # the second, whitened-space k-NN search
    rerank: bool  # the calibrated score over the Euclidean K-NN


def needs(cfg: Config, variants) -> Needs:
    """What the signal function must compute for these score variants."""
    vs = [v or default_variant(cfg) for v in variants]
    return Needs(influence=any(v not in NO_INFLUENCE for v in vs),
                 calibrated=any(v in calibration.CALIBRATED_SCORES for v in vs),
                 rerank=any(v in calibration.RERANK_SCORES for v in vs))


# One compiled function per configuration, shared by every Scorer built with it (a run over
# several categories compiles its scoring path once): (kind, key) -> (jitted fn, trace counter).
_COMPILED: dict = {}


def _shared(kind: str, key, build: Callable):
    entry = _COMPILED.get((kind, key))
    if entry is None:
        counter = {"traces": 0}

        def on_trace():
            counter["traces"] += 1

        entry = _COMPILED[(kind, key)] = (build(on_trace), counter)
    return entry


class Scorer:
    """One compiled scoring path per configuration: features -> signals -> maps -> image scores.

    The jitted signal and map functions are shared by all Scorers of the same configuration
    (`traces` counts the traces of those shared functions); a sharded Scorer compiles one
    signal function per bank size it sees, since the padding mask is static."""

    def __init__(self, cfg: Config, grid: tuple[int, int], variants=(None,)):
        self.cfg, self.grid, self.size = cfg, tuple(grid), map_size(cfg)
        self.need_influence, calibrated, rerank = needs(cfg, variants)
        # Propose Noising always shows its influence and noise maps, whatever score it ranks by.
        self.need_influence |= cfg.noising.method == "propose_noising"
        flags = dict(need_influence=self.need_influence, calibrated=calibrated, rerank=rerank)
        self._sharded = None
        if cfg.devices > 1:
            from pn_jax import sharding

            mesh = sharding.make_bank_mesh(jax.devices()[:cfg.devices])
            self._sharded = (sharding, mesh)
            self._sig_counter = {"traces": 0}

            def build(n_valid):  # the pad mask depends on the bank size: one function per size
                knn_fn = lambda f, rows: sharding._knn_sharded(  # noqa: E731
                    f, rows, k=cfg.noising.k, block=cfg.bank.knn_block, n_valid=n_valid, mesh=mesh)
                return make_signal_fn(cfg, on_trace=self._count_sharded, knn_fn=knn_fn, n_valid=n_valid,
                                      **flags)

            self._build_sharded, self._sharded_fns = build, {}
        else:
            key = (cfg.noising, cfg.bank.knn_block, cfg.model.precision, tuple(sorted(flags.items())))
            self._signals, self._sig_counter = _shared(
                "signals", key, lambda on_trace: make_signal_fn(cfg, on_trace=on_trace, **flags))
        self._flags = flags
        grid_, size, sigma = self.grid, self.size, cfg.noising.blur_sigma
        lay = tiles.of_config(cfg)

        def build_maps(on_trace):
            def to_maps(patch):
                on_trace()
                if lay is not None:  # per-tile maps stitched at full size, then one blur
                    return tiles.to_pixel_maps(patch, grid_, lay, sigma)
                return maps_lib.to_pixel_maps(patch, grid_, size, sigma)
            return jax.jit(to_maps)

        self._maps, self._maps_counter = _shared("maps", (grid_, size, sigma, lay), build_maps)

    def _count_sharded(self):
        self._sig_counter["traces"] += 1

    @property
    def traces(self) -> dict:
        """Traces so far of this configuration's compiled signal and map functions."""
        return {"signals": self._sig_counter["traces"], "maps": self._maps_counter["traces"]}

    def signals(self, state: DetectorState, feats, exclude=None) -> dict:
        """`exclude`: (bank_owner [M], owners [B]) scores image b without the bank entries
        that came from training image owners[b] (leave-one-image-out; -1 excludes nothing)."""
        if exclude is not None:
            if self._sharded:
                raise ValueError("leave-one-image-out scoring runs on one device; build the Scorer with devices=1")
            check_loo_bank(exclude[0], exclude[1], self.cfg.noising.k)
            cfg, flags = self.cfg, self._flags
            key = (cfg.noising, cfg.bank.knn_block, cfg.model.precision, tuple(sorted(flags.items())))
            fn, _ = _shared("signals_loo", key, lambda on_trace: make_signal_fn(
                cfg, on_trace=on_trace, loo=True, **flags))
            return fn(state.params, self._prepared(state), state.dims, state.stats, feats,
                      (jnp.asarray(exclude[0], jnp.int32), jnp.asarray(exclude[1], jnp.int32)))
        if not self._sharded:
            return self._signals(state.params, self._prepared(state), state.dims, state.stats, feats)
        sharding, mesh = self._sharded
        if getattr(self, "_bank_src", None) is not state.bank:  # pad + place the rows once per bank
            sb = sharding.shard_bank(state.bank, mesh)
            self._bank_src, self._bank_rows, self._n_valid = state.bank, sb.rows, sb.n_valid
        if self._n_valid not in self._sharded_fns:
            self._sharded_fns[self._n_valid] = self._build_sharded(self._n_valid)
        return self._sharded_fns[self._n_valid](state.params, self._bank_rows, state.dims, state.stats, feats)

    def _prepared(self, state: DetectorState) -> knn_lib.BankIndex:
        if getattr(self, "_index_src", None) is not state.bank:  # prepare each bank once
            self._index_src, self._index = state.bank, knn_lib.prepare_bank(state.bank)
        return self._index

    def maps(self, patch) -> jax.Array:
        return self._maps(patch)

    def image_scores(self, patch, amap) -> jax.Array:
        return image_scores(self.cfg, patch, amap)

    def __call__(self, state: DetectorState, feats, exclude=None) -> dict:
        sig = self.signals(state, feats, exclude)
        patch = patch_score(self.cfg, sig, state.stats)
        amap = self.maps(patch)
        out = {"image_scores": self.image_scores(patch, amap), "anomaly_maps": amap,
               "patch_scores": patch, "image_scores_patch_max": jnp.max(patch, axis=-1)}
        if self.need_influence:
            out["influence_maps"] = self.maps(sig["influence"])
            out["noise_maps"] = self.maps(sig["noise"])
        out["signals"] = sig
        return out


# ----------------------------------------------------------------------------- fit
@functools.partial(jax.jit, static_argnames=("k", "block"))
def _holdout_knn(feats, index, *, k, block):
    return jax.lax.map(lambda f: knn_lib.knn_indexed(f, index, k=k, block=block), feats)


def holdout_neighbours(cfg: Config, bank, holdout_feats) -> tuple[jax.Array, jax.Array]:
    """The K-NN of every held-out patch, searched once for all fit-time statistics:
    (dist [h,N,K], idx [h,N,K]). The bank is prepared once (not once per image)."""
    return _holdout_knn(jnp.asarray(holdout_feats), knn_lib.prepare_bank(bank), k=cfg.noising.k,
                        block=cfg.bank.knn_block)


def select_dims(cfg: Config, key, dim: int, holdout_feats=None, bank=None, neighbours=None) -> jax.Array:
    """The influence dims S: random (PRNG key) or by importance on held-out normal patches."""
    s = n_influence_dims(cfg, dim)
    if cfg.noising.dim_selection == "random" or holdout_feats is None:
        return jnp.sort(jax.random.choice(key, dim, (s,), replace=False)).astype(jnp.int32)
    # importance: mean influence of each dim over held-out normal patches (all D dims)
    dist, idx = neighbours if neighbours is not None else holdout_neighbours(cfg, bank, holdout_feats)
    f = jnp.asarray(holdout_feats).reshape(-1, dim)
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
    owner_of = (None, None) if exclude is None else (jnp.asarray(exclude[0], jnp.int32),
                                                     jnp.asarray(exclude[1], jnp.int32))
    infl = _holdout_influence(jnp.asarray(holdout_feats), bank, dist, idx, dims, params.get("predictor"),
                              *owner_of, method=n.influence, eps=n.eps, precision=precision_lib.of(cfg))
    # Wait for the result: dispatch is asynchronous, and whatever touched the state next (the
    # checkpoint save, issue 15) would otherwise be timed with this whole held-out search.
    return jax.block_until_ready(_stats_from(params, dims, dist, infl, std_range=(n.noise_std_min, n.noise_std_max)))


@functools.partial(jax.jit, static_argnames=("method", "eps", "precision"))
def _holdout_influence(feats, bank, dist, idx, dims, predictor_params, bank_owner, owners, *, method, eps,
                       precision=precision_lib.HIGHEST):
    bank_s = influence_lib.bank_columns(bank, dims)
    if method == "predictor":
        from pn_jax import predictor

        return jax.lax.map(lambda a: predictor.influence(predictor_params, a[0], bank, a[1], a[2], dims, eps, bank_s),
                           (feats, dist, idx))
    # owners None: held-out images, nothing excluded
    return jax.lax.map(lambda a: influence_lib.influence(method, a[0], bank, a[1], a[2], dims, eps, bank_s,
                                                         excluded=None if a[3] is None else bank_owner == a[3],
                                                         precision=precision),
                       (feats, dist, idx, owners))


@functools.partial(jax.jit, static_argnames=("std_range",))
def _stats_from(params, dims, dist, infl, std_range):
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


@dataclasses.dataclass
class FitReport:
    n_train_patches: int
    bank_size: int
    timings: dict
    bank_owner: np.ndarray | None = None  # [M] the training image each bank entry came from
    calibration: dict = dataclasses.field(default_factory=dict)  # what the statistics were fitted on


@functools.partial(jax.jit, static_argnames=("k", "block"))
def _loo_knn(feats, owners, index, bank_owner, *, k, block):
    return jax.lax.map(lambda a: knn_excluding(a[0], index, bank_owner, a[1], k=k, block=block), (feats, owners))


def loo_neighbours(cfg: Config, bank, bank_owner, feats, owners) -> tuple[jax.Array, jax.Array]:
    """Leave-one-image-out K-NN: patches of training image owners[i] (feats [c, N, D]) searched
    against the bank without the entries that came from that image: (dist [c,N,K], idx)."""
    check_loo_bank(bank_owner, owners, cfg.noising.k)
    return _loo_knn(jnp.asarray(feats), jnp.asarray(owners, jnp.int32), knn_lib.prepare_bank(bank),
                    jnp.asarray(bank_owner, jnp.int32),
                    k=cfg.noising.k, block=cfg.bank.knn_block)


def calibration_split(n_images: int, seed: int, max_images: int = 32, *,
                      calibrate: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """Disjoint seeded samples of training images: (calibration, validation), each at most
    `max_images` (32 images = 32k patches at 32x32: the per-dim RMS residual s_j is then an
    average over thousands of roughly independent patches, a few percent of standard error)."""
    perm = np.random.default_rng([seed, 1729]).permutation(n_images)
    if not calibrate:  # held-out images calibrate: every training image may validate
        return None, np.sort(perm[:max_images])
    n_cal = min(max_images, max(1, -(-n_images // 2)))
    n_val = min(max_images, n_images - n_cal)
    return np.sort(perm[:n_cal]), np.sort(perm[n_cal:n_cal + n_val])


def fit(cfg: Config, train_feats: np.ndarray, holdout_feats: np.ndarray | None,
        key: jax.Array | None = None, *, calibrate_on: np.ndarray | None = None) -> tuple[DetectorState, FitReport]:
    """train_feats [n, N, D] (host) -> state. The noise scale, the importance dims and the
    statistics come from `holdout_feats` [h, N, D] (normal images not in the bank) or, with
    `calibrate_on` (training image indices), from those images scored leave-one-image-out."""
    key = jax.random.key(cfg.seed) if key is None else key
    k_core, k_dims = jax.random.split(key)
    n_img, n_patch, dim = train_feats.shape
    streamed = hasattr(train_feats, "coreset")  # a streaming.FeatureStore: features on disk, projection in memory
    flat = None if streamed else train_feats.reshape(-1, dim)
    t0 = time.perf_counter()
    if streamed:
        idx = train_feats.coreset(k_core, cfg)
    elif cfg.devices > 1:
        from pn_jax import sharding

        mesh = sharding.make_bank_mesh(jax.devices()[:cfg.devices])
        idx = sharding.coreset_indices_sharded(k_core, flat, cfg.bank.coreset_ratio,
                                               cfg.bank.coreset_proj_dim, cfg.bank.coreset_starts, mesh)
    else:
        idx = coreset_lib.coreset_indices(k_core, flat, cfg.bank.coreset_ratio,
                                          cfg.bank.coreset_proj_dim, cfg.bank.coreset_starts, progress=True,
                                          precision=precision_lib.of(cfg), preselect=cfg.bank.coreset_preselect)
    idx = np.asarray(idx)
    bank = jnp.asarray(train_feats.rows(idx) if streamed else flat[idx])
    bank_owner = (idx // n_patch).astype(np.int32)
    t_core = time.perf_counter() - t0
    if bank.shape[0] < cfg.noising.k:
        raise ValueError(f"memory bank has {bank.shape[0]} entries but k={cfg.noising.k}; "
                         f"raise --coreset-ratio or lower --k")
    params = init_params(dim)
    t0 = time.perf_counter()
    neighbours, calib_feats = None, None
    if holdout_feats is not None and len(holdout_feats):
        calib_feats = holdout_feats
        neighbours = holdout_neighbours(cfg, bank, holdout_feats)  # one search serves all below
        info = {"source": "held-out images", "images": int(len(holdout_feats))}
    elif calibrate_on is not None and len(calibrate_on):
        calib = np.asarray(calibrate_on)
        if n_img < 2:
            raise ValueError("leave-one-image-out calibration needs at least 2 training images "
                             "(one image's patches are searched against the others')")
        calib_feats = train_feats[calib]
        neighbours = loo_neighbours(cfg, bank, bank_owner, calib_feats, calib)
        info = {"source": "leave-one-image-out", "images": int(len(calib))}
    else:
        info = {"source": "none: identity statistics and noise scale 1", "images": 0}
        warnings.warn("fit: no calibration images (no held-out images and no leave-one-image-out sample): "
                      "identity statistics and noise scale s = 1 are used, so calibrated scores equal "
                      "unwhitened distances", stacklevel=2)
    if calib_feats is not None:
        params["noise_scale"] = calibration.fit_noise_scale(
            bank, jnp.asarray(calib_feats.reshape(-1, dim)), shrinkage=cfg.noising.noise_shrinkage,
            floor=cfg.noising.noise_floor, nearest=neighbours[1][..., 0].reshape(-1))
    dims = select_dims(cfg, k_dims, dim, calib_feats, bank, neighbours)
    info["dim_selection"] = cfg.noising.dim_selection if calib_feats is not None else "random"
    if cfg.noising.dim_selection != info["dim_selection"]:
        warnings.warn("fit: dim_selection=importance needs calibration images; the dims S were drawn at "
                      "random instead (recorded in the checkpoint's calibration info)", stacklevel=2)
    info["patches"] = 0 if calib_feats is None else int(calib_feats.shape[0] * calib_feats.shape[1])
    if cfg.noising.influence == "predictor":
        if calib_feats is None:
            raise ValueError("--influence predictor learns from calibration images: fit on at least 2 "
                             "training images (or give held-out images)")
        from pn_jax import predictor

        # Targets: grad influence of the calibration patches (under leave-one-image-out they are
        # also in the bank, so the smallest distances are over-represented; see README).
        pf = predictor.fit_predictor(calib_feats, bank, dims, k=cfg.noising.k, key=jax.random.fold_in(key, 17),
                                     steps=cfg.noising.predictor_steps, hidden=cfg.noising.predictor_hidden,
                                     block=cfg.bank.knn_block)
        params["predictor"] = pf.params
        info["predictor"] = {**pf.info, "val_loss_before": pf.val_loss_init, "val_loss_after": pf.val_loss}
    loo = (bank_owner, np.asarray(calibrate_on)) if info["source"] == "leave-one-image-out" else None
    stats = fit_stats(cfg, params, bank, dims, calib_feats, neighbours, exclude=loo)
    t_stats = time.perf_counter() - t0
    state = DetectorState(bank=bank, dims=dims, params=params, stats=stats)
    return state, FitReport(n_img * n_patch, int(bank.shape[0]), {"coreset_s": t_core, "stats_s": t_stats},
                            bank_owner=bank_owner, calibration=info)
