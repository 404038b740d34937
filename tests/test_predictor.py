"""InfluencePredictor: shapes, exactness where it can be exact, training, determinism, checkpoint."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pn_jax import checkpoint, detector, influence, knn, noising
from pn_jax.research import predictor
from pn_jax.config import tiny_config


def _problem(seed=0, m=240, d=32, n_dims=8):
    # Features with low-rank structure (like real patch features): the other neighbours'
    # residuals are then partly predictable from what the predictor sees.
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(4, d)).astype(np.float32)

    def draw(n, spread=1.0):
        return (rng.normal(size=(n, 4)) @ basis * spread + 0.3 * rng.normal(size=(n, d)) + 3.0).astype(np.float32)

    bank = draw(m)
    dims = np.sort(rng.choice(d, n_dims, replace=False)).astype(np.int32)
    return rng, draw, bank, dims


def test_shapes_and_inputs_match_numpy():
    rng, draw, bank, dims = _problem()
    k = 4
    params = predictor.init_params(len(dims), k, hidden=16, key=jax.random.key(1))
    f = jnp.asarray(draw(50))
    dist, idx = knn.knn(f, jnp.asarray(bank), k=k, block=64)
    out = predictor.influence(params, f, jnp.asarray(bank), dist, idx, jnp.asarray(dims), 1e-3)
    assert out.shape == (50, len(dims))
    # the inputs, built independently in numpy
    fn, i0 = np.asarray(f), np.asarray(idx)[:, 0]
    x_s = fn[:, dims]
    r1 = x_s - bank[i0][:, dims]
    want = 1e-3 * np.asarray(predictor.apply(params, jnp.asarray(x_s), dist, jnp.asarray(r1)))
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-6)
    assert np.all(np.asarray(out) > 0)
    jitted = jax.jit(predictor.apply)(params, jnp.asarray(x_s), dist, jnp.asarray(r1))
    np.testing.assert_allclose(np.asarray(jitted), want / 1e-3, rtol=1e-5)


def test_k1_is_exact_whatever_the_params():
    # With one neighbour the learned term has weight 0: the prediction must equal jax.grad's.
    rng, draw, bank, dims = _problem(seed=1)
    params = predictor.init_params(len(dims), 1, hidden=8, key=jax.random.key(7))
    f = jnp.asarray(draw(40))
    dist, idx = knn.knn(f, jnp.asarray(bank), k=1, block=64)
    got = predictor.influence(params, f, jnp.asarray(bank), dist, idx, jnp.asarray(dims), 1e-2)
    g = jax.grad(lambda x: jnp.sum(knn.exact_distances(x, jnp.asarray(bank), idx)))(f)
    want = 1e-2 * np.abs(np.asarray(g))[:, dims]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-9)


def test_wrong_sizes_are_refused():
    params = predictor.init_params(8, 4, hidden=8)
    with pytest.raises(ValueError, match="fitted for"):
        predictor.apply(params, jnp.zeros((3, 9)), jnp.ones((3, 4)), jnp.zeros((3, 9)))
    with pytest.raises(ValueError, match="predictor params"):
        predictor.apply({"nope": 1}, jnp.zeros((3, 8)), jnp.ones((3, 4)), jnp.zeros((3, 8)))
    with pytest.raises(ValueError, match="D=16 but the bank D=32"):
        predictor.fit_predictor(np.zeros((10, 16), np.float32), np.zeros((20, 32), np.float32),
                                np.arange(4), k=3, key=jax.random.key(0), steps=2)


@pytest.fixture(scope="module")
def fitted():
    rng, draw, bank, dims = _problem(seed=2)
    held = draw(1500)
    fit = predictor.fit_predictor(held, jnp.asarray(bank), dims, k=5, key=jax.random.key(0),
                                  steps=250, hidden=16, batch=256)
    return rng, draw, bank, dims, held, fit


def test_training_lowers_the_loss_and_the_error_against_grad(fitted):
    rng, draw, bank, dims, _, fit = fitted
    assert fit.losses.shape == (250,)
    assert np.all(np.isfinite(fit.losses))
    assert fit.losses[-20:].mean() < 0.75 * fit.losses[:20].mean()
    assert fit.val_loss < 0.6 * fit.val_loss_init
    # fresh normal and off-manifold patches, against the exact reference
    f = jnp.asarray(np.concatenate([draw(100), draw(100, spread=2.5)]))
    b, s = jnp.asarray(bank), jnp.asarray(dims)
    dist, idx = knn.knn(f, b, k=5, block=64)
    ref = np.asarray(influence.grad(f, b, dist, idx, s, 1e-3))
    untrained = predictor.init_params(len(dims), 5, hidden=16, key=jax.random.key(0))

    def err(p):
        return np.median(np.abs(np.asarray(predictor.influence(p, f, b, dist, idx, s, 1e-3)) - ref) / ref)

    assert err(fit.params) < 0.5 * err(untrained), (err(fit.params), err(untrained))
    # ... and beats its own fixed part alone (the k=1 term for every neighbour): learning adds something
    _, dd, r1 = predictor.inputs(f, b, dist, idx, s)
    nearest = 1e-3 * np.abs(np.asarray(r1)) / np.asarray(dd)[:, :1]
    assert err(fit.params) < 0.8 * np.median(np.abs(nearest - ref) / ref)
    assert fit.info["n_normal"] == 1500 and fit.info["n_anomalous"] == 750


def test_fit_is_deterministic_for_a_key(fitted):
    _, _, bank, dims, held, _ = fitted
    fit = lambda key: predictor.fit_predictor(held[:300], jnp.asarray(bank), dims, k=5,  # noqa: E731
                                              key=jax.random.key(key), steps=20, hidden=8, batch=64)
    a, b, c = fit(0), fit(0), fit(1)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(a.losses, b.losses)
    assert not np.array_equal(np.asarray(a.params["inp"]["kernel"]), np.asarray(c.params["inp"]["kernel"]))


def test_anomalous_features_are_used_when_given(fitted):
    _, draw, bank, dims, held, _ = fitted
    fit = predictor.fit_predictor(held[:200], jnp.asarray(bank), dims, k=5, key=jax.random.key(0),
                                  steps=3, hidden=8, anomalous=draw(60, spread=3.0))
    assert fit.info["n_anomalous"] == 60 and fit.info["anomalous_source"].startswith("synthetic")


def test_checkpoint_round_trip(fitted, tmp_path):
    rng, draw, bank, dims, _, fit = fitted
    cfg = tiny_config()
    d = bank.shape[1]
    state = detector.DetectorState(bank=jnp.asarray(bank), dims=jnp.asarray(dims),
                                   params=detector.init_params(d), stats=noising.identity_stats())
    flat = predictor.flatten(fit.params)
    assert all(name.startswith("predictor/") for name in flat)
    checkpoint.save(tmp_path / "ckpt", state, cfg, extra_arrays=flat)
    _, _, meta = checkpoint.load(tmp_path / "ckpt")
    back = predictor.unflatten(meta["extra_arrays"])
    assert jax.tree.structure(back) == jax.tree.structure(fit.params)
    for a, b in zip(jax.tree.leaves(fit.params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    f = jnp.asarray(draw(20))
    dist, idx = knn.knn(f, jnp.asarray(bank), k=5, block=64)
    args = (f, jnp.asarray(bank), dist, idx, jnp.asarray(dims), 1e-3)
    np.testing.assert_array_equal(np.asarray(predictor.influence(fit.params, *args)),
                                  np.asarray(predictor.influence(back, *args)))
