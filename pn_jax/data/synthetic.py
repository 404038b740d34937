"""A deterministic synthetic dataset in MVTec layout (SPEC 2.11), for tests and smoke runs.

Normal images are one texture family: oriented stripes plus smooth low-frequency shading
plus pixel noise, each image with its own stripe phase/angle/frequency jitter and shading,
so normal images differ but share one distribution. Two defect types with masks:
  * scratch: a thin dark line segment (darkened by 45-60%), 2-3% of the image long side wide;
  * blob: an irregular patch (thresholded smooth noise inside an ellipse) with a colour
    shift. Both are clearly visible but low contrast against the stripes at their edges.
Each image is drawn from its own generator seeded by (category name, seed, split, index):
the same name and seed give byte-identical files, and categories of different names differ
(a stable hash of the name, zlib.crc32, not Python's per-process `hash`). `mixed_formats=True` writes images in every supported format
(grayscale/RGBA/16-bit PNG, upper-case .JPG, .bmp, .tiff) and varies sizes, to exercise
the reader.
"""
from __future__ import annotations

import inspect
import json
import os
import zlib

import numpy as np
from PIL import Image, ImageDraw

DEFECTS = ("scratch", "blob")
_BASE_COLOUR = np.array([150.0, 120.0, 95.0])


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Band-limited noise in about [-1, 1]: a random grid upsampled bicubically."""
    grid = rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC))


def normal_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = 0.6 + rng.normal(0.0, 0.08)
    cycles = rng.uniform(7.0, 9.0)  # stripes across the image: scale-free texture
    phase = rng.uniform(0.0, 2 * np.pi)
    u = (xx * np.cos(theta) + yy * np.sin(theta)) / max(h, w)
    stripes = np.sin(2 * np.pi * cycles * u + phase)
    shading = _smooth_noise(rng, h, w, 4)
    grain = rng.normal(0.0, 5.0, (h, w, 3))
    img = _BASE_COLOUR + 28.0 * stripes[..., None] + 18.0 * shading[..., None] + grain
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def scratch(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    m = Image.new("L", (w, h), 0)
    length = rng.uniform(0.3, 0.55) * min(h, w)
    angle = rng.uniform(0, np.pi)
    cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
    dx, dy = 0.5 * length * np.cos(angle), 0.5 * length * np.sin(angle)
    width = max(2, int(round(rng.uniform(0.02, 0.03) * max(h, w))))
    ImageDraw.Draw(m).line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=width)
    mask = np.asarray(m) > 0
    dark = rng.uniform(0.4, 0.55)
    out = img.astype(np.float32)
    out[mask] *= dark
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), mask.astype(np.uint8) * 255


def blob(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
    rx, ry = rng.uniform(0.08, 0.16) * w, rng.uniform(0.08, 0.16) * h
    ellipse = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
    # An irregular outline: the ellipse's radius modulated by smooth noise.
    mask = ellipse < 1.0 + 0.6 * _smooth_noise(rng, h, w, 6)
    if not mask.any():  # cannot happen for these radii, but a defect must have a region
        mask[int(cy), int(cx)] = True
    shift = np.array([55.0, -10.0, -45.0]) * rng.choice([-1.0, 1.0])
    out = img.astype(np.float32)
    out[mask] += shift
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), mask.astype(np.uint8) * 255


PARAMS_FILE = "synthetic.json"
# Bumped whenever the same parameters would generate other images, so that a tree written by
# an older generator is refused rather than silently reused (ensure_synthetic compares
# synthetic.json). 2: the category name seeds the images.
GENERATOR = 2
_VARIANTS = ("png", "gray_png", "JPG", "bmp", "tiff", "rgba_png", "png16")


def _save(img: np.ndarray, folder: str, stem: str, variant: str) -> str:
    """Write img in the given format variant; returns the file name."""
    pil = Image.fromarray(img)
    if variant == "png":
        name = stem + ".png"
        pil.save(os.path.join(folder, name))
    elif variant == "gray_png":
        name = stem + ".png"
        pil.convert("L").save(os.path.join(folder, name))
    elif variant == "JPG":
        name = stem + ".JPG"
        pil.save(os.path.join(folder, name), quality=95)
    elif variant == "bmp":
        name = stem + ".bmp"
        pil.save(os.path.join(folder, name))
    elif variant == "tiff":
        name = stem + ".Tiff"
        pil.save(os.path.join(folder, name))
    elif variant == "rgba_png":
        name = stem + ".png"
        pil.putalpha(200)
        pil.save(os.path.join(folder, name))
    elif variant == "png16":
        name = stem + ".png"
        gray16 = np.asarray(pil.convert("L")).astype(np.uint16) * 257
        Image.fromarray(gray16).save(os.path.join(folder, name))
    else:
        raise ValueError(variant)
    return name


def generate_category(root: str, category: str = "synthetic", *, n_train: int = 20,
                      n_test_good: int = 6, n_test_defect: int = 6, size: int = 128,
                      seed: int = 0, mixed_formats: bool = False) -> str:
    """Write <root>/<category> in MVTec layout (+ synthetic.json, its parameters)."""
    cat = os.path.join(root, category)
    params = dict(generator=GENERATOR, n_train=n_train, n_test_good=n_test_good,
                  n_test_defect=n_test_defect, size=size, seed=seed, mixed_formats=mixed_formats)
    name_seed = zlib.crc32(category.encode("utf-8"))
    jobs = [("train", "good", i) for i in range(n_train)]
    jobs += [("test", "good", i) for i in range(n_test_good)]
    jobs += [("test", d, i) for d in DEFECTS for i in range(n_test_defect)]
    for k, (split, defect, i) in enumerate(jobs):
        split_id = {"train": 0, "test": 1}[split]
        defect_id = 0 if defect == "good" else 1 + DEFECTS.index(defect)
        rng = np.random.default_rng([name_seed, seed, split_id, defect_id, i])
        h = w = size
        variant = "png"
        if mixed_formats:
            variant = _VARIANTS[k % len(_VARIANTS)]
            h, w = size + 8 * (k % 3), size + 4 * (k % 2)  # sizes vary within the category
        img = normal_image(rng, h, w)
        mask = None
        if defect == "scratch":
            img, mask = scratch(img, rng)
        elif defect == "blob":
            img, mask = blob(img, rng)
        folder = os.path.join(cat, split, defect)
        os.makedirs(folder, exist_ok=True)
        stem = f"{i:03d}"
        _save(img, folder, stem, variant)
        if mask is not None:
            gt = os.path.join(cat, "ground_truth", defect)
            os.makedirs(gt, exist_ok=True)
            Image.fromarray(mask).save(os.path.join(gt, stem + "_mask.png"))
    with open(os.path.join(cat, PARAMS_FILE), "w") as f:
        json.dump(params, f, sort_keys=True)
    return cat


def full_params(**overrides) -> dict:
    """generate_category's parameters with its defaults filled in (unknown names refused)."""
    sig = inspect.signature(generate_category)
    defaults = {k: p.default for k, p in sig.parameters.items()
                if p.kind == p.KEYWORD_ONLY}
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise TypeError(f"unknown synthetic parameters {sorted(unknown)}; known: {sorted(defaults)}")
    return {"generator": GENERATOR, **defaults, **overrides}
