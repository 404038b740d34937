"""Defaults for every test."""
import pytest


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    # pn_jax downloads missing torchvision weights by default; no test may fetch the real ones
    # (WRN-50-2 is 263 MB). tests/test_download.py lifts this and serves files from loopback.
    from pn_jax import download

    monkeypatch.setenv(download.OFFLINE_ENV, "1")
    monkeypatch.delenv(download.MIRROR_ENV, raising=False)
    monkeypatch.setattr(download, "_policy", None)


def _n_maps() -> int | None:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return None


def _max_maps() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After a test module, drop every compiled XLA program once the process holds more than
    half of Linux's memory-mapping limit. Each XLA:CPU executable keeps a few mappings, the
    caches keep every executable, and the whole suite in one process reached 65256 of the
    default vm.max_map_count = 65530: XLA then segfaulted while compiling (test_tune or
    test_predictor, wherever the limit fell). Clearing only between modules, and only then,
    leaves every module's own caching (and its trace-count tests) as it was."""
    yield
    n = _n_maps()
    if n is not None and n > _max_maps() // 2:
        import gc

        import jax

        from pn_jax import detector

        detector._COMPILED.clear()
        detector._EXTRACTORS.clear()
        jax.clear_caches()
        gc.collect()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    # Every XLA:CPU executable maps its code pages; the whole suite in one process compiles
    # thousands of them and crossed Linux's vm.max_map_count (65530) near its end, where LLVM
    # then segfaulted inside a compile (test_predictor / test_tune, intermittently). Dropping
    # JAX's caches after each test module releases them (~28k maps after three modules without).
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
