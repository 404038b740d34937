"""Leave-one-image-out calibration (issue 14): every training image in the bank, and each
calibration/validation image scored without the bank entries that came from it."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pn_jax import detector, fitting, influence, knn, normalstats
from pn_jax.config import INFLUENCE_METHODS, tiny_config


def brute_loo(feats, owners, bank, bank_owner, k):
    """float64 numpy: the K nearest bank rows of another image, ties to the lower index."""
    dist, idx = [], []
    for f, o in zip(feats, owners):
        d = np.sqrt(((f[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1))
        d[:, bank_owner == o] = np.inf
        order = np.lexsort((np.broadcast_to(np.arange(len(bank)), d.shape), d), axis=-1)[:, :k]
        idx.append(order)
        dist.append(np.take_along_axis(d, order, -1))
    return np.stack(dist), np.stack(idx)


def test_loo_search_equals_brute_force_with_ties():
    rng = np.random.default_rng(0)
    cfg = tiny_config(noising={"k": 3}, bank={"knn_block": 16})
    bank = rng.normal(size=(50, 8)).astype(np.float32)
    bank_owner = rng.integers(0, 5, 50).astype(np.int32)
    bank[7] = bank[3]  # an exact tie between two images' entries
    feats = rng.normal(size=(4, 6, 8)).astype(np.float32)
    feats[0, 0] = bank[3]  # a patch identical to an entry of another image...
    owners = np.array([bank_owner[3] + 1 if bank_owner[3] != bank_owner[7] else 9, 0, 1, 2], np.int32)
    feats[1, 0] = bank[np.flatnonzero(bank_owner == 0)[0]]  # ...and one identical to its own image's entry
    dist, idx = normalstats.loo_neighbours(cfg, jnp.asarray(bank), bank_owner, feats, owners)
    rd, ri = brute_loo(feats, owners, bank, bank_owner, 3)
    np.testing.assert_array_equal(np.asarray(idx), ri)
    np.testing.assert_allclose(np.asarray(dist), rd, rtol=1e-5, atol=1e-5)
    assert not np.isin(np.asarray(idx)[1], np.flatnonzero(bank_owner == 0)).any()
    assert np.asarray(dist)[1, 0, 0] > 0  # its own copy in the bank is not found


@functools.lru_cache(maxsize=None)
def _fit(method="propose_noising", score="calibrated_rerank", influence_method="fd_fixed"):
    from tests.test_detector import fake_backbone

    cfg = tiny_config(noising={"method": method, "score": score, "influence": influence_method,
                               "predictor_steps": 30},
                      model={"pretrain_embed_dimension": 32, "target_embed_dimension": 32})
    ext = detector.FeatureExtractor(cfg, backbone_fn=fake_backbone)
    train = np.random.default_rng(0).normal(size=(8, 64, 64, 3)).astype(np.float32)
    tf = np.asarray(ext(train))
    cal, val = fitting.calibration_split(len(tf), cfg.seed)
    state, rep = fitting.fit_state(cfg, tf, None, jax.random.key(0), calibrate_on=cal)
    return cfg, ext, tf, state, rep, cal, val


def test_bank_holds_every_training_image_and_records_its_source():
    cfg, _, tf, state, rep, cal, val = _fit()
    assert rep.n_train_patches == tf.shape[0] * tf.shape[1]
    assert rep.bank_owner.shape == (state.bank.shape[0],)
    # each bank row is the patch feature of the training image it says it came from
    flat = tf.reshape(-1, tf.shape[-1])
    for m in range(0, state.bank.shape[0], 7):
        rows = np.flatnonzero((flat == np.asarray(state.bank[m])).all(-1))
        assert rep.bank_owner[m] in set(rows // tf.shape[1])
    assert rep.calibration["source"] == "leave-one-image-out" and rep.calibration["images"] == len(cal)
    assert set(cal).isdisjoint(val) and len(cal) + len(val) == len(tf)


def test_noise_scale_comes_from_leave_one_image_out_residuals():
    cfg, _, tf, state, rep, cal, _ = _fit()
    flat_bank = np.asarray(state.bank)
    res = []
    for i in cal:  # numpy: nearest bank row of another image, per patch
        d = ((tf[i][:, None] - flat_bank[None]) ** 2).sum(-1)
        d[:, rep.bank_owner == i] = np.inf
        res.append(tf[i] - flat_bank[d.argmin(1)])
    var = np.mean(np.concatenate(res) ** 2, axis=0)
    lam, floor = cfg.noising.noise_shrinkage, cfg.noising.noise_floor
    var = (1 - lam) * var + lam * var.mean()
    s = np.sqrt(var)
    s = np.maximum(s, floor * np.median(s) + 1e-12)
    np.testing.assert_allclose(np.asarray(state.params["noise_scale"]), s, rtol=1e-4)


@pytest.mark.parametrize("method,score", [("patchcore", "calibrated_rerank"), ("propose_noising", "calibrated"),
                                          ("propose_noising", "seed")])
def test_scorer_exclusion_equals_a_bank_without_that_image(method, score):
    cfg, ext, tf, state, rep, _, val = _fit(method, score)
    scorer = detector.Scorer(cfg, ext.grid)
    feats = jnp.asarray(tf[val[:1]])
    owner = int(val[0])
    out = scorer(state, detector.pad_batch(feats, cfg.batch_size),
                 (jnp.asarray(rep.bank_owner), jnp.asarray([owner] + [-1] * (cfg.batch_size - 1), jnp.int32)))
    keep = rep.bank_owner != owner
    reduced = state._replace(bank=state.bank[np.flatnonzero(keep)])
    ref = detector.Scorer(cfg, ext.grid)(reduced, detector.pad_batch(feats, cfg.batch_size))
    np.testing.assert_allclose(np.asarray(out["patch_scores"][0]), np.asarray(ref["patch_scores"][0]),
                               rtol=1e-4, atol=1e-4)
    # and removing rows can only push a training image's nearest distances up
    plain = scorer(state, detector.pad_batch(feats, cfg.batch_size))
    assert np.all(np.asarray(out["signals"]["nearest"][0]) >= np.asarray(plain["signals"]["nearest"][0]) - 1e-5)


def _without(bank, bank_owner, owner):
    """The bank without training image `owner`'s rows, and the map from its rows to the full bank's."""
    keep = np.flatnonzero(np.asarray(bank_owner) != owner)
    return jnp.asarray(np.asarray(bank)[keep]), keep


@pytest.mark.parametrize("method", sorted(influence.METHODS))
def test_every_estimator_excluding_equals_the_bank_without_that_image(method):
    """influence.influence(..., excluded) on the whole bank == the same estimator on the bank
    without those rows, searched there (fd searches again: its re-search must skip them too)."""
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(60, 12)).astype(np.float32)
    bank_owner = rng.integers(0, 4, 60).astype(np.int32)
    owner = 2
    f = bank[bank_owner == owner][:5] + 1e-4 * rng.normal(size=(5, 12)).astype(np.float32)  # its own entries nearby
    f = jnp.asarray(np.concatenate([f, rng.normal(size=(7, 12)).astype(np.float32)]))
    dims = jnp.arange(0, 12, 2, dtype=jnp.int32)
    excluded = jnp.asarray(bank_owner == owner)
    dist, idx = knn.knn_excluding(f, jnp.asarray(bank), excluded, k=3, block=16)
    got = influence.influence(method, f, jnp.asarray(bank), dist, idx, dims, 1e-3, excluded=excluded)
    reduced, _ = _without(bank, bank_owner, owner)
    rd, ri = knn.knn(f, reduced, k=3, block=16)
    want = influence.influence(method, f, reduced, rd, ri, dims, 1e-3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-7)
    # the first rows sit next to their own entries: searching those would change fd completely
    full = influence.influence(method, f, jnp.asarray(bank), dist, idx, dims, 1e-3)
    if method == "fd":
        assert not np.allclose(np.asarray(full)[:5], np.asarray(want)[:5], rtol=1e-2)


@pytest.mark.parametrize("method", INFLUENCE_METHODS)
def test_loo_scoring_equals_a_bank_without_that_image_for_every_estimator(method):
    """Validation scoring (the threshold's normal images): a training image scored without its
    own bank rows equals the same image scored against a bank that never had them."""
    cfg, ext, tf, state, rep, _, val = _fit("propose_noising", "seed", method)
    owner = int(val[0])
    ex = (jnp.asarray(rep.bank_owner), jnp.asarray([owner] + [-1] * (cfg.batch_size - 1), jnp.int32))
    out = detector.Scorer(cfg, ext.grid)(state, detector.pad_batch(jnp.asarray(tf[owner:owner + 1]), cfg.batch_size),
                                         ex)
    reduced, _ = _without(state.bank, rep.bank_owner, owner)
    ref = detector.Scorer(cfg, ext.grid)(state._replace(bank=reduced),
                                         detector.pad_batch(jnp.asarray(tf[owner:owner + 1]), cfg.batch_size))
    for key in ("influence", "noise", "distance"):
        np.testing.assert_allclose(np.asarray(out["signals"][key][0]), np.asarray(ref["signals"][key][0]),
                                   rtol=1e-4, atol=1e-6, err_msg=f"{method} {key}")


@pytest.mark.parametrize("method", sorted(influence.METHODS))
def test_fit_statistics_under_loo_equal_a_bank_without_each_image(method):
    """The fit-time statistics of leave-one-image-out calibration: each calibration image's
    K-NN and influence from the bank without its own rows (a plain search of that bank)."""
    cfg, _, tf, state, rep, cal, _ = _fit("propose_noising", "seed", method)
    dists, infls = [], []
    for i in cal:
        reduced, _ = _without(state.bank, rep.bank_owner, i)
        d, ix = knn.knn(jnp.asarray(tf[i]), reduced, k=cfg.noising.k, block=cfg.bank.knn_block)
        dists.append(d)
        infls.append(influence.influence(method, jnp.asarray(tf[i]), reduced, d, ix, state.dims, cfg.noising.eps))
    n = cfg.noising
    want = normalstats._stats_from(state.params, state.dims, jnp.stack(dists), (jnp.stack(infls),),
                                std_range=(n.noise_std_min, n.noise_std_max))
    for name, got, ref in zip(want._fields, state.stats, want):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-6, err_msg=name)
