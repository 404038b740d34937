"""Streamed train features and --max-memory (issue 26): the streamed coreset selects the
in-memory one's points, a streamed fit is the in-memory fit, and a run that cannot fit is
refused before it reads an image."""
import jax
import numpy as np
import pytest

import pn_jax
from pn_jax import cli, coreset, membudget, streaming
from pn_jax import model as model_lib
from pn_jax.config import tiny_config
from pn_jax.data import pipeline


def _store_of(feats, key, proj_dim, batches):
    """A FeatureStore filled batch by batch, as streaming.extract fills it."""
    n, n_patch, d = feats.shape
    store = streaming.FeatureStore(n)
    store._key = key
    proj = np.asarray(coreset.random_projection(coreset.projection_key(key), d, proj_dim))
    store.start(n_patch, d, proj, coreset.HIGHEST)
    for lo, hi in zip(batches[:-1], batches[1:]):
        store.append(feats[lo:hi])
    store.finish(n)
    return store


def test_streamed_coreset_selects_the_in_memory_points():
    # 41 images x 1000 patches = 41,000 rows: the projection chunks (32,768 rows) straddle batches
    rng = np.random.default_rng(0)
    feats = (rng.normal(size=(41, 1000, 48)) * rng.gamma(2.0, size=(1, 1, 48))).astype(np.float32)
    key = jax.random.key(7)
    cfg = tiny_config(bank={"coreset_ratio": 0.01, "coreset_proj_dim": 16})
    store = _store_of(feats, key, 16, [0, 3, 4, 17, 30, 41])  # uneven batches
    try:
        flat = feats.reshape(-1, 48)
        want_proj = coreset.project_chunked(flat, coreset.random_projection(coreset.projection_key(key), 48, 16))
        np.testing.assert_array_equal(store.projected, np.asarray(want_proj))  # bit for bit
        got = store.coreset(key, cfg, progress=False)
        want = np.asarray(coreset.coreset_indices(key, flat, 0.01, 16, cfg.bank.coreset_starts))
        assert len(got) == 410
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(store.rows(got), flat[got])  # the bank's rows read back from disk
        np.testing.assert_array_equal(store[[5, 0, 40]], feats[[5, 0, 40]])
        with pytest.raises(ValueError, match="coreset key differs"):
            store.coreset(jax.random.key(8), cfg)
    finally:
        store.close()


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream_data")
    pipeline.ensure_synthetic(str(root / "synthetic"))
    return root / "synthetic" / "synthetic"


@pytest.mark.parametrize("dim_selection", ["random", "importance"])
def test_streamed_fit_is_the_in_memory_fit(train_dir, dim_selection):
    # batch_size 3: the calibration and validation samples are read back in several batches,
    # the last one partial; everything must still be the whole-array fit's, bit for bit
    cfg = tiny_config(bank={"coreset_proj_dim": 16}, noising={"dim_selection": dim_selection}, batch_size=3)
    quiet = dict(log=lambda *_: None)
    a = pn_jax.fit(cfg, str(train_dir / "train" / "good"), **quiet)
    b = pn_jax.fit(cfg.replace(max_memory_gb=64.0), str(train_dir / "train" / "good"), **quiet)
    np.testing.assert_array_equal(np.asarray(a.state.bank), np.asarray(b.state.bank))
    np.testing.assert_array_equal(a.bank_owner, b.bank_owner)
    assert a.calibration["images"] > 3 and len(a.calibration["validation_images"]) > 3
    np.testing.assert_array_equal(np.asarray(a.state.dims), np.asarray(b.state.dims))
    for name in a.state.params:
        np.testing.assert_array_equal(np.asarray(a.state.params[name]), np.asarray(b.state.params[name]), err_msg=name)
    for name, x, y in zip(a.state.stats._fields, a.state.stats, b.state.stats):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
    assert a.validation.keys() == b.validation.keys()
    for v in a.validation:
        for x, y in zip(a.validation[v], b.validation[v]):
            np.testing.assert_array_equal(x, y)
    assert a.threshold == b.threshold
    test = str(train_dir / "test" / "blob")
    np.testing.assert_array_equal(a.predict(test, progress=False).scores, b.predict(test, progress=False).scores)


def test_a_run_that_cannot_fit_is_refused_before_reading_an_image(train_dir, monkeypatch):
    cfg = tiny_config(data={"image_size": 1024}, max_memory_gb=2.0)
    with pytest.raises(membudget.MemoryBudgetError, match=r"--max-memory 2: this run needs about .* GB"):
        membudget.check(cfg, 400, 300)

    def no_reading(*a, **k):
        raise AssertionError("an image was read before the memory check")

    monkeypatch.setattr(pn_jax.model.Model, "batches", no_reading)
    big = tiny_config(data={"image_size": 1024}, model={"pretrain_embed_dimension": 1024,
                                                        "target_embed_dimension": 1024}, max_memory_gb=1.0)
    with pytest.raises(membudget.MemoryBudgetError, match="--max-memory 1"):
        pn_jax.fit(big, str(train_dir / "train" / "good"), log=lambda *_: None)


def test_max_memory_with_several_devices_is_refused_before_reading_an_image(train_dir, monkeypatch):
    def no_reading(*a, **k):
        raise AssertionError("an image was read before the refusal")

    monkeypatch.setattr(model_lib.Model, "batches", no_reading)
    cfg = tiny_config(max_memory_gb=8.0, devices=2)
    with pytest.raises(model_lib.ModelError, match="--max-memory streams .* drop --devices"):
        pn_jax.fit(cfg, str(train_dir / "train" / "good"), log=lambda *_: None)


def test_estimate_grows_with_what_it_should():
    cfg = tiny_config(data={"image_size": 512}, max_memory_gb=8.0)
    e = membudget.estimate(cfg, 100, 50)
    assert e["patches_per_image"] == 64 * 64  # efficientnet_lite0 blocks4: stride 8
    assert membudget.estimate(cfg, 200, 50)["parts"]["train"] > e["parts"]["train"]
    assert membudget.estimate(cfg, 100, 50, streamed=False)["parts"]["train"] > e["parts"]["train"]
    tiled = membudget.estimate(cfg.replace(data={"tile": 256, "tile_overlap": 32}), 100, 50)
    assert tiled["patches_per_image"] == 9 * 32 * 32  # starts 0, 224, 256 per axis


def test_max_memory_flag_refuses_in_the_cli(train_dir, capsys, tmp_path):
    rc = cli.run_main(["--dataset", "synthetic", "--data-root", str(train_dir.parent), "--image-size", "1024",
                       "--max-memory", "1", "--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error: --max-memory 1: this run needs about" in err and "Traceback" not in err


def test_two_stage_coreset_is_chunk_greedy_then_global_greedy_and_streams_alike():
    """--coreset-preselect against a float64 reference built from its definition: the greedy
    of each 32,768-row chunk keeps ceil(factor * ratio * rows), the global greedy picks
    int(N * ratio) of the survivors; the streamed store selects the same points."""
    from tests import reference

    rng = np.random.default_rng(1)
    feats = rng.normal(size=(70, 1000, 24)).astype(np.float32)  # 70,000 rows: chunks 32768, 32768, 4464
    key, ratio, factor = jax.random.key(3), 0.002, 2.0
    flat = feats.reshape(-1, 24)
    got = np.asarray(coreset.coreset_indices(key, flat, ratio, 8, 10, preselect=factor))
    proj = np.asarray(coreset.project_chunked(flat, coreset.random_projection(coreset.projection_key(key), 24, 8)),
                      np.float64)
    survivors = []
    for c, lo in enumerate(range(0, len(flat), coreset.PRESELECT_CHUNK)):
        part = proj[lo:lo + coreset.PRESELECT_CHUNK]
        k = jax.random.fold_in(jax.random.fold_in(key, 0x5e1ec7), c)
        starts = np.asarray(jax.random.choice(k, len(part), (10,), replace=False))
        keep = int(np.ceil(factor * ratio * len(part)))
        survivors.append(lo + np.sort(reference.greedy_coreset(part, starts, keep)))
    survivors = np.concatenate(survivors)
    starts = np.asarray(jax.random.choice(jax.random.split(key)[1], len(survivors), (10,), replace=False))
    want = survivors[reference.greedy_coreset(proj[survivors], starts, int(len(flat) * ratio))]
    assert len(survivors) == 132 + 132 + 18 and len(got) == 140
    np.testing.assert_array_equal(got, want)
    cfg = tiny_config(bank={"coreset_ratio": ratio, "coreset_proj_dim": 8, "coreset_preselect": factor})
    store = streaming.FeatureStore(70)
    store._key = key
    store.start(1000, 24, np.asarray(coreset.random_projection(coreset.projection_key(key), 24, 8)),
                coreset.HIGHEST, ratio=ratio, preselect=factor, n_starts=10)
    try:
        for lo in range(0, 70, 9):
            store.append(feats[lo:lo + 9])
        store.finish(70)
        np.testing.assert_array_equal(store.coreset(key, cfg, progress=False), want)
    finally:
        store.close()


def test_preselect_flag_is_validated():
    with pytest.raises(ValueError, match=r"--coreset-preselect\) must be 0 \(off\) or >= 1"):
        tiny_config(bank={"coreset_preselect": 0.5})


def test_the_disk_check_counts_the_store_streaming_writes(train_dir, monkeypatch):
    from pn_jax import data

    cfg = tiny_config(max_memory_gb=8.0)
    src = data.folder_source(str(train_dir / "train" / "good"))
    store = streaming.extract(model_lib.Model(cfg, (0, 0), None), src, jax.random.key(0))
    try:
        assert membudget.store_bytes(cfg, len(src)) == __import__("os").path.getsize(store.path)
    finally:
        store.close()
    # a disk with one byte too few is refused by name, before any image is read
    import shutil

    need = membudget.store_bytes(cfg, len(src))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 * need, 9 * need, need - 1))
    with pytest.raises(membudget.MemoryBudgetError, match=r"streams the train features to disk: .* but .* GB are free"):
        membudget.check(cfg, len(src))

    def no_reading(*a, **k):
        raise AssertionError("an image was read before the disk check")

    monkeypatch.setattr(model_lib.Model, "batches", no_reading)
    with pytest.raises(membudget.MemoryBudgetError, match="TMPDIR"):
        pn_jax.fit(cfg, str(train_dir / "train" / "good"), log=lambda *_: None)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 * need, 9 * need - 1, need + 1))
    assert membudget.check(cfg, len(src)) is not None  # enough: accepted
