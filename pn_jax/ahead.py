"""Ahead-of-time compilation on a background thread (issue 25).

XLA:CPU compiles a program on one core. While the main thread compiles and runs one stage,
`compile(fn, shapes)` compiles a later stage's jitted function on a second thread
(`fn.lower(*shapes).compile()`: the same program a call with arrays of those shapes and dtypes
lowers to, so the call finds the executable in JAX's in-memory cache); `wait(fn)` before the
first call waits for it rather than compiling a second copy. Shapes are
`jax.ShapeDtypeStruct`s without a sharding (a sharding-pinned one lowers to another program).
"""
from __future__ import annotations

import concurrent.futures

_PENDING: dict = {}  # jitted function -> Future of its compile
_POOL: list = []


def compile(fn, shapes) -> None:  # noqa: A001 - the verb is the point
    """Start compiling jitted `fn` for arguments of these shapes (once per function until
    `wait`)."""
    if fn not in _PENDING:
        if not _POOL:
            _POOL.append(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pn_jax-compile"))
        _PENDING[fn] = _POOL[0].submit(lambda: fn.lower(*shapes).compile())


def wait(fn) -> None:
    """Wait for `fn`'s compile, if one is in flight. A failed one is ignored: the call then
    compiles and raises what is wrong itself."""
    fut = _PENDING.pop(fn, None)
    if fut is not None:
        fut.exception()
