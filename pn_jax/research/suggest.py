"""Uncertainty-guided data collection: which unlabelled images to look at (and label) next.

The note: "high proposed noise -> uncertain regions -> collect more data". Per image i, with
z_i = score_i / threshold (the model's normalised score: 1 is the decision boundary):

    u_score_i = exp(-0.5 * ((z_i - 1) / w)^2)           1 at the threshold, -> 0 far from it
    u_noise_i = (q95(noise map_i) - lo) / (hi - lo)      the image's high proposed noise std,
                                                         in [0, 1] of its range (lo, hi)
    U_i       = a * u_score_i + (1 - a) * u_noise_i       a = 0.5 by default

w is the width of "near the threshold" in normalised-score units; by default the candidates'
robust spread 1.4826 * MAD(z) (floored at 0.02), so it adapts to how spread the scores are.
Images are ranked by U (highest first); exact ties are broken by a permutation drawn from
`seed`, so the ranking is a pure function of the inputs and the seed.

The same formula per pixel (anomaly map / threshold and the noise map at that pixel) gives an
uncertainty map; the contact sheet outlines where it reaches 0.5.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys

import numpy as np

NOISE_QUANTILE = 0.95
OUTLINE_LEVEL = 0.5


@dataclasses.dataclass
class Uncertainty:
    total: np.ndarray  # U [n]
    score_term: np.ndarray  # u_score [n]
    noise_term: np.ndarray  # u_noise [n]
    normalized: np.ndarray  # z [n]
    noise_q: np.ndarray  # q95 of each noise map [n]
    width: float
    weight: float


def default_width(normalized) -> float:
    z = np.asarray(normalized, np.float64)
    z = z[np.isfinite(z)]
    if z.size == 0:
        return 0.02
    return float(max(1.4826 * np.median(np.abs(z - np.median(z))), 0.02))


def _check(weight, width, threshold, std_range):
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"uncertainty weight must be in [0, 1], got {weight}")
    if width is not None and not width > 0:
        raise ValueError(f"uncertainty width must be > 0, got {width}")
    if not (threshold and np.isfinite(threshold) and threshold > 0):
        raise ValueError(f"a positive decision threshold is needed to rank by uncertainty, got {threshold} "
                         "(the model was fitted without held-out images? refit with holdout_fraction > 0)")
    lo, hi = std_range
    if not hi > lo:
        raise ValueError(f"noise std range must have hi > lo, got {std_range}")


def noise_quantile(noise_map) -> float:
    """q95 of one image's proposed noise std map (NaN for a missing map)."""
    return float(np.quantile(np.asarray(noise_map, np.float64), NOISE_QUANTILE)) if noise_map is not None \
        else float("nan")


def uncertainty(image_scores, noise_q, threshold: float, std_range, *, weight: float = 0.5,
                width: float | None = None) -> Uncertainty:
    """image_scores [n]; noise_q [n]: each image's `noise_quantile` of its noise map."""
    _check(weight, width, threshold, std_range)
    scores = np.asarray(image_scores, np.float64)
    q = np.asarray(noise_q, np.float64)
    if q.shape != scores.shape:
        raise ValueError(f"{scores.shape} image scores but {q.shape} noise quantiles")
    lo, hi = std_range
    z = scores / threshold
    w = default_width(z) if width is None else float(width)
    u_s = np.exp(-0.5 * ((z - 1.0) / w) ** 2)
    u_n = np.clip((q - lo) / (hi - lo), 0.0, 1.0)
    total = weight * u_s + (1.0 - weight) * u_n
    total = np.where(np.isfinite(total), total, -np.inf)  # unreadable images rank last
    return Uncertainty(total, u_s, u_n, z, q, w, weight)


def pixel_uncertainty(anomaly_map, noise_map, threshold: float, std_range, *, weight: float, width: float):
    """The per-pixel form of U: [H,W] maps -> [H,W] in [0, 1]."""
    lo, hi = std_range
    u_s = np.exp(-0.5 * ((np.asarray(anomaly_map, np.float64) / threshold - 1.0) / width) ** 2)
    u_n = np.clip((np.asarray(noise_map, np.float64) - lo) / (hi - lo), 0.0, 1.0)
    return weight * u_s + (1.0 - weight) * u_n


def rank(total, seed: int) -> np.ndarray:
    """Indices by U descending; exact ties in the order of a permutation drawn from `seed`."""
    total = np.asarray(total, np.float64)
    tie = np.random.default_rng(seed).permutation(len(total))
    return np.lexsort((tie, -total))


def random_order(n: int, seed: int) -> np.ndarray:
    """The random baseline: a seeded permutation."""
    return np.random.default_rng(seed).permutation(n)


FIELDS = ("rank", "name", "uncertainty", "score_term", "noise_term", "score", "normalized_score",
          "noise_q95", "predicted")


def rows(names, scores, unc: Uncertainty, order, top: int | None = None, errors=None) -> list[dict]:
    order = order[:top] if top else order
    out = []
    for r, i in enumerate(order, 1):
        z = unc.normalized[i]
        if errors and str(names[i]) in errors:
            out.append({"rank": r, "name": str(names[i]), **{k: "" for k in FIELDS[2:-1]},
                        "predicted": "error: " + errors[str(names[i])]})
            continue
        out.append({"rank": r, "name": str(names[i]), "uncertainty": f"{unc.total[i]:.6g}",
                    "score_term": f"{unc.score_term[i]:.6g}", "noise_term": f"{unc.noise_term[i]:.6g}",
                    "score": f"{scores[i]:.6g}", "normalized_score": f"{z:.6g}", "noise_q95": f"{unc.noise_q[i]:.6g}",
                    "predicted": "anomalous" if z >= 1.0 else "normal"})
    return out


def write_csv(path: str, table: list[dict]) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=FIELDS)
        wr.writeheader()
        wr.writerows(table)
    return path


def contact_sheet(path: str, images, umaps, titles, cols: int = 4) -> str:
    """images: RGB (uint8 or 0..1) arrays; umaps: matching [H,W] uncertainty maps (outlined at
    OUTLINE_LEVEL, shaded lightly); titles: one line each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pn_jax import viz

    n = len(images)
    if n == 0:
        raise ValueError("contact sheet: no images")
    cols = min(cols, n)
    rows_ = -(-n // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(2.6 * cols, 2.8 * rows_), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, u, t in zip(axes.ravel(), images, umaps, titles):
        ax.imshow(img)
        u = np.asarray(u, np.float64)
        if u.shape != np.asarray(img).shape[:2]:
            raise ValueError(f"contact sheet: uncertainty map {u.shape} does not match its image "
                             f"{np.asarray(img).shape[:2]}")
        ax.imshow(np.ma.masked_less(u, OUTLINE_LEVEL), cmap="autumn", alpha=0.35, vmin=0, vmax=1)
        if (u >= OUTLINE_LEVEL).any() and (u < OUTLINE_LEVEL).any():
            ax.contour(u, levels=[OUTLINE_LEVEL], colors="cyan", linewidths=1.0)
        ax.set_title(t, fontsize=7)
    return viz.save_png(fig, path, dpi=90)


# ----------------------------------------------------------------------------- with a model
def _short(name: str, width: int = 30) -> str:
    """The last two path components (test/blob/002.png -> blob/002.png), cut from the left."""
    tail = "/".join(str(name).replace(os.sep, "/").split("/")[-2:])
    return tail if len(tail) <= width else "..." + tail[-(width - 3):]


def _thumb(a: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    a = np.asarray(a)
    if a.dtype != np.uint8:
        return np.asarray(Image.fromarray(a.astype(np.float32)).resize((size, size), Image.BILINEAR))
    return np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR))


def suggest(model, inputs, out_dir: str, *, top: int = 16, seed: int = 0, weight: float = 0.5,
            width: float | None = None, thumb: int = 160, log=print) -> dict:
    """Score `inputs` with a fitted pn_jax Model, rank them by U, write
    <out_dir>/suggestions.csv (every image) and <out_dir>/suggestions.png (the top N)."""
    n = model.cfg.noising
    std_range = (n.noise_std_min, n.noise_std_max)
    _check(weight, width, model.threshold, std_range)
    names, scores, noise_q, thumbs = [], [], [], []
    errors = {}
    for rec in model.predict_iter(inputs):
        names.append(rec["name"])
        if rec.get("error"):
            errors[rec["name"]] = rec["error"]
            scores.append(np.nan)
            noise_q.append(np.nan)
            thumbs.append(None)
            continue
        if "noise_map" not in rec:
            raise ValueError("this model computes no noise maps (method patchcore?); uncertainty "
                             "needs Propose Noising's proposed noise (--method propose_noising)")
        scores.append(rec["score"])
        noise_q.append(noise_quantile(rec["noise_map"]))
        thumbs.append(tuple(_thumb(rec[k], thumb) for k in ("image", "anomaly_map", "noise_map")))
    if not names:
        raise ValueError("no images to rank")
    scores = np.asarray(scores, np.float64)
    unc = uncertainty(scores, noise_q, model.threshold, std_range, weight=weight, width=width)
    order = rank(unc.total, seed)
    table = rows(names, scores, unc, order, errors=errors)
    csv_path = write_csv(os.path.join(out_dir, "suggestions.csv"), table)
    chosen = [i for i in order[:top] if thumbs[i] is not None]
    sheet = None
    if chosen:
        umaps = [pixel_uncertainty(thumbs[i][1], thumbs[i][2], model.threshold, std_range, weight=weight,
                                   width=unc.width) for i in chosen]
        titles = [f"#{r + 1} U={unc.total[i]:.2f} z={unc.normalized[i]:.2f}\n{_short(names[i])}"
                  for r, i in enumerate(chosen)]
        sheet = contact_sheet(os.path.join(out_dir, "suggestions.png"), [thumbs[i][0] for i in chosen], umaps, titles)
    log(f"ranked {len(names)} images by uncertainty (width {unc.width:.3g}, weight {weight}); "
        f"top {len(chosen)}: {csv_path}" + (f", {sheet}" if sheet else ""))
    return {"csv": csv_path, "contact_sheet": sheet, "order": order.tolist(), "names": names,
            "uncertainty": unc.total.tolist(), "width": unc.width, "errors": errors}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `pn-jax suggest` (a subcommand of pn_jax.cli's parser)."""
    p.add_argument("--checkpoint", required=True, help="a model saved by `pn-jax fit` / Model.save")
    p.add_argument("paths", nargs="+", help="unlabelled images or folders")
    p.add_argument("--top", type=int, default=16, help="images on the contact sheet")
    p.add_argument("--out", default="results/suggest")
    p.add_argument("--seed", type=int, default=0, help="breaks exact ties")
    p.add_argument("--weight", type=float, default=0.5, help="a: weight of the score term (1 - a: noise)")
    p.add_argument("--width", type=float, default=None, help="w; default: 1.4826 * MAD of z")


def run_command(a: argparse.Namespace) -> int:
    """`pn-jax suggest` with parsed flags; 2 and a message on bad input."""
    if a.top < 1:
        print("error: --top must be >= 1", file=sys.stderr)
        return 2
    try:
        from pn_jax import model as model_lib

        m = model_lib.load(a.checkpoint)
        suggest(m, a.paths if len(a.paths) > 1 else a.paths[0], a.out, top=a.top, seed=a.seed,
                weight=a.weight, width=a.width)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
