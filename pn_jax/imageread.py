"""Reading images: the inputs of predict, file decoding, mode conversion, geometry and the
per-file errors. One module for the training pipeline (`pn_jax.data`), `Model.predict` and the
exported model's loader (`pn_jax.export`); it needs only numpy, PIL and the standard library,
so a deployment box runs the loader without grain, flax or orbax.

Every image becomes RGB uint8 HxWx3 whatever its file mode (grayscale, palette, RGBA,
16-bit); arrays go through `array_to_rgb` to the same form. A file that cannot be read raises
`DataError` naming it (a multi-page TIFF, a truncated file, a decompression bomb included);
`attempt` turns that into the one-line message that predict puts in its `errors`. Geometry:
  * "resize" (default, the seed's `patchcore_noising_256`): SxS bilinear. PIL's BILINEAR
    resize widens its kernel when downscaling, so it is antialiased.
  * "patchcore" (PatchCore-original): shorter side to `image_size`, centre crop `crop_size`,
    with torchvision's Resize/CenterCrop rounding.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
RESIZE_MODES = ("resize", "patchcore")


class DataError(ValueError):
    """A malformed dataset, file or image array: the message names it and what to do."""


class MissingDataError(DataError, FileNotFoundError):
    """A dataset folder or file that should exist does not."""


_READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError,
                Image.DecompressionBombError)


def is_image_file(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _reason(path: str, err: Exception) -> str:
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return "the file is empty (0 bytes)"
    return str(err)


def open_image(path: str, what: str = "image") -> Image.Image:
    """The decoded PIL image of `path` (caller closes it), or DataError naming the file."""
    img = None
    try:
        img = Image.open(path)
        img.load()  # decode now, so a truncated file fails here, naming the file
        n_frames = getattr(img, "n_frames", 1)
    except FileNotFoundError:
        raise MissingDataError(f"{what} not found: {path}") from None
    except _READ_ERRORS as e:
        if img is not None:
            img.close()
        raise DataError(f"cannot read {what} {path}: {_reason(path, e)}. Replace or remove "
                        f"the file.") from None
    if img.format == "TIFF" and n_frames > 1:
        # Only the first page would be read, the rest of the stack silently dropped. (Phone
        # JPEGs that carry a preview frame, MPO, are read as their main image.)
        img.close()
        raise DataError(f"{what} {path} is a multi-page TIFF ({n_frames} pages); save each "
                        f"page as its own image file.")
    return img


def image_size_of(path: str, what: str = "image") -> tuple[int, int]:
    """(width, height) from the header only: cheap enough to check a whole dataset."""
    try:
        with Image.open(path) as img:
            size = img.size
            n_frames = getattr(img, "n_frames", 1) if img.format == "TIFF" else 1
    except FileNotFoundError:
        raise MissingDataError(f"{what} not found: {path}") from None
    except _READ_ERRORS as e:
        raise DataError(f"cannot read {what} {path}: {_reason(path, e)}. Replace or remove "
                        f"the file.") from None
    if n_frames > 1:
        raise DataError(f"{what} {path} is a multi-page TIFF ({n_frames} pages); save each "
                        f"page as its own image file.")
    return size


# ----------------------------------------------------------------------------- modes
def _to_uint8(img: Image.Image) -> np.ndarray:
    """Pixel values of any single/multi-channel mode on a 0..255 scale."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grayscale: full scale is 65535; PIL's convert("L") would clip instead.
        a = np.asarray(img).astype(np.float64)
        return np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
    if img.mode == "F":
        a = np.asarray(img, np.float64)
        scale = 255.0 if a.max(initial=0.0) <= 1.0 else 1.0  # float images in 0..1 or 0..255
        return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
    return np.asarray(img)


def to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode == "RGB":
        return np.asarray(img)
    if img.mode in ("P", "PA", "RGBA", "LA", "CMYK", "YCbCr", "1", "L", "La", "RGBa", "HSV", "LAB"):
        # Alpha is dropped, not composited: the pixel colours are what the camera saw.
        return np.asarray(img.convert("RGB"))
    gray = _to_uint8(img)
    return np.repeat(gray[..., None], 3, axis=-1) if gray.ndim == 2 else gray[..., :3]


def load_rgb(path: str) -> np.ndarray:
    """Any image file -> RGB uint8 HxWx3 (raises DataError naming the file)."""
    with open_image(path, "image") as img:
        out = to_rgb(img)
    if out.dtype != np.uint8 or out.ndim != 3 or out.shape[2] != 3:
        raise DataError(f"cannot convert image {path} (mode {img.mode}) to 8-bit RGB.")
    return np.ascontiguousarray(out)


FLOAT_TOLERANCE = 1e-3  # float images may overshoot [0, 1] by rounding, not by a scale
_CHANNELS = (1, 3, 4)


def _array_scale_to_uint8(a: np.ndarray, shape) -> np.ndarray:
    """Values of one dtype convention -> uint8 0..255 (conventions as load_rgb's files)."""
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * np.uint8(255)
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.uint16:  # 16-bit: full scale 65535, as a 16-bit PNG is read
        return np.rint(a / 257.0).astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0 or hi > 255:
            raise DataError(
                f"an integer image array of dtype {a.dtype} (shape {shape}) must hold values "
                f"in 0..255, found {lo}..{hi}; pass uint16 for 16-bit data or scale it to "
                f"uint8 first.")
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if a.size and not np.isfinite(a).all():
            raise DataError(f"a float image array (shape {shape}) holds NaN or inf values.")
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        # Only one float convention: a float array with max <= 1 could be a dark 0..255 image
        # too, so guessing the scale from the values could silently be off by 255x.
        if lo < -FLOAT_TOLERANCE or hi > 1.0 + FLOAT_TOLERANCE:
            raise DataError(
                f"a float image array (dtype {a.dtype}, shape {shape}) must hold values in "
                f"[0, 1], found {lo:.4g}..{hi:.4g}; for 0..255 data pass "
                f"array.astype(np.uint8), or divide by 255.")
        return np.rint(np.clip(a.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    raise DataError(f"an image array must be bool, integer or float, got dtype {a.dtype} "
                    f"(shape {shape}).")


def array_to_rgb(array) -> np.ndarray:
    """One image array -> RGB uint8 HxWx3.

    Shapes HxW, HxWx1 (grayscale), HxWx3 (RGB), HxWx4 (RGBA: alpha dropped, as load_rgb
    does). dtypes: uint8; uint16 (16-bit, 65535 = white); other integers holding 0..255;
    float in [0, 1] (a float outside [0, 1] is refused, not guessed); bool (True = white).
    """
    a = np.asarray(array)
    shape = tuple(a.shape)
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in _CHANNELS)):
        raise DataError(
            f"an image array must be HxW, HxWx1, HxWx3 or HxWx4 (channels last), got shape "
            f"{shape}; a channels-first array needs np.moveaxis(a, 0, -1).")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise DataError(f"an image array has no pixels (shape {shape}).")
    a = _array_scale_to_uint8(a, shape)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


def split_images(array) -> list:
    """An array of one image or a batch -> its images, unconverted (`array_to_rgb` converts).

    4-D is a batch [B, H, W, C]; 2-D is one grayscale image; 3-D is one image when its last
    axis is 1, 3 or 4 (HxWxC), a batch of grayscale images [B, H, W] otherwise, except when
    its first axis is 1, 3 or 4: that is also a channels-first image, so it is refused as
    ambiguous. A list or tuple of arrays is a list of single images.
    """
    if isinstance(array, (list, tuple)):
        return list(array)
    a = np.asarray(array)
    shape = tuple(a.shape)
    if a.ndim == 4:
        if a.shape[3] not in _CHANNELS:
            raise DataError(f"a batch of images must be [B, H, W, C] with C in 1, 3 or 4, "
                            f"got shape {shape}.")
        return list(a)
    if a.ndim == 3 and a.shape[2] not in _CHANNELS:
        if a.shape[0] in _CHANNELS:
            raise DataError(
                f"ambiguous image array shape {shape}: a channels-first image or a batch of "
                f"{shape[0]} grayscale images? Pass channels last (np.moveaxis(a, 0, -1)) for "
                f"one image, or a 4-D [B, H, W, 1] array (or a list) for a batch.")
        return list(a)
    if a.ndim in (2, 3):
        return [a]
    raise DataError(f"an image array must have 2, 3 or 4 dimensions (HxW, HxWxC or "
                    f"[B, H, W, C]), got shape {shape}.")


def array_to_images(array) -> list[np.ndarray]:
    """An array of one image or a batch (`split_images`) -> [RGB uint8 HxWx3, ...]."""
    return [array_to_rgb(a) for a in split_images(array)]


# ----------------------------------------------------------------------------- geometry
def geometry(h: int, w: int, image_size: int, resize_mode: str, crop_size: int):
    """-> (resized (W, H), crop box or None)."""
    if resize_mode == "resize":
        return (image_size, image_size), None
    if resize_mode != "patchcore":
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
    # torchvision Resize(int): shorter side -> size, longer side truncated.
    if w <= h:
        nw, nh = image_size, int(image_size * h / w)
    else:
        nw, nh = int(image_size * w / h), image_size
    if crop_size > min(nw, nh):
        raise ValueError(f"crop_size {crop_size} exceeds resized image {nw}x{nh}")
    # torchvision CenterCrop rounding.
    top = int(round((nh - crop_size) / 2.0))
    left = int(round((nw - crop_size) / 2.0))
    return (nw, nh), (left, top, left + crop_size, top + crop_size)


def resize_image(image: np.ndarray, image_size: int, resize_mode: str = "resize",
                 crop_size: int = 224) -> np.ndarray:
    """uint8 HxWx3 -> uint8 SxSx3 (S = image_size, or crop_size in patchcore mode)."""
    size, box = geometry(*image.shape[:2], image_size, resize_mode, crop_size)
    img = Image.fromarray(image)
    if img.size != size:
        img = img.resize(size, Image.BILINEAR)
    if box is not None:
        img = img.crop(box)
    return np.asarray(img)


# ----------------------------------------------------------------------------- inputs
def is_hidden(name: str) -> bool:
    return name.startswith(".")


def walk_files(folder: str) -> list[str]:
    """Regular, non-hidden files under folder (recursive, symlinks followed once), as sorted
    relative paths with "/" separators."""
    out, seen = [], set()

    def fail(err: OSError):
        raise DataError(f"cannot list folder {err.filename}: {err.strerror}. Fix its "
                        f"permissions or remove it.")

    for dirpath, dirnames, filenames in os.walk(folder, onerror=fail, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink cycle, or a folder linked twice
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        rel = os.path.relpath(dirpath, folder)
        for f in filenames:
            if is_hidden(f) or not os.path.isfile(os.path.join(dirpath, f)):
                continue
            out.append(f if rel == "." else "/".join([*rel.split(os.sep), f]))
    return sorted(out)


def _files_of(p: str) -> list[str]:
    """A folder -> every regular file under it (not only image extensions: predict reports a
    file it cannot read by name instead of dropping it silently); a file, or a path that does
    not exist (for the same reason) -> itself."""
    if not os.path.isdir(p):
        return [p]
    files = walk_files(p)
    if not files:
        raise DataError(f"input folder {p} holds no files (hidden files are skipped).")
    return [os.path.join(p, *f.split("/")) for f in files]


def resolve_inputs(inputs) -> list[str]:
    """A path, a folder, or a list of them -> the list of files to score, in order.
    Folders are expanded recursively, sorted, hidden files skipped."""
    if isinstance(inputs, (str, os.PathLike)):
        items = [inputs]
    elif isinstance(inputs, (list, tuple)):
        items = list(inputs)
    else:
        raise TypeError(f"inputs must be a path, a folder or a list of paths, got "
                        f"{type(inputs).__name__}; arrays go through array_to_images.")
    if not items:
        raise ValueError("no inputs given: pass at least one image path or folder.")
    out = []
    for p in items:
        if not isinstance(p, (str, os.PathLike)):
            raise TypeError(f"inputs must be paths, got a {type(p).__name__} in the list.")
        out += _files_of(os.fspath(p))
    return out


def input_items(inputs) -> list[tuple[str, Callable[[], np.ndarray]]]:
    """What predict scores: a path, a folder (recursive), an array (one image or a batch,
    `split_images`) or a list of paths, folders and image arrays -> [(name, read)] in input
    order, where read() gives RGB uint8 HxWx3 or raises DataError naming the input. Arrays are
    converted when read, so a bad image in a batch is reported by name like a bad file."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not isinstance(inputs, (list, tuple)):  # an array (numpy, jax, ...)
        return [(f"array[{i}]", lambda x=x: array_to_rgb(x)) for i, x in enumerate(split_images(np.asarray(inputs)))]
    if not inputs:
        raise ValueError("no inputs given: pass at least one image, path or folder.")
    out = []
    for i, x in enumerate(inputs):
        if isinstance(x, (str, os.PathLike)):
            out += [(p, lambda p=p: load_rgb(p)) for p in _files_of(os.fspath(x))]
        else:
            out.append((f"array[{i}]", lambda x=x: array_to_rgb(x)))
    return out


def attempt(read: Callable[[], object]):
    """Run one input's reading (and whatever preprocessing goes with it): (its result, None),
    or (None, the one-line reason) when the file or array cannot be used. The same reasons
    go into `Model.predict`'s and the exported predictor's `errors`."""
    try:
        return read(), None
    except (ValueError, OSError) as e:  # DataError is a ValueError: it names the file
        return None, str(e).splitlines()[0]
