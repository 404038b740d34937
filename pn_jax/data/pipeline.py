"""Batches for the detector (grain) and one entry point per category: `load_category`.

    sources = load_category("mvtec_ad", "/data/mvtec_ad", "bottle", holdout_fraction=0.1,
                            holdout_min=2, seed=0)
    for batch in make_batches(sources["train"], image_size=256, mean=IMAGENET_MEAN,
                              std=IMAGENET_STD, batch_size=8):
        batch["image"]  # float32 [B, S, S, 3], normalised
        batch["mask"]   # float32 [B, S, S] in {0, 1}; zeros where a record has no mask
        batch["label"]  # int32 [B]
        batch["name"]   # str array [B]
        batch["defect"] # str array [B]: the defect type ("good" for normal)
The last batch may be smaller than batch_size (no drop_remainder): the caller pads it.
`load_folders` (pn_jax.data.folder) gives the same Sources for a plain folder of good images.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from pn_jax.data import elpv, mvtec, preprocess, synthetic, visa
from pn_jax.data.records import (ReadLog, Sample, Source, check_mask_size, choose_samples,
                                 mask_coverage, samples_source)

DATASETS = ("mvtec_ad", "elpv", "synthetic", "visa")
TFDS_DATASETS = ("mvtec_ad", "elpv", "synthetic")
BACKENDS = ("direct", "tfds")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _coerce(record: dict) -> dict:
    """Accept lazy records (paths) and raw tfds examples as well as uniform records."""
    if "has_mask" in record:
        from pn_jax.data.tfds_builders import tfds_to_record  # imports tfds only when needed
        return tfds_to_record(record, record.get("split", ""))
    image, mask = record["image"], record.get("mask")
    mask_file = str(mask) if isinstance(mask, (str, os.PathLike)) else None
    if isinstance(image, (str, os.PathLike)):
        image_file = str(image)
        image = preprocess.load_rgb(image_file)
        if mask_file:
            mask = preprocess.load_mask(mask_file)
        check_mask_size(image, mask, image_file, mask_file)
    elif mask_file:
        image_file = str(record.get("name", "?"))
        mask = preprocess.load_mask(mask_file)
    if mask_file:
        preprocess.warn_if_empty_mask(mask, record.get("label", 0), mask_file, image_file)
    return {**record, "image": image, "mask": mask}


def preprocess_record(record: dict, *, image_size: int, mean, std, resize_mode: str = "resize",
                      crop_size: int = 224) -> dict[str, Any]:
    r = _coerce(record)
    image = preprocess.resize_image(np.asarray(r["image"]), image_size, resize_mode, crop_size)
    if r["mask"] is None:
        mask = np.zeros(image.shape[:2], np.float32)
    else:
        mask = preprocess.resize_mask(np.asarray(r["mask"]), image_size, resize_mode, crop_size)
    return {"image": preprocess.normalize(image, mean, std), "mask": mask,
            "label": np.int32(r["label"]), "name": str(r["name"]),
            "defect": str(r.get("defect") or ("good" if int(r["label"]) == 0 else "anomalous"))}


def _collate(items: Sequence[dict]) -> dict[str, np.ndarray]:
    return {"image": np.stack([x["image"] for x in items]),
            "mask": np.stack([x["mask"] for x in items]),
            "label": np.array([x["label"] for x in items], np.int32),
            "name": np.array([x["name"] for x in items], dtype=str),
            "defect": np.array([x["defect"] for x in items], dtype=str)}


def make_batches(source, *, image_size: int, mean, std, batch_size: int,
                 resize_mode: str = "resize", crop_size: int = 224, shuffle: bool = False,
                 seed: int = 0, num_workers: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Numpy batches over any random-access source (list of records, Source, tfds source).

    num_workers > 0 reads with that many threads (PIL decoding releases the GIL); threads,
    not processes, so every read still reaches the parent's ReadLog.
    """
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    fn = functools.partial(preprocess_record, image_size=image_size, mean=mean, std=std,
                           resize_mode=resize_mode, crop_size=crop_size)
    ds = ds.map(fn).batch(batch_size, drop_remainder=False, batch_fn=_collate)
    if num_workers > 0:
        options = grain.ReadOptions(num_threads=num_workers, prefetch_buffer_size=2 * num_workers)
        return _plain_errors(iter(ds.to_iter_dataset(options)))
    return _plain_errors(iter(ds))


def _plain_errors(batches: Iterator) -> Iterator:
    """Our DataError as raised by the reader: grain (main thread or workers) appends a note
    about its filtered frames to the exception, which is noise next to a file name."""
    try:
        yield from batches
    except preprocess.DataError as e:
        notes = [n for n in getattr(e, "__notes__", []) if "Grain" not in n]
        if hasattr(e, "__notes__"):
            e.__notes__ = notes
        raise e.with_traceback(None) from None


def default_root(dataset: str) -> str:
    return {"mvtec_ad": "data/mvtec_ad", "synthetic": "data/synthetic", "visa": "data/visa",
            "elpv": os.path.expanduser("~/.cache/pn_jax")}[dataset]


def available_categories(dataset: str, root: str | None = None) -> list[str]:
    if dataset == "elpv":
        return list(elpv.ELPV_CATEGORIES)
    if dataset == "visa":
        return visa.list_categories(root or default_root(dataset))
    found = mvtec.list_categories(root or default_root(dataset))
    return found or (["synthetic"] if dataset == "synthetic" else [])


def ensure_synthetic(root: str, category: str = "synthetic", **kwargs) -> str:
    """Generate <root>/<category> once; written to a temporary folder and renamed, so an
    interrupted generation never leaves a half-written category behind."""
    target = os.path.join(root, category)
    params = synthetic.full_params(**kwargs)
    if os.path.isdir(target):
        try:
            with open(os.path.join(target, synthetic.PARAMS_FILE)) as f:
                found = json.load(f)
        except (OSError, ValueError):
            found = None
        if found != params:
            raise preprocess.DataError(
                f"{target} exists but was not generated with {params} (found {found}); "
                f"delete it to regenerate, or use another root or category name.")
    else:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{category}-", dir=root)
        try:
            synthetic.generate_category(tmp, category, **kwargs)
            os.rename(os.path.join(tmp, category), target)
        except OSError:
            if not os.path.isdir(target):  # lost a race with another process: fine
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def index_dataset(dataset: str, root: str | None, category: str, *,
                  require_masks: bool = True,
                  synthetic_kwargs: dict | None = None) -> dict[str, list[Sample]]:
    """{"train": [...], "test": [...]} Samples (no pixels read); synthetic: generated once."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if dataset == "elpv":
        return elpv.index_elpv(category)
    root = root or default_root(dataset)
    if dataset == "visa":
        return visa.index_visa(root, category, require_masks=require_masks)
    if dataset == "synthetic":
        ensure_synthetic(root, category, **(synthetic_kwargs or {}))
    return mvtec.index_category(root, category, require_masks=require_masks)


def _tfds_sources(dataset, root, category, full, chosen, tfds_dir, log):
    from pn_jax.data import tfds_builders  # tfds is imported only on this path

    builder = tfds_builders.prepare(dataset, category, tfds_dir, root)
    data = builder.as_data_source()
    for split in ("train", "test"):
        if len(data[split]) != len(full[split]):
            raise preprocess.DataError(
                f"the tfds build in {builder.data_dir} has {len(data[split])} {split} "
                f"examples but the dataset now has {len(full[split])}: it is stale; delete "
                f"{builder.data_dir} to rebuild it.")
    out = {}
    for split, samples in chosen.items():
        disk_split = "test" if split == "test" else "train"
        pos = {s.name: i for i, s in enumerate(full[disk_split])}
        idx = [pos[s.name] for s in samples]
        names = [s.name for s in samples]

        def read(i, _ds=data[disk_split], _idx=idx, _names=names, _split=split):
            rec = tfds_builders.tfds_to_record(_ds[_idx[i]], _split)
            if rec["name"] != _names[i]:
                raise preprocess.DataError(
                    f"tfds build in {builder.data_dir} is stale (example {_idx[i]} is "
                    f"{rec['name']}, expected {_names[i]}); delete it to rebuild.")
            check_mask_size(rec["image"], rec["mask"], rec["name"], rec["name"] + " (mask)")
            if rec["mask"] is not None:  # stored as on disk: 0/1 masks stay 0/1 there
                rec["mask"] = (np.asarray(rec["mask"]) != 0).astype(np.uint8) * np.uint8(255)
                preprocess.warn_if_empty_mask(rec["mask"], rec["label"],
                                              f"{rec['name']} (mask, tfds build)", rec["name"])
            return rec

        out[split] = Source(len(samples), read, names, dataset=dataset, category=category,
                            split=split, log=log, has_masks=mask_coverage(samples)[0])
    return out


def load_category(dataset: str, root: str | None = None, category: str | None = None, *,
                  holdout_fraction: float = 0.1, holdout_min: int = 2, seed: int = 0,
                  backend: str = "direct", tfds_dir: str | None = None,
                  max_train: int | None = None, max_test: int | None = None,
                  require_masks: bool = True, synthetic_kwargs: dict | None = None,
                  log: ReadLog | None = None) -> dict[str, Source]:
    """-> {"train": Source, "holdout": Source, "test": Source} of uniform records.

    train/holdout: a seeded split of the (optionally capped) training images; test: the
    (optionally capped, label-stratified) test images. backend "direct" reads files;
    "tfds" builds the tfds dataset once into tfds_dir (default <root>/_tfds) and reads it
    through array_record; both give identical records in identical order.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "tfds" and dataset not in TFDS_DATASETS:
        raise ValueError(f"backend 'tfds' reads {', '.join(TFDS_DATASETS)}; use backend "
                         f"'direct' for {dataset}")
    category = category or {"elpv": "all", "synthetic": "synthetic"}.get(dataset)
    if category is None:
        raise ValueError(f"category is required for {dataset}")
    root = root or default_root(dataset)
    full = index_dataset(dataset, root, category, require_masks=require_masks,
                 synthetic_kwargs=synthetic_kwargs)
    chosen = choose_samples(full, holdout_fraction=holdout_fraction, holdout_min=holdout_min,
                            seed=seed, max_train=max_train, max_test=max_test)
    has_masks, missing = mask_coverage(chosen["test"])
    if missing and len(missing) < sum(s.label for s in chosen["test"]):
        # Only with require_masks=False: pixel metrics over the defect images that happen to
        # have a mask would measure another test set, so the split reports no masks at all.
        preprocess.warn_data(
            f"{len(missing)} anomalous test images of {dataset}/{category} have no mask (e.g. "
            f"{', '.join(s.path for s in missing[:3])}): the test split is treated as having "
            f"no masks (image metrics only).")
    if backend == "tfds":
        return _tfds_sources(dataset, None if dataset == "elpv" else root, category, full,
                             chosen, tfds_dir or os.path.join(root, "_tfds"), log)
    return {split: samples_source(s, dataset=dataset, category=category, split=split, log=log)
            for split, s in chosen.items()}
