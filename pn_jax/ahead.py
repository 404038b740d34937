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
import threading

_PENDING: dict = {}  # (jitted function, shapes) -> Future of its compile
_POOL: list = []
_LOCK = threading.Lock()  # `wait` may be called from `batches.in_flight`'s threads


def compile(fn, shapes, **static) -> None:  # noqa: A001 - the verb is the point
    """Start compiling jitted `fn` for arguments of these shapes (and these static keyword
    arguments), once per function and shapes until `wait`."""
    key = (fn, repr((shapes, sorted(static.items()))))
    with _LOCK:
        if key not in _PENDING:
            _PENDING[key] = _pool().submit(lambda: fn.lower(*shapes, **static).compile())


def wait(fn) -> None:
    """Wait for `fn`'s compiles, if any are in flight. A failed one is ignored: the call then
    compiles and raises what is wrong itself."""
    with _LOCK:
        futs = [_PENDING.pop(k) for k in [k for k in _PENDING if k[0] is fn]]
    for fut in futs:
        fut.exception()


def submit(fn) -> concurrent.futures.Future:
    """Run fn() on the background thread, after the compiles queued before it (work that needs
    nothing the main thread is computing, e.g. the fit's random dims beside its coreset)."""
    with _LOCK:
        return _pool().submit(fn)


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    if not _POOL:
        _POOL.append(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pn_jax-compile"))
    return _POOL[0]
