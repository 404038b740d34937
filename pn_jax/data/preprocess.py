"""Image and mask loading and geometry (SPEC 2.1).

Every image becomes RGB uint8 HxWx3 whatever its file mode (grayscale, palette, RGBA,
16-bit); masks become uint8 HxW on a 0..255 scale. Geometry:
  * "resize" (default, the seed's `patchcore_noising_256`): SxS bilinear. PIL's BILINEAR
    resize widens its kernel when downscaling, so it is antialiased.
  * "patchcore" (PatchCore-original): shorter side to `image_size`, centre crop `crop_size`,
    with torchvision's Resize/CenterCrop rounding.
Masks take the same geometry, resized as float, then binarised at > 0.5 of full scale: real
masks are not always clean 0/255 and an antialiased edge must not become a defect.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
RESIZE_MODES = ("resize", "patchcore")


class DataError(ValueError):
    """A malformed dataset: the message names the file or folder and what to do."""


class MissingDataError(DataError, FileNotFoundError):
    """A dataset folder or file that should exist does not."""


def is_image_file(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _open(path: str, what: str) -> Image.Image:
    img = None
    try:
        img = Image.open(path)
        img.load()  # decode now, so a truncated file fails here, naming the file
        return img
    except FileNotFoundError:
        raise MissingDataError(f"{what} not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if img is not None:
            img.close()
        raise DataError(
            f"cannot read {what} {path}: {e}. Replace or remove the file.") from None


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
    with _open(path, "image") as img:
        out = to_rgb(img)
    if out.dtype != np.uint8 or out.ndim != 3 or out.shape[2] != 3:
        raise DataError(f"cannot convert image {path} (mode {img.mode}) to 8-bit RGB.")
    return np.ascontiguousarray(out)


def load_mask(path: str) -> np.ndarray:
    """Any mask file -> uint8 HxW on 0..255 (not yet binarised: that happens after resize)."""
    with _open(path, "mask") as img:
        if img.mode == "1":
            img = img.convert("L")
        elif img.mode in ("P", "PA", "RGB", "RGBA", "LA", "La", "CMYK", "YCbCr"):
            img = img.convert("RGB")  # then max over channels: a pure-red mask is a mask
        out = _to_uint8(img)
    if out.ndim == 3:
        out = out.max(axis=-1)
    return np.ascontiguousarray(out.astype(np.uint8))


def image_size_of(path: str, what: str = "image") -> tuple[int, int]:
    """(width, height) from the header only: cheap enough to check a whole dataset."""
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        raise MissingDataError(f"{what} not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(
            f"cannot read {what} {path}: {e}. Replace or remove the file.") from None


def _geometry(h: int, w: int, image_size: int, resize_mode: str, crop_size: int):
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
    size, box = _geometry(*image.shape[:2], image_size, resize_mode, crop_size)
    img = Image.fromarray(image)
    if img.size != size:
        img = img.resize(size, Image.BILINEAR)
    if box is not None:
        img = img.crop(box)
    return np.asarray(img)


def resize_mask(mask: np.ndarray, image_size: int, resize_mode: str = "resize",
                crop_size: int = 224, full_scale: float = 255.0) -> np.ndarray:
    """uint8 HxW (0..full_scale) -> float32 SxS in {0, 1}: resize as float, then > 0.5."""
    size, box = _geometry(*mask.shape[:2], image_size, resize_mode, crop_size)
    img = Image.fromarray(mask.astype(np.float32) / np.float32(full_scale))  # mode "F"
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
