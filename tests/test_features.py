import jax.numpy as jnp
import numpy as np
import pytest

from pn_jax import features
from tests import reference


@pytest.mark.parametrize("length,out", [(36, 16), (360, 1024), (4608, 1024), (2048, 1024), (7, 3), (5, 5)])
def test_adaptive_pool_matches_torch_bin_rule(length, out):
    x = np.random.default_rng(0).normal(size=(3, length)).astype(np.float32)
    got = np.asarray(features.adaptive_avg_pool_last(jnp.asarray(x), out))
    np.testing.assert_allclose(got, reference.adaptive_avg_pool1d(x.astype(np.float64), out), atol=2e-6)


def test_upsample_matches_torch_bilinear():
    x = np.random.default_rng(1).normal(size=(2, 5, 7, 3)).astype(np.float32)
    got = np.asarray(features.upsample_bilinear(jnp.asarray(x), (10, 14)))
    np.testing.assert_allclose(got, reference.bilinear_nhwc(x, (10, 14)), atol=1e-5)
    got = np.asarray(features.upsample_bilinear(jnp.asarray(x), (13, 9)))
    np.testing.assert_allclose(got, reference.bilinear_nhwc(x, (13, 9)), atol=1e-5)


@pytest.mark.parametrize("dims", [(32, 24), (36, 24), (64, 64), (200, 160)])  # (36, 24): bins of 9 -> 2
def test_fast_aggregation_equals_direct_definition(dims):
    """Pool-then-upsample (ours) == unfold, upsample, pool, stack, pool (PatchCore's order)."""
    rng = np.random.default_rng(2)
    maps = [rng.normal(size=(2, 8, 8, 5)).astype(np.float32),
            rng.normal(size=(2, 4, 4, 7)).astype(np.float32),
            rng.normal(size=(2, 2, 2, 3)).astype(np.float32)]
    got = np.asarray(features.aggregate([jnp.asarray(m) for m in maps], dims[0], dims[1]))
    want = reference.patchcore_aggregate([m.astype(np.float64) for m in maps], *dims)
    assert got.shape == (2, 64, dims[1])
    np.testing.assert_allclose(got.reshape(-1, dims[1]), want, atol=1e-5)
