"""The calibrated noise model: s_j from held-out normals only; whitened k-NN == brute-force NLL."""
import jax
import jax.numpy as jnp
import numpy as np

from pn_jax import calibration, detector, fitting
from tests import reference
from tests.test_detector import make


def test_noise_scale_is_rms_residual_with_shrinkage_and_floor():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(80, 12)).astype(np.float32)
    hold = (rng.normal(size=(50, 12)) * np.linspace(0.01, 3, 12)).astype(np.float32)
    s = np.asarray(calibration.fit_noise_scale(jnp.asarray(bank), jnp.asarray(hold), shrinkage=0.2, floor=0.5))
    _, idx = reference.knn_bruteforce(hold, bank, 1)
    var = ((hold - bank[idx[:, 0]]) ** 2).mean(0)
    var = 0.8 * var + 0.2 * var.mean()
    want = np.maximum(np.sqrt(var), 0.5 * np.median(np.sqrt(var)))
    np.testing.assert_allclose(s, want, rtol=1e-5)
    # the caller's search: the nearest index per patch [P], or the K-NN indices [..., K] (the fit's)
    _, idx3 = reference.knn_bruteforce(hold, bank, 3)
    by_index = calibration.fit_noise_scale(jnp.asarray(bank), jnp.asarray(hold), shrinkage=0.2, floor=0.5,
                                           nearest=jnp.asarray(idx3[:, 0], jnp.int32))
    by_knn = calibration.fit_noise_scale(jnp.asarray(bank), jnp.asarray(hold), shrinkage=0.2, floor=0.5,
                                         nearest=jnp.asarray(idx3.reshape(5, 10, 3), jnp.int32))
    np.testing.assert_allclose(np.asarray(by_index), want, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(by_knn), np.asarray(by_index))


def test_whitened_knn_equals_bruteforce_nll():
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(120, 16)).astype(np.float32) * 4
    f = rng.normal(size=(30, 16)).astype(np.float32) * 4
    scale = rng.uniform(0.1, 5.0, size=16).astype(np.float32)
    sig, idx = calibration.calibrated_signals(jnp.asarray(f), jnp.asarray(bank), jnp.asarray(scale), 3, 32)
    nll = 0.5 * (((f[:, None, :] - bank[None]) / scale) ** 2).sum(-1)  # [Q, M]
    order = np.argsort(nll, axis=1)[:, :3]
    np.testing.assert_array_equal(np.asarray(idx), order)
    np.testing.assert_allclose(np.asarray(sig["calibrated_nll"]), nll.min(1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(sig["calibrated"]), np.sqrt(2 * nll.min(1)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(sig["calibrated_mean"]),
                               np.sqrt(2 * np.take_along_axis(nll, order, 1)).mean(1), rtol=1e-5)


def test_rerank_is_the_whitened_nll_over_the_euclidean_knn():
    rng = np.random.default_rng(2)
    bank = rng.normal(size=(150, 16)).astype(np.float32) * 4 + 10
    f = rng.normal(size=(40, 16)).astype(np.float32) * 4 + 10
    scale = rng.uniform(0.2, 4.0, size=16).astype(np.float32)
    _, idx = reference.knn_bruteforce(f, bank, 5)  # Euclidean 5-NN
    nll = 0.5 * (((f[:, None, :] - bank[idx]) / scale) ** 2).sum(-1)  # [Q, 5]
    got = calibration.rerank_signals(jnp.asarray(f), jnp.asarray(bank), jnp.asarray(scale), jnp.asarray(idx))
    np.testing.assert_allclose(np.asarray(got["calibrated_rerank"]), np.sqrt(2 * nll.min(1)), rtol=1e-5)
    # an upper bound of the whitened search over the whole bank, equal where its winner is a candidate
    full, w_idx = calibration.calibrated_signals(jnp.asarray(f), jnp.asarray(bank), jnp.asarray(scale), 1, 64)
    r, c = np.asarray(got["calibrated_rerank"]), np.asarray(full["calibrated"])
    assert np.all(r >= c * (1 - 1e-6))
    inside = np.array([w in row for w, row in zip(np.asarray(w_idx)[:, 0], idx)])
    assert inside.any() and (~inside).any()
    np.testing.assert_allclose(r[inside], c[inside], rtol=1e-5)
    assert np.all(r[~inside] > c[~inside])


def test_noise_scale_comes_from_holdout_only():
    cfg, ext, state, train_feats, _ = make()
    rng = np.random.default_rng(3)
    hold_a = train_feats[:2] + rng.normal(size=train_feats[:2].shape).astype(np.float32) * 0.01
    hold_b = train_feats[:2] + rng.normal(size=train_feats[:2].shape).astype(np.float32) * 0.5
    sa, _ = fitting.fit_state(cfg, train_feats, hold_a, jax.random.key(0))
    sb, _ = fitting.fit_state(cfg, train_feats, hold_b, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(sa.bank), np.asarray(sb.bank))  # same train -> same bank
    assert float(np.mean(np.asarray(sb.params["noise_scale"]))) > 3 * float(np.mean(np.asarray(sa.params["noise_scale"])))
    s_none, _ = fitting.fit_state(cfg, train_feats, None, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(s_none.params["noise_scale"]), 1.0)  # nothing fitted without holdout


def test_calibrated_scores_independent_of_batch_composition():
    cfg, ext, state, _, test = make()
    cfg = cfg.replace(noising={"score": "calibrated"})
    scorer = detector.Scorer(cfg, ext.grid)
    full = np.asarray(scorer(state, ext(test[:4]))["image_scores"])
    alone = np.concatenate([np.asarray(scorer(state, ext(np.concatenate([test[i:i + 1], test[4:7]])))["image_scores"][:1])
                            for i in range(4)])
    np.testing.assert_allclose(alone, full, rtol=1e-5)
