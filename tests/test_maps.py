"""Pixel maps against independent references: the Gaussian blur equals
scipy.ndimage.gaussian_filter with the documented border mode ("reflect", truncate 4)."""
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from pn_jax import maps


@pytest.mark.parametrize("shape,sigma", [((2, 64, 48), 4.0), ((1, 9, 13), 4.0), ((3, 20, 20), 1.5),
                                         ((1, 5, 40), 2.3)])
def test_gaussian_blur_equals_scipy_reflect(shape, sigma):
    # (1, 9, 13) and (1, 5, 40): the kernel radius (16 at sigma 4) exceeds the image side, so
    # the border is reflected more than once, as scipy does.
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    x[0, 0, 0] = 10.0  # a spike at a corner: the border mode decides the result near it
    want = np.stack([ndimage.gaussian_filter(m.astype(np.float64), sigma, mode="reflect", truncate=4.0)
                     for m in x])
    got = np.asarray(maps.gaussian_blur(jnp.asarray(x), sigma))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and not another border mode: "nearest"/"mirror"/"constant" differ at the spiked corner
    for other in ("nearest", "mirror", "constant"):
        alt = ndimage.gaussian_filter(x[0].astype(np.float64), sigma, mode=other, truncate=4.0)
        assert np.abs(alt - want[0]).max() > 1e-3, other


def test_zero_sigma_is_identity():
    x = jnp.arange(12.0).reshape(1, 3, 4)
    np.testing.assert_array_equal(np.asarray(maps.gaussian_blur(x, 0.0)), np.asarray(x))
