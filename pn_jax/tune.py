"""Tune the learnable parameters with optax on the validation split (SPEC 2.10).

The validation split is normal images held out of the bank plus synthetic anomalies made
from them (Perlin / cut-paste, seeded), with their masks; test images are never read here.

Objective: a pairwise logistic ranking loss between anomalous and normal patches,
    mean_{a, n} softplus(-(z_a - z_n)),   z = (score - mean_normal) / std_normal,
which is differentiable and invariant to the scale of the score (so it cannot be lowered by
simply inflating every score).

What is tuned depends on the score: the note's mix tunes `influence_weight` [D] and
`distance_weight` [1]; the calibrated scores tune the per-dim noise scale s [D] (as log s).
An L2 prior `reg * mean((log s - log s_0)^2)` keeps the calibrated noise scale near its
value fitted on held-out normals: the synthetic anomalies are only a proxy for real defects,
and without it s over-fits them (ELPV: test AUROC fell by ~4 points). The note's weights have
no fitted value to stay near, so their default `reg` is 0.

Every patch score is a function of that patch alone, so each step scores only the patches
the loss uses (all anomalous ones and a seeded sample of normal ones), not whole images.

The fit-time statistics normalise the WEIGHTED influence (and the noise built from it), so
after the note's weights are tuned they are recomputed with the tuned weights, from normal
held-out features (`stats_feats`, default: the validation images without an anomalous pixel).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pn_jax import detector, normalstats
from pn_jax.config import Config

SEED_PARAMS = ("influence_weight", "distance_weight")
CALIBRATED_PARAMS = ("noise_scale",)


def tuned_params(variant: str) -> tuple[str, ...]:
    if variant in ("seed", "seed_z", "influence", "noise", "proposed"):
        return SEED_PARAMS
    if variant.startswith("calibrated"):
        return CALIBRATED_PARAMS
    raise ValueError(f"score {variant!r} has no learnable parameters to tune")


def patch_labels(masks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[n,H,W] {0,1} -> [n, h*w]: 1 if > half the cell is anomalous, 0 if none is, -1 (ignored) else."""
    n, h, w = masks.shape
    gh, gw = grid
    if h % gh or w % gw:
        raise ValueError(f"mask size {h}x{w} is not a multiple of the patch grid {gh}x{gw}")
    frac = masks.reshape(n, gh, h // gh, gw, w // gw).mean(axis=(2, 4)).reshape(n, -1)
    return np.where(frac > 0.5, 1, np.where(frac == 0, 0, -1)).astype(np.int32)


def ranking_loss(scores, anom_idx, norm_idx):
    """scores [n, N] flattened; indices into the flattened array."""
    flat = scores.reshape(-1)
    s_n, s_a = flat[norm_idx], flat[anom_idx]
    mu, sd = jnp.mean(s_n), jnp.std(s_n) + 1e-6
    z_a, z_n = (s_a - mu) / sd, (s_n - mu) / sd
    return jnp.mean(jax.nn.softplus(-(z_a[:, None] - z_n[None, :])))


@dataclasses.dataclass
class TuneResult:
    state: detector.DetectorState
    losses: list[float]
    variant: str
    tuned: tuple[str, ...]


def tune(cfg: Config, state: detector.DetectorState, val_feats: np.ndarray, val_masks: np.ndarray,
         grid: tuple[int, int], *, variant: str | None = None, steps: int = 60, lr: float = 0.05,
         reg: float | None = None, max_normal: int = 2048, seed: int | None = None, log=None,
         stats_feats: np.ndarray | None = None) -> TuneResult:
    """Fit the parameters of `variant` (default: the configured score) to the validation split.
    `stats_feats` [h, N, D]: normal held-out features to recompute the statistics from after
    tuning the note's weights (default: the validation images whose mask is empty)."""
    variant = variant or detector.default_variant(cfg)
    names = tuned_params(variant)
    if reg is None:
        reg = 1.0 if names == CALIBRATED_PARAMS else 0.0
    if names == SEED_PARAMS and stats_feats is None:
        stats_feats = np.asarray(val_feats)[~np.asarray(val_masks).reshape(len(val_masks), -1).any(-1)]
        if not len(stats_feats):
            raise ValueError("tuning the note's weights needs normal images to recompute the fit-time "
                             "statistics with: the validation split has none (pass stats_feats)")
    labels = patch_labels(np.asarray(val_masks) > 0.5, grid).reshape(-1)
    anom = np.flatnonzero(labels == 1)
    norm = np.flatnonzero(labels == 0)
    if len(anom) == 0 or len(norm) == 0:
        raise ValueError("validation split needs both anomalous and normal patches to tune on")
    rng = np.random.default_rng(cfg.seed if seed is None else seed)
    if len(norm) > max_normal:
        norm = np.sort(rng.choice(norm, max_normal, replace=False))
    # Only the labelled patches enter the loss: score them as one "image" of P patches.
    flat = np.asarray(val_feats).reshape(-1, val_feats.shape[-1])
    feats = jnp.asarray(np.concatenate([flat[anom], flat[norm]])[None])
    anom_idx = jnp.arange(len(anom))
    norm_idx = jnp.arange(len(anom), len(anom) + len(norm))

    need = detector.needs(cfg, [variant])
    signal_fn = detector.make_signal_fn(cfg, need_influence=need.influence, calibrated=need.calibrated,
                                        rerank=need.rerank, jit=False)
    fixed = {k: v for k, v in state.params.items() if k not in names}

    def to_params(theta):
        p = dict(fixed)
        for k in names:
            p[k] = jnp.exp(theta[k]) if k == "noise_scale" else theta[k]
        return p

    theta0 = {k: (jnp.log(state.params[k]) if k == "noise_scale" else state.params[k]) for k in names}

    def loss_fn(theta, feats, bank):  # data as arguments: closed-over arrays would be constant-folded
        sig = signal_fn(to_params(theta), bank, state.dims, state.stats, feats)
        rank = ranking_loss(detector.patch_score(cfg, sig, state.stats, variant), anom_idx, norm_idx)
        prior = sum(jnp.mean((theta[k] - theta0[k]) ** 2) for k in names)
        return rank + reg * prior

    theta = dict(theta0)
    opt = optax.adam(lr)
    opt_state = opt.init(theta)

    @jax.jit
    def step(theta, opt_state, feats, bank):
        loss, g = jax.value_and_grad(loss_fn)(theta, feats, bank)
        updates, opt_state = opt.update(g, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state, loss

    losses = []
    for t in range(steps):
        theta, opt_state, loss = step(theta, opt_state, feats, state.bank)
        losses.append(float(loss))
        if log and (t % 10 == 0 or t == steps - 1):
            log(f"  tune[{variant}] step {t:3d} loss {losses[-1]:.4f}")
    final = float(jax.jit(loss_fn)(theta, feats, state.bank))
    losses.append(final)
    params = {**state.params, **{k: v for k, v in to_params(theta).items() if k in names}}
    state = state._replace(params=params)
    if names == SEED_PARAMS:  # the statistics of the weighted influence, with the tuned weights
        state = state._replace(stats=normalstats.fit_stats(cfg, params, state.bank, state.dims, stats_feats))
    return TuneResult(state, losses, variant, names)
