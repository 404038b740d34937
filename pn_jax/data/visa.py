"""VisA (Zou et al. 2022, amazon-science/spot-diff) read in its own layout.

    <root>/split_csv/1cls.csv             object,split,label,image,mask
    <root>/<object>/Data/Images/Normal/*.JPG
    <root>/<object>/Data/Images/Anomaly/*.JPG
    <root>/<object>/Data/Masks/Anomaly/*.png

The CSV is the one-class protocol: `split` is train or test, `label` is normal or anomaly,
`image` and `mask` are paths relative to the root (mask empty for normal images). Train rows
must be normal. VisA's masks store small non-zero values (not 255) on 0: `load_mask` reads
any non-zero pixel as defect. Sample names are the image paths relative to <root>/<object>
(e.g. "Data/Images/Anomaly/000.JPG"); the defect type is "anomaly" (the 1cls split has none
finer).
"""
from __future__ import annotations

import collections
import csv
import os

from pn_jax.data.preprocess import DataError, MissingDataError
from pn_jax.data.records import Sample, check_headers

VISA_CATEGORIES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1",
                   "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum")
VISA_URL = "https://github.com/amazon-science/spot-diff"
SPLIT_CSV = os.path.join("split_csv", "1cls.csv")
COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": 0, "anomaly": 1}
SPLITS = ("train", "test")


def csv_path(root: str) -> str:
    return os.path.join(root, SPLIT_CSV)


def check_root(root: str) -> str:
    path = csv_path(root)
    if not os.path.isdir(root):
        raise MissingDataError(
            f"VisA root {os.path.abspath(root)} does not exist. VisA is obtained from "
            f"{VISA_URL} (extract VisA_20220922.tar so that {path} exists, or pass --root).")
    if not os.path.isfile(path):
        raise MissingDataError(
            f"{path} not found: --dataset visa reads VisA in its own layout through its "
            f"one-class split file (extract VisA_20220922.tar from {VISA_URL} as is). A "
            f"VisA converted to the MVTec layout is read with --dataset mvtec_ad.")
    return path


def _resolve(root: str, rel: str, where: str) -> str:
    """A CSV path -> a file under root; a path that leaves the root is refused."""
    if os.path.isabs(rel):
        raise DataError(f"{where}: path {rel!r} is absolute; VisA paths are relative to the root.")
    full = os.path.normpath(os.path.join(root, *rel.replace("\\", "/").split("/")))
    real_root = os.path.realpath(root)
    if os.path.commonpath([os.path.realpath(full), real_root]) != real_root:
        raise DataError(f"{where}: path {rel!r} points outside the dataset root {root}.")
    return full


def read_split_csv(root: str) -> list[dict]:
    """Rows of split_csv/1cls.csv as dicts (with "line", the CSV line number), validated."""
    path = check_root(root)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: tolerate a BOM
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in COLUMNS if c not in header]
            if missing:
                raise DataError(
                    f"{path} lacks the column(s) {', '.join(missing)}: a VisA split file has "
                    f"the header {','.join(COLUMNS)} (found {','.join(header) or 'no header'}).")
            rows = []
            for row in reader:
                row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
                if not any(row.get(c) for c in COLUMNS):
                    continue  # blank line
                where = f"{path} line {reader.line_num}"
                if row["split"] not in SPLITS:
                    raise DataError(f"{where}: split {row['split']!r} is not one of "
                                    f"{', '.join(SPLITS)}.")
                if row["label"] not in LABELS:
                    raise DataError(f"{where}: label {row['label']!r} is not one of "
                                    f"{', '.join(LABELS)}.")
                if not row["object"] or not row["image"]:
                    raise DataError(f"{where}: the object or image column is empty.")
                rows.append({**row, "line": reader.line_num})
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read {path}: {e}.") from None
    return rows


def list_categories(root: str) -> list[str]:
    """The objects named in the split file ([] when there is none)."""
    try:
        return sorted({r["object"] for r in read_split_csv(root)})
    except MissingDataError:
        return []


def index_visa(root: str, category: str, *, require_masks: bool = True,
               check_files: bool = True) -> dict[str, list[Sample]]:
    """-> {"train": [...], "test": [...]} of Samples sorted by name."""
    rows = read_split_csv(root)
    path = csv_path(root)
    mine = [r for r in rows if r["object"] == category]
    if not mine:
        found = sorted({r["object"] for r in rows})
        raise MissingDataError(f"VisA category {category!r} is not in {path}; it lists "
                               f"{', '.join(found) if found else 'no objects'}.")
    out = {"train": [], "test": []}
    prefix = category + "/"
    for r in mine:
        where = f"{path} line {r['line']}"
        label = LABELS[r["label"]]
        if r["split"] == "train" and label:
            raise DataError(f"{where}: an anomaly in the train split; the memory bank must "
                            f"hold normal images only. Use the one-class split file as shipped.")
        image = _resolve(root, r["image"], where)
        if not os.path.isfile(image):
            raise MissingDataError(f"image {image} (listed in {where}) not found.")
        mask = _resolve(root, r["mask"], where) if r["mask"] and label else None
        if mask is not None and not os.path.isfile(mask):
            if require_masks:
                raise MissingDataError(f"mask {mask} (listed in {where}) not found; restore "
                                       f"it, or index with require_masks=False.")
            mask = None
        if label and mask is None and require_masks:
            raise MissingDataError(f"{where}: anomalous image {image} has no mask; add it, "
                                   f"or index with require_masks=False.")
        rel = r["image"].replace("\\", "/")
        name = rel[len(prefix):] if rel.startswith(prefix) else rel
        out[r["split"]].append(Sample(name=name, path=image, split=r["split"], label=label,
                                      defect="anomaly" if label else "good", mask_path=mask))
    for split in out:
        out[split].sort(key=lambda s: s.name)
        counts = collections.Counter(s.name for s in out[split])
        dup = sorted(n for n, c in counts.items() if c > 1)
        if dup:
            raise DataError(f"{path} lists {category} {split} image(s) twice: "
                            f"{', '.join(dup[:5])}.")
    if not out["train"]:
        raise DataError(f"{path} lists no train images for {category}.")
    if not out["test"]:
        raise DataError(f"{path} lists no test images for {category}.")
    if check_files:
        check_headers(out["train"] + out["test"])
    return out
