"""Patch scores -> pixel maps -> image scores (SPEC 2.8), as PatchCore does it.

Bilinear upsampling (align_corners=False) of the patch grid to the image size, then a
Gaussian blur with sigma 4 equal to scipy.ndimage.gaussian_filter(mode="reflect",
truncate=4.0). Image score = max of the blurred map (ADer's `sp_max`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_blur(maps: jax.Array, sigma: float) -> jax.Array:
    """Separable blur of [B,H,W], 'reflect' (half-sample symmetric) borders like scipy."""
    if sigma <= 0:
        return maps
    k = jnp.asarray(gaussian_kernel1d(sigma))
    r = (k.shape[0] - 1) // 2
    x = maps
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        xp = jnp.pad(x, pad, mode="symmetric")
        n = x.shape[axis]
        acc = 0.0
        for t in range(2 * r + 1):
            acc = acc + k[t] * jax.lax.slice_in_dim(xp, t, t + n, axis=axis)
        x = acc
    return x


def upsample_maps(patch_maps: jax.Array, size: tuple[int, int]) -> jax.Array:
    """[B,h,w] -> [B,H,W] bilinear, align_corners=False."""
    b = patch_maps.shape[0]
    return jax.image.resize(patch_maps, (b, size[0], size[1]), method="linear", antialias=False)


def to_pixel_maps(patch_scores: jax.Array, grid: tuple[int, int], size: tuple[int, int],
                  sigma: float) -> jax.Array:
    """[B, h*w] patch scores -> blurred [B,H,W] maps."""
    b = patch_scores.shape[0]
    return gaussian_blur(upsample_maps(patch_scores.reshape(b, *grid), size), sigma)


def image_scores(maps: jax.Array) -> jax.Array:
    return jnp.max(maps.reshape(maps.shape[0], -1), axis=-1)
