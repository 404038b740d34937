"""Host arrays onto the device as a plain transfer (issue 25).

`jnp.asarray(numpy_array)` is not a transfer in JAX 0.10: outside a trace it runs a jitted
`stage` program, compiled once per new shape and dtype (a 256 px ELPV run compiled 55 of them,
one per backbone weight shape, 0.5-0.7 s of every run, the persistent cache too small to keep
them). `jax.device_put` copies the bytes with the same dtype rules (float64 -> float32,
int64 -> int32 while x64 is off) and compiles nothing. The copy is a copy: writing to the numpy
array afterwards does not change the device array (checked on XLA:CPU).
"""
from __future__ import annotations

import jax
import numpy as np


def to_device(x, dtype=None) -> jax.Array:
    """A device array of `x` (cast on the host first when `dtype` is given); a device array
    of that dtype is returned as it is."""
    if isinstance(x, jax.Array):
        return x if dtype is None or x.dtype == np.dtype(dtype) else x.astype(dtype)
    return jax.device_put(np.asarray(x) if dtype is None else np.asarray(x, dtype))


def tree_to_device(tree):
    """`to_device` of every leaf of a pytree of host arrays."""
    return jax.tree.map(to_device, tree)
