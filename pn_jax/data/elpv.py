"""ELPV solar-cell electroluminescence images (Deitsch et al. 2019), PyPI `elpv-dataset`.

Real images that install with pip: 2624 cells, 300x300 8-bit grayscale PNG, each with a
defect probability in {0, 1/3, 2/3, 1} (graded by an expert) and a cell type (mono, poly).

Protocol used by pn_jax (image-level labels only; masks are None):
  * categories: `mono` and `poly` (cell type), and `all` (both types together);
  * cells with defect probability 0 are normal. Within each cell type they are sorted by
    file name and split by a seeded permutation (`np.random.default_rng([split_seed,
    type index])`, type index 0 mono, 1 poly; split_seed 0 by default): the first
    round(0.2 * n) go to test (label 0, defect "good"), the other 80% to train. `all` is
    the union of the mono and poly splits, so the three categories agree;
  * cells with probability 1.0 are the test anomalies (label 1, defect "defective");
  * cells with probability 1/3 or 2/3 are EXCLUDED from both train and test: their labels
    are uncertain (the expert was unsure), so they would be neither clean normals for the
    memory bank nor reliable anomalies for the metrics;
  * counts with split_seed 0: mono 470 train, 118 + 313 test; poly 736 train,
    184 + 402 test; all 1206 train, 302 + 715 test;
  * the holdout split (fit-time statistics, tuning) is then taken from train like any other
    dataset (`records.split_train_holdout`), and `load_category(max_train=, max_test=)`
    can cap train/test with a seeded, label-stratified subset for quick runs.
Sample names are the package's relative paths, e.g. "images/cell0001.png".
"""
from __future__ import annotations

import os

import numpy as np

from pn_jax.data.preprocess import MissingDataError
from pn_jax.data.records import Sample

ELPV_CATEGORIES = ("mono", "poly", "all")
CELL_TYPES = ("mono", "poly")
TEST_FRACTION = 0.2


def elpv_dir() -> str:
    """The package's data folder (holds labels.csv and images/)."""
    try:
        import elpv_dataset
    except ImportError:
        raise MissingDataError(
            "ELPV needs the PyPI package elpv-dataset: pip install elpv-dataset") from None
    d = os.path.join(os.path.dirname(elpv_dataset.__file__), "data")
    if not os.path.isfile(os.path.join(d, "labels.csv")):
        raise MissingDataError(f"{os.path.join(d, 'labels.csv')} not found: reinstall "
                               f"elpv-dataset (pip install --force-reinstall elpv-dataset).")
    return d


def read_labels(data_dir: str | None = None) -> list[tuple[str, float, str]]:
    """[(relative path, defect probability, cell type)] from labels.csv."""
    data_dir = data_dir or elpv_dir()
    rows = []
    with open(os.path.join(data_dir, "labels.csv")) as f:
        for line in f:
            if line.strip():
                path, prob, kind = line.split()
                rows.append((path, float(prob), kind))
    return rows


def index_elpv(category: str = "all", *, split_seed: int = 0,
               data_dir: str | None = None) -> dict[str, list[Sample]]:
    """-> {"train": [...], "test": [...]} of Samples sorted by name, per the protocol above."""
    if category not in ELPV_CATEGORIES:
        raise MissingDataError(f"ELPV category {category!r} does not exist; "
                               f"choose one of {', '.join(ELPV_CATEGORIES)}.")
    data_dir = data_dir or elpv_dir()
    rows = sorted(read_labels(data_dir))
    train, test = [], []
    for t_idx, kind in enumerate(CELL_TYPES):
        if category not in (kind, "all"):
            continue
        normal = [p for p, prob, k in rows if k == kind and prob == 0.0]
        n_test = int(round(TEST_FRACTION * len(normal)))
        perm = np.random.default_rng([split_seed, t_idx]).permutation(len(normal))
        test_idx = set(perm[:n_test].tolist())
        for i, p in enumerate(normal):
            split = "test" if i in test_idx else "train"
            (test if split == "test" else train).append(
                Sample(name=p, path=os.path.join(data_dir, p), split=split, label=0,
                       defect="good"))
        test.extend(Sample(name=p, path=os.path.join(data_dir, p), split="test", label=1,
                           defect="defective")
                    for p, prob, k in rows if k == kind and prob == 1.0)
    return {"train": sorted(train, key=lambda s: s.name),
            "test": sorted(test, key=lambda s: s.name)}
