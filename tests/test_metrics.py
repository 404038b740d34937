"""Metrics against independent references: scikit-learn for AUROC / AP / F1-max, and a
straightforward per-threshold PRO (boolean masks, scikit-image labelling) for AUPRO."""
import math

import numpy as np
import pytest
from skimage.measure import label as sk_label
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from pn_jax import metrics


def _sk_f1_max(scores, labels):
    p, r, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * p * r / (p + r))
    return f1.max()


def _data(rng, n, ties, pos_frac=0.3, dtype=np.float64):
    labels = (rng.random(n) < pos_frac).astype(np.int64)
    scores = rng.normal(size=n) + 1.0 * labels
    if ties:
        scores = np.round(scores, 1)  # many exact ties, some across classes
    return scores.astype(dtype), labels


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n", [7, 83, 5000])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_curve_metrics_match_sklearn(ties, n, dtype):
    rng = np.random.default_rng(n + 10 * ties)
    scores, labels = _data(rng, n, ties, dtype=dtype)
    labels[:2] = [0, 1]  # both classes present
    assert metrics.auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics.average_precision(scores, labels) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12)
    f1, thr = metrics.f1_max_with_threshold(scores, labels)
    assert f1 == pytest.approx(_sk_f1_max(scores, labels), abs=1e-12)
    assert metrics.f1_max(scores, labels) == f1
    # The threshold reaches that F1 when predicting score >= threshold.
    pred = scores >= thr
    tp = np.sum(pred & (labels == 1))
    assert 2 * tp / (pred.sum() + labels.sum()) == pytest.approx(f1, abs=1e-12)


def test_integer_scores_and_bool_labels():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, 200)
    labels = rng.random(200) < 0.5
    assert metrics.auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics.average_precision(scores, labels) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12)


def _blob_masks():
    """5 masks 16x16: blobs, diagonal-only links (8-connected: one region), an empty mask."""
    m = np.zeros((5, 16, 16), dtype=bool)
    m[0, 2:6, 3:7] = True  # square
    m[0, 10:12, 10:15] = True  # bar
    for i in range(5):  # a diagonal staircase, connected only through corners
        m[1, 3 + i, 3 + i] = True
    m[1, 12, 1] = True  # single pixel
    m[2, 0:3, 0:3] = True  # touches the border
    m[2, 3, 3] = True  # corner-linked to the block above: same region
    m[2, 8:14, 6:9] = True
    # m[3] stays empty (an anomalous image may have an empty mask)
    m[4, 5:11, 5:11] = True
    m[4, 7:9, 7:9] = False  # a ring with a hole
    return m


def _reference_aupro(maps, masks, limit):
    """Per distinct threshold: overlap per region and FPR with boolean masks; integrate."""
    regions = []
    for i in range(masks.shape[0]):
        lab = sk_label(masks[i], connectivity=2)  # 8-connectivity
        regions += [(i, lab == r) for r in range(1, lab.max() + 1)]
    normal = ~masks
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        xs.append(np.sum(pred & normal) / np.sum(normal))
        ys.append(np.mean([np.sum(pred[i] & reg) / np.sum(reg) for i, reg in regions]))
    xs.append(1.0)
    ys.append(1.0)
    area = 0.0  # linear pieces, each clipped to [0, limit]
    for x0, x1, y0, y1 in zip(xs[:-1], xs[1:], ys[:-1], ys[1:]):
        b = min(x1, limit)
        if x1 > x0 and b > x0:
            yb = y0 + (y1 - y0) * (b - x0) / (x1 - x0)
            area += 0.5 * (y0 + yb) * (b - x0)
    return area / limit, len(regions)


def _noisy_maps(rng, masks, ties):
    maps = rng.normal(size=masks.shape) + 1.2 * masks
    if ties:
        maps = np.round(maps * 3) / 3  # coarse quantisation: heavy ties across classes
    return maps.astype(np.float32)


def test_region_labels_are_8_connected():
    m = _blob_masks()
    _, n = metrics.region_labels(m)
    # image 0: 2, image 1: staircase + pixel = 2, image 2: 2, image 3: 0, image 4: ring = 1
    assert n == 7
    assert n == sum(sk_label(x, connectivity=2).max() for x in m)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_matches_reference(ties, limit):
    rng = np.random.default_rng(3 + ties)
    masks = _blob_masks()
    maps = _noisy_maps(rng, masks, ties)
    ref, n_regions = _reference_aupro(maps, masks, limit)
    assert n_regions == 7
    assert 0.05 < ref < 0.999
    assert metrics.aupro(maps, masks, fpr_limit=limit) == pytest.approx(ref, abs=1e-9)


def test_aupro_cut_on_a_curve_point():
    # 0.3 hit exactly by a curve point: no interpolation term (MVTec's `x_max in x` branch).
    masks = np.zeros((1, 1, 12), dtype=bool)
    masks[0, 0, :2] = True  # 10 normal pixels, FPR steps of 0.1
    maps = np.array([[[5, 1, 9, 8, 7, 4, 3, 2, 1.5, 0.5, 0.2, 0.1]]], dtype=np.float64)
    ref, _ = _reference_aupro(maps, masks, 0.3)
    fprs, _ = metrics.pro_curve(maps, masks)
    assert np.any(fprs == 0.3)  # 3 / 10 rounds to the double nearest 0.3
    assert metrics.aupro(maps, masks, 0.3) == pytest.approx(ref, abs=1e-12)


def test_pixel_metrics_match_sklearn_and_reference():
    rng = np.random.default_rng(7)
    masks = _blob_masks()
    for ties in (False, True):
        maps = _noisy_maps(rng, masks, ties)
        image_scores = maps.reshape(5, -1).max(1)
        image_labels = np.array([1, 1, 0, 1, 1])  # image 3: anomalous with an empty mask
        r = metrics.evaluate(image_scores, image_labels, maps, masks)
        y, s = masks.ravel(), maps.ravel()
        assert r["mAUROC_px"] == pytest.approx(100 * roc_auc_score(y, s), abs=1e-9)
        assert r["mAP_px"] == pytest.approx(100 * average_precision_score(y, s), abs=1e-9)
        assert r["mF1_max_px"] == pytest.approx(100 * _sk_f1_max(s, y), abs=1e-9)
        ref_aupro = _reference_aupro(maps, masks, 0.3)[0]
        assert r["mAUPRO_px"] == pytest.approx(100 * ref_aupro, abs=1e-7)
        assert r["mAUROC_sp_max"] == pytest.approx(
            100 * roc_auc_score(image_labels, image_scores), abs=1e-9)
        assert r["mAP_sp_max"] == pytest.approx(
            100 * average_precision_score(image_labels, image_scores), abs=1e-9)
        assert r["mF1_max_sp_max"] == pytest.approx(
            100 * _sk_f1_max(image_scores, image_labels), abs=1e-9)
        assert list(r) == list(metrics.IMAGE_KEYS + metrics.PIXEL_KEYS)
        assert all(type(v) is float for v in r.values())


def test_larger_pixel_set_matches_sklearn():
    # Enough pixels that float32 scores tie by chance, on top of regions of many sizes.
    rng = np.random.default_rng(11)
    masks = rng.random((6, 64, 64)) < 0.02
    masks = np.stack([np.pad(m[4:-4, 4:-4], 4) for m in masks])  # keep some borders clean
    maps = (rng.normal(size=masks.shape) + 1.5 * masks).astype(np.float32)
    maps = np.round(maps, 2)
    r = metrics.evaluate(maps.reshape(6, -1).max(1), [0, 1, 0, 1, 1, 1], maps, masks)
    assert r["mAUROC_px"] == pytest.approx(
        100 * roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
    assert r["mAP_px"] == pytest.approx(
        100 * average_precision_score(masks.ravel(), maps.ravel()), abs=1e-9)


def test_perfect_and_inverted_detectors():
    rng = np.random.default_rng(5)
    masks = _blob_masks()
    labels = masks.reshape(5, -1).any(1).astype(int)
    perfect = masks + 0.5 * rng.random(masks.shape)  # every anomalous pixel above every normal
    r = metrics.evaluate(perfect.reshape(5, -1).max(1), labels, perfect, masks)
    assert all(v == pytest.approx(100.0) for v in r.values()), r
    inverted = -perfect
    r = metrics.evaluate(inverted.reshape(5, -1).max(1), labels, inverted, masks)
    assert r["mAUROC_px"] == pytest.approx(0.0, abs=1e-9)
    assert r["mAUPRO_px"] == pytest.approx(0.0, abs=1e-9)


def test_undefined_metrics_are_nan_with_warning():
    maps = np.random.default_rng(0).random((3, 8, 8))
    empty = np.zeros((3, 8, 8), dtype=bool)
    with pytest.warns(RuntimeWarning, match="no anomalous"):
        r = metrics.evaluate([0.1, 0.5, 0.9], [0, 1, 1], maps, empty)
    assert all(math.isnan(r[k]) for k in metrics.PIXEL_KEYS)
    assert not any(math.isnan(r[k]) for k in metrics.IMAGE_KEYS)
    with pytest.warns(RuntimeWarning, match="no normal"):
        r = metrics.evaluate([0.1, 0.5, 0.9], [0, 1, 1], maps, ~empty)
    assert all(math.isnan(r[k]) for k in metrics.PIXEL_KEYS)
    with pytest.warns(RuntimeWarning, match="no anomalous"):
        r = metrics.evaluate([0.1, 0.5, 0.9], [0, 0, 0])
    assert all(math.isnan(r[k]) for k in metrics.IMAGE_KEYS) and set(r) == set(metrics.IMAGE_KEYS)
    with pytest.warns(RuntimeWarning):
        assert math.isnan(metrics.aupro(maps, empty))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="NaN"):
        metrics.auroc([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match="binary"):
        metrics.auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="both"):
        metrics.evaluate([0.1, 0.2], [0, 1], anomaly_maps=np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.evaluate([0.1, 0.2], [0, 1], fpr_limit=0.0)


def test_accepts_jax_arrays():
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(2)
    masks = _blob_masks()
    maps = _noisy_maps(rng, masks, ties=False)
    s = maps.reshape(5, -1).max(1)
    lab = np.array([1, 1, 1, 0, 1])
    got = metrics.evaluate(jnp.asarray(s), jnp.asarray(lab), jnp.asarray(maps), jnp.asarray(masks))
    assert got == metrics.evaluate(s, lab, maps, masks)


def test_mean_over_categories():
    a = {"mAUROC_sp_max": 90.0, "mAUROC_px": 80.0}
    b = {"mAUROC_sp_max": 100.0, "mAUROC_px": 70.0}
    assert metrics.mean_over_categories([a, b]) == {"mAUROC_sp_max": 95.0, "mAUROC_px": 75.0}
    with pytest.raises(ValueError, match="different metrics"):
        metrics.mean_over_categories([a, {"mAUROC_sp_max": 1.0}])
