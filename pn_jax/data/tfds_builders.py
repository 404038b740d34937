"""tensorflow-datasets builders `mvtec_ad` (manual download) and `elpv` (SPEC 2.11).

Built with file_format="array_record" and read with `builder.as_data_source()`, which needs
no TensorFlow. Without TF, tfds cannot encode numpy images, so examples carry encoded PNG
bytes: a file that is already an RGB (mvtec_ad) or grayscale (elpv) PNG is stored as is;
anything else (jpg, bmp, tiff, 16-bit, RGBA, palette, grayscale in mvtec_ad) is decoded with
`preprocess.load_rgb` / `load_mask` and re-encoded losslessly, so a record read back equals
what the direct reader returns. Examples are written in name order (`disable_shuffling`,
integer keys), so index i of a split is the i-th sample of the direct index.

A mask feature cannot be absent, so samples without a mask store a 1x1 zero PNG and
`has_mask=False`; `tfds_to_record` turns that back into mask=None.

    builder = mvtec_builder("bottle", data_dir="/data/tfds")    # or any category name
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir="/data/mvtec_ad"))
    source = builder.as_data_source()["test"]
"""
from __future__ import annotations

import io
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from pn_jax.data import elpv, mvtec, preprocess
from pn_jax.data.records import Sample, make_record

VERSION = "1.0.0"


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)  # fast, still lossless
    return buf.getvalue()


def _raw_if(path: str, modes: tuple[str, ...]) -> bytes | None:
    """The file's own bytes when PIL decodes it to exactly what we would re-encode."""
    with Image.open(path) as img:
        if img.format == "PNG" and img.mode in modes:
            with open(path, "rb") as f:
                return f.read()
    return None



def _features(channels: int) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, channels)),
        "mask": tfds.features.Image(shape=(None, None, 1)),
        "has_mask": tfds.features.Scalar(dtype=np.bool_),
        "label": tfds.features.ClassLabel(names=["good", "anomalous"]),
        "defect": tfds.features.Text(),
        "name": tfds.features.Text(),
    })


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(VERSION)
    _CHANNELS = 3
    _DESCRIPTION = ""

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: dataset_info_from_configs wants a package folder of metadata.
        return tfds.core.DatasetInfo(builder=self, description=self._DESCRIPTION,
                                     features=_features(self._CHANNELS),
                                     disable_shuffling=True)

    def _index(self, dl_manager) -> dict[str, list[Sample]]:
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        index = self._index(dl_manager)
        return {split: self._generate_examples(samples) for split, samples in index.items()}

    def _encode_image(self, path: str) -> bytes:
        return _raw_if(path, ("RGB",)) or _png(preprocess.load_rgb(path))

    def _generate_examples(self, samples):
        empty = _png(np.zeros((1, 1), np.uint8))
        for k, s in enumerate(samples):
            if s.mask_path:
                mask = _raw_if(s.mask_path, ("L",)) or _png(preprocess.load_mask(s.mask_path))
            yield k, {"image": self._encode_image(s.path),
                      "mask": mask if s.mask_path else empty,
                      "has_mask": s.mask_path is not None, "label": s.label,
                      "defect": s.defect, "name": s.name}


class MvtecAd(_Builder):
    """Any dataset in MVTec AD layout; manual_dir = the root holding <category>/ folders."""
    name = "mvtec_ad"
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=c) for c in mvtec.MVTEC_CATEGORIES]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Download MVTec AD from {mvtec.MVTEC_URL}, extract it and pass the folder holding "
        f"bottle/, cable/, ... as manual_dir (any dataset in the MVTec layout works).")
    _DESCRIPTION = "MVTec AD layout: train/good, test/<defect|good>, ground_truth masks."

    def _index(self, dl_manager):
        return mvtec.index_category(os.fspath(dl_manager.manual_dir), self.builder_config.name)


class Elpv(_Builder):
    """ELPV from the elpv-dataset package, split per the protocol in pn_jax.data.elpv."""
    name = "elpv"
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=c) for c in elpv.ELPV_CATEGORIES]
    _CHANNELS = 1  # every ELPV cell is an 8-bit grayscale PNG, stored as is
    _DESCRIPTION = elpv.__doc__

    def _index(self, dl_manager):
        return elpv.index_elpv(self.builder_config.name)

    def _encode_image(self, path: str) -> bytes:
        return _raw_if(path, ("L",)) or _png(preprocess.load_rgb(path)[..., 0])


def mvtec_builder(category: str, data_dir: str) -> MvtecAd:
    """An mvtec_ad builder for any category name (the 15 MVTec ones are predefined)."""
    known = {c.name: c for c in MvtecAd.BUILDER_CONFIGS}
    config = known.get(category) or tfds.core.BuilderConfig(name=category)
    return MvtecAd(config=config, data_dir=data_dir, file_format="array_record")


def elpv_builder(category: str, data_dir: str) -> Elpv:
    return Elpv(config=category, data_dir=data_dir, file_format="array_record")


def prepare(dataset: str, category: str, data_dir: str, root: str | None = None):
    """Build once into data_dir (reused afterwards); returns the prepared builder."""
    if dataset == "elpv":
        builder = elpv_builder(category, data_dir)
    else:  # mvtec_ad and synthetic share the layout
        builder = mvtec_builder(category, data_dir)
    if not builder.is_prepared():
        config = tfds.download.DownloadConfig(manual_dir=root) if root else None
        builder.download_and_prepare(download_config=config)
    return builder


def tfds_to_record(raw: dict, split: str) -> dict:
    """A tfds example (decoded by the data source) -> the uniform record."""
    def text(v):
        return v.decode() if isinstance(v, bytes) else str(v)

    image = np.asarray(raw["image"])
    if image.ndim == 2 or image.shape[-1] == 1:
        image = np.repeat(image.reshape(image.shape[:2])[..., None], 3, axis=-1)
    mask = np.asarray(raw["mask"])[..., 0] if bool(raw["has_mask"]) else None
    return make_record(image, mask, int(raw["label"]), text(raw["defect"]),
                       text(raw["name"]), split)
