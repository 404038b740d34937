"""Approximate greedy k-center coreset (PatchCore's ApproximateGreedyCoresetSampler).

1. Project features to `proj_dim` with a random Gaussian matrix (explicit key).
2. Pick `n_starts` random points; the min-distance vector starts as each point's mean
   distance to them (the starts themselves are not selected).
3. `n_select` times: take the argmax of the min-distance vector, then lower the vector with
   the distances to the new centre. A fixed-size `lax.fori_loop`; nothing leaves the device.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def n_coreset(n: int, ratio: float) -> int:
    return max(1, int(n * ratio))


def random_projection(key: jax.Array, dim_in: int, dim_out: int) -> jax.Array:
    return jax.random.normal(key, (dim_in, dim_out), jnp.float32) / np.sqrt(dim_out)


def _dist_to(points: jax.Array, sq: jax.Array, centre: jax.Array) -> jax.Array:
    # sqrt(|x|^2 - 2 x.c + |c|^2); clamp before sqrt, as PatchCore does.
    return jnp.sqrt(jnp.maximum(sq - 2.0 * points @ centre + centre @ centre, 0.0))


@functools.partial(jax.jit, static_argnames=("n_select",))
def greedy_select(projected: jax.Array, starts: jax.Array, n_select: int) -> jax.Array:
    """projected [N, P], starts [S] indices -> selected indices [n_select] (int32)."""
    sq = jnp.sum(projected * projected, axis=-1)
    start_d = jax.vmap(lambda i: _dist_to(projected, sq, projected[i]))(starts)  # [S, N]
    min_d = jnp.mean(start_d, axis=0)

    def body(t, carry):
        min_d, sel = carry
        i = jnp.argmax(min_d).astype(jnp.int32)
        sel = sel.at[t].set(i)
        min_d = jnp.minimum(min_d, _dist_to(projected, sq, projected[i]))
        return min_d, sel

    _, sel = jax.lax.fori_loop(0, n_select, body, (min_d, jnp.zeros((n_select,), jnp.int32)))
    return sel


def coreset_indices(key: jax.Array, features: jax.Array, ratio: float, proj_dim: int = 128,
                    n_starts: int = 10) -> jax.Array:
    """Indices of the approximate greedy coreset of features [N, D]."""
    n, d = features.shape
    n_select = n_coreset(n, ratio)
    if n_select >= n:
        return jnp.arange(n, dtype=jnp.int32)
    k_proj, k_start = jax.random.split(key)
    projected = project_chunked(features, random_projection(k_proj, d, proj_dim)) if proj_dim < d \
        else jnp.asarray(features, jnp.float32)
    starts = jax.random.choice(k_start, n, (min(n_starts, n),), replace=False)
    return greedy_select(projected, starts, n_select)


@jax.jit
def project(features: jax.Array, proj: jax.Array) -> jax.Array:
    return features.astype(jnp.float32) @ proj


def project_chunked(features, proj: jax.Array, chunk: int = 32768) -> jax.Array:
    """Project host features chunk by chunk, so only the [N, proj_dim] result lives on device."""
    parts = [project(jnp.asarray(features[i:i + chunk]), proj) for i in range(0, len(features), chunk)]
    return jnp.concatenate(parts, axis=0)
