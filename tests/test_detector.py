"""Detector-level behaviour on a tiny fake backbone: batch independence, no retracing,
PatchCore scores equal to a brute-force nearest-neighbour reference, seeded determinism."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pn_jax import detector, fitting, maps, normalstats
from pn_jax.config import tiny_config
from tests import reference


def fake_backbone(images):
    """Two 'stages' from fixed random projections of average-pooled pixels (stride 4 and 8)."""
    w1 = jax.random.normal(jax.random.key(1), (3, 6))
    w2 = jax.random.normal(jax.random.key(2), (6, 10))
    b, h, w, _ = images.shape
    s1 = jnp.tanh(images.reshape(b, h // 4, 4, w // 4, 4, 3).mean((2, 4)) @ w1)
    s2 = jnp.tanh(s1.reshape(b, h // 8, 2, w // 8, 2, 6).mean((2, 4)) @ w2)
    return {"blocks4": s1, "blocks10": s2}


@functools.lru_cache(maxsize=None)
def make(method="propose_noising", influence="fd_fixed"):
    cfg = tiny_config(noising={"method": method, "influence": influence, "score": "seed"},
                      model={"pretrain_embed_dimension": 32, "target_embed_dimension": 32})
    ext = detector.FeatureExtractor(cfg, backbone_fn=fake_backbone)
    rng = np.random.default_rng(0)
    train = rng.normal(size=(6, 64, 64, 3)).astype(np.float32)
    hold = rng.normal(size=(2, 64, 64, 3)).astype(np.float32)
    test = rng.normal(size=(7, 64, 64, 3)).astype(np.float32)
    test[3, 10:30, 10:30] += 3.0  # an anomaly
    tf = np.asarray(ext(train))
    hf = np.asarray(ext(hold))
    state, _ = fitting.fit_state(cfg, tf, hf, jax.random.key(0))
    return cfg, ext, state, tf, test


def score(cfg, ext, state, images, scorer=None):
    scorer = scorer or detector.Scorer(cfg, ext.grid)
    out = scorer(state, ext(images))
    return np.asarray(out["image_scores"]), np.asarray(out["anomaly_maps"]), scorer


@pytest.mark.parametrize("method", ["propose_noising", "patchcore"])
def test_scores_independent_of_batch_size_and_composition(method):
    cfg, ext, state, _, test = make(method)
    full, full_maps, scorer = score(cfg, ext, state, test)
    singles = np.concatenate([score(cfg, ext, state, test[i:i + 1], scorer)[0] for i in range(len(test))])
    np.testing.assert_allclose(singles, full, rtol=1e-5, atol=1e-6)
    perm = np.array([6, 2, 0, 5, 1, 3, 4])
    shuffled, shuffled_maps, _ = score(cfg, ext, state, test[perm], scorer)
    np.testing.assert_allclose(shuffled, full[perm], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(shuffled_maps, full_maps[perm], rtol=1e-5, atol=1e-5)
    # and with very different batch-mates
    mixed = np.concatenate([test[:2], test[:2] * 10.0])
    np.testing.assert_allclose(score(cfg, ext, state, mixed, scorer)[0][:2], full[:2], rtol=1e-5, atol=1e-6)


def test_patchcore_equals_bruteforce_nearest_neighbour():
    cfg, ext, state, _, test = make("patchcore")
    feats = np.asarray(ext(test))
    d, _ = reference.knn_bruteforce(feats.reshape(-1, feats.shape[-1]), np.asarray(state.bank), 1)
    patch = d[:, 0].reshape(len(test), 16, 16).astype(np.float32)
    want = np.asarray(maps.gaussian_blur(maps.upsample_maps(jnp.asarray(patch), (64, 64)), 4.0))
    got_scores, got_maps, _ = score(cfg, ext, state, test)
    np.testing.assert_allclose(got_maps, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_scores, want.reshape(len(test), -1).max(-1), rtol=1e-4)
    assert np.argmax(got_scores) == 3


def test_image_score_patch_max_is_the_raw_max_over_patches():
    cfg, ext, state, _, test = make("patchcore")
    feats = np.asarray(ext(test))
    d, _ = reference.knn_bruteforce(feats.reshape(-1, feats.shape[-1]), np.asarray(state.bank), 1)
    patch = d[:, 0].reshape(len(test), -1)
    out = detector.Scorer(cfg.replace(noising={"image_score": "patch_max"}), ext.grid)(state, feats)
    np.testing.assert_allclose(np.asarray(out["image_scores"]), patch.max(-1), rtol=1e-5)
    blurred = detector.Scorer(cfg, ext.grid)(state, feats)  # the default: max of the blurred map
    np.testing.assert_allclose(np.asarray(blurred["image_scores"]),
                               np.asarray(blurred["anomaly_maps"]).reshape(len(test), -1).max(-1), rtol=1e-6)
    assert np.all(np.asarray(blurred["image_scores"]) < patch.max(-1))  # the blur lowers the peak
    with pytest.raises(ValueError, match="image_score"):
        cfg.replace(noising={"image_score": "mean"})


def test_scorer_compiles_once_per_configuration():
    cfg, ext, state, _, test = make()
    # a configuration no other test uses, so its shared compiled functions start untraced
    cfg = cfg.replace(noising={"eps": 1.2345e-3, "blur_sigma": 3.875})
    ext(test[:1]); scorer = detector.Scorer(cfg, ext.grid)
    for i in range(3):
        scorer(state, ext(test[i:i + 4]))
    # anomaly, influence and noise maps share one compiled function; signals compile once
    assert scorer.traces == {"signals": 1, "maps": 1}
    scorer(state, ext(test[3:5]))  # a different batch size is a different shape: one more trace
    assert scorer.traces == {"signals": 2, "maps": 2}
    # a second Scorer of the same configuration (e.g. the next category) compiles nothing
    again = detector.Scorer(cfg, ext.grid)
    again(state, ext(test[:4]))
    assert again.traces == {"signals": 2, "maps": 2}
    # another configuration has its own compiled signal function (the maps are the same)
    other = detector.Scorer(cfg.replace(noising={"eps": 2.3456e-3}), ext.grid)
    other(state, ext(test[:4]))
    assert other.traces == {"signals": 1, "maps": 2}


def test_fit_is_seeded():
    cfg, _, s1, tf, _ = make()
    s2, _ = fitting.fit_state(cfg, tf, None, jax.random.key(0))
    s3, _ = fitting.fit_state(cfg, tf, None, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(s1.bank), np.asarray(s2.bank))
    np.testing.assert_array_equal(np.asarray(s1.dims), np.asarray(s2.dims))
    assert not np.array_equal(np.asarray(s1.dims), np.asarray(s3.dims))


def numpy_stats(cfg, bank, dims, w_infl, w_dist, feats):
    """The fit-time statistics of SPEC 2.7 recomputed in float64 numpy from features [n,N,D]:
    brute-force K-NN, fd_fixed influence on the dims S, the noise proposal, means and stds."""
    n = cfg.noising
    f = feats.reshape(-1, feats.shape[-1]).astype(np.float64)
    d, i = reference.knn_bruteforce(f, bank, n.k)
    r = (f[:, None, :] - bank.astype(np.float64)[i])[..., dims]  # [P,K,S]
    x = (d * d)[..., None] + 2 * n.eps * r + n.eps ** 2
    infl = np.abs(np.sqrt(x) - d[..., None]).mean(1) * w_infl[dims]  # [P,S] weighted influence
    dsig = d.mean(-1)
    im, isd, dm, dsd = infl.mean(), infl.std(), dsig.mean(), dsig.std()
    z = (infl - im) / isd + w_dist * ((dsig - dm) / dsd)[:, None]
    noise = n.noise_std_min + (n.noise_std_max - n.noise_std_min) / (1 + np.exp(-z))
    parts = np.stack([infl.mean(-1), dsig, noise.mean(-1)])
    return dict(infl_mean=im, infl_std=isd, dist_mean=dm, dist_std=dsd,
                signal_mean=parts.mean(-1), signal_std=parts.std(-1))


def test_stats_come_from_holdout_not_test():
    cfg, ext, state, _, test = make()
    rng = np.random.default_rng(0)  # make()'s draws: train, then the held-out images
    rng.normal(size=(6, 64, 64, 3))
    hold = np.asarray(ext(rng.normal(size=(2, 64, 64, 3)).astype(np.float32)))
    args = (cfg, np.asarray(state.bank), np.asarray(state.dims),
            np.asarray(state.params["influence_weight"]), float(state.params["distance_weight"][0]))
    want = numpy_stats(*args, hold)
    for name, value in want.items():
        np.testing.assert_allclose(np.asarray(getattr(state.stats, name)), value, rtol=2e-4, err_msg=name)
    # statistics of the test images would be other numbers: these really come from the held-out ones
    other = numpy_stats(*args, np.asarray(ext(test)))
    assert abs(other["dist_mean"] - want["dist_mean"]) > 1e-3 * want["dist_mean"]


@pytest.mark.parametrize("influence", ["fd", "grad", "jvp"])
def test_other_influence_methods_score_close_to_fd_fixed(influence):
    cfg, ext, state, _, test = make()
    ref, _, _ = score(cfg, ext, state, test)
    cfg2 = cfg.replace(noising={"influence": influence})
    got, _, _ = score(cfg2, ext, state, test)
    np.testing.assert_allclose(got, ref, rtol=1e-3)


def test_adaptive_noising_module_matches_the_scoring_path():
    from pn_jax import noising

    cfg, ext, state, _, test = make()
    feats = ext(test[:2])
    mod = noising.AdaptiveNoisingModule(feats.shape[-1], k=cfg.noising.k, influence="fd_fixed",
                                        eps=cfg.noising.eps, block=cfg.bank.knn_block)
    dist, idx = mod.compute_spatial_distance(feats, state.bank)
    infl = mod.compute_feature_influence(feats, state.bank, dist, idx, state.dims)
    noise = mod.propose_adaptive_noise(infl, dist, state.stats)
    sig = detector.Scorer(cfg, ext.grid).signals(state, feats)
    np.testing.assert_allclose(np.asarray(dist.mean(-1)), np.asarray(sig["distance"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(infl.mean(-1)), np.asarray(sig["influence"]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(noise.mean(-1)), np.asarray(sig["noise"]), rtol=1e-5)
    assert noise.shape == (2, feats.shape[1], state.dims.shape[0])
    assert float(noise.min()) > cfg.noising.noise_std_min and float(noise.max()) < cfg.noising.noise_std_max


def test_importance_dim_selection_picks_the_most_influential_dims():
    from tests import reference as ref

    cfg, ext, state, train_feats, test = make()
    cfg = cfg.replace(noising={"dim_selection": "importance"})
    hold = np.asarray(ext(test[:2]))
    dims = np.asarray(normalstats.select_dims(cfg, jax.random.key(0), hold.shape[-1], hold, state.bank))
    f = hold.reshape(-1, hold.shape[-1])
    d, i = ref.knn_bruteforce(f, np.asarray(state.bank), cfg.noising.k)
    r = f[:, None, :] - np.asarray(state.bank)[i]
    imp = np.abs(r / d[..., None]).mean(axis=(0, 1))  # eps-free grad influence per dim
    want = np.sort(np.argsort(-imp)[:len(dims)])
    np.testing.assert_array_equal(dims, want)
    assert len(dims) == detector.n_influence_dims(cfg, hold.shape[-1])


def test_importance_is_streamed_and_equals_the_unchunked_mean():
    from pn_jax import influence, knn

    rng = np.random.default_rng(4)
    f = jnp.asarray(rng.normal(size=(37, 16)), jnp.float32)
    bank = jnp.asarray(rng.normal(size=(20, 16)), jnp.float32)
    dist, idx = knn.knn(f, bank, k=3, block=8)
    want = np.asarray(influence.fd_fixed(f, bank, dist, idx, jnp.arange(16), 1e-3)).mean(0)
    for chunk in (5, 37, 64):  # a ragged last chunk, one chunk, a chunk larger than P
        got = np.asarray(normalstats._importance(f, bank, dist, idx, 1e-3, chunk=chunk))
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=str(chunk))
    # Held-out patches P=4000, K=9, D=256: the unstreamed residuals alone are [P,K,D] (37 MB).
    p, k, d = 4000, 9, 256
    shapes = (jax.ShapeDtypeStruct((p, d), jnp.float32), jax.ShapeDtypeStruct((300, d), jnp.float32),
              jax.ShapeDtypeStruct((p, k), jnp.float32), jax.ShapeDtypeStruct((p, k), jnp.int32))
    temp = normalstats._importance.lower(*shapes, 1e-3).compile().memory_analysis().temp_size_in_bytes
    assert temp < p * k * d * 4 / 2, temp
