"""The detector's maths: patch features, the scoring signals, the Scorer over a memory bank.

    images -> backbone -> patch features -+- fit:   coreset -> bank, dims S, statistics
                                          +- score: k-NN -> influence -> noise -> scores -> maps

State is an explicit pytree (`DetectorState`); the config travels beside it. Batches are
padded to a fixed batch size so the compiled scorer is traced once per configuration.
"""
from __future__ import annotations

import functools
import threading
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pn_jax import ahead, calibration
from pn_jax import features as features_lib
from pn_jax import influence as influence_lib
from pn_jax import knn as knn_lib
from pn_jax import maps as maps_lib
from pn_jax import noising
from pn_jax import precision as precision_lib
from pn_jax import tilebank, tiles, transfer
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

    One jitted call per batch, backbone and aggregation together, returned without waiting
    (issue 25: the caller's one host sync per batch is where the device time is paid, so the
    next batch can be dispatched first). The weights are an argument of that call, not
    compile-time constants. A custom `backbone_fn` (no `params`/`_fn`) runs as two jitted calls,
    still without a wait. The jitted functions are shared by every extractor of the same model
    settings (a run over several categories, or a second run in one process, compiles them
    once). `timings["batches"]` counts the calls."""

    def __init__(self, cfg: Config, backbone_fn: Callable | None = None):
        m = cfg.model
        self.layers = tuple(m.layers)
        custom = backbone_fn is not None
        if backbone_fn is None:
            key = ("backbone", m.backbone, m.weights, self.layers, m.precision)
            if key not in _EXTRACTORS:
                from pn_jax import backbones

                _EXTRACTORS[key] = backbones.create(m.backbone, weights=m.weights, layers=self.layers,
                                                    precision=precision_lib.of(cfg))
            backbone_fn = _EXTRACTORS[key]
        self.backbone = backbone_fn
        agg = functools.partial(features_lib.aggregate, pretrain_dim=m.pretrain_embed_dimension,
                                target_dim=m.target_embed_dimension, patchsize=m.patchsize,
                                precision=precision_lib.of(cfg))
        key = ("aggregate", m.pretrain_embed_dimension, m.target_embed_dimension, m.patchsize, m.precision)
        if key not in _EXTRACTORS:
            _EXTRACTORS[key] = jax.jit(agg)
        self._aggregate = _EXTRACTORS[key]
        # Grids seen at trace time, by input shape (the fused call returns features only).
        self._grids: dict = {}
        self._fused = None
        if not custom and hasattr(backbone_fn, "params") and hasattr(backbone_fn, "_fn"):
            key = ("fused", m.backbone, m.weights, self.layers, m.precision, m.pretrain_embed_dimension,
                   m.target_embed_dimension, m.patchsize)
            if key not in _EXTRACTORS:
                grids, layers, fn = {}, self.layers, backbone_fn._fn

                def fused(params, images):
                    maps = _pick(fn(params, images), layers)
                    grids[images.shape] = tuple(maps[0].shape[1:3])
                    return agg(maps)

                _EXTRACTORS[key] = (jax.jit(fused), grids)
            self._fused, self._grids = _EXTRACTORS[key]
        self.grid: tuple[int, int] | None = None
        self.dim = m.target_embed_dimension
        self.timings = {"batches": 0}

    def __call__(self, images) -> jax.Array:
        """Features of a batch, dispatched (not waited for)."""
        x = transfer.to_device(images, np.float32)
        self.timings["batches"] += 1
        if self._fused is not None:
            feats = self._fused(self.backbone.params, x)
            self.grid = self._grids[x.shape]
            return feats
        maps = _pick(self.backbone(x), self.layers)
        self.grid = tuple(maps[0].shape[1:3])
        return self._aggregate(maps)


def _pick(out: dict, layers) -> list:
    missing = [l for l in layers if l not in out]
    if missing:
        raise KeyError(f"backbone returned no stage(s) {missing}; it returned {sorted(out)}")
    return [out[l] for l in layers]


# (kind, settings) -> jitted backbone / aggregation, shared across FeatureExtractors.
_EXTRACTORS: dict = {}


def pad_batch(x, size: int):
    """Zero-pad the batch axis to `size`, so the compiled functions see one shape. Host arrays
    stay on the host and device arrays on the device."""
    if x.shape[0] == size:
        return x
    widths = ((0, size - x.shape[0]),) + ((0, 0),) * (x.ndim - 1)
    return jnp.pad(x, widths) if isinstance(x, jax.Array) else np.pad(x, widths)


# ----------------------------------------------------------------------------- scoring
def make_signal_fn(cfg: Config, need_influence: bool = True, on_trace: Callable | None = None,
                   calibrated: bool = False, jit: bool = True, knn_fn: Callable | None = None,
                   rerank: bool = False, n_valid: int | None = None, loo: bool = False,
                   knn_excluding_fn: Callable | None = None):
    """(params, bank, dims, stats, feats [B,N,D]) -> dict of per-patch signals [B,N] (jitted).

    `calibrated`: also the whitened-search scores; `rerank`: the calibrated score over the
    Euclidean K-NN. `knn_fn(f, bank) -> (dist, idx)` overrides every K-NN search, the whitened
    one included (sharded banks); `n_valid`: the real rows of a zero-padded bank, so the
    literal `fd` re-search never picks a pad. `loo`: the function takes a sixth argument
    (bank_owner [M], owners [B]) and scores image b leave-one-image-out: every search returns
    the K nearest rows not from image owners[b] (`knn_excluding`; `knn_excluding_fn(f, bank,
    excluded)` instead: a sharded bank, whose owners are padded as its rows)."""
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
            knn = (lambda q, b: knn_excluding_fn(q, b, excluded)) if knn_excluding_fn else (  # noqa: E731
                lambda q, b: knn_lib.knn_excluding(q, index if (b is bank and index is not None) else b, excluded,
                                                   k=n.k, block=cfg.bank.knn_block))
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
    bank_owner, owners = np.asarray(bank_owner), np.asarray(owners)  # host numpy (no device max to compile)
    owned = np.bincount(bank_owner, minlength=int(np.max(owners, initial=0)) + 1)
    for o in np.unique(owners):
        if o >= 0 and len(bank_owner) - owned[o] < k:
            raise ValueError(f"leave-one-image-out: without training image {o}'s entries the memory bank "
                             f"has {len(bank_owner) - owned[o]} rows but k={k}; raise --coreset-ratio or lower --k")


# Score variants of the ablation, all computed from one pass on the same bank.
ABLATION_VARIANTS = ("patchcore", "distance", "influence", "noise", "seed", "seed_z",
                     "calibrated", "calibrated_mean", "calibrated_nll", "calibrated_rerank", "proposed")


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
        self._lock = threading.RLock()  # the per-bank caches below; batches are scored from two threads
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

            def build_loo(n_valid):  # leave-one-image-out on the sharded bank
                knn_fn = lambda f, rows: sharding._knn_sharded(  # noqa: E731
                    f, rows, k=cfg.noising.k, block=cfg.bank.knn_block, n_valid=n_valid, mesh=mesh)
                return make_signal_fn(cfg, on_trace=self._count_sharded, knn_fn=knn_fn, n_valid=n_valid, loo=True,
                                      knn_excluding_fn=sharding.knn_excluding_fn(cfg.noising.k, cfg.bank.knn_block,
                                                                                 n_valid, mesh), **flags)

            self._build_sharded, self._build_loo, self._sharded_fns = build, build_loo, {}
        else:
            # Test images: the plain search; leave-one-image-out: its own function (owner -1 for test
            # images gave the same bits, one compile fewer, a 12% slower 400+300 ELPV test pass).
            key = (cfg.noising, cfg.bank.knn_block, cfg.model.precision, tuple(sorted(flags.items())))
            self._signals, self._sig_counter = _shared(
                "signals", key, lambda on_trace: make_signal_fn(cfg, on_trace=on_trace, **flags))
            self._signals_loo, _ = _shared(
                "signals_loo", key, lambda on_trace: make_signal_fn(cfg, on_trace=on_trace, loo=True, **flags))
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

        self.maps, self._maps_counter = _shared("maps", (grid_, size, sigma, lay), build_maps)  # patch -> maps

        def build_scored(on_trace):
            def scored(patch):  # a max is exact: the same scores as the map, then a max, apart
                on_trace()
                amap = self.maps(patch)
                return amap, image_scores(cfg, patch, amap), jnp.max(patch, axis=-1)
            return jax.jit(scored)

        self._scored, _ = _shared("scored", (grid_, size, sigma, lay, cfg.noising.image_score), build_scored)

    def _count_sharded(self):
        self._sig_counter["traces"] += 1

    @property
    def traces(self) -> dict:
        """Traces so far of this configuration's compiled signal and map functions."""
        return {"signals": self._sig_counter["traces"], "maps": self._maps_counter["traces"]}

    def signals(self, state: DetectorState, feats, exclude=None) -> dict:
        """`exclude`: (bank_owner [M], owners [B]) scores image b without the bank entries
        that came from training image owners[b] (leave-one-image-out; -1 excludes nothing).
        With a bank per tile position (`pn_jax.tilebank`), each position's patches are scored
        against its own rows by the same compiled function, and the signals laid end to end."""
        n_pos = tilebank.n_positions(self.cfg)
        if not n_pos:
            return self._signals_on(state, feats, exclude)
        with self._lock:
            if getattr(self, "_pos_src", None) is not state.bank:  # slice each bank once (and prepare each once)
                cuts = tilebank.slices(state.bank.shape[0], feats.shape[1], n_pos)
                self._pos, self._indexes = [(state.bank[bs], bs, fs) for bs, fs in cuts], {}
                self._pos_src = state.bank
            pos = self._pos
        parts = [self._signals_on(state._replace(bank=bank_t), feats[:, fs],
                                  None if exclude is None else (np.asarray(exclude[0])[bs], exclude[1]))
                 for bank_t, bs, fs in pos]
        return {k: tilebank.join([p[k] for p in parts]) for k in parts[0]}

    def _signals_on(self, state: DetectorState, feats, exclude=None) -> dict:
        if exclude is not None:
            check_loo_bank(exclude[0], exclude[1], self.cfg.noising.k)
            if self._sharded:
                return self._signals_sharded(state, feats, exclude)
            ex = (transfer.to_device(exclude[0], np.int32), transfer.to_device(exclude[1], np.int32))
        if not self._sharded:
            fn = self._signals if exclude is None else self._signals_loo
            ahead.wait(fn)
            return fn(state.params, self._prepared(state), state.dims, state.stats, feats,
                      *(() if exclude is None else (ex,)))
        return self._signals_sharded(state, feats)

    def _signals_sharded(self, state: DetectorState, feats, exclude=None) -> dict:
        sharding, mesh = self._sharded
        if getattr(self, "_bank_src", None) is not state.bank:  # pad + place the rows once per bank
            sb = sharding.shard_bank(state.bank, mesh)
            self._bank_src, self._bank_rows, self._n_valid = state.bank, sb.rows, sb.n_valid
        key = (self._n_valid, exclude is not None)
        if key not in self._sharded_fns:
            self._sharded_fns[key] = (self._build_loo if exclude is not None else self._build_sharded)(self._n_valid)
        args = (state.params, self._bank_rows, state.dims, state.stats, feats)
        if exclude is None:
            return self._sharded_fns[key](*args)
        return self._sharded_fns[key](*args, (sharding.shard_owners(exclude[0], mesh), jnp.asarray(exclude[1], jnp.int32)))

    def _prepared(self, state: DetectorState) -> knn_lib.BankIndex:
        with self._lock:
            if tilebank.n_positions(self.cfg):  # one index per position's bank, kept with its slices
                hit = self._indexes.get(id(state.bank))
                if hit is None or hit[0] is not state.bank:
                    hit = self._indexes[id(state.bank)] = (state.bank, knn_lib.prepare_bank(state.bank))
                return hit[1]
            if getattr(self, "_index_src", None) is not state.bank:  # prepare each bank once
                self._index_src, self._index = state.bank, knn_lib.prepare_bank(state.bank)
            return self._index

    def scored_maps(self, patch) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(maps, image scores, max patch score) of patch scores [B, N], in one compiled call
        (eagerly, the two maxes and a reshape were three more programs to compile)."""
        ahead.wait(self._scored)
        return self._scored(patch)

    def compile_ahead(self, state: DetectorState, n_images: int):
        """Compile on a background thread (`pn_jax.ahead`) the signal functions and maps for
        `n_images`-image batches against `state` (only its shapes are read; issue 25): the fit
        calls it before its coreset, so these compile beside the coreset's and the statistics'
        on a second core. `signals`/`scored_maps` wait for it. Single-device scorers only."""
        if self._sharded or self.cfg.noising.influence == "predictor":
            return
        shape = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)  # noqa: E731
        m, d = state.bank.shape
        lay = tiles.of_config(self.cfg)
        n = self.grid[0] * self.grid[1] * (lay.n_tiles if lay is not None else 1)
        f32, i32 = jnp.float32, jnp.int32
        args = (shape(state.params), jax.eval_shape(knn_lib.prepare_bank, state.bank), shape(state.dims),
                shape(state.stats), jax.ShapeDtypeStruct((n_images, n, d), f32))
        owners = (jax.ShapeDtypeStruct((m,), i32), jax.ShapeDtypeStruct((n_images,), i32))
        ahead.compile(self._signals_loo, args + (owners,))  # the threshold's, first
        ahead.compile(self._scored, (jax.ShapeDtypeStruct((n_images, n), f32),))
        ahead.compile(self._signals, args)

    def __call__(self, state: DetectorState, feats, exclude=None, *, extra_maps: bool = True) -> dict:
        """Scores, maps and signals of a batch (dispatched, not waited for). `extra_maps=False`
        skips the influence and noise maps (nothing but the figures reads them)."""
        sig = self.signals(state, feats, exclude)
        patch = patch_score(self.cfg, sig, state.stats)
        amap, img, patch_max = self.scored_maps(patch)
        out = {"image_scores": img, "anomaly_maps": amap, "patch_scores": patch, "image_scores_patch_max": patch_max}
        if self.need_influence and extra_maps:
            out["influence_maps"] = self.maps(sig["influence"])
            out["noise_maps"] = self.maps(sig["noise"])
        out["signals"] = sig
        return out
