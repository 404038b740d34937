"""Reader for the MVTec AD folder layout (SPEC 2.11).

    <root>/<category>/train/good/*.<ext>
    <root>/<category>/test/<good | defect type>/*.<ext>
    <root>/<category>/ground_truth/<defect type>/<stem>_mask.png

Works for any dataset in this layout (MPDD, converted VisA or BTAD, ...): any category names,
extensions png/jpg/jpeg/bmp/tif/tiff in any case, grayscale or colour, sizes varying within
a category. The label comes from the folder: everything under test/ except `good` is
anomalous, even if its mask is empty (a warning names it when read). Non-image files
(Thumbs.db, .DS_Store) are ignored.
"""
from __future__ import annotations

import os

from pn_jax.data.preprocess import DataError, MissingDataError, is_image_file
from pn_jax.data.records import Sample, check_headers

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
MVTEC_URL = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
OFFLINE_DEMO = "python -m experiments.run --dataset elpv"


def image_files(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder)
                  if is_image_file(f) and not f.startswith(".")
                  and os.path.isfile(os.path.join(folder, f)))


def list_categories(root: str) -> list[str]:
    """Sub-folders of root that look like categories (have train/ or test/)."""
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root)
                  if not d.startswith((".", "_"))
                  and (os.path.isdir(os.path.join(root, d, "train"))
                       or os.path.isdir(os.path.join(root, d, "test"))))


def check_root(root: str) -> None:
    if not os.path.isdir(root):
        raise MissingDataError(
            f"dataset root {os.path.abspath(root)} does not exist. MVTec AD is obtained from "
            f"{MVTEC_URL} (extract it so that {os.path.join(root, 'bottle', 'train', 'good')} "
            f"exists, or pass --data-root). Any dataset in the MVTec layout works. Without a "
            f"dataset on disk, the offline demo is: {OFFLINE_DEMO}")


def find_mask(gt_dir: str, stem: str) -> str | None:
    """<stem>_mask.png first; also tolerate another image extension or no _mask suffix."""
    exact = os.path.join(gt_dir, stem + "_mask.png")
    if os.path.isfile(exact):
        return exact
    if os.path.isdir(gt_dir):
        for f in image_files(gt_dir):
            if os.path.splitext(f)[0] in (stem + "_mask", stem):
                return os.path.join(gt_dir, f)
    return None


def index_category(root: str, category: str, *, require_masks: bool = True,
                   check_files: bool = True) -> dict[str, list[Sample]]:
    """-> {"train": [...], "test": [...]} of Samples sorted by name.

    check_files reads every image's header (not its pixels): unreadable files and masks
    whose size differs from their image are reported before any work starts.
    """
    check_root(root)
    cat_dir = os.path.join(root, category)
    if not os.path.isdir(cat_dir):
        found = list_categories(root)
        raise MissingDataError(
            f"category {category!r} not found: {cat_dir} does not exist. Categories found "
            f"under {root}: {', '.join(found) if found else 'none'}.")
    train_dir = os.path.join(cat_dir, "train", "good")
    if not os.path.isdir(train_dir):
        raise MissingDataError(
            f"{train_dir} does not exist: a category needs its normal training images in "
            f"train/good/ (MVTec AD layout).")
    train_files = image_files(train_dir)
    if not train_files:
        raise DataError(
            f"{train_dir} holds no images (looked for extensions png, jpg, jpeg, bmp, tif, "
            f"tiff); put the normal training images there.")
    test_dir = os.path.join(cat_dir, "test")
    if not os.path.isdir(test_dir):
        raise MissingDataError(
            f"{test_dir} does not exist: a category needs test/good/ and test/<defect>/ "
            f"folders (MVTec AD layout).")

    train = [Sample(name=f"train/good/{f}", path=os.path.join(train_dir, f), split="train",
                    label=0, defect="good") for f in train_files]
    test = []
    for defect in sorted(d for d in os.listdir(test_dir)
                         if os.path.isdir(os.path.join(test_dir, d)) and not d.startswith(".")):
        gt_dir = os.path.join(cat_dir, "ground_truth", defect)
        for f in image_files(os.path.join(test_dir, defect)):
            mask = None
            if defect != "good":
                mask = find_mask(gt_dir, os.path.splitext(f)[0])
                if mask is None and require_masks:
                    expected = os.path.join(gt_dir, os.path.splitext(f)[0] + "_mask.png")
                    raise MissingDataError(
                        f"anomalous test image {os.path.join(test_dir, defect, f)} has no mask: "
                        f"expected {expected}. Add the mask (an all-black one if the defect "
                        f"has no region), or pass --no-masks (image metrics only).")
            test.append(Sample(name=f"test/{defect}/{f}", path=os.path.join(test_dir, defect, f),
                               split="test", label=int(defect != "good"), defect=defect,
                               mask_path=mask))
    test.sort(key=lambda s: s.name)
    if not test:
        raise DataError(f"{test_dir} holds no images in any test/<defect or good>/ folder.")
    if check_files:
        check_headers(train + test)
    return {"train": train, "test": test}
