"""Adaptive noise proposal and score combination (SPEC 2.6-2.8).

Per patch q with K-NN distances dist [K] and influence I [S] over the chosen dims S:

  I_w        = influence_weight[S] * I                      (learnable, init 1)
  I_norm     = (I_w - mu_I) / sd_I                          (fit-time statistics, scalars)
  D_norm     = (mean_k dist - mu_D) / sd_D
  combined   = I_norm + distance_weight * D_norm            (broadcast over S)
  noise_std  = min_std + (max_std - min_std) * sigmoid(combined)
  score      = a * mean_S I_w + b * mean_k dist + c * mean_S noise_std   (a,b,c = 0.4,0.4,0.2)

mu/sd come from held-out normal images at fit time and never from the batch being scored:
the note normalises over the batch, which makes an image's score depend on its batch-mates.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pn_jax import calibration
from pn_jax import influence as influence_lib
from pn_jax import knn as knn_lib

SIGNALS = ("influence", "distance", "noise")


class Stats(NamedTuple):
    """Fit-time normalisation statistics (all float32 scalars or [3])."""
    infl_mean: jax.Array
    infl_std: jax.Array
    dist_mean: jax.Array
    dist_std: jax.Array
    signal_mean: jax.Array  # [3] patch-level influence/distance/noise, for optional z-norm
    signal_std: jax.Array


def identity_stats() -> Stats:
    z, o = jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32)
    return Stats(z, o, z, o, jnp.zeros((3,), jnp.float32), jnp.ones((3,), jnp.float32))


def propose_noise(infl_w, dist_signal, distance_weight, stats: Stats, std_range):
    """infl_w [...,S], dist_signal [...] -> noise_std [...,S]."""
    lo, hi = std_range
    i_norm = (infl_w - stats.infl_mean) / stats.infl_std
    d_norm = (dist_signal - stats.dist_mean) / stats.dist_std
    combined = i_norm + distance_weight[0] * d_norm[..., None]
    return lo + (hi - lo) * jax.nn.sigmoid(combined)


def patch_signals(params, bank, dims, features, stats: Stats, *, k, influence, eps, std_range,
                  block, calibrated: bool = False, rerank: bool = False, knn_fn=None, bank_s=None,
                  n_valid=None, excluded=None, precision=jax.lax.Precision.HIGHEST):
    """features [N, D] of ONE image -> dict of per-patch signals [N].

    With `calibrated`, also the whitened-space scores of the calibrated noise model
    (params["noise_scale"], fitted on held-out normals) and the `proposed` NLL; with
    `rerank`, the calibrated score over the Euclidean K-NN (no second search). `bank_s`: the
    bank's columns S (`influence.bank_columns`), when the caller shares them across images.
    `knn_fn(features, bank) -> (dist, idx)` replaces both searches (e.g. a sharded bank); with
    a padded bank, `n_valid` (its real rows) keeps the pads out of the literal `fd` re-search, and
    `excluded` ([M] bool: the rows `knn_fn` leaves out, e.g. the scored image's own) keeps them out too.
    `precision`: of the influence's matmuls (`pn_jax.precision`; the k-NN searches pin their own)."""
    knn_fn = knn_fn or (lambda f, b: knn_lib.knn(f, b, k=k, block=block))
    dist, idx = knn_fn(features, bank)
    if influence == "predictor":  # learned at fit time from grad influence (pn_jax/predictor.py)
        from pn_jax.research import predictor

        infl = predictor.influence(params["predictor"], features, bank, dist, idx, dims, eps, bank_s)
    else:
        infl = influence_lib.influence(influence, features, bank, dist, idx, dims, eps, bank_s, n_valid,
                                       excluded=excluded, precision=precision)
    out, noise = signals_from(params, dims, stats, dist, infl, std_range)
    if rerank:
        out.update(calibration.rerank_signals(features, bank, params["noise_scale"], idx))
    if calibrated:
        cal, cal_idx = calibration.calibrated_signals(features, bank, params["noise_scale"], k, block, knn_fn)
        out.update(cal)
        out["proposed"] = calibration.proposed_nll(features, bank, cal_idx[:, 0], dims, noise)
    return out


def signals_from(params, dims, stats: Stats, dist, infl, std_range):
    """Per-patch signals from the k-NN distances dist [...,K] and raw influence infl [...,S]:
    (dict of [...] signals, per-dim noise std [...,S])."""
    infl_w = infl * params["influence_weight"][dims]
    dist_signal = jnp.mean(dist, axis=-1)
    noise = propose_noise(infl_w, dist_signal, params["distance_weight"], stats, std_range)
    out = {"influence": jnp.mean(infl_w, axis=-1), "distance": dist_signal,
           "noise": jnp.mean(noise, axis=-1), "nearest": dist[..., 0]}
    return out, noise


def combine(signals, weights, stats: Stats, znorm: bool):
    """Weighted sum of the three patch signals (optionally z-normalised with fit-time stats)."""
    parts = [signals[name] for name in SIGNALS]
    if znorm:
        parts = [(p - stats.signal_mean[i]) / stats.signal_std[i] for i, p in enumerate(parts)]
    return sum(w * p for w, p in zip(weights, parts))


class AdaptiveNoisingModule(nnx.Module):
    """Learnable part of Propose Noising: per-dim influence weight [D] and distance weight [1].

    The maths lives in the pure functions of this module; the class holds the parameters and
    gives the note's three steps their names.
    """

    def __init__(self, feature_dim: int, *, k: int = 9, influence: str = "fd_fixed",
                 eps: float = 1e-3, std_range=(0.01, 0.5), block: int = 4096,
                 precision=jax.lax.Precision.HIGHEST):
        self.influence_weight = nnx.Param(jnp.ones((feature_dim,), jnp.float32))
        self.distance_weight = nnx.Param(jnp.ones((1,), jnp.float32))
        self.k, self.influence, self.eps = k, influence, eps
        self.std_range, self.block, self.precision = tuple(std_range), block, precision

    def params(self):
        return {"influence_weight": self.influence_weight[...],
                "distance_weight": self.distance_weight[...]}

    def compute_spatial_distance(self, features, bank):
        """[B,N,D] x [M,D] -> (dist [B,N,K] ascending, idx [B,N,K])."""
        return knn_lib.knn_batched(features, bank, k=self.k, block=self.block)

    def compute_feature_influence(self, features, bank, dist, idx, dims):
        """[B,N,D] -> weighted influence [B,N,S]."""
        b, n, d = features.shape
        raw = influence_lib.influence(self.influence, features.reshape(b * n, d), bank,
                                      dist.reshape(b * n, -1), idx.reshape(b * n, -1), dims, self.eps,
                                      precision=self.precision)
        return raw.reshape(b, n, -1) * self.influence_weight[...][dims]

    def propose_adaptive_noise(self, infl_w, dist, stats: Stats):
        return propose_noise(infl_w, jnp.mean(dist, -1), self.distance_weight[...], stats, self.std_range)
