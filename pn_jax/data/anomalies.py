"""Synthetic anomalies with known masks, for the tuning split (SPEC 2.10). Never test images.

* Perlin (DRAEM, Zavrtanik et al. 2021): threshold a Perlin noise map at 0.5 -> mask M;
  I' = (1 - M) * I + M * ((1 - beta) * A + beta * I), beta ~ U(0, 0.8). DRAEM's anomaly
  source A is a DTD texture; offline we have none, so A is the image itself after strong
  colour/tone changes and a spatial shift, or a random Perlin colour texture.
* CutPaste (Li et al. 2021): a rectangle cut from the image, colour-jittered, pasted
  elsewhere; M is the pasted rectangle.
Every function takes an np.random.Generator (or a seed) and is pure numpy, vectorised.
Masks are uint8 HxW 0/255, like the records' masks.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

KINDS = ("perlin", "cutpaste")


def _rng(rng) -> np.random.Generator:
    return np.random.default_rng(rng)  # a Generator passes through; an int seeds one


def _fade(t):
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng) -> np.ndarray:
    """2-D gradient (Perlin) noise in about [-1, 1], res lattice cells per axis, any shape."""
    rng = _rng(rng)
    (h, w), (ry, rx) = shape, res
    angles = rng.uniform(0.0, 2 * np.pi, (ry + 1, rx + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    y = (np.arange(h) + 0.5) * ry / h
    x = (np.arange(w) + 0.5) * rx / w
    iy, ix = np.minimum(y.astype(int), ry - 1), np.minimum(x.astype(int), rx - 1)
    fy, fx = (y - iy)[:, None], (x - ix)[None, :]

    def corner(dy, dx):  # dot(gradient at corner, offset from corner)
        g = grads[iy[:, None] + dy, ix[None, :] + dx]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    ty, tx = _fade(fy), _fade(fx)
    top = corner(0, 0) + tx * (corner(0, 1) - corner(0, 0))
    bottom = corner(1, 0) + tx * (corner(1, 1) - corner(1, 0))
    return (np.sqrt(2.0) * (top + ty * (bottom - top))).astype(np.float32)


def perlin_mask(shape, rng, threshold: float = 0.5, max_scale: int = 6,
                min_pixels: int = 16) -> np.ndarray:
    """Boolean mask from thresholded Perlin noise at a random scale 2^k, k in [0, max_scale).

    Redrawn until it covers min_pixels (DRAEM sometimes yields an empty mask; a tuning
    anomaly must have a region).
    """
    rng = _rng(rng)
    h, w = shape
    for _ in range(20):
        res = (2 ** int(rng.integers(0, max_scale)), 2 ** int(rng.integers(0, max_scale)))
        noise = perlin_noise((h, w), (max(res[0], 1), max(res[1], 1)), rng)
        mask = noise > threshold
        if mask.sum() >= min(min_pixels, h * w):
            return mask
    # Fallback: the top 2% of the last noise map, never empty.
    return noise >= np.quantile(noise, 0.98)


def _colour_source(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An anomaly source A: the image shifted in space and strongly altered in colour/tone."""
    h, w = image.shape[:2]
    if rng.random() < 0.3:  # a random colour texture
        t = np.stack([perlin_noise((h, w), (4, 4), rng) for _ in range(3)], axis=-1)
        return np.clip(127.5 + 127.5 * t, 0, 255)
    a = np.roll(image, (int(rng.integers(h)), int(rng.integers(w))), axis=(0, 1))
    a = a[::-1] if rng.random() < 0.5 else a[:, ::-1]
    a = a.astype(np.float32)
    ops = rng.permutation(5)[: int(rng.integers(2, 4))]
    for op in ops:
        if op == 0:  # per-channel colour shift
            a = a + rng.uniform(40, 90, 3) * rng.choice([-1.0, 1.0], 3)
        elif op == 1:  # invert
            a = 255.0 - a
        elif op == 2:  # posterize to 2..4 bits
            q = 2.0 ** (8 - int(rng.integers(2, 5)))
            a = np.floor(np.clip(a, 0, 255) / q) * q
        elif op == 3:  # solarize
            thr = rng.uniform(64, 192)
            a = np.where(a > thr, 255.0 - a, a)
        else:  # contrast
            mean = a.mean()
            a = (a - mean) * rng.uniform(0.3, 2.0) + mean
    return np.clip(a, 0, 255)


def perlin_anomaly(image: np.ndarray, rng, *, threshold: float = 0.5,
                   beta_range: tuple[float, float] = (0.0, 0.8)) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 HxWx3, rng) -> (uint8 HxWx3 with a DRAEM-style defect, uint8 HxW mask 0/255)."""
    rng = _rng(rng)
    h, w = image.shape[:2]
    mask = perlin_mask((h, w), rng, threshold)
    if rng.random() < 0.5:  # DRAEM rotates its noise; quarter turns keep it cheap
        mask = np.rot90(mask, 2)
    source = _colour_source(image, rng)
    beta = rng.uniform(*beta_range)
    m = mask[..., None].astype(np.float32)
    img = image.astype(np.float32)
    out = (1 - m) * img + m * ((1 - beta) * source + beta * img)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), mask.astype(np.uint8) * 255


def cutpaste_anomaly(image: np.ndarray, rng, *, area: tuple[float, float] = (0.02, 0.15),
                     aspect: tuple[float, float] = (0.3, 3.3)) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 HxWx3, rng) -> (image with a jittered patch pasted elsewhere, uint8 mask 0/255)."""
    rng = _rng(rng)
    h, w = image.shape[:2]
    a = rng.uniform(*area) * h * w
    r = np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1])))
    ph = int(np.clip(round(np.sqrt(a * r)), 2, h - 1))
    pw = int(np.clip(round(np.sqrt(a / r)), 2, w - 1))
    sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    dy, dx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    patch = image[sy:sy + ph, sx:sx + pw].astype(np.float32)
    # Colour jitter (CutPaste uses brightness/contrast/saturation/hue 0.1); a little more
    # here so a patch pasted onto its own location is still a visible defect.
    mean = patch.mean()
    patch = (patch - mean) * rng.uniform(0.7, 1.3) + mean * rng.uniform(0.75, 1.25)
    patch = patch + rng.uniform(-15, 15, 3)
    out = image.copy()
    out[dy:dy + ph, dx:dx + pw] = np.clip(np.rint(patch), 0, 255).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[dy:dy + ph, dx:dx + pw] = 255
    return out, mask


def synthesize_anomaly(image: np.ndarray, rng, kind: str = "mixed") -> tuple[np.ndarray, np.ndarray, str]:
    """-> (image, mask, kind used); kind "mixed" picks perlin or cutpaste at random."""
    rng = _rng(rng)
    if kind == "mixed":
        kind = KINDS[int(rng.integers(len(KINDS)))]
    if kind == "perlin":
        return (*perlin_anomaly(image, rng), kind)
    if kind == "cutpaste":
        return (*cutpaste_anomaly(image, rng), kind)
    raise ValueError(f"kind must be one of {KINDS + ('mixed',)}, got {kind!r}")


def make_validation_records(normal: Sequence[dict], *, seed: int, kind: str = "mixed",
                            split: str = "validation") -> list[dict]:
    """Tuning split: every normal record as is (label 0) plus one synthetic anomaly of it.

    `normal` should be the holdout source (held-out train/good images, never test); reading
    it is logged as a holdout read. Image i's anomaly uses the generator seeded (seed, i).
    """
    out = []
    for i in range(len(normal)):
        r = normal[i]
        out += [{**r, "split": split}, anomaly_record(r, seed=seed, index=i, kind=kind, split=split)]
    return out


def anomaly_record(normal: dict, *, seed: int, index: int, kind: str = "mixed", split: str = "validation") -> dict:
    """The synthetic anomaly of normal record `index` of a validation list (generator seeded
    (seed, index)), as `make_validation_records` makes it: made on its own, it can be made
    where the record is read (a decode worker) instead of all before the first is used."""
    img, mask, used = synthesize_anomaly(normal["image"], np.random.default_rng([seed, index]), kind)
    return {"image": img, "mask": mask, "label": 1, "defect": f"synthetic_{used}",
            "name": f"{normal['name']}#{used}", "split": split}
