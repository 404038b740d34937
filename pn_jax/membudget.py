"""`--max-memory GB`: the peak resident memory of a run, estimated before any image is read,
and a refusal of a configuration that cannot fit (issue 26).

The estimate adds what a run holds at its peak, from the sizes alone: N patches per image
(the first layer's stride at the image or tile size, times the tiles), D feature dims, the
image and tile sides, the image counts and the coreset ratio. Under `--max-memory` the fit
streams its train features to disk (`pn_jax.streaming`), so the train set costs its
projection ([n * N, 128] float32) instead of its features ([n * N, D]). The calibration
sample (at most 32 images, pn_jax.fitting.calibration_split) is read back a batch at a time
(`streaming.Subset`) except for the noise scale's one [c * N, D] device array; the validation
images and their synthetic anomalies are scored a batch at a time and only their image
scores kept. The test phase holds one map per test image (and the pixel metrics sort them).
The fit has two phases that do not overlap: extraction + coreset (the projection), then
calibration + validation (the bank, the calibration sample). The constants were measured on
efficientnet_lite0 (the features of a batch of 8 at 256 and 1024 px); estimates against
measured peaks are in README "Resolution and tiles".
"""
from __future__ import annotations

import math

GB = 1e9
BASE = 1.2 * GB  # python, jax, XLA:CPU, backbone weights and compiled code (measured 0.6-1.1 GB)
ACT_PER_PIXEL = 200.0  # backbone activations per input pixel of a batch (bytes; measured ~130 at 1024 px)
CHUNK_ROWS = 32768  # streaming.CHUNK: rows buffered for one projection chunk


def patches_per_image(cfg) -> tuple[int, int]:
    """(N patches per image, side of one backbone input) from the config alone."""
    from pn_jax import backbones, tiles

    d = cfg.data
    side = d.crop_size if d.resize_mode == "patchcore" else d.image_size
    lay = tiles.of_config(cfg)
    unit = lay.tile if lay else side
    stride = backbones.info(cfg.model.backbone).stages[cfg.model.layers[0]].stride
    g = math.ceil(unit / stride)
    return g * g * (lay.n_tiles if lay else 1), unit


def estimate(cfg, n_train: int, n_test: int = 0, *, pixel_metrics: bool = True, streamed: bool = True) -> dict:
    """Peak resident bytes of a fit on n_train images then a test on n_test, by part."""
    from pn_jax import coreset, hardware, knn, tiles

    n_patch, unit = patches_per_image(cfg)
    d, p = cfg.model.target_embed_dimension, min(cfg.bank.coreset_proj_dim, cfg.model.target_embed_dimension)
    side = cfg.data.crop_size if cfg.data.resize_mode == "patchcore" else cfg.data.image_size
    lay = tiles.of_config(cfg)
    per_call = cfg.batch_size * (lay.n_tiles if lay else 1)  # backbone inputs per batch of images
    rows = n_train * n_patch
    pre = cfg.bank.coreset_preselect
    kept = min(rows, math.ceil(pre * cfg.bank.coreset_ratio * rows) + CHUNK_ROWS) if pre else rows  # greedy's points
    f32 = 4
    n_cal = min(32, max(1, -(-n_train // 2))) if n_train >= 2 else 0
    n_val = min(32, n_train - n_cal)
    bank_rows = coreset.n_coreset(rows, cfg.bank.coreset_ratio)
    read = (max(2, cfg.batch_size) + 1) * n_patch * d * f32  # one streaming.Subset batch (a lone last image joins it)
    s_dims = max(1, round(cfg.noising.influence_ratio * d))
    parts = {
        "base": BASE,
        # one batch through the backbone and the aggregation (+ its host copy)
        "batch": per_call * unit * unit * ACT_PER_PIXEL + 3 * cfg.batch_size * n_patch * d * f32,
        # train features: streamed = the projection (host + device copy) and one chunk buffer;
        # in memory = the features and the projection
        "train": (2 * kept * p * f32 + 2 * CHUNK_ROWS * d * f32) if streamed else (rows * d + 2 * rows * p) * f32,
        "coreset": 4 * kept * f32,  # min-distance, squared norms and their temporaries
        "bank": 3 * bank_rows * d * f32,
        # one image's k-NN: every bank block's candidate scores of a chunk of its queries
        # (knn.QUERY_SCORES) live at once. 16 bytes a score: the search alone measured 8-13
        # (1.3 GB for 16,384 x 65,536 in chunks of 2,048), but a 1024 px fit on 400 images
        # peaked at 8.6 GB early in calibration where 8 bytes a score estimated 7.8 GB (the
        # rest is not yet explained: README "Resolution and tiles"), so the term carries it.
        # The CPU searches `hardware.cpu_streams()` batches at once, each with its share of it.
        "knn": 16 * knn.query_chunk(n_patch, bank_rows) * bank_rows * hardware.cpu_streams(),
        # calibration: streamed = the noise scale's [c * N, D] device array and one batch read
        # back (+ its device copy); in memory = the sample and its device copy. Either way its
        # K-NN (distances, indices) and influence on S per patch.
        "calibration": ((n_cal * n_patch * d * f32 + 2 * read) if streamed else 2 * n_cal * n_patch * d * f32)
                       + n_cal * n_patch * (2 * cfg.noising.k + s_dims) * f32,
        # validation normals + synthetic anomalies, a batch at a time: its features (host and
        # device) and its three maps
        "validation": 2 * read + 3 * cfg.batch_size * side * side * f32,
        # one anomaly map per test image, the masks, and the pixel metrics' sort of all pixels
        "test": n_test * side * side * ((f32 + 1 + 12) if pixel_metrics else 0),
    }
    # The phases do not all overlap: the projection is dropped once the coreset is chosen
    # (streamed; in memory the features stay until the fit returns), and the fit is over
    # before the test holds maps.
    select_phase = parts["train"] + parts["coreset"]
    calib_phase = parts["bank"] + parts["knn"] + max(parts["calibration"], parts["validation"])
    fit_peak = parts["base"] + parts["batch"] + (max(select_phase, calib_phase) if streamed
                                                 else select_phase + calib_phase)
    test_peak = parts["base"] + parts["batch"] + parts["bank"] + parts["knn"] + parts["test"]
    return {"parts": parts, "fit": fit_peak, "test": test_peak, "peak": max(fit_peak, test_peak),
            "patches_per_image": n_patch}


def store_bytes(cfg, n_train: int) -> int:
    """Bytes of the on-disk feature store of a streamed fit (`streaming.FeatureStore`): every
    train patch's D float32 features."""
    return n_train * patches_per_image(cfg)[0] * cfg.model.target_embed_dimension * 4


def check_disk(cfg, n_train: int, directory: str | None = None) -> None:
    """Refuse, before any work, a streamed fit whose feature store cannot fit in the free space
    of its folder (the system's temporary folder: TMPDIR): at 1024 px, 400 images are 27 GB,
    and a full disk would otherwise stop the run minutes into the extraction."""
    import shutil
    import tempfile

    where = directory or tempfile.gettempdir()
    need, free = store_bytes(cfg, n_train), shutil.disk_usage(where).free
    if need > free:
        raise MemoryBudgetError(
            f"--max-memory streams the train features to disk: {n_train} images need "
            f"{need / GB:.1f} GB in {where} but {free / GB:.1f} GB are free. Free space there, point TMPDIR "
            f"at a larger disk, or lower --max-train / --image-size.")


def check(cfg, n_train: int, n_test: int = 0, *, pixel_metrics: bool = True) -> dict | None:
    """Refuse, before any work, a run whose estimated peak exceeds cfg.max_memory_gb, or whose
    streamed feature store does not fit on its disk."""
    if cfg.max_memory_gb is None:
        return None
    est = estimate(cfg, n_train, n_test, pixel_metrics=pixel_metrics)
    limit = cfg.max_memory_gb * GB
    if est["peak"] > limit:
        big = sorted(est["parts"].items(), key=lambda kv: -kv[1])[:3]
        side = cfg.data.image_size
        raise MemoryBudgetError(
            f"--max-memory {cfg.max_memory_gb:g}: this run needs about {est['peak'] / GB:.1f} GB at its peak "
            f"({n_train} train images, {n_test} test, {est['patches_per_image']} patches of "
            f"{cfg.model.target_embed_dimension} dims per {side} px image; largest parts: "
            + ", ".join(f"{k} {v / GB:.1f} GB" for k, v in big)
            + "). Lower --max-train / --max-test, --image-size or --embed-dim, use --tile, or raise --max-memory.")
    check_disk(cfg, n_train)
    return est


class MemoryBudgetError(ValueError):
    """A run that cannot fit in --max-memory; the message says what takes the memory."""
