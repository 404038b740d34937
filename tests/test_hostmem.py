"""The background page-faulting thread never overwrites a row the writer has written."""
import numpy as np
import pytest

from pn_jax import hostmem


@pytest.mark.parametrize("rows_per_write", [1, 3, 50])
def test_prefaulted_array_keeps_every_written_row(monkeypatch, rows_per_write):
    monkeypatch.setattr(hostmem, "CHUNK_BYTES", 4096)  # many small chunks: many chances to race
    rng = np.random.default_rng(rows_per_write)
    data = rng.normal(size=(400, 300)).astype(np.float32)
    for _ in range(5):
        buf = hostmem.PrefaultedArray(data.shape)
        for s in range(0, len(data), rows_per_write):
            e = min(s + rows_per_write, len(data))
            buf.claim(e)[s:e] = data[s:e]
        np.testing.assert_array_equal(buf.close(), data)


def test_close_early_stops_the_thread():
    buf = hostmem.PrefaultedArray((10, 4))
    buf.claim(2)[:2] = 7.0
    arr = buf.close()
    assert not buf._thread.is_alive()
    np.testing.assert_array_equal(arr[:2], 7.0)
