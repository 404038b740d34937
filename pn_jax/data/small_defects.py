"""A seeded small-defect dataset at high resolution (issue 26), in MVTec layout.

Two categories of 1024 px images, so that what resolution buys can be measured:
  * `texture`: the stripes-and-shading texture of `synthetic.normal_image`, with grain;
  * `pattern`: an aligned part, a lattice of pads joined by traces (period 64 px) that
    every image shares up to a 0-3 px shift, a few percent of brightness and grain (a PCB,
    or tiles on a line).
Defects are 4-16 px across, a quarter to a sixteenth of a 256 px model's 8 px patch after
resizing: `spot` (a disc of 4-16 px, its colour shifted), `nick` (a dark stroke 8-16 px
long, 2-4 px wide). Each image has its own generator seeded by (category, seed, split,
defect, index): the same arguments write byte-identical files.
"""
from __future__ import annotations

import json
import os
import zlib

import numpy as np
from PIL import Image, ImageDraw

from pn_jax.data import synthetic

CATEGORIES = ("texture", "pattern")
DEFECTS = ("spot", "nick")
PARAMS_FILE = "small_defects.json"


def pattern_image(rng: np.random.Generator, size: int) -> np.ndarray:
    period, pad = 64, 24
    dy, dx = rng.integers(0, 4, 2)
    yy, xx = np.mgrid[0:size, 0:size]
    py, px = (yy + dy) % period, (xx + dx) % period
    pads = (py < pad) & (px < pad)
    traces = ((np.abs(py - pad // 2) < 2) | (np.abs(px - pad // 2) < 2))
    img = np.empty((size, size, 3), np.float32)
    img[:] = (40.0, 90.0, 50.0)  # board
    img[traces] = (150.0, 140.0, 90.0)
    img[pads] = (200.0, 190.0, 150.0)
    img *= rng.uniform(0.95, 1.05)
    img += rng.normal(0.0, 4.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def add_defect(img: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    m = Image.new("L", (w, h), 0)
    cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
    if kind == "spot":
        r = rng.uniform(2.0, 8.0)  # 4-16 px across
        ImageDraw.Draw(m).ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        length, angle = rng.uniform(8.0, 16.0), rng.uniform(0, np.pi)
        ddx, ddy = 0.5 * length * np.cos(angle), 0.5 * length * np.sin(angle)
        ImageDraw.Draw(m).line([(cx - ddx, cy - ddy), (cx + ddx, cy + ddy)], fill=255,
                               width=int(rng.integers(2, 5)))
    mask = np.asarray(m) > 0
    out = img.astype(np.float32)
    if kind == "spot":
        out[mask] += np.array([70.0, -20.0, -60.0]) * rng.choice([-1.0, 1.0])
    else:
        out[mask] *= rng.uniform(0.3, 0.45)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), mask.astype(np.uint8) * 255


def generate(root: str, category: str, *, n_train: int = 40, n_test_good: int = 20, n_test_defect: int = 10,
             size: int = 1024, seed: int = 0) -> str:
    """Write <root>/<category> (MVTec layout); reused when its parameters file matches."""
    if category not in CATEGORIES:
        raise ValueError(f"small-defect category must be one of {CATEGORIES}, got {category!r}")
    cat = os.path.join(root, category)
    params = dict(n_train=n_train, n_test_good=n_test_good, n_test_defect=n_test_defect, size=size, seed=seed)
    pfile = os.path.join(cat, PARAMS_FILE)
    if os.path.isfile(pfile) and json.load(open(pfile)) == params:
        return cat
    name_seed = zlib.crc32(category.encode())
    jobs = [("train", "good", i) for i in range(n_train)] + [("test", "good", i) for i in range(n_test_good)]
    jobs += [("test", d, i) for d in DEFECTS for i in range(n_test_defect)]
    for split, defect, i in jobs:
        rng = np.random.default_rng([name_seed, seed, int(split == "test"), ["good", *DEFECTS].index(defect), i])
        img = synthetic.normal_image(rng, size, size) if category == "texture" else pattern_image(rng, size)
        folder = os.path.join(cat, split, defect)
        os.makedirs(folder, exist_ok=True)
        if defect != "good":
            img, mask = add_defect(img, defect, rng)
            os.makedirs(os.path.join(cat, "ground_truth", defect), exist_ok=True)
            Image.fromarray(mask).save(os.path.join(cat, "ground_truth", defect, f"{i:03d}_mask.png"))
        Image.fromarray(img).save(os.path.join(folder, f"{i:03d}.png"), compress_level=1)
    with open(pfile, "w") as f:
        json.dump(params, f, sort_keys=True)
    return cat
