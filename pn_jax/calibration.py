"""A per-dimension noise model of normal patches (beyond the note; issue "calibrated noise").

At fit time, from normal patches that are NOT in the bank (the held-out images), with the
nearest bank entry m(f) re-searched for each patch:

    s_j^2 = mean_patches (f_j - m_j(f))^2                       (RMS residual per dim)
    s_j^2 <- (1 - lam) s_j^2 + lam * mean_j s_j^2               (shrinkage to the mean)
    s_j   <- max(s_j, floor * median_j s_j)                     (no dimension explodes)

Score of a test patch: the diagonal-Gaussian negative log-likelihood of its residual,
0.5 * sum_j ((f_j - m_j) / s_j)^2, with the k-NN search itself done in the whitened space
(f / s against bank / s; the bank is scaled once per call). `calibrated` is the whitened
distance to the nearest entry (sqrt(2 NLL), the form whose blurred max is the image score),
`calibrated_mean` its mean over K, `calibrated_nll` the NLL itself.

`calibrated_rerank` needs no second search: the smallest whitened distance among the K
Euclidean nearest neighbours that the k-NN search (and the influence) already found. It is
an upper bound of `calibrated` (equal whenever the whitened nearest entry is among them) and
costs K row gathers instead of a second pass over the whole bank.

The note's per-dim proposed noise std is a per-patch refinement of s_j; `proposed` uses it
as the whitening scale on the influence dims S (see `proposed_nll`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pn_jax import ahead
from pn_jax import knn as knn_lib

CALIBRATED_SCORES = ("calibrated", "calibrated_mean", "calibrated_nll", "proposed")  # whitened search
RERANK_SCORES = ("calibrated_rerank",)  # over the Euclidean K-NN


def fit_noise_scale(bank: jax.Array, holdout: jax.Array, *, shrinkage: float = 0.1,
                    floor: float = 0.1, block: int = 4096, nearest: jax.Array | None = None) -> jax.Array:
    """holdout [P, D] normal patch features not in the bank -> s [D]. `nearest` [P]: the
    index of each patch's nearest bank entry, when the caller has searched already (or the
    K-NN indices [..., K] of those P patches, nearest first: the first column is used)."""
    if nearest is None:
        nearest = knn_lib.knn(holdout, bank, k=1, block=block)[1][:, 0]
    ahead.wait(noise_scale_program)
    return noise_scale_program(bank, holdout, nearest, shrinkage, floor)


@jax.jit
def noise_scale_program(bank, holdout, nearest, shrinkage, floor):
    """s [D] from residuals to the given nearest rows (`fit_noise_scale`; jitted, called
    positionally, so `normalstats.compile_ahead` can compile it before the coreset)."""
    if nearest.ndim > 1:  # K-NN indices [..., K]: the nearest of each patch, in patch order
        nearest = nearest[..., 0].reshape(-1)
    r = holdout.astype(jnp.float32) - bank[nearest].astype(jnp.float32)
    var = jnp.mean(r * r, axis=0)
    var = (1.0 - shrinkage) * var + shrinkage * jnp.mean(var)
    s = jnp.sqrt(var)
    return jnp.maximum(s, floor * jnp.median(s) + 1e-12)


def whitened_knn(f: jax.Array, bank: jax.Array, scale: jax.Array, k: int, block: int, knn_fn=None):
    """k-NN in the space whitened by `scale`: (distances [Q,k], indices [Q,k]).
    `knn_fn(queries, bank) -> (dist, idx)`: the K-NN search to use (k fixed inside it), e.g.
    the sharded one, which knows which rows of a padded bank are real."""
    inv = 1.0 / scale
    if knn_fn is None:
        return knn_lib.knn(f * inv, bank * inv, k=k, block=block)
    return knn_fn(f * inv, bank * inv)


def calibrated_signals(f, bank, scale, k, block, knn_fn=None):
    """Per-patch calibrated scores of one image's features f [N, D]."""
    d_w, idx = whitened_knn(f, bank, scale, k, block, knn_fn)
    return {"calibrated": d_w[:, 0], "calibrated_mean": jnp.mean(d_w, -1),
            "calibrated_nll": 0.5 * d_w[:, 0] ** 2}, idx


def rerank_signals(f, bank, scale, idx):
    """Whitened distance of f [N, D] to the nearest of its Euclidean K-NN idx [N, K]."""
    d_w = knn_lib.exact_distances(f, bank, idx, inv_scale=1.0 / scale)
    return {"calibrated_rerank": jnp.min(d_w, axis=-1)}


def proposed_nll(f, bank, nn_idx, dims, noise_std):
    """0.5 * sum_{j in S} (r_j / sigma_j)^2 with the note's proposed per-patch std sigma [N,S]."""
    r = f[:, dims] - bank[nn_idx][:, dims]
    return 0.5 * jnp.sum((r / noise_std) ** 2, axis=-1)
