"""The uniform record format, random-access sources, splits and read provenance.

Every dataset (MVTec layout, ELPV, synthetic, read directly or through tfds) yields records

    {"image": uint8 HxWx3, "mask": uint8 HxW (non-zero = defect) or None, "label": int (0 normal,
     1 anomalous), "defect": str ("good" for normal), "name": str (path relative to the
     category, the sample's identity), "split": "train" | "holdout" | "test" | ...}

Splits: `train` builds the memory bank; `holdout` is normal images held out of train/good
(seeded) for fit-time statistics and tuning, never in the bank; `test` is only scored.

`Source.has_masks` says whether pixel metrics are defined for a split. It is decided by the
files on disk (every anomalous sample has a mask file), not by the dataset's name.

Provenance: a source logs (dataset, category, split) to a `ReadLog` each time it actually
reads an image, so tests can prove that tuning never read `test` and that scoring a saved
checkpoint never read `train`. Indexing (listing files, sizes from headers) is not a read.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Sequence

import numpy as np

from pn_jax.data import preprocess

SPLITS = ("train", "holdout", "test")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One indexed image, nothing read yet."""
    name: str  # relative to the category folder, e.g. "test/crack/000.png"
    path: str
    split: str  # "train" or "test" as on disk; "holdout" once split off
    label: int
    defect: str
    mask_path: str | None = None


class ReadLog:
    """Thread-safe set of (dataset, category, split) whose images were read."""

    def __init__(self):
        self._lock = threading.Lock()
        self.splits_read: set[tuple[str, str, str]] = set()
        self.counts: dict[tuple[str, str, str], int] = {}

    def record(self, dataset: str, category: str, split: str) -> None:
        key = (dataset, category, split)
        with self._lock:
            self.splits_read.add(key)
            self.counts[key] = self.counts.get(key, 0) + 1

    def clear(self) -> None:
        with self._lock:
            self.splits_read.clear()
            self.counts.clear()

    def splits(self) -> set[str]:
        return {s for _, _, s in self.splits_read}


READ_LOG = ReadLog()  # the default log every source writes to


def make_record(image, mask, label: int, defect: str, name: str, split: str) -> dict[str, Any]:
    return {"image": image, "mask": mask, "label": int(label), "defect": str(defect),
            "name": str(name), "split": str(split)}


def check_mask_size(image: np.ndarray, mask: np.ndarray | None, image_file: str,
                    mask_file: str | None) -> None:
    if mask is not None and mask.shape[:2] != image.shape[:2]:
        raise preprocess.DataError(
            f"mask {mask_file} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
            f"{image_file} is {image.shape[1]}x{image.shape[0]}; fix or regenerate the mask.")


class Source:
    """Random-access records of one split; reading an item is logged.

    has_masks: every anomalous record of the split has a mask (and there is at least one),
    so pixel metrics are defined.
    """

    def __init__(self, n: int, read: Callable[[int], dict], names: Sequence[str], *,
                 dataset: str, category: str, split: str, log: ReadLog | None = None,
                 has_masks: bool = False):
        self._n, self._read, self.names = n, read, list(names)
        self.dataset, self.category, self.split = dataset, category, split
        self.log = READ_LOG if log is None else log
        self.has_masks = bool(has_masks)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if not -self._n <= i < self._n:
            raise IndexError(f"index {i} out of range for {self!r}")
        self.log.record(self.dataset, self.category, self.split)
        return self._read(i % self._n)

    def __iter__(self):
        return (self[i] for i in range(self._n))

    def __repr__(self) -> str:
        return f"Source({self.dataset}/{self.category}/{self.split}, n={self._n})"


def mask_coverage(samples: Sequence[Sample]) -> tuple[bool, list[Sample]]:
    """-> (has_masks, anomalous samples without a mask file)."""
    anomalous = [s for s in samples if s.label == 1]
    missing = [s for s in anomalous if not s.mask_path]
    return bool(anomalous) and not missing, missing


def check_headers(samples: Sequence[Sample]) -> None:
    """Read every image's (and mask's) header, not its pixels: unreadable files and masks
    whose size differs from their image are reported before any work starts."""
    for s in samples:
        size = preprocess.image_size_of(s.path)
        if s.mask_path is not None:
            msize = preprocess.image_size_of(s.mask_path, "mask")
            if msize != size:
                raise preprocess.DataError(
                    f"mask {s.mask_path} is {msize[0]}x{msize[1]} (WxH) but its image "
                    f"{s.path} is {size[0]}x{size[1]}; fix or regenerate the mask.")


def samples_source(samples: Sequence[Sample], *, dataset: str, category: str,
                   split: str, log: ReadLog | None = None) -> Source:
    """A source that reads image (and mask) files from disk on access."""
    samples = list(samples)

    def read(i):
        s = samples[i]
        image = preprocess.load_rgb(s.path)
        mask = preprocess.load_mask(s.mask_path) if s.mask_path else None
        check_mask_size(image, mask, s.path, s.mask_path)
        preprocess.warn_if_empty_mask(mask, s.label, s.mask_path, s.path)
        return make_record(image, mask, s.label, s.defect, s.name, split)

    src = Source(len(samples), read, [s.name for s in samples], dataset=dataset,
                 category=category, split=split, log=log,
                 has_masks=mask_coverage(samples)[0])
    src.paths = [s.path for s in samples]  # the files, for content checks (labelled.check_disjoint)
    return src


def records_source(records: Sequence[dict], *, dataset: str, category: str, split: str,
                   log: ReadLog | None = None) -> Source:
    """A source over in-memory records (e.g. synthetic anomalies for tuning)."""
    records = list(records)
    anomalous = [r for r in records if int(r["label"]) == 1]
    has_masks = bool(anomalous) and all(r.get("mask") is not None for r in anomalous)
    return Source(len(records), lambda i: dict(records[i]), [r["name"] for r in records],
                  dataset=dataset, category=category, split=split, log=log,
                  has_masks=has_masks)


def split_train_holdout(samples: Sequence, fraction: float, min_count: int,
                        seed: int) -> tuple[list, list]:
    """Seeded split of train/good into (train, holdout), both in the input order.

    The holdout has max(min_count, round(fraction * n)) items, but never all of them: at
    least one image stays in the bank. fraction=0 and min_count=0 hold out nothing.
    """
    n = len(samples)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    k = min(max(int(min_count), int(round(fraction * n))), max(n - 1, 0))
    held = set(np.random.default_rng(seed).permutation(n)[:k].tolist())
    train = [s for i, s in enumerate(samples) if i not in held]
    holdout = [s for i, s in enumerate(samples) if i in held]
    return train, holdout


def cap_samples(samples: Sequence[Sample], max_count: int | None, seed: int) -> list[Sample]:
    """A seeded subset of at most max_count, stratified by label, in the input order."""
    samples = list(samples)
    if max_count is None or len(samples) <= max_count:
        return samples
    rng = np.random.default_rng(seed)
    labels = np.array([s.label for s in samples])
    groups = [np.flatnonzero(labels == lab) for lab in np.unique(labels)]
    # Largest-remainder shares summing to max_count, at least one per label when possible.
    exact = np.array([max_count * len(g) / len(samples) for g in groups])
    shares = np.floor(exact).astype(int)
    for j in np.argsort(shares - exact)[: max_count - shares.sum()]:
        shares[j] += 1
    for j in np.flatnonzero(shares == 0):
        if shares.max() > 1:
            shares[np.argmax(shares)] -= 1
            shares[j] = 1
    keep = sorted(i for g, k in zip(groups, shares) for i in rng.permutation(g)[:k].tolist())
    return [samples[i] for i in keep]


def _check_cap(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                              or value < 1):
        raise ValueError(f"{name} must be a positive number of images or None (no cap), "
                         f"got {value!r}")


def choose_samples(full: dict[str, list[Sample]], *, holdout_fraction: float,
                   holdout_min: int, seed: int, max_train: int | None = None,
                   max_test: int | None = None) -> dict[str, list[Sample]]:
    """{"train", "test"?} indexed samples -> {"train", "holdout", "test"?}: seeded caps, then
    the seeded holdout split of train (the same rule for every dataset)."""
    _check_cap("max_train", max_train)
    _check_cap("max_test", max_test)
    train = cap_samples(full["train"], max_train, seed)
    train, holdout = split_train_holdout(train, holdout_fraction, holdout_min, seed)
    chosen = {"train": train, "holdout": holdout}
    if full.get("test") is not None:
        chosen["test"] = cap_samples(full["test"], max_test, seed + 1)
    return chosen
