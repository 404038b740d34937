"""Masks, normalisation and dataset warnings (SPEC 2.1); image files and arrays are read by
`pn_jax.imageread` (one module for the pipeline, predict and the exported model's loader),
whose names are re-exported here.

Masks become uint8 HxW in {0, 255}: a pixel is a defect when it is non-zero, whatever the
encoding (0/1, 0/255, bool, palette index, 16-bit, RGB), so a 0/1 mask is not read as empty.
They are binarised (non-zero -> 1) before the geometry (`imageread.geometry`, the images'),
then resized as float and thresholded at 0.5: the resize's interpolated edge must not grow
the defect.
"""
from __future__ import annotations

import threading
import warnings

import numpy as np
from PIL import Image

from pn_jax.imageread import (FLOAT_TOLERANCE, IMAGE_EXTENSIONS, RESIZE_MODES, DataError,  # noqa: F401
                              MissingDataError, array_to_images, array_to_rgb, geometry, image_size_of,
                              is_image_file, load_rgb, open_image, resize_image, to_rgb)


class DataWarning(UserWarning):
    """Data that is usable but probably not what the user meant (names the files)."""


def warn_data(msg: str) -> None:
    warnings.warn(msg, DataWarning, stacklevel=3)


def mask_to_binary(img: Image.Image) -> np.ndarray:
    """A decoded mask -> bool HxW, True where the defect is.

    Non-zero marks the defect in every lossless encoding: palette masks by their index (label
    PNGs: index 0 is background), colour masks in any channel (alpha ignored, as for images),
    16-bit and float masks by their raw value, so a 1 out of 65535 is not rounded away. A
    lossy (JPEG) mask has compression noise around 0 and its edges, so there the defect is
    above half of the mask's own maximum (a 0/120 JPEG mask is still read).
    """
    if img.mode in ("RGB", "RGBA", "RGBa", "CMYK", "YCbCr", "HSV", "LAB"):
        a = np.asarray(img.convert("RGB")).max(axis=-1)
    elif img.mode in ("LA", "La", "PA"):
        a = np.asarray(img)[..., 0]
    else:  # "1", "L", "P", "I;16*", "I", "F"
        a = np.asarray(img)
    if img.format in ("JPEG", "MPO", "WEBP") and a.size:
        return a > 0.5 * float(a.max())
    return a != 0


def load_mask(path: str) -> np.ndarray:
    """Any mask file -> uint8 HxW in {0, 255} (non-zero pixels are the defect)."""
    with open_image(path, "mask") as img:
        out = mask_to_binary(img)
    return np.ascontiguousarray(out.astype(np.uint8) * np.uint8(255))


_WARNED_EMPTY: set[str] = set()
_WARNED_LOCK = threading.Lock()


def warn_if_empty_mask(mask: np.ndarray | None, label: int, mask_file: str,
                       image_file: str) -> None:
    """A defect image whose mask marks nothing: pixel metrics would silently count it as all
    normal. Warned once per mask file per process."""
    if mask is None or int(label) != 1 or np.any(mask):
        return
    with _WARNED_LOCK:
        if mask_file in _WARNED_EMPTY:
            return
        _WARNED_EMPTY.add(mask_file)
    warnings.warn(
        f"the mask {mask_file} of defect image {image_file} is all zero: no pixel marks the "
        f"defect, so pixel metrics count the whole image as normal. Fix the mask (non-zero "
        f"pixels mark the defect) or move the image to good/ if it has no defect.",
        DataWarning, stacklevel=2)


def resize_mask(mask: np.ndarray, image_size: int, resize_mode: str = "resize",
                crop_size: int = 224) -> np.ndarray:
    """HxW mask of any dtype (non-zero = defect) -> float32 SxS in {0, 1}.

    Binarised first, so 0/1, 0/255 and 16-bit masks agree; then resized as float and
    thresholded at 0.5, so the interpolated edge neither grows nor shrinks the defect.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be HxW, got shape {mask.shape}")
    size, box = geometry(*mask.shape[:2], image_size, resize_mode, crop_size)
    img = Image.fromarray((mask != 0).astype(np.float32))  # mode "F"
    if img.size != size:
        img = img.resize(size, Image.BILINEAR)
    if box is not None:
        img = img.crop(box)
    return (np.asarray(img) > 0.5).astype(np.float32)


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
    """uint8 HxWx3 -> float32 HxWx3, (x/255 - mean) / std with mean/std on the 0..1 scale."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    return (image.astype(np.float32) / np.float32(255.0) - mean) / std
