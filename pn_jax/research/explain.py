"""Coarse-to-fine explanation: which feature dimensions make each anomalous region anomalous.

Coarse level: the patches whose score is above the decision threshold, grouped into regions
(8-connected components of the thresholded patch-score grid, scipy.ndimage.label).
Fine level, on those patches only:

  * the influence over ALL D dimensions (not only S), by the `grad` estimator with S = every
    dim: I_d = eps * mean_k |r_kd| / d_k (the derivative is the same price for all D dims);
  * the whitened residual w = (f - m) / s to the neighbour the calibrated score uses (the
    smallest whitened distance among the K Euclidean nearest, as `calibrated_rerank`), with
    s the fitted per-dim noise scale. Its squared norm is twice the patch's NLL, so

        share_d(region) = sum_{q in region} w_qd^2 / sum_{q in region} |w_q|^2

    is the fraction of the region's anomaly score carried by dim d.

Per region: the top dims by share, with their influence, and how many dims it takes to reach
half and 80% of the residual. The fine level runs in fixed-size zero-padded batches of
flagged patches, so one compiled function serves any number of flagged patches.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from pn_jax import influence as influence_lib
from pn_jax import knn as knn_lib

EIGHT_CONNECTED = np.ones((3, 3), int)


def full_influence(f, bank, dist, idx, eps):
    """[P,D] -> [P,D]: the `grad` influence over every dimension."""
    d = f.shape[-1]
    return influence_lib.grad(f, bank, dist, idx, jnp.arange(d, dtype=jnp.int32), eps, bank_s=bank)


def fine_level(f, bank, scale, eps, *, k, block, knn_fn=None):
    """Flagged patches f [P,D] -> (full-D influence [P,D], whitened residual [P,D], neighbour [P]).
    `knn_fn(f, bank) -> (dist, idx)`: the K-NN search (default `knn.knn`; a sharded bank's own)."""
    dist, idx = knn_lib.knn(f, bank, k=k, block=block) if knn_fn is None else knn_fn(f, bank)
    infl = full_influence(f, bank, dist, idx, eps)
    inv = 1.0 / scale
    d_w = knn_lib.exact_distances(f, bank, idx, inv_scale=inv)
    nn = jnp.take_along_axis(idx, jnp.argmin(d_w, axis=-1)[:, None], axis=-1)[:, 0]
    w = (f.astype(jnp.float32) - jnp.take(bank, nn, axis=0).astype(jnp.float32)) * inv
    return infl, w, nn


class Explainer:
    """Fine level over fixed-size padded batches; `traces` counts compilations."""

    def __init__(self, bank, noise_scale, *, k: int, eps: float, block: int = 4096,
                 batch: int = 64, top: int = 5):
        if batch < 1 or top < 1:
            raise ValueError(f"Explainer: batch and top must be >= 1 (got {batch}, {top})")
        from pn_jax import sharding

        knn_fn, m = None, sharding.n_rows(bank)
        if isinstance(bank, sharding.ShardedBank):  # a distributed fit's: searched and gathered where it lies
            mesh, k_ = bank.rows.sharding.mesh, min(k, m)
            knn_fn = lambda f, rows: sharding._knn_sharded(f, rows, k=k_, block=block, n_valid=m, mesh=mesh)  # noqa: E731
            self.bank, self.scale = bank.rows, noise_scale
        else:
            self.bank, self.scale = jnp.asarray(bank), jnp.asarray(noise_scale, jnp.float32)
        if self.scale.shape != self.bank.shape[-1:]:
            raise ValueError(f"Explainer: noise_scale has shape {self.scale.shape}, the bank's D is "
                             f"{self.bank.shape[-1]}")
        self.k, self.eps, self.batch, self.top = min(k, m), float(eps), batch, top
        self.traces = 0

        def counted(f, bank, scale, eps):
            self.traces += 1
            return fine_level(f, bank, scale, eps, k=self.k, block=block, knn_fn=knn_fn)

        self._fn = jax.jit(counted)

    @classmethod
    def from_state(cls, state, cfg, **kw) -> "Explainer":
        """From a detector.DetectorState and its Config (K, eps, k-NN block, noise scale)."""
        n = cfg.noising
        return cls(state.bank, state.params["noise_scale"], k=n.k, eps=n.eps, block=cfg.bank.knn_block, **kw)

    def fine(self, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """f [P,D] (host) -> full-D influence [P,D], whitened residual [P,D] (host)."""
        p, d = f.shape
        infl, w = np.zeros((p, d), np.float32), np.zeros((p, d), np.float32)
        for s in range(0, p, self.batch):
            chunk = np.zeros((self.batch, d), np.float32)
            n = min(self.batch, p - s)
            chunk[:n] = f[s:s + n]
            a, b, _ = self._fn(jnp.asarray(chunk), self.bank, self.scale, jnp.float32(self.eps))
            infl[s:s + n], w[s:s + n] = np.asarray(a)[:n], np.asarray(b)[:n]
        return infl, w

    def explain(self, feats, patch_scores, grid, threshold: float, names=None) -> list[dict]:
        """feats [B,N,D], patch_scores [B,N] (N = h*w of `grid`) -> one JSON-able dict per image."""
        feats, scores = np.asarray(feats), np.asarray(patch_scores, np.float64)
        if feats.ndim == 2:
            feats, scores = feats[None], scores[None]
        h, w = grid
        if scores.shape != feats.shape[:2] or feats.shape[1] != h * w:
            raise ValueError(f"explain: features {feats.shape}, scores {scores.shape} and grid {grid} disagree")
        labels = [label_grid(s, grid, threshold).reshape(-1) for s in scores]
        flagged = [np.flatnonzero(lab) for lab in labels]
        rows = np.concatenate([feats[i, q] for i, q in enumerate(flagged)]) if any(len(q) for q in flagged) \
            else np.zeros((0, feats.shape[-1]), np.float32)
        infl, wres = self.fine(rows.astype(np.float32)) if len(rows) else (rows, rows)
        out, start = [], 0
        for i, q in enumerate(flagged):
            sl = slice(start, start + len(q))
            start += len(q)
            out.append(self._image(i, q, labels[i][q], scores[i], infl[sl], wres[sl], grid, threshold,
                                   None if names is None else str(names[i])))
        return out

    def _image(self, i, q, lab, scores, infl, wres, grid, threshold, name) -> dict:
        h, w = grid
        regions = []
        for r in np.unique(lab):
            sel = lab == r
            rows, cols = np.divmod(q[sel], w)
            sq = (wres[sel].astype(np.float64) ** 2).sum(0)
            total = float(sq.sum())
            share = sq / total if total > 0 else np.zeros_like(sq)
            order = np.argsort(-share, kind="stable")
            cum = np.cumsum(share[order])
            mean_infl = infl[sel].astype(np.float64).mean(0)
            infl_rank = np.empty(len(mean_infl), int)
            infl_rank[np.argsort(-mean_infl, kind="stable")] = np.arange(1, len(mean_infl) + 1)
            top = order[:self.top]
            regions.append({
                "region": int(r), "n_patches": int(sel.sum()),
                "bbox_grid": [int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1],
                "max_score": float(scores[q[sel]].max()), "mean_score": float(scores[q[sel]].mean()),
                "whitened_residual_sq": total,
                "top_dims": [{"dim": int(d), "share": float(share[d]), "influence": float(mean_infl[d]),
                              "influence_rank": int(infl_rank[d])} for d in top],
                "top_share": float(share[top].sum()),
                "dims_for_half": int(np.searchsorted(cum, 0.5) + 1) if total > 0 else 0,
                "dims_for_80pct": int(np.searchsorted(cum, 0.8) + 1) if total > 0 else 0,
                "top_influence_dims": [int(d) for d in np.argsort(-mean_infl, kind="stable")[:self.top]],
            })
        regions.sort(key=lambda r: -r["max_score"])
        return {"image": i if name is None else name, "threshold": float(threshold), "grid": [int(h), int(w)],
                "n_flagged": int(len(q)), "regions": regions}


# ----------------------------------------------------------------------------- figures
def explanation_panel(ax, explanation: dict, max_regions: int = 3, top: int | None = None):
    """Horizontal bars: per region (largest score first), its top dims' share of the whitened
    residual; the bar text gives the dim and its full-D influence rank."""
    regions = explanation["regions"][:max_regions]
    if not regions:
        ax.text(0.5, 0.5, "no patch above threshold", ha="center", va="center", fontsize=8)
        ax.axis("off")
        return ax
    y, labels, colours = [], [], []
    pos = 0
    for j, reg in enumerate(regions):
        dims = reg["top_dims"][:top] if top else reg["top_dims"]
        for d in dims:
            y.append((pos, d["share"]))
            labels.append(f"R{reg['region']} d{d['dim']} (infl #{d['influence_rank']})")
            colours.append(f"C{j}")
            pos += 1
        pos += 0.6
    ax.barh([p for p, _ in y], [s for _, s in y], color=colours)
    ax.set_yticks([p for p, _ in y])
    ax.set_yticklabels(labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("share of whitened residual", fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title("explanation", fontsize=9)
    return ax


def save_explanation_figure(path: str, image: np.ndarray, anomaly_map: np.ndarray, labels_grid: np.ndarray,
                            explanation: dict, title: str = "") -> str:
    """image [H,W,3] in 0..1, anomaly_map [H,W], labels_grid [h,w] (from `label_grid`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pn_jax import viz

    fig, (a0, a1) = plt.subplots(1, 2, figsize=(7.5, 3.4), gridspec_kw={"width_ratios": [1, 1.2]})
    a0.imshow(image)
    a0.imshow(anomaly_map, cmap="jet", alpha=0.45)
    hh, ww = image.shape[:2]
    up = _upsample_nearest(labels_grid, (hh, ww))
    for j, reg in enumerate(explanation["regions"][:3]):
        m = (up == reg["region"]).astype(float)
        if m.any():
            a0.contour(m, levels=[0.5], colors=[f"C{j}"], linewidths=1.5)
            yy, xx = np.nonzero(m)
            a0.text(xx.mean(), yy.mean(), f"R{reg['region']}", color="white", fontsize=8, ha="center")
    a0.axis("off")
    a0.set_title("flagged regions", fontsize=9)
    explanation_panel(a1, explanation)
    fig.suptitle(title, fontsize=9)
    return viz.save_png(fig, path, dpi=90)


def label_grid(patch_scores, grid, threshold: float) -> np.ndarray:
    """The region labels [h,w] that `Explainer.explain` uses for one image's patch scores [N]."""
    lab, _ = ndimage.label(np.asarray(patch_scores).reshape(grid) > threshold, structure=EIGHT_CONNECTED)
    return lab


def _upsample_nearest(lab: np.ndarray, size) -> np.ndarray:
    h, w = lab.shape
    rows = np.minimum((np.arange(size[0]) * h) // size[0], h - 1)
    cols = np.minimum((np.arange(size[1]) * w) // size[1], w - 1)
    return lab[rows][:, cols]
