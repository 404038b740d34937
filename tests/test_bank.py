"""k-NN search and greedy coreset against plain numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pn_jax import coreset, knn
from tests import reference


@pytest.mark.parametrize("block", [7, 64, 4096])
def test_blockwise_knn_equals_bruteforce(block):
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(150, 24)).astype(np.float32) * 5 + 30  # large |x|: cancellation-prone
    q = rng.normal(size=(40, 24)).astype(np.float32) * 5 + 30
    d, i = knn.knn(jnp.asarray(q), jnp.asarray(bank), k=9, block=block)
    d_ref, i_ref = reference.knn_bruteforce(q, bank, 9)
    np.testing.assert_array_equal(np.asarray(i), i_ref)
    np.testing.assert_allclose(np.asarray(d), d_ref, rtol=1e-6)


def test_knn_rejects_k_larger_than_bank():
    with pytest.raises(ValueError, match="memory bank has only 5"):
        knn.knn(jnp.zeros((3, 4)), jnp.zeros((5, 4)), k=9)


def test_knn_batched_shapes():
    f = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6, 8)), jnp.float32)
    d, i = knn.knn_batched(f, f.reshape(-1, 8), k=3, block=5)
    assert d.shape == (2, 6, 3) and i.shape == (2, 6, 3)
    np.testing.assert_allclose(np.asarray(d[..., 0]), 0.0, atol=1e-5)  # each point finds itself


def test_greedy_coreset_matches_numpy_reference():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 16)).astype(np.float32)
    starts = np.array([3, 77, 400])
    got = np.asarray(coreset.greedy_select(jnp.asarray(x), jnp.asarray(starts), 40))
    want = reference.greedy_coreset(x.astype(np.float64), starts, 40)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("select", [coreset.greedy_select, coreset.greedy_select_stepwise])
@pytest.mark.parametrize("n_cand", [1, 3, 64, 2000])
def test_batching_selects_the_reference_points(select, n_cand):
    # 1: a new batch every step (the plain loop); 3: a batch every few steps; 2000: all points.
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2000, 12)).astype(np.float32)
    starts = np.array([11, 500, 1999, 7])
    want = reference.greedy_coreset(x.astype(np.float64), starts, 150)
    got = select(jnp.asarray(x), jnp.asarray(starts), 150, n_cand=n_cand, chunks=7)
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("n", [20_000, 20_480])
def test_deferred_batches_match_the_reference_over_many_batches(n):
    # Enough points and steps for many deferred batches, every flush width (64..256) and the
    # chunked pass with a tail (20,000) and without (20,480 = 4 chunks of 5,120). The seed
    # gives data without float32-level near-ties among the largest min-distances (seeds 8
    # and 12 have one: there both float32 loops agree with each other, not with float64).
    rng = np.random.default_rng(9)
    x = (rng.normal(size=(n, 32)) * np.linspace(3, 0.2, 32)).astype(np.float32)
    starts = np.array([3, 9_999, 17])
    got = np.asarray(coreset.greedy_select(jnp.asarray(x), jnp.asarray(starts), 600, chunks=3))
    np.testing.assert_array_equal(got, reference.greedy_coreset(x.astype(np.float64), starts, 600))
    # ... and the same points as the candidate batching, bit for bit in its float32 arithmetic
    np.testing.assert_array_equal(got, np.asarray(coreset.greedy_select_stepwise(jnp.asarray(x), jnp.asarray(starts), 600)))


def test_deferred_batches_break_exact_ties_like_the_reference():
    # Every point three times: min-distances tie exactly; the smallest index must win each time.
    rng = np.random.default_rng(9)
    base = rng.normal(size=(700, 8)).astype(np.float32)
    x = np.concatenate([base, base, base])
    starts = np.array([0, 1234])
    want = reference.greedy_coreset(x.astype(np.float64), starts, 120)
    for n_cand in (5, 256):
        got = coreset.greedy_select(jnp.asarray(x), jnp.asarray(starts), 120, n_cand=n_cand)
        np.testing.assert_array_equal(np.asarray(got), want)


def test_first_argmax_ties_to_smallest_index():
    v = jnp.asarray([0.5, 2.0, -1.0, 2.0, 2.0], jnp.float32)
    assert int(coreset.first_argmax(v)) == int(jnp.argmax(v)) == 1
    assert coreset.n_candidates(10) == 10 and coreset.n_candidates(10**9) >= 1


def test_coreset_indices_seeded_and_sized():
    x = np.random.default_rng(4).normal(size=(1000, 64)).astype(np.float32)
    a = coreset.coreset_indices(jax.random.key(0), x, 0.05, proj_dim=16)
    b = coreset.coreset_indices(jax.random.key(0), x, 0.05, proj_dim=16)
    c = coreset.coreset_indices(jax.random.key(1), x, 0.05, proj_dim=16)
    assert a.shape == (50,) and len(set(np.asarray(a).tolist())) == 50
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_coreset_covers_clusters():
    """k-center picks a point from every well-separated cluster."""
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(6, 32)) * 50
    x = np.concatenate([c + rng.normal(size=(200, 32)) for c in centres]).astype(np.float32)
    idx = np.asarray(coreset.coreset_indices(jax.random.key(0), x, 6 / len(x), proj_dim=128))
    assert sorted(set(idx // 200)) == list(range(6))
