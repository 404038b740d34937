"""Approximate greedy k-center coreset (PatchCore's ApproximateGreedyCoresetSampler).

1. Project features to `proj_dim` with a random Gaussian matrix (explicit key).
2. Pick `n_starts` random points; the min-distance vector starts as each point's mean
   distance to them (the starts themselves are not selected).
3. `n_select` times: take the argmax of the min-distance vector, then lower the vector with
   the distances to the new centre. `lax.fori_loop` on the device, in a few chunks so that a
   progress bar can move; nothing but the chunk bounds crosses to the host.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm


def n_coreset(n: int, ratio: float) -> int:
    return max(1, int(n * ratio))


def random_projection(key: jax.Array, dim_in: int, dim_out: int) -> jax.Array:
    return jax.random.normal(key, (dim_in, dim_out), jnp.float32) / np.sqrt(dim_out)


def _dist_to(points: jax.Array, sq: jax.Array, centre: jax.Array) -> jax.Array:
    # sqrt(|x|^2 - 2 x.c + |c|^2); clamp before sqrt, as PatchCore does.
    return jnp.sqrt(jnp.maximum(sq - 2.0 * points @ centre + centre @ centre, 0.0))


@jax.jit
def _init_min_distance(projected, starts):
    sq = jnp.sum(projected * projected, axis=-1)
    start_d = jax.vmap(lambda i: _dist_to(projected, sq, projected[i]))(starts)  # [S, N]
    return jnp.mean(start_d, axis=0)


@jax.jit
def _greedy_steps(projected, min_d, sel, t0, t1):
    """Greedy steps t0..t1-1 (traced bounds: one compilation serves every chunk)."""
    sq = jnp.sum(projected * projected, axis=-1)

    def body(t, carry):
        min_d, sel = carry
        i = jnp.argmax(min_d).astype(jnp.int32)
        sel = sel.at[t].set(i)
        min_d = jnp.minimum(min_d, _dist_to(projected, sq, projected[i]))
        return min_d, sel

    return jax.lax.fori_loop(t0, t1, body, (min_d, sel))


def greedy_select(projected: jax.Array, starts: jax.Array, n_select: int, progress: bool = False,
                  chunks: int = 20) -> jax.Array:
    """projected [N, P], starts [S] indices -> selected indices [n_select] (int32).

    The loop runs on the device in `chunks` pieces so a progress bar can advance between them.
    """
    projected = jnp.asarray(projected, jnp.float32)
    min_d = _init_min_distance(projected, jnp.asarray(starts))
    sel = jnp.zeros((n_select,), jnp.int32)
    step = max(1, -(-n_select // chunks))
    bar = tqdm(total=n_select, desc="coreset", unit="pt", leave=False, disable=not progress)
    for t0 in range(0, n_select, step):
        t1 = min(t0 + step, n_select)
        min_d, sel = _greedy_steps(projected, min_d, sel, t0, t1)
        if progress:
            sel.block_until_ready()
        bar.update(t1 - t0)
    bar.close()
    return sel


def coreset_indices(key: jax.Array, features: jax.Array, ratio: float, proj_dim: int = 128,
                    n_starts: int = 10, progress: bool = False) -> jax.Array:
    """Indices of the approximate greedy coreset of features [N, D]."""
    n, d = features.shape
    n_select = n_coreset(n, ratio)
    if n_select >= n:
        return jnp.arange(n, dtype=jnp.int32)
    k_proj, k_start = jax.random.split(key)
    projected = project_chunked(features, random_projection(k_proj, d, proj_dim)) if proj_dim < d \
        else jnp.asarray(features, jnp.float32)
    starts = jax.random.choice(k_start, n, (min(n_starts, n),), replace=False)
    return greedy_select(projected, starts, n_select, progress=progress)


@jax.jit
def project(features: jax.Array, proj: jax.Array) -> jax.Array:
    return features.astype(jnp.float32) @ proj


def project_chunked(features, proj: jax.Array, chunk: int = 32768) -> jax.Array:
    """Project host features chunk by chunk, so only the [N, proj_dim] result lives on device."""
    parts = [project(jnp.asarray(features[i:i + chunk]), proj) for i in range(0, len(features), chunk)]
    return jnp.concatenate(parts, axis=0)
