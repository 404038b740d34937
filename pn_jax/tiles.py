"""Overlapping tiles: images larger than the working size (`--tile SIZE --tile-overlap PX`).

An image of S x S pixels (the model's input size, `data.image_size`) is cut into tiles of
t x t pixels whose top-left corners lie on a stride of t - overlap along each axis; the last
tile of an axis is moved back to end at the border (`positions`), so every pixel is covered
and no tile is padded, also when S - t is not a multiple of the stride. Each tile goes
through the backbone on its own, so a tile's patch grid is the grid of a t-pixel image.

Features. An image's tiles are laid end to end: features [B, T * N_t, D] for T tiles of N_t
patches each. The rest of the pipeline sees an image with T * N_t patches, so the bank
(one bank for every tile position), the coreset, its record of which training image each
bank entry came from, and leave-one-image-out calibration (which then leaves out every
tile of the image, overlaps included) are unchanged.

Maps (`to_pixel_maps`). Each tile's patch scores are upsampled to t x t exactly as an
untiled map is (bilinear, align_corners=False); the tiles are then stitched into S x S,
each pixel the weighted mean of the tiles that cover it, with separable weights that ramp
linearly over the overlap (w(x) = min(1, (x + 1/2) / overlap, (t - x - 1/2) / overlap)),
normalised by their sum at that pixel. The ramp hides the seams, where a tile's border
patches see zero padding in the backbone; a pixel covered by one tile takes that tile's
value. The Gaussian blur then runs once on the stitched map, and the image score is taken
on it, as for an untiled image.
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from pn_jax import maps as maps_lib


class Layout(NamedTuple):
    size: int  # S: the image side the tiles cover
    tile: int  # t
    overlap: int
    starts: tuple[int, ...]  # tile starts along one axis (the same on both)

    @property
    def n_tiles(self) -> int:
        return len(self.starts) ** 2

    @property
    def corners(self) -> list[tuple[int, int]]:
        """(y, x) of each tile, row-major: the order of the tiles in the features."""
        return [(y, x) for y in self.starts for x in self.starts]


def check(size: int, tile: int, overlap: int) -> None:
    """Refuse a tiling that cannot work, naming the flag."""
    if tile < 32:
        raise ValueError(f"--tile {tile}: a tile must be at least 32 px (the backbone's stride-16 stage "
                         f"needs a few patches)")
    if tile > size:
        raise ValueError(f"--tile {tile} is larger than the image ({size} px after resizing, --image-size): "
                         f"give --tile <= {size}, or a larger --image-size")
    if not 0 <= overlap < tile:
        raise ValueError(f"--tile-overlap {overlap}: the overlap must be >= 0 and smaller than the tile "
                         f"({tile} px)")


def positions(size: int, tile: int, overlap: int) -> tuple[int, ...]:
    """Tile starts along one axis: 0, s, 2s, ... (s = tile - overlap), the last moved back to end at `size`."""
    check(size, tile, overlap)
    stride = tile - overlap
    n = 1 + max(0, -(-(size - tile) // stride))  # ceil((size - tile) / stride) + 1
    return tuple(min(i * stride, size - tile) for i in range(n))


def layout(size: int, tile: int, overlap: int) -> Layout:
    return Layout(size, tile, overlap, positions(size, tile, overlap))


def of_config(cfg) -> Layout | None:
    """The config's tiling, or None when it does not tile."""
    d = cfg.data
    if not d.tile:
        return None
    size = d.crop_size if d.resize_mode == "patchcore" else d.image_size
    return layout(size, d.tile, d.tile_overlap)


def split(images, lay: Layout):
    """Images [B, S, S, C] -> tiles [B * T, t, t, C], image-major then row-major (numpy or jax)."""
    b, h, w = images.shape[:3]
    if (h, w) != (lay.size, lay.size):
        raise ValueError(f"images are {h}x{w}, but the tiling covers {lay.size}x{lay.size}")
    t = lay.tile
    xp = jnp if not isinstance(images, np.ndarray) else np
    parts = [images[:, y:y + t, x:x + t] for y, x in lay.corners]
    return xp.stack(parts, axis=1).reshape((b * lay.n_tiles, t, t) + tuple(images.shape[3:]))


def ramp(tile: int, overlap: int) -> np.ndarray:
    """The 1-d blending weight [t] (float64): 1 inside, a linear ramp over the overlap at both ends."""
    x = np.arange(tile, dtype=np.float64) + 0.5
    if overlap == 0:
        return np.ones(tile)
    return np.minimum(1.0, np.minimum(x, tile - x) / overlap)


def blend_weights(lay: Layout) -> np.ndarray:
    """Per tile, its share of each pixel it covers [T, t, t] (float32): the tile's separable
    ramp weight divided by the summed weight of every tile covering that pixel."""
    r = ramp(lay.tile, lay.overlap)
    w2 = np.outer(r, r)
    total = np.zeros((lay.size, lay.size))
    t = lay.tile
    for y, x in lay.corners:
        total[y:y + t, x:x + t] += w2
    return np.stack([w2 / total[y:y + t, x:x + t] for y, x in lay.corners]).astype(np.float32)


def stitch(tile_maps, lay: Layout):
    """Tile maps [B, T, t, t] -> [B, S, S]: each pixel the weighted mean of its tiles."""
    w = jnp.asarray(blend_weights(lay))
    t = lay.tile
    out = jnp.zeros((tile_maps.shape[0], lay.size, lay.size), jnp.float32)
    for i, (y, x) in enumerate(lay.corners):
        out = out.at[:, y:y + t, x:x + t].add(w[i] * tile_maps[:, i])
    return out


def to_pixel_maps(patch_scores, grid: tuple[int, int], lay: Layout, sigma: float):
    """Patch scores [B, T * h * w] of tiled images -> blurred, stitched [B, S, S] maps."""
    b = patch_scores.shape[0]
    per_tile = patch_scores.reshape(b * lay.n_tiles, *grid)
    up = maps_lib.upsample_maps(per_tile, (lay.tile, lay.tile)).reshape(b, lay.n_tiles, lay.tile, lay.tile)
    return maps_lib.gaussian_blur(stitch(up, lay), sigma)
