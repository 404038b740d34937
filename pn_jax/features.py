"""PatchCore patch-feature aggregation (Roth et al. 2022, sec. 3.1), NHWC.

Direct definition, per chosen layer l with map [B, h_l, w_l, C_l]:
  1. unfold 3x3 neighbourhoods (stride 1, zero padding 1) -> vectors of C_l*9, ordered
     (channel, ky, kx) as torch's `unfold` + PatchCore's reshape leave them;
  2. bilinearly upsample (align_corners=False) deeper layers' unfolded maps to the first
     layer's grid;
  3. adaptive-average-pool each vector to `pretrain_embed_dimension` (torch's bin rule);
  4. stack the layers and pool the concatenation [L * pretrain] to `target_embed_dimension`.

Steps 2 and 3 are linear maps on different axes (space vs channels), so they commute: we
pool first and upsample the small pooled map, which saves a factor C_l*9/pretrain of memory.
`tests/test_features.py` checks this against a literal numpy implementation of steps 1-4.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST  # the pooling matmuls in float32 on every backend (pn_jax.precision)


def adaptive_pool_plan(length: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """Gather indices [out, w] and weights [out, w] of torch's adaptive_avg_pool1d.

    Bin i covers [floor(i*L/out), ceil((i+1)*L/out)); works for L >= out and L < out.
    """
    starts = np.array([(i * length) // out for i in range(out)])
    ends = np.array([-((-(i + 1) * length) // out) for i in range(out)])
    width = int((ends - starts).max())
    idx = starts[:, None] + np.arange(width)[None, :]
    valid = idx < ends[:, None]
    weights = valid / (ends - starts)[:, None]
    return np.minimum(idx, length - 1).astype(np.int32), weights.astype(np.float32)


def adaptive_avg_pool_last(x: jax.Array, out: int, precision=HIGHEST) -> jax.Array:
    """torch.nn.functional.adaptive_avg_pool1d over the last axis, exact bins.

    With g = gcd(L, out), L = g*a and out = g*b, bin i = b*m + j lies inside input block m
    (it covers [a*m + floor(j*a/b), a*m + ceil((j+1)*a/b))), so the pooling is a reshape to
    [..., g, a] and one small [a, b] matrix: no gather (slow on CPU) and no [L, out] matmul.
    """
    length = x.shape[-1]
    if length == out:
        return x
    g, a, b, small = _pool_matrix(length, out)
    y = _group_matmul(x.reshape(x.shape[:-1] + (g, a)), small, precision)
    return y.reshape(x.shape[:-1] + (out,))


def _group_matmul(x: jax.Array, small: np.ndarray, precision=HIGHEST) -> jax.Array:
    """x [..., g, a] @ small [a, b] -> [..., g, b]. For a tiny matrix (WRN50's last pooling is
    a = 2, b = 1) the products are written out so XLA fuses them into one elementwise loop;
    a dot with a contraction of 2 is several times slower on a CPU."""
    a, b = small.shape
    if a * b > 32:
        return jnp.einsum("...ga,ab->...gb", x, jnp.asarray(small, x.dtype), precision=precision)
    cols = []
    for j in range(b):
        terms = [x[..., i] * float(small[i, j]) for i in range(a) if small[i, j] != 0.0]
        cols.append(sum(terms[1:], terms[0]) if terms else jnp.zeros(x.shape[:-1], x.dtype))
    return jnp.stack(cols, axis=-1)


def unfold3x3(x: jax.Array, patchsize: int = 3) -> jax.Array:
    """[B,h,w,C] -> [B,h,w,C*p*p], zero padding p//2, (channel, ky, kx) order."""
    p = patchsize
    pad = (p - 1) // 2
    b, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (pad, p - 1 - pad), (pad, p - 1 - pad), (0, 0)))
    shifts = [xp[:, dy:dy + h, dx:dx + w, :] for dy in range(p) for dx in range(p)]
    return jnp.stack(shifts, axis=-1).reshape(b, h, w, c * p * p)


def bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch's 1-D bilinear interpolation (align_corners=False, no antialiasing) as two taps:
    out[o] = (1 - lam[o]) * x[i0[o]] + lam[o] * x[i1[o]], with source coordinate
    (o + 0.5) * n_in / n_out - 0.5 clamped at 0."""
    src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def _interp_axis(x: jax.Array, n_out: int, axis: int) -> jax.Array:
    i0, i1, lam = bilinear_taps(x.shape[axis], n_out)
    shape = [1] * x.ndim
    shape[axis] = n_out
    lam = jnp.asarray(lam, x.dtype).reshape(shape)
    return jnp.take(x, i0, axis=axis) * (1.0 - lam) + jnp.take(x, i1, axis=axis) * lam


def upsample_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of [B,h,w,C] as torch's F.interpolate(mode="bilinear",
    align_corners=False), one axis at a time with two static taps per output row (on a CPU
    ~7x faster than jax.image.resize and ~12x faster than interpolation matmuls)."""
    if x.shape[1:3] == tuple(size):
        return x
    return _interp_axis(_interp_axis(x, size[0], 1), size[1], 2)


def _pool_matrix(length: int, out: int):
    """(g, a, b, small [a, b]) of the grouped form of adaptive_avg_pool_last."""
    g = math.gcd(length, out)
    a, b = length // g, out // g
    idx, w = adaptive_pool_plan(a, b)
    small = np.zeros((a, b), np.float32)
    for j in range(b):
        np.add.at(small[:, j], idx[j], w[j])
    return g, a, b, small


def unfold_pool(x: jax.Array, out: int, patchsize: int = 3, precision=HIGHEST) -> jax.Array:
    """adaptive_avg_pool_last(unfold3x3(x), out) without materialising the unfolded map.

    When the pooling reduces (out <= C*p*p) and each group spans whole channels' p*p taps
    (a % p^2 == 0, e.g. WRN50's layer2: 512*9 -> 1024), the result is a sum over the p*p
    shifted maps of small per-group matmuls, which XLA fuses (WRN50: 157 -> 27 ms/image);
    otherwise it unfolds and pools.
    """
    p = patchsize
    b_, h, w, c = x.shape
    g, a, b, small = _pool_matrix(c * p * p, out)
    if a % (p * p) or b > a:  # upsampling pools (b > a) are cheaper on the unfolded map
        return adaptive_avg_pool_last(unfold3x3(x, p), out, precision)
    cpg = a // (p * p)  # channels per group
    pad = (p - 1) // 2
    xp = jnp.pad(x, ((0, 0), (pad, p - 1 - pad), (pad, p - 1 - pad), (0, 0)))
    taps = small.reshape(cpg, p * p, b)
    y = 0.0
    for t in range(p * p):
        dy, dx = divmod(t, p)
        view = xp[:, dy:dy + h, dx:dx + w, :].reshape(b_, h, w, g, cpg)
        y = y + jnp.einsum("...gc,cj->...gj", view, jnp.asarray(taps[:, t, :], x.dtype),
                           precision=precision)
    return y.reshape(b_, h, w, out)


def aggregate(feature_maps: Sequence[jax.Array], pretrain_dim: int, target_dim: int,
              patchsize: int = 3, precision=HIGHEST) -> jax.Array:
    """Layer maps (first = reference grid) -> patch features [B, h0*w0, target_dim].
    `precision`: of the pooling matmuls (`pn_jax.precision`; None = the backend's default)."""
    ref = feature_maps[0].shape[1:3]
    pooled = [unfold_pool(fmap, pretrain_dim, patchsize, precision) for fmap in feature_maps]
    n_layers = len(pooled)
    _, a, _, _ = _pool_matrix(n_layers * pretrain_dim, target_dim)
    if pretrain_dim % a == 0:
        # Every bin of the last pooling lies inside one layer's block (WRN50: pairs of 2048
        # -> 1024), so it commutes with the upsampling: pool each layer to its share (the same
        # [a, b] bin matrix restricted to the layer), then upsample the smaller map, concatenate.
        share = target_dim // n_layers
        out = jnp.concatenate([upsample_bilinear(adaptive_avg_pool_last(p, share, precision), ref)
                               for p in pooled], -1)
    else:
        stacked = jnp.concatenate([upsample_bilinear(p, ref) for p in pooled], axis=-1)  # == torch's stack(dim=1).reshape(N, 1, -1)
        out = adaptive_avg_pool_last(stacked, target_dim, precision)
    b, h, w, d = out.shape
    return out.reshape(b, h * w, d)
