"""Synthetic categories are seeded by their name: different names give different images, the
same name and seed the same bytes, and a tree from an older generator is not reused."""
import filecmp
import json
import os

import numpy as np
import pytest
from PIL import Image

from pn_jax.data import pipeline, preprocess, synthetic

KW = dict(n_train=3, n_test_good=1, n_test_defect=1, size=32, seed=3)


def files(root):
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, _, ns in os.walk(root) for n in ns
                  if n.endswith(".png"))


def test_category_name_seeds_the_images(tmp_path):
    for name in ("gadget", "widget"):
        synthetic.generate_category(str(tmp_path / "a"), name, **KW)
    synthetic.generate_category(str(tmp_path / "b"), "gadget", **KW)
    names = files(tmp_path / "a" / "gadget")
    assert names == files(tmp_path / "a" / "widget") and len(names) == 3 + 1 + 2 + 2
    for rel in names:
        g = np.asarray(Image.open(tmp_path / "a" / "gadget" / rel))
        w = np.asarray(Image.open(tmp_path / "a" / "widget" / rel))
        assert not np.array_equal(g, w), rel  # every image of another name differs
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "a" / "gadget", tmp_path / "b" / "gadget", names,
                                           shallow=False)
    assert not mismatch and not errors  # the same name: byte-identical, wherever it is written


def test_tree_of_an_older_generator_is_refused(tmp_path):
    target = synthetic.generate_category(str(tmp_path), "gadget", **KW)
    path = os.path.join(target, synthetic.PARAMS_FILE)
    with open(path) as f:
        params = json.load(f)
    assert params == synthetic.full_params(**KW)
    pipeline.ensure_synthetic(str(tmp_path), "gadget", **KW)  # current generator: reused
    del params["generator"]  # as written before the name seeded the images
    with open(path, "w") as f:
        json.dump(params, f)
    with pytest.raises(preprocess.DataError, match="delete it to regenerate"):
        pipeline.ensure_synthetic(str(tmp_path), "gadget", **KW)
