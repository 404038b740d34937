"""JAX's persistent compilation cache, on by default under pn_jax's cache folder (issue 25).

A fresh process otherwise compiles every function again: on an accelerator most of a
short run is compilation (the issue's H200 run: a 780k x 1024 coreset took 7.3 s the first
time and 0.34 s the second). With the cache a compiled executable is written to disk once and
read back by later processes with the same program, shapes, jax/jaxlib version and device,
so the numbers are the same; only the compile time goes.

Folder: `$PN_JAX_CACHE/jax_compilation_cache`, default `$XDG_CACHE_HOME/pn_jax/...`
(`~/.cache/pn_jax`, where pn_jax keeps its other downloads). `--no-compile-cache` turns
it off for one command; results.json records which (`runtime.compile_cache`).
"""
from __future__ import annotations

import os
import sys

# Cache only executables that took at least this long to compile: below it, reading the file
# back costs about what compiling does (JAX's default is 1 s; most of pn_jax's CPU compiles
# take 0.1-2 s).
MIN_COMPILE_S = 0.2


def base_dir() -> str:
    if os.environ.get("PN_JAX_CACHE"):
        return os.path.expanduser(os.environ["PN_JAX_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "pn_jax")


def default_dir() -> str:
    return os.path.join(base_dir(), "jax_compilation_cache")


_ACTIVE: list = []


def enable(path: str | None = None) -> str | None:
    """Turn the cache on (this process); returns its folder, or None where it cannot be
    written (a warning says why; the run goes on without it)."""
    import jax

    path = os.path.abspath(path or default_dir())
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is not writable")
    except OSError as e:
        print(f"warning: compilation cache off: cannot write {path} ({e}); set PN_JAX_CACHE to a writable "
              f"folder or pass --no-compile-cache", file=sys.stderr)
        return None
    if active() == path:
        return path
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _reset()
    _ACTIVE[:] = [path]
    return path


def disable() -> None:
    """Off for the rest of this process (a later `enable` turns it on again)."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    jax.config.update("jax_compilation_cache_dir", None)
    _reset()
    _ACTIVE.clear()


def _reset() -> None:
    # JAX reads the cache settings once, at the first compilation after they change only if
    # told to: a process that compiled before (a test suite, a notebook) re-reads them here.
    try:
        from jax._src import compilation_cache

        compilation_cache.reset_cache()
    except (ImportError, AttributeError):  # another jax layout: new settings apply to a fresh process
        pass


def active() -> str | None:
    """The folder in use, or None (off)."""
    return _ACTIVE[0] if _ACTIVE else None


def add_cli_flag(p) -> None:
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not read or write JAX's persistent compilation cache "
                        "(default: on, under $PN_JAX_CACHE or ~/.cache/pn_jax)")
