"""Data as users have it: a folder of good images and an optional labelled test folder (the
inputs of `predict`, a path, a list of paths or a folder, are `pn_jax.imageread`'s).

Train folder (`folder_source`, `--train-dir`): every image file under it, recursively
(png/jpg/jpeg/bmp/tif/tiff in any case), sorted by its path relative to the folder, which
is also its name. Hidden files and folders are ignored; other files are skipped with one
note that counts them by extension.

Test folder (`--test-dir DIR`):
    DIR/good/**          normal images (label 0)
    DIR/<defect>/**      anomalous images (label 1), one sub-folder per defect type
    DIR/ground_truth/<defect>/<stem>_mask.*  or  DIR/../ground_truth/<defect>/...  (optional)
Masks are optional, but all or nothing: once a ground_truth folder is there, a defect image
without a mask is an error that names it. Pixel metrics over the images that happen to have
a mask would silently measure a different test set; `masks=False` (--no-masks) ignores the
masks and gives image metrics only. `Source.has_masks` tells the caller which it got.
"""
from __future__ import annotations

import collections
import os
from typing import Callable, Sequence

from pn_jax.data import mvtec
from pn_jax.data.preprocess import (IMAGE_EXTENSIONS, DataError, MissingDataError,
                                    is_image_file, warn_data)
# predict's inputs live in imageread, shared with the exported model's loader
from pn_jax.imageread import is_hidden, resolve_inputs, walk_files  # noqa: F401
from pn_jax.data.records import (ReadLog, Sample, Source, check_headers, choose_samples,
                                 samples_source)

GROUND_TRUTH = "ground_truth"
NORMAL = "good"
_EXTS = ", ".join(e[1:] for e in IMAGE_EXTENSIONS)
_SHOW = 5  # file names listed in one message


def describe_files(names: Sequence[str]) -> str:
    """"12 .txt files, 1 file without extension" (most common first)."""
    counts = collections.Counter(os.path.splitext(n)[1].lower() or "" for n in names)
    parts = []
    for ext, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        kind = f"{ext} file" if ext else "file without extension"
        parts.append(f"{n} {kind}{'s' if n != 1 else ''}")
    return ", ".join(parts)


def _check_folder(folder: str, what: str) -> None:
    if not os.path.exists(folder):
        raise MissingDataError(f"{what} {folder} does not exist.")
    if not os.path.isdir(folder):
        raise DataError(f"{what} {folder} is a file, not a folder; pass the folder that holds "
                        f"the images.")


def _split_images(folder: str, files: Sequence[str]) -> tuple[list[str], list[str]]:
    images = [f for f in files if is_image_file(f)]
    return images, [f for f in files if not is_image_file(f)]


def _note_skipped(folder: str, skipped: Sequence[str], notify) -> None:
    if skipped:
        notify(f"skipped {len(skipped)} non-image file{'s' if len(skipped) != 1 else ''} in "
               f"{folder} ({describe_files(skipped)}); images are {_EXTS}.")


def _check_readable(samples: Sequence[Sample]) -> None:
    """Headers of every file: all unreadable ones named in one error, before any work."""
    bad = []
    for s in samples:
        try:
            check_headers([s])
        except DataError as e:
            bad.append(str(e))
    if len(bad) == 1:
        raise DataError(bad[0])
    if bad:
        more = f"\n  ... and {len(bad) - _SHOW} more" if len(bad) > _SHOW else ""
        raise DataError(f"{len(bad)} files cannot be used:\n  " + "\n  ".join(bad[:_SHOW])
                        + more)


def index_folder(train_dir: str, *, notify: Callable[[str], None] | None = None,
                 check_files: bool = True) -> list[Sample]:
    """Every image under train_dir as a normal training Sample, sorted by name."""
    notify = notify or warn_data
    _check_folder(train_dir, "training folder")
    images, skipped = _split_images(train_dir, walk_files(train_dir))
    if not images:
        held = describe_files(skipped) if skipped else "nothing (or only hidden files)"
        raise DataError(
            f"training folder {train_dir} holds no images (looked recursively for {_EXTS}, "
            f"any case); it holds {held}. Point it at the folder of good images.")
    _note_skipped(train_dir, skipped, notify)
    suspicious = sorted({n.split("/", 1)[0] for n in images if "/" in n} & {GROUND_TRUTH, "test"})
    if suspicious:
        notify(f"training folder {train_dir} has a {' and a '.join(suspicious)} sub-folder: "
               f"every image under it is used as a normal training image. Pass the folder of "
               f"good images only (e.g. train/good) if that is not what you meant.")
    samples = [Sample(name=n, path=os.path.join(train_dir, *n.split("/")), split="train",
                      label=0, defect=NORMAL) for n in images]
    if check_files:
        _check_readable(samples)
    return samples


def _ground_truth_dir(test_dir: str) -> str | None:
    for gt in (os.path.join(test_dir, GROUND_TRUTH),
               os.path.join(os.path.dirname(os.path.abspath(test_dir)), GROUND_TRUTH)):
        if os.path.isdir(gt):
            return gt
    return None


def index_test_dir(test_dir: str, *, masks: bool = True,
                   notify: Callable[[str], None] | None = None,
                   check_files: bool = True) -> list[Sample]:
    """DIR/good and DIR/<defect> images as test Samples sorted by name ("<defect>/<file>")."""
    notify = notify or warn_data
    _check_folder(test_dir, "test folder")
    entries = sorted(e for e in os.listdir(test_dir) if not is_hidden(e))
    classes = [e for e in entries if os.path.isdir(os.path.join(test_dir, e)) and e != GROUND_TRUTH]
    loose = [e for e in entries if is_image_file(e) and os.path.isfile(os.path.join(test_dir, e))]
    if loose:
        raise DataError(
            f"test folder {test_dir} has {len(loose)} image(s) directly inside it "
            f"({', '.join(loose[:_SHOW])}{', ...' if len(loose) > _SHOW else ''}), which have no "
            f"label: put normal images in {os.path.join(test_dir, NORMAL)}/ and defective ones in "
            f"{os.path.join(test_dir, '<defect type>')}/. To score unlabelled images, use predict.")
    if NORMAL not in classes:
        # Without good/ every image would be labelled anomalous: refuse rather than guess that
        # "ok" or "normal" means normal.
        raise DataError(
            f"test folder {test_dir} has no {NORMAL}/ sub-folder for its normal images (found "
            f"{', '.join(classes) if classes else 'no sub-folders'}); every sub-folder other "
            f"than {NORMAL}/ is a defect type. Rename the normal images' folder to {NORMAL}.")
    gt = _ground_truth_dir(test_dir) if masks else None
    samples, skipped, missing = [], [], []
    for defect in classes:
        folder = os.path.join(test_dir, defect)
        images, other = _split_images(folder, walk_files(folder))
        skipped += [f"{defect}/{f}" for f in other]
        for rel in images:
            path = os.path.join(folder, *rel.split("/"))
            mask = None
            if defect != NORMAL and gt is not None:
                reldir, fname = os.path.split(os.path.join(*rel.split("/")))
                mask = mvtec.find_mask(os.path.join(gt, defect, reldir), os.path.splitext(fname)[0])
                if mask is None:
                    missing.append(path)
            samples.append(Sample(name=f"{defect}/{rel}", path=path, split="test",
                                  label=int(defect != NORMAL), defect=defect, mask_path=mask))
    if not samples:
        raise DataError(f"test folder {test_dir} holds no images in its sub-folders (looked "
                        f"for {_EXTS}).")
    _note_skipped(test_dir, skipped, notify)
    if missing:
        n_defect = sum(s.label for s in samples)
        raise MissingDataError(
            f"{len(missing)} of {n_defect} defect images in {test_dir} have no mask in {gt} "
            f"(looked for <defect>/<stem>_mask.<ext> or <defect>/<stem>.<ext>): "
            f"{', '.join(missing[:_SHOW])}{', ...' if len(missing) > _SHOW else ''}. Pixel "
            f"metrics need a mask for every defect image: add them (all black if a defect has "
            f"no region), or pass masks=False (--no-masks) for image metrics only.")
    samples.sort(key=lambda s: s.name)
    if check_files:
        _check_readable(samples)
    return samples


def _category_name(train_dir: str) -> str:
    return os.path.basename(os.path.normpath(os.path.abspath(train_dir))) or "folder"


def folder_source(train_dir: str, *, category: str | None = None, split: str = "train",
                  notify: Callable[[str], None] | None = None, log: ReadLog | None = None,
                  check_files: bool = True) -> Source:
    """All images under train_dir as one Source of normal records (dataset "folder")."""
    samples = index_folder(train_dir, notify=notify, check_files=check_files)
    return samples_source(samples, dataset="folder", category=category or _category_name(train_dir),
                          split=split, log=log)


def load_folders(train_dir: str, test_dir: str | None = None, *, holdout_fraction: float = 0.1,
                 holdout_min: int = 2, seed: int = 0, max_train: int | None = None,
                 max_test: int | None = None, masks: bool = True, category: str | None = None,
                 check_files: bool = True, notify: Callable[[str], None] | None = None,
                 log: ReadLog | None = None) -> dict[str, Source]:
    """-> {"train", "holdout", "test" (when test_dir is given)} Sources, as load_category.

    The holdout is a seeded split of the training folder, as for every dataset.
    """
    full = {"train": index_folder(train_dir, notify=notify, check_files=check_files)}
    if test_dir is not None:
        full["test"] = index_test_dir(test_dir, masks=masks, notify=notify,
                                      check_files=check_files)
        train_real = {os.path.realpath(s.path): s.path for s in full["train"]}
        both = [train_real[r] for r in (os.path.realpath(s.path) for s in full["test"])
                if r in train_real]
        if both:
            raise DataError(
                f"{len(both)} images are both in the training folder {train_dir} and the test "
                f"folder {test_dir} (e.g. {', '.join(both[:3])}): a test image in the memory "
                f"bank scores as perfectly normal. Keep the two folders apart.")
    chosen = choose_samples(full, holdout_fraction=holdout_fraction, holdout_min=holdout_min,
                            seed=seed, max_train=max_train, max_test=max_test)
    category = category or _category_name(train_dir)
    return {split: samples_source(s, dataset="folder", category=category, split=split, log=log)
            for split, s in chosen.items()}
