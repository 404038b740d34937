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


@pytest.fixture(autouse=True, scope="session")
def _compile_cache_of_this_run(tmp_path_factory):
    # The commands turn on JAX's persistent compilation cache (default ~/.cache/pn_jax); the
    # suite keeps its own, empty at the start, so it never writes into the user's cache and a
    # run here starts as cold as CI's. A PN_JAX_CACHE set by the caller is kept.
    import os

    if not os.environ.get("PN_JAX_CACHE"):
        os.environ["PN_JAX_CACHE"] = str(tmp_path_factory.mktemp("pn_jax_cache"))
    yield


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
