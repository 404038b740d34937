"""What a run keeps for its report page (`pn_jax.report`), taken from what its test pass
already computed: per category the scores of every variant, labels, defect types and names, the
pixel ROC / PR points (decimated; the full pixel arrays would be megabytes) and a few gallery
images kept while the pass streams (`Gallery`, downsized). Written atomically to
`<out>/report/<category>.npz`; `pn-jax predict` keeps `report_data.npz` (`ScoreGallery`).
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from pn_jax import atomic, metrics

DATA_DIR = "report"  # <run>/report/<category>.npz
PREDICT_DATA = "report_data.npz"
N_GALLERY = 6  # images per gallery row: highest-scoring normal, lowest-scoring defective
THUMB = 160  # gallery thumbnails, pixels
CURVE_POINTS = 2000  # pixel curves are decimated to about this many points for the plots

def _thumb(a: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Downsize an image ("RGB" uint8), a map ("F") or a mask ("L") to at most `size` px."""
    h, w = a.shape[:2]
    s = min(1.0, size / max(h, w))
    shape = (max(1, round(w * s)), max(1, round(h * s)))
    if mode == "F":
        return np.asarray(Image.fromarray(a.astype(np.float32), "F").resize(shape, Image.BILINEAR))
    if mode == "L":
        return np.asarray(Image.fromarray(a.astype(np.uint8) * 255, "L").resize(shape, Image.NEAREST)) > 127
    return np.asarray(Image.fromarray(a).resize(shape, Image.BILINEAR))


class Gallery:
    """Keeps, while a test pass streams, the `n` highest-scoring normal and the `n`
    lowest-scoring defective images (downsized image, anomaly map, mask): the worst false
    positives and the worst misses. `offer(batch, scores, maps)` per batch (batches.score_source)."""

    def __init__(self, n: int, mean, std, size: int = THUMB):
        self.n, self.size = n, size
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        self.kept = {"normal": [], "defective": []}  # (rank key, item)

    def offer(self, batch, scores, maps) -> None:
        for i, sc in enumerate(np.asarray(scores, np.float64)):
            group = "normal" if int(batch["label"][i]) == 0 else "defective"
            key = -sc if group == "normal" else sc  # smallest key first
            kept = self.kept[group]
            if len(kept) == self.n and key >= kept[-1][0]:
                continue
            img = np.clip(np.asarray(batch["image"][i]) * self.std + self.mean, 0, 1)
            mask = np.asarray(batch["mask"][i]) > 0.5
            kept.append((key, {"image": _thumb((img * 255).round().astype(np.uint8), self.size, "RGB"),
                               "map": _thumb(np.asarray(maps[i], np.float32), self.size, "F"),
                               "mask": _thumb(mask, self.size, "L"), "has_mask": bool(mask.any()),
                               "name": str(batch["name"][i]), "score": float(sc),
                               "defect": str(batch.get("defect", ["?"] * len(scores))[i])}))
            kept.sort(key=lambda t: t[0])
            del kept[self.n:]

    def arrays(self, prefix: str = "g") -> dict:
        out = {}
        for group, kept in self.kept.items():
            items = [it for _, it in kept]
            p = f"{prefix}_{group}_"
            if not items:
                out[p + "name"] = np.array([], dtype=str)
                continue
            out[p + "image"] = np.stack([it["image"] for it in items])
            out[p + "map"] = np.stack([it["map"] for it in items]).astype(np.float16)
            out[p + "mask"] = np.stack([it["mask"] for it in items])
            out[p + "has_mask"] = np.array([it["has_mask"] for it in items])
            for k in ("name", "defect"):
                out[p + k] = np.array([it[k] for it in items], dtype=str)
            out[p + "score"] = np.array([it["score"] for it in items], np.float64)
        return out


def _decimate(x: np.ndarray, y: np.ndarray, n: int = CURVE_POINTS):
    if len(x) <= n:
        return x, y
    idx = np.unique(np.linspace(0, len(x) - 1, n).round().astype(int))
    return x[idx], y[idx]


def curves(scores, labels) -> dict:
    """ROC (fpr, tpr) and PR (recall, precision) points of one score array (metrics.binary_curve,
    the same curve the metrics are read off)."""
    c = metrics.binary_curve(scores, labels)
    if c.n_pos == 0 or c.n_neg == 0:
        return {}
    fpr, tpr = np.concatenate(([0.0], c.fps / c.n_neg)), np.concatenate(([0.0], c.tps / c.n_pos))
    rec, prec = c.tps / c.n_pos, c.tps / (c.tps + c.fps)
    fpr, tpr = _decimate(fpr, tpr)
    rec, prec = _decimate(rec, prec)
    return {"fpr": fpr, "tpr": tpr, "recall": rec, "precision": prec}


def variant_label(model_key: str, variant, main_key: str, configured: str) -> str:
    """The name of a (model, variant) score on the page; matches results.json's `ablation` keys."""
    if variant is None:
        return f"{configured} (configured)" + ("" if model_key == main_key else f" ({model_key})")
    return f"{variant}" + ("" if model_key == main_key else f" ({model_key})")


def category_data(res: dict, main_key: str, configured: str, masks: bool, gallery: Gallery | None) -> dict:
    """What the page needs of one category's test pass (`batches.score_source`'s result)."""
    keys = [(main_key, None)] + [k for k in res["scores"] if k != (main_key, None)]
    data = {"labels": np.asarray(res["labels"], np.int8), "names": np.array(res["names"], dtype=str),
            "defects": np.asarray(res["defects"], dtype=str),
            "variants": np.array([variant_label(m, v, main_key, configured) for m, v in keys], dtype=str),
            "scores": np.stack([np.asarray(res["scores"][k], np.float64) for k in keys])}
    if masks:
        for i, k in enumerate(keys):
            for name, v in curves(res["maps"][k], res["masks"]).items():
                data[f"px{i}_{name}"] = v
    if gallery is not None:
        data.update(gallery.arrays())
    return data


def _atomic_savez(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic.replacing(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **data)


def save_category_data(out_dir: str, category: str, data: dict | None) -> str:
    """<out>/report/<category>.npz, written atomically; None removes an earlier run's."""
    path = os.path.join(out_dir, DATA_DIR, category.replace("/", "_") + ".npz")
    if data is None:
        if os.path.exists(path):
            os.remove(path)
    else:
        _atomic_savez(path, data)
    return path


class ScoreGallery:
    """`pn-jax predict`'s gallery: the `n_high` highest- and `n_low` lowest-scoring images."""

    def __init__(self, n_high: int = 12, n_low: int = 6, size: int = THUMB):
        self.n_high, self.n_low, self.size = n_high, n_low, size
        self.high, self.low, self.seen = [], [], 0

    def offer(self, name: str, score: float, rgb: np.ndarray, amap: np.ndarray | None) -> None:
        self.seen += 1
        for kept, n, key in ((self.high, self.n_high, (-score, self.seen)), (self.low, self.n_low, (score, self.seen))):
            if len(kept) == n and key >= kept[-1][0]:
                continue
            item = {"image": _thumb(rgb, self.size, "RGB"), "name": name, "score": float(score),
                    "map": _thumb(np.asarray(amap, np.float32), self.size, "F") if amap is not None else None}
            kept.append((key, item))
            kept.sort(key=lambda t: t[0])
            del kept[n:]

    def arrays(self) -> dict:
        out = {}
        in_high = {k[1] for k, _ in self.high}  # few images: each shown once, in score order
        low = [(k, it) for k, it in reversed(self.low) if k[1] not in in_high]
        for group, kept in (("high", self.high), ("low", low)):
            items = [it for _, it in kept]
            p = f"g_{group}_"
            out[p + "name"] = np.array([it["name"] for it in items], dtype=str)
            out[p + "score"] = np.array([it["score"] for it in items], np.float64)
            for i, it in enumerate(items):  # one array per thumbnail: their shapes follow each input's
                out[f"{p}image_{i}"] = it["image"]
                if it["map"] is not None:
                    out[f"{p}map_{i}"] = it["map"].astype(np.float16)
        return out


def predict_gallery(d: dict) -> dict:
    """`report_data.npz`'s per-thumbnail arrays as lists under g_<group>_image / _map (what the
    page's cards read), maps only where every image of the group has one."""
    d = dict(d)
    for g in ("high", "low"):
        p, n = f"g_{g}_", len(d.get(f"g_{g}_name", []))
        for k in ("image", "map"):
            if n and all(f"{p}{k}_{i}" in d for i in range(n)):
                d[p + k] = [d.pop(f"{p}{k}_{i}") for i in range(n)]
    return d


def write_predict_data(out_dir: str, names, scores, threshold, gallery: ScoreGallery) -> str:
    path = os.path.join(out_dir, PREDICT_DATA)
    _atomic_savez(path, {"kind": np.array("predict"), "names": np.array(names, dtype=str),
                         "scores": np.asarray(scores, np.float64),
                         "threshold": np.array(np.nan if threshold is None else threshold, np.float64),
                         **gallery.arrays()})
    return path
