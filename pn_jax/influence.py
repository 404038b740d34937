"""Feature influence (SPEC 2.6): how much perturbing feature dim d moves a patch's k-NN distances.

  influence[q, j] = mean_k |dist_k(f_q + eps e_{S_j}) - dist_k(f_q)|      (j indexes S)

(the learnable per-dim weight w_d is applied by the caller). Four estimators:

  fd        the note's literal form: perturb, re-run the k-NN search over the rows the first
            search could return (not pads, not a left-out image's entries), compare the new
            sorted K distances rank by rank with the old ones.
  fd_fixed  the same with the K neighbours held fixed, in closed form from the residuals
            r_k = f - m_k:  dist_k' - dist_k = (2 eps r_kd + eps^2) / (dist_k' + dist_k).
  grad      eps * |d dist_k / d f_d| from reverse-mode autodiff (jax.grad); = eps |r_kd| / dist_k
            (0 where dist_k = 0, i.e. the patch equals its neighbour).
  jvp       the same derivative in forward mode (jax.jvp), one tangent per dim in S, with
            dist_k written as a function of the coordinates S (the other dims enter as a constant).

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

HIGHEST = jax.lax.Precision.HIGHEST


def _stable_delta(r_d, dist, eps):
    """dist(f + eps e_d) - dist(f) for a fixed neighbour, without cancellation."""
    num = 2.0 * eps * r_d + eps * eps
    return num / (jnp.sqrt(jnp.maximum(dist * dist + num, 0.0)) + dist)


def bank_columns(bank, dims):
    """The bank's columns S, [M, S]: computed once per scoring call, shared by all images."""
    return jnp.take(bank, dims, axis=1)


def _neighbour_columns(bank, idx, dims, bank_s):
    """The neighbours' coordinates on S, [Q,K,S]: rows of the [M,S] columns (gathered with
    clipped indices, which XLA's CPU gather does ~4x faster than the default bounds mode)."""
    bank_s = bank_columns(bank, dims) if bank_s is None else bank_s
    return jnp.take(bank_s, idx, axis=0, mode="clip").astype(jnp.float32)


def fd_fixed(f, bank, dist, idx, dims, eps, bank_s=None):
    """[Q,D] -> [Q,|S|]. Neighbours fixed; vectorised over dims."""
    r = f[:, None, dims].astype(jnp.float32) - _neighbour_columns(bank, idx, dims, bank_s)  # [Q,K,S]
    delta = _stable_delta(r, dist[..., None], eps)
    return jnp.mean(jnp.abs(delta), axis=1)


def _on_dims(f, bank, dist, idx, dims, bank_s=None):
    """dist_k as a function of the coordinates S only: (x_S [Q,S], m_S [Q,K,S], c [Q,K]) with
    c = dist_k^2 - |r_kS|^2 the part of the squared distance from the dims NOT in S, so that
    dist_k(f) = sqrt(c + |x_S - m_kS|^2). Only the [M,S] columns of the bank are gathered, never
    the neighbours' full [D] rows; the K-NN search already computed dist_k from full residuals."""
    x_s = f[:, dims].astype(jnp.float32)
    m_s = _neighbour_columns(bank, idx, dims, bank_s)  # [Q,K,S]
    r_s = x_s[:, None, :] - m_s
    c = jnp.maximum(dist * dist - jnp.sum(r_s * r_s, -1), 0.0)
    return x_s, m_s, c


def _dist_of_s(x_s, m_s, c):
    # sqrt has an infinite slope at 0, so a patch equal to a bank entry would give 0 * inf =
    # NaN. There the derivative is defined as 0 (the distance is at its minimum); the inner
    # where keeps sqrt's own gradient finite so the outer where can zero it (double where).
    sq = c + jnp.sum((x_s - m_s) ** 2, axis=-1)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def grad(f, bank, dist, idx, dims, eps, bank_s=None):
    """eps * mean_k |d dist_k / d f_d| by reverse mode: one jax.grad of sum_{q,k} dist_k(f_q)
    with respect to a per-(q,k) copy of f_S (each distance depends on its own copy only)."""
    x_s, m_s, c = _on_dims(f, bank, dist, idx, dims, bank_s)
    copies = jnp.broadcast_to(x_s[:, None, :], m_s.shape)
    g = jax.grad(lambda x: jnp.sum(_dist_of_s(x, m_s, c)))(copies)  # [Q,K,S]
    return eps * jnp.mean(jnp.abs(g), axis=1)


def jvp(f, bank, dist, idx, dims, eps, bank_s=None):
    """Forward mode: one jax.jvp per dim in S (tangent e_d) of dist_k as a function of f_S."""
    x_s, m_s, c = _on_dims(f, bank, dist, idx, dims, bank_s)

    def along(t):  # t [S] one-hot tangent
        tangent = jnp.broadcast_to(t, x_s.shape)
        return jax.jvp(lambda x: _dist_of_s(x[:, None, :], m_s, c), (x_s,), (tangent,))[1]  # [Q,K]

    d = jax.vmap(along)(jnp.eye(dims.shape[0], dtype=jnp.float32))  # [S,Q,K]
    return eps * jnp.mean(jnp.abs(d), axis=-1).T


def fd(f, bank, dist, idx, dims, eps, bank_s=None, n_valid=None, excluded=None, precision=HIGHEST):
    """The literal form: perturb dim d, search the bank again, compare rank by rank.

    The re-search ranks all M entries by d2(m) + 2 eps (f_d - m_d) + eps^2, which is exactly
    the perturbed squared distance (only coordinate d moved). The K winners' distances are
    then recomputed from residuals. Rows that the first search could not return can never
    win the re-search either (+inf): `n_valid`, only the first n_valid rows are bank entries
    (a sharded bank is zero-padded to a multiple of the device count); `excluded` [M] bool,
    the rows `knn.knn_excluding` left out (leave-one-image-out: the scored image's own entries).
    `precision`: of the re-search's matmul (`pn_jax.precision`; the winners' distances are
    recomputed from residuals either way).
    """
    k = idx.shape[-1]
    f32 = f.astype(jnp.float32)
    bank32 = bank.astype(jnp.float32)
    m = bank.shape[0]
    keep = None if n_valid is None or n_valid >= m else jnp.arange(m) < n_valid
    if excluded is not None:
        keep = ~excluded if keep is None else keep & ~excluded
    # Squared distances to every bank entry, in the expanded form the search uses, but about
    # the mean of the searchable rows: centring shrinks |q|^2 and |m|^2 and with them the
    # float32 rounding that otherwise shows up as false neighbour switches between near-tied
    # entries (the same centre as a search of the bank without the other rows).
    if keep is None:
        mu = jnp.mean(bank32, axis=0)
    else:
        mu = jnp.sum(jnp.where(keep[:, None], bank32, 0.0), axis=0) / jnp.maximum(jnp.sum(keep), 1)
    fc, bc = f32 - mu, bank32 - mu
    d2_all = (jnp.sum(fc * fc, -1, keepdims=True) - 2.0 * jnp.matmul(fc, bc.T, precision=precision)
              + jnp.sum(bc * bc, -1)[None, :])
    if keep is not None:
        d2_all = jnp.where(keep[None, :], d2_all, jnp.inf)

    def one_dim(d):
        shift = 2.0 * eps * (f32[:, d][:, None] - bank32[:, d][None, :]) + eps * eps
        neg, new_idx = jax.lax.top_k(-(d2_all + shift), k)
        # exact d2 of the new winners, unperturbed, and their residual along d
        new_d2_unpert = knn_lib.exact_distances(f32, bank32, new_idx) ** 2
        new_num = 2.0 * eps * (f32[:, d][:, None] - bank32[:, d][new_idx]) + eps * eps
        new_dist = jnp.sqrt(new_d2_unpert + new_num)
        same = new_idx == idx
        stable = new_num / (new_dist + dist)  # exact change where the neighbour is the same
        switched = new_dist - dist  # a different bank entry: a genuine difference
        return jnp.mean(jnp.abs(jnp.where(same, stable, switched)), axis=-1)  # [Q]

    return jax.lax.map(one_dim, dims).T


METHODS = {"fd": fd, "fd_fixed": fd_fixed, "grad": grad, "jvp": jvp}


def influence(method: str, f, bank, dist, idx, dims, eps, bank_s=None, n_valid=None, excluded=None,
              precision=HIGHEST):
    """Dispatch; f [Q,D], dist/idx [Q,K] (from the k-NN search), dims [S] -> [Q,S].
    `n_valid` (the bank's real rows, the rest are pads) and `excluded` ([M] bool, the rows the
    search left out) say which rows the search could return. Every estimator takes them; only
    `fd` searches the bank again, the others use the K neighbours they are given. `precision`:
    of fd's re-search matmul (`pn_jax.precision`); the other estimators have no matmul."""
    try:
        fn = METHODS[method]
    except KeyError:
        raise ValueError(f"unknown influence method {method!r}; choose from {sorted(METHODS)}") from None
    if method == "fd":
        return fd(f, bank, dist, idx, dims, eps, bank_s, n_valid=n_valid, excluded=excluded, precision=precision)
    return fn(f, bank, dist, idx, dims, eps, bank_s)


def mean_influence_identity(dist, r_l1, eps, d_total):
    """For fixed neighbours, grad influence averaged over all D dims equals
    eps * mean_k(||r_k||_1 / ||r_k||_2) / D (SPEC 2.6). Used as a check."""
    return eps * jnp.mean(r_l1 / dist, axis=-1) / d_total


def neighbours(f, bank, k, block):
    """Convenience: exact k-NN for influence tests."""
    return knn_lib.knn(f, bank, k=k, block=block)
