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
