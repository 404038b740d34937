"""optax tuning lowers the validation ranking loss; patch labels follow the masks."""
import numpy as np
import pytest

from pn_jax import tune
from tests.test_detector import make, numpy_stats


def test_patch_labels_from_masks():
    m = np.zeros((1, 8, 8))
    m[0, :4, :4] = 1  # cell (0,0) fully anomalous
    m[0, 4, 4] = 1  # cell (1,1) 1/16 anomalous -> ignored
    lab = tune.patch_labels(m, (2, 2))
    np.testing.assert_array_equal(lab, [[1, 0, 0, -1]])


@pytest.mark.parametrize("variant", ["seed", "calibrated", "calibrated_rerank"])
def test_tuning_lowers_validation_loss(variant):
    cfg, ext, state, _, _ = make()
    rng = np.random.default_rng(7)
    imgs = rng.normal(size=(4, 64, 64, 3)).astype(np.float32)
    masks = np.zeros((4, 64, 64), np.float32)
    for i in (1, 3):  # two anomalous images: a subtle colour shift in one channel
        imgs[i, 16:40, 20:44, 1] += 0.4
        masks[i, 16:40, 20:44] = 1
    feats = np.asarray(ext(imgs))
    res = tune.tune(cfg, state, feats, masks, ext.grid, variant=variant, steps=15, lr=0.1)
    assert res.losses[-1] < 0.9 * res.losses[0], res.losses
    changed = [k for k in state.params if not np.array_equal(np.asarray(state.params[k]), np.asarray(res.state.params[k]))]
    assert sorted(changed) == sorted(res.tuned)


def test_tuning_the_weights_recomputes_the_statistics_with_them():
    cfg, ext, state, _, _ = make()
    rng = np.random.default_rng(7)
    imgs = rng.normal(size=(4, 64, 64, 3)).astype(np.float32)
    masks = np.zeros((4, 64, 64), np.float32)
    for i in (1, 3):
        imgs[i, 16:40, 20:44, 1] += 0.4
        masks[i, 16:40, 20:44] = 1
    feats = np.asarray(ext(imgs))
    res = tune.tune(cfg, state, feats, masks, ext.grid, variant="seed", steps=15, lr=0.1)
    w = np.asarray(res.state.params["influence_weight"])[np.asarray(state.dims)]
    assert np.abs(w - 1).max() > 1e-2  # the weights on S moved
    # independent float64 recomputation from the normal validation images with the tuned weights
    want = numpy_stats(cfg, np.asarray(state.bank), np.asarray(state.dims),
                       np.asarray(res.state.params["influence_weight"]),
                       float(res.state.params["distance_weight"][0]), feats[[0, 2]])
    for name, value in want.items():
        np.testing.assert_allclose(np.asarray(getattr(res.state.stats, name)), value, rtol=2e-4, err_msg=name)
    # the calibrated noise scale does not enter the statistics: they stay as they were
    cal = tune.tune(cfg, state, feats, masks, ext.grid, variant="calibrated", steps=3, lr=0.1)
    assert cal.state.stats is state.stats
