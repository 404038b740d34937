"""PNG figures: image | anomaly map | influence map | noise map, with the ground-truth outline."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pn_jax import atomic  # noqa: E402


def save_png(fig, path: str, *, dpi: int) -> str:
    """Lay out, write (creating the folder) and close a figure; returns `path`."""
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def denormalize(image: np.ndarray, mean, std) -> np.ndarray:
    return np.clip(image * np.asarray(std) + np.asarray(mean), 0, 1)


def save_figure(path: str, image: np.ndarray, maps: dict[str, np.ndarray], mask: np.ndarray | None,
                title: str, limits: dict[str, tuple[float, float]] | None = None) -> str:
    """image [H,W,3] in 0..1; maps name -> [H,W]; mask [H,W] or None. `limits` fixes each map's
    colour range across figures (so a normal image does not look red just because its own
    maximum is mapped to the top of the scale)."""
    panels = [("image", None)] + list(maps.items())
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for ax, (name, m) in zip(np.atleast_1d(axes), panels):
        ax.imshow(image)
        if m is not None:
            lo, hi = (limits or {}).get(name, (float(np.min(m)), float(np.max(m))))
            ax.imshow(m, cmap="jet", alpha=0.5, vmin=lo, vmax=hi)
        if mask is not None and mask.any():
            ax.contour(mask.astype(float), levels=[0.5], colors="white", linewidths=1.2)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return save_png(fig, path, dpi=90)


def plot_curves(path: str, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str,
                title: str = "", logx: bool = False, logy: bool = False) -> str:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, (x, y) in series.items():
        ax.plot(x, y, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path, dpi=100)


def save_overlay(path: str, image: np.ndarray, amap: np.ndarray, threshold: float | None, title: str) -> str:
    """A prediction for a person: the image, and the anomaly map over it with the region above
    the decision threshold outlined; the score and the decision in the title."""
    fig, axes = plt.subplots(1, 2, figsize=(7.0, 3.8))
    for ax in axes:
        ax.imshow(image)
        ax.axis("off")
    axes[1].imshow(amap, cmap="jet", alpha=0.5)
    if threshold is not None and np.isfinite(threshold) and amap.max() >= threshold:
        for ax in axes:
            ax.contour(amap, levels=[threshold], colors="white", linewidths=1.2)
    axes[0].set_title("image", fontsize=9)
    axes[1].set_title("anomaly map (outline: above threshold)", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic.replacing(path, ".tmp.png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return path
