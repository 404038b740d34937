"""A bank per tile position (`--tile-bank per-position`, issue 26): for aligned parts (PCBs,
tiles on a line), where a pattern normal at one place is a defect at another.

With tiles (`pn_jax.tiles`) an image's T tiles are laid end to end as its patches: features
[B, T * N_t, D], tile t's patches at [t * N_t, (t + 1) * N_t). The shared bank (the default)
is one coreset over every tile's patches, so a tile is compared with every position's normal
patches. Per position, position t's bank is the greedy coreset of position t's patches over
all training images (n * N_t rows, the same ratio), and tile t is scored against it alone.

Layout. Every position has n * N_t candidate rows, so every position's bank has the same size
M_t = coreset.n_coreset(n * N_t, ratio). They are stored end to end as one bank [T * M_t, D]
(position-major): position t's rows are [t * M_t, (t + 1) * M_t), which is all a checkpoint
and the scorer need to know (`slices`). Scoring runs the unchanged exact k-NN paths on each
position's slice (one compiled function: every slice has the same shape) and lays the
per-patch signals end to end again, so maps, stitching and image scores are the shared
bank's. Leave-one-image-out scoring excludes an image's rows within each position's bank.

Coreset. The projection is the shared fit's (the same key, the same 32,768-row chunks over all
rows in image order, `coreset.project_chunked` or the streamed store's), so a streamed fit
selects the same rows; position t's greedy runs on its rows with the key fold_in(key, t).

Statistics. The noise scale s, the dims S and the signal statistics stay one set for all
positions: they are fitted on the calibration images' patches, each searched against its own
position's bank (leave-one-image-out), so the threshold is chosen on scores made the way test
scores are.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pn_jax import coreset as coreset_lib
from pn_jax import precision as precision_lib
from pn_jax import tiles


def n_positions(cfg) -> int:
    """T, the number of position banks; 0 for one shared bank."""
    if cfg.bank.tile_bank != "per_position":
        return 0
    return tiles.of_config(cfg).n_tiles


def position_rows(n_img: int, n_patch: int, n_pos: int, t: int) -> np.ndarray:
    """Flat row indices (image * N + patch) of position t's patches, image by image."""
    n_t = n_patch // n_pos
    return (np.arange(n_img, dtype=np.int64)[:, None] * n_patch + t * n_t + np.arange(n_t)[None, :]).reshape(-1)


def project_all(key, flat: np.ndarray, cfg) -> np.ndarray:
    """Every row's coreset projection, as `coreset.coreset_indices(key, flat, ...)` makes it."""
    return np.asarray(coreset_lib.projected_rows(key, flat, cfg.bank.coreset_proj_dim, precision_lib.of(cfg)))


def coreset(key, projected: np.ndarray, n_img: int, n_patch: int, cfg, progress: bool = True) -> np.ndarray:
    """Flat indices of the bank rows, position-major: position t's greedy coreset of its own
    rows (key fold_in(key, t)), each of n_coreset(n_img * N_t, ratio) rows."""
    n_pos = n_positions(cfg)
    out = []
    for t in range(n_pos):
        rows = position_rows(n_img, n_patch, n_pos, t)
        sel = coreset_lib.select_projected(jax.random.fold_in(key, t), projected[rows], cfg.bank.coreset_ratio,
                                           cfg.bank.coreset_starts, progress=progress,
                                           precision=precision_lib.of(cfg))
        out.append(rows[np.asarray(sel)])
    return np.concatenate(out)


def slices(n_bank: int, n_patch: int, n_pos: int) -> list[tuple[slice, slice]]:
    """(bank rows, patch columns) of each position."""
    if n_bank % n_pos or n_patch % n_pos:
        raise ValueError(f"a per-position bank of {n_bank} rows and {n_patch} patches per image cannot hold "
                         f"{n_pos} equal tile positions")
    m, n = n_bank // n_pos, n_patch // n_pos
    return [(slice(t * m, (t + 1) * m), slice(t * n, (t + 1) * n)) for t in range(n_pos)]


def join(parts: list, offsets=None):
    """Per-position results [B, N_t, ...] laid end to end -> [B, T * N_t, ...]; `offsets`: added
    to each part (local bank indices -> indices into the whole bank)."""
    if offsets is not None:
        parts = [p + o for p, o in zip(parts, offsets)]
    return jnp.concatenate(parts, axis=1)
