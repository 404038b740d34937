"""The four influence estimators agree with jax.grad to O(eps^2) where neighbours stay put;
the literal `fd` departs from them exactly where a neighbour switches."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pn_jax import influence, knn


def _problem(seed=0, q=30, m=200, d=48, scale=5.0, offset=20.0):
    rng = np.random.default_rng(seed)
    bank = jnp.asarray(rng.normal(size=(m, d)) * scale + offset, jnp.float32)
    f = jnp.asarray(rng.normal(size=(q, d)) * scale * 1.3 + offset, jnp.float32)
    dist, idx = knn.knn(f, bank, k=5, block=64)
    dims = jnp.arange(0, d, 3, dtype=jnp.int32)
    return f, bank, dist, idx, dims


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def test_jvp_equals_grad():
    f, bank, dist, idx, dims = _problem()
    g = influence.grad(f, bank, dist, idx, dims, 1e-3)
    j = influence.jvp(f, bank, dist, idx, dims, 1e-3)
    assert _rel(j, g) < 1e-5


def test_grad_is_the_analytic_derivative():
    f, bank, dist, idx, dims = _problem()
    r = np.asarray(f)[:, None, :] - np.asarray(bank)[np.asarray(idx)]
    want = 1e-3 * np.mean(np.abs(r / np.asarray(dist)[..., None]), axis=1)[:, np.asarray(dims)]
    assert _rel(influence.grad(f, bank, dist, idx, dims, 1e-3), want) < 1e-5


def test_grad_equals_autodiff_of_the_full_knn_distance():
    # Reference: jax.grad through the k-NN distances over all D dims (full residual rows),
    # one neighbour rank at a time; `grad` differentiates only over the dims S.
    f, bank, dist, idx, dims = _problem(seed=3)
    per_rank = []
    for k in range(idx.shape[1]):
        g = jax.grad(lambda x: jnp.sum(knn.exact_distances(x, bank, idx[:, k:k + 1])))(f)
        per_rank.append(np.abs(np.asarray(g)))
    want = 1e-3 * np.mean(per_rank, axis=0)[:, np.asarray(dims)]
    assert _rel(influence.grad(f, bank, dist, idx, dims, 1e-3), want) < 1e-5


@pytest.mark.parametrize("method", ["fd_fixed", "fd"])
def test_finite_differences_converge_quadratically_to_grad(method):
    f, bank, dist, idx, dims = _problem()
    errs = []
    for eps in (1e-1, 1e-2, 1e-3):
        fd = influence.influence(method, f, bank, dist, idx, dims, eps)
        g = influence.grad(f, bank, dist, idx, dims, eps)
        errs.append(float(np.max(np.abs(np.asarray(fd) - np.asarray(g)))))
    # absolute error ~ C eps^2: each decade of eps buys ~two decades of error
    assert errs[0] / errs[1] > 50 and errs[1] / errs[2] > 30, errs
    assert errs[2] < 1e-6 * 1e-1  # well below the influence itself (~1e-3)


def test_fd_differs_only_where_a_neighbour_switches():
    eps, delta = 1e-2, 1e-3
    d = 4
    # Query 0 at the origin: nearest a=(-1,0,..) at distance 1, runner-up b=(0,-(1+delta),..).
    # Moving +eps along dim 0 pushes a away (1+eps) so b (1+delta) becomes nearest: a switch.
    bank = np.array([[-1, 0, 0, 0], [0, -(1 + delta), 0, 0], [9, 9, 9, 9], [-9, 9, -9, 9]], np.float32)
    rng = np.random.default_rng(0)
    others = rng.normal(size=(5, d)).astype(np.float32) * 0.1 + np.array([9, 9, 9, 9], np.float32)
    f = jnp.asarray(np.concatenate([np.zeros((1, d), np.float32), others]))
    bank = jnp.asarray(bank)
    dist, idx = knn.knn(f, bank, k=1, block=4)
    dims = jnp.arange(d, dtype=jnp.int32)
    lit = np.asarray(influence.fd(f, bank, dist, idx, dims, eps))
    fixed = np.asarray(influence.fd_fixed(f, bank, dist, idx, dims, eps))
    diff = np.abs(lit - fixed) > 1e-6
    assert diff[0, 0] and diff.sum() == 1, diff
    np.testing.assert_allclose(lit[0, 0], np.sqrt((1 + delta) ** 2 + eps ** 2) - 1, rtol=1e-3)
    np.testing.assert_allclose(fixed[0, 0], eps, rtol=1e-3)


def test_fd_fixed_is_accurate_at_realistic_distance_scale():
    """Distances ~100 with eps=1e-4: a naive float32 difference would be off by percents."""
    f, bank, dist, idx, dims = _problem(scale=20.0, offset=50.0, d=64)
    assert float(np.mean(np.asarray(dist))) > 80
    eps = 1e-4
    fd = influence.fd_fixed(f, bank, dist, idx, dims, eps)
    g = influence.grad(f, bank, dist, idx, dims, eps)
    assert _rel(fd, g) < 1e-3
    naive = np.mean(np.abs(np.asarray(
        knn.exact_distances(f.at[:, dims[1]].add(eps), bank, idx)) - np.asarray(dist)), axis=1)
    assert np.max(np.abs(naive - np.asarray(g)[:, 1]) / np.asarray(g)[:, 1]) > 1e-2  # why we avoid it


def test_mean_over_dims_identity():
    f, bank, dist, idx, _ = _problem()
    d = f.shape[-1]
    g = influence.grad(f, bank, dist, idx, jnp.arange(d), 1e-3).mean(-1)
    r = np.asarray(f)[:, None, :] - np.asarray(bank)[np.asarray(idx)]
    want = influence.mean_influence_identity(dist, jnp.asarray(np.abs(r).sum(-1)), 1e-3, d)
    assert _rel(g, want) < 1e-5


@pytest.mark.parametrize("method", ["grad", "jvp"])
def test_zero_distance_has_zero_derivative_not_nan(method):
    """A test patch equal to a bank entry: the derivative of its distance is defined as 0 there
    (sqrt's slope at 0 would otherwise give NaN); the other neighbours keep eps |r_d| / dist."""
    f, bank, _, _, dims = _problem(seed=5, q=6)
    f = f.at[2].set(bank[17]).at[4].set(bank[3])  # two patches sit exactly on bank entries
    dist, idx = knn.knn(f, bank, k=5, block=64)
    assert float(dist[2, 0]) == 0.0 and float(dist[4, 0]) == 0.0
    d64, i64 = np.asarray(dist, np.float64), np.asarray(idx)
    r = np.asarray(f, np.float64)[:, None, :] - np.asarray(bank, np.float64)[i64]
    per = np.where(d64[..., None] > 0, np.abs(r) / np.where(d64 > 0, d64, 1.0)[..., None], 0.0)
    want = 1e-3 * per.mean(axis=1)[:, np.asarray(dims)]
    got = np.asarray(influence.influence(method, f, bank, dist, idx, dims, 1e-3))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-9)
