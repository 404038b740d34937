"""Feature influence (SPEC 2.6): how much perturbing feature dim d moves a patch's k-NN distances.

  influence[q, j] = mean_k |dist_k(f_q + eps e_{S_j}) - dist_k(f_q)|      (j indexes S)

(the learnable per-dim weight w_d is applied by the caller). Four estimators:

  fd        the note's literal form: perturb, re-run the k-NN search over the whole bank,
            compare the new sorted K distances rank by rank with the old ones.
  fd_fixed  the same with the K neighbours held fixed, in closed form from the residuals
            r_k = f - m_k:  dist_k' - dist_k = (2 eps r_kd + eps^2) / (dist_k' + dist_k).
  grad      eps * |d dist_k / d f_d| from reverse-mode autodiff (jax.jacrev); = eps |r_kd| / dist_k.
  jvp       the same derivative in forward mode (jax.jvp), one tangent per dim in S.

All four agree to O(eps^2) wherever the neighbour set does not change under the perturbation.

Numerics: dist ~ O(10..100) while the change is ~ eps |r_d| / dist ~ 1e-5, so subtracting
two float32 distances loses most digits. fd_fixed uses the cancellation-free form above;
fd does the same for ranks whose neighbour did not switch, and subtracts genuinely different
distances (both recomputed from residuals) only where the neighbour did switch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pn_jax import knn as knn_lib


def _residuals(f, bank, idx):
    """f [Q,D], idx [Q,K] -> r [Q,K,D] = f - bank[idx]."""
    return f[:, None, :].astype(jnp.float32) - bank[idx].astype(jnp.float32)


def _stable_delta(r_d, dist, eps):
    """dist(f + eps e_d) - dist(f) for a fixed neighbour, without cancellation."""
    num = 2.0 * eps * r_d + eps * eps
    return num / (jnp.sqrt(jnp.maximum(dist * dist + num, 0.0)) + dist)


def fd_fixed(f, bank, dist, idx, dims, eps):
    """[Q,D] -> [Q,|S|]. Neighbours fixed; vectorised over dims."""
    r = _residuals(f, bank, idx)[..., dims]  # [Q,K,S]
    delta = _stable_delta(r, dist[..., None], eps)
    return jnp.mean(jnp.abs(delta), axis=1)


def _dist_fixed(f_q, nbrs):
    """k-NN distances of one query f_q [D] to fixed neighbours nbrs [K,D]."""
    return jnp.sqrt(jnp.sum((f_q[None, :] - nbrs) ** 2, axis=-1))


def grad(f, bank, dist, idx, dims, eps):
    """eps * mean_k |d dist_k / d f_d| via jax.jacrev, dims S only."""
    nbrs = bank[idx].astype(jnp.float32)  # [Q,K,D]
    jac = jax.vmap(jax.jacrev(_dist_fixed))(f.astype(jnp.float32), nbrs)  # [Q,K,D]
    return eps * jnp.mean(jnp.abs(jac[..., dims]), axis=1)


def jvp(f, bank, dist, idx, dims, eps):
    """Forward mode: one jvp per dim in S (tangent e_d)."""
    nbrs = bank[idx].astype(jnp.float32)
    f32 = f.astype(jnp.float32)
    d_feat = f.shape[-1]

    def one_dim(d):
        tangent = jnp.zeros((d_feat,), jnp.float32).at[d].set(1.0)
        per_q = lambda fq, nb: jax.jvp(lambda x: _dist_fixed(x, nb), (fq,), (tangent,))[1]
        return jnp.mean(jnp.abs(jax.vmap(per_q)(f32, nbrs)), axis=1)  # [Q]

    return eps * jax.lax.map(one_dim, dims).T  # [Q,S]


def fd(f, bank, dist, idx, dims, eps, block: int = 4096):
    """The literal form: perturb dim d, search the whole bank again, compare rank by rank.

    The re-search ranks all M entries by d2(m) + 2 eps (f_d - m_d) + eps^2, which is exactly
    the perturbed squared distance (only coordinate d moved). The K winners' distances are
    then recomputed from residuals.
    """
    k = idx.shape[-1]
    f32 = f.astype(jnp.float32)
    bank32 = bank.astype(jnp.float32)
    # Squared distances to every bank entry (expanded form, as the search itself uses).
    d2_all = (jnp.sum(f32 * f32, -1, keepdims=True) - 2.0 * f32 @ bank32.T
              + jnp.sum(bank32 * bank32, -1)[None, :])

    def one_dim(d):
        shift = 2.0 * eps * (f32[:, d][:, None] - bank32[:, d][None, :]) + eps * eps
        neg, new_idx = jax.lax.top_k(-(d2_all + shift), k)
        new_r = _residuals(f32, bank32, new_idx)
        new_d2_unpert = jnp.sum(new_r * new_r, -1)  # exact d2 of the new winners, unperturbed
        new_num = 2.0 * eps * new_r[..., d] + eps * eps
        new_dist = jnp.sqrt(new_d2_unpert + new_num)
        same = new_idx == idx
        stable = new_num / (new_dist + dist)  # exact change where the neighbour is the same
        switched = new_dist - dist  # a different bank entry: a genuine difference
        return jnp.mean(jnp.abs(jnp.where(same, stable, switched)), axis=-1)  # [Q]

    return jax.lax.map(one_dim, dims).T


METHODS = {"fd": fd, "fd_fixed": fd_fixed, "grad": grad, "jvp": jvp}


def influence(method: str, f, bank, dist, idx, dims, eps):
    """Dispatch; f [Q,D], dist/idx [Q,K] (from the k-NN search), dims [S] -> [Q,S]."""
    try:
        fn = METHODS[method]
    except KeyError:
        raise ValueError(f"unknown influence method {method!r}; choose from {sorted(METHODS)}") from None
    return fn(f, bank, dist, idx, dims, eps)


def mean_influence_identity(dist, r_l1, eps, d_total):
    """For fixed neighbours, grad influence averaged over all D dims equals
    eps * mean_k(||r_k||_1 / ||r_k||_2) / D (SPEC 2.6). Used as a check."""
    return eps * jnp.mean(r_l1 / dist, axis=-1) / d_total


def neighbours(f, bank, k, block):
    """Convenience: exact k-NN for influence tests."""
    return knn_lib.knn(f, bank, k=k, block=block)
