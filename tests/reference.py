"""Plain numpy reference implementations used by the tests (independent of pn_jax)."""
import numpy as np


def torch_bilinear_1d_weights(n_in, n_out):
    """Interpolation matrix [n_out, n_in] of torch's bilinear, align_corners=False."""
    w = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for o in range(n_out):
        src = max((o + 0.5) * scale - 0.5, 0.0)
        i0 = int(np.floor(src))
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        w[o, i0] += 1 - lam
        w[o, i1] += lam
    return w


def bilinear_nhwc(x, size):
    wh = torch_bilinear_1d_weights(x.shape[1], size[0])
    ww = torch_bilinear_1d_weights(x.shape[2], size[1])
    return np.einsum("oh,bhwc,pw->bopc", wh, x, ww)


def adaptive_avg_pool1d(x, out):
    """torch.nn.functional.adaptive_avg_pool1d on the last axis, loop form."""
    L = x.shape[-1]
    res = np.empty(x.shape[:-1] + (out,))
    for i in range(out):
        s = (i * L) // out
        e = -((-(i + 1) * L) // out)
        res[..., i] = x[..., s:e].mean(-1)
    return res


def unfold_torch_order(x, p=3):
    """[B,h,w,C] -> [B,h,w,C,p,p]: the (channel, ky, kx) layout of torch unfold + PatchCore."""
    b, h, w, c = x.shape
    pad = (p - 1) // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.zeros((b, h, w, c, p, p))
    for ky in range(p):
        for kx in range(p):
            out[..., ky, kx] = xp[:, ky:ky + h, kx:kx + w, :]
    return out


def patchcore_aggregate(maps, pretrain, target, p=3):
    """Literal PatchCore: unfold, upsample unfolded maps, pool per layer, stack, pool."""
    ref = maps[0].shape[1:3]
    per_layer = []
    for m in maps:
        u = unfold_torch_order(m, p)  # [B,h,w,C,p,p]
        b, h, w, c = m.shape
        if (h, w) != tuple(ref):
            flat = u.reshape(b, h, w, c * p * p)
            u = bilinear_nhwc(flat, ref).reshape(b, *ref, c, p, p)
        v = u.reshape(b * ref[0] * ref[1], -1)  # flatten (C, ky, kx)
        per_layer.append(adaptive_avg_pool1d(v, pretrain))
    stacked = np.stack(per_layer, axis=1).reshape(len(per_layer[0]), -1)
    return adaptive_avg_pool1d(stacked, target)


def greedy_coreset(projected, starts, n_select):
    """PatchCore's approximate greedy k-center, numpy float64."""
    def dist(c):
        return np.sqrt(np.maximum(((projected - c) ** 2).sum(-1), 0))
    min_d = np.mean([dist(projected[s]) for s in starts], axis=0)
    sel = []
    for _ in range(n_select):
        i = int(np.argmax(min_d))
        sel.append(i)
        min_d = np.minimum(min_d, dist(projected[i]))
    return np.array(sel)


def knn_bruteforce(q, bank, k):
    d = np.sqrt(((q[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1))
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, 1), idx
