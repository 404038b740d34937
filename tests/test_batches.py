"""The asynchronous batch loop (issue 25): the next batch dispatched before the current one is
handed on, order kept, the last short batch, errors with their file name, one compiled call
per batch, and what a restricted `score_features` copies."""
import jax
import numpy as np
import pytest

import pn_jax
from pn_jax import batches, detector, transfer
from pn_jax.data import preprocess, records
from pn_jax.model import Model


def test_ahead_starts_the_next_item_before_handing_on_the_current_and_keeps_order():
    log = []

    def start(x):
        log.append(("start", x))
        return x * 10

    out = []
    for item, started in batches.ahead(range(5), start):
        log.append(("got", item))
        out.append((item, started))
    assert out == [(i, 10 * i) for i in range(5)]
    # item i is handed on only after item i + 1 was started (the last has no successor)
    for i in range(4):
        assert log.index(("start", i + 1)) < log.index(("got", i))
    assert list(batches.ahead([], start)) == []


def test_ahead_hands_on_the_items_before_an_error_then_raises_it():
    def items():
        yield 1
        yield 2
        raise preprocess.DataError("cannot read /data/bad.png")

    got = []
    with pytest.raises(preprocess.DataError, match="bad.png"):
        for item, _ in batches.ahead(items(), lambda x: x):
            got.append(item)
    assert got == [1, 2]


def _records(n, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return [records.make_record(rng.integers(0, 256, (size, size, 3), np.uint8), None, i % 2,
                                "good" if i % 2 == 0 else "x", f"img{i}.png", "test") for i in range(n)]


@pytest.fixture(scope="module")
def model():
    cfg = pn_jax.tiny_config()
    recs = _records(6, seed=1)
    return pn_jax.fit(cfg, records.records_source(recs, dataset="t", category="t", split="train"),
                      log=lambda *_: None)


def test_feature_batches_last_short_batch_and_order_match_one_image_at_a_time(model):
    recs = _records(7, seed=2)  # batch size 4: batches of 4 and 3
    src = records.records_source(recs, dataset="t", category="t", split="test")
    got = list(batches.feature_batches(model, src))
    assert [len(b["image"]) for b, _ in got] == [4, 3]
    assert [f.shape[0] for _, f in got] == [4, 3]
    assert [str(n) for b, _ in got for n in b["name"]] == [r["name"] for r in recs]
    feats = np.concatenate([np.asarray(f) for _, f in got])
    # reference: each image alone, padded to the batch size by the extractor's caller
    imgs = np.concatenate([b["image"] for b, _ in got])
    one = np.concatenate([np.asarray(model.features(imgs[i:i + 1])) for i in range(len(imgs))])
    np.testing.assert_array_equal(feats, one)
    np.testing.assert_array_equal(batches.extract(model, src), feats)
    waited = list(batches.feature_batches(model, src, lookahead=False))  # the XLA:CPU test pass
    np.testing.assert_array_equal(np.concatenate([np.asarray(f) for _, f in waited]), feats)


def test_a_decode_error_in_a_worker_names_the_file(model, tmp_path):
    bad = tmp_path / "cut.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    recs = _records(5, seed=3) + [records.make_record(str(bad), None, 0, "good", "cut.png", "test")]
    src = records.records_source(recs, dataset="t", category="t", split="test")
    with pytest.raises(preprocess.DataError, match="cut.png"):
        batches.extract(model, src)


def test_fused_extractor_equals_backbone_then_aggregation(model):
    ext = model.extractor
    assert ext._fused is not None  # the real backbone takes the one-call path
    x = np.asarray(np.random.default_rng(4).normal(size=(4, 64, 64, 3)), np.float32)
    maps = ext.backbone(x)
    two_calls = ext._aggregate([maps[l] for l in ext.layers])
    np.testing.assert_array_equal(np.asarray(ext(x)), np.asarray(two_calls))
    assert ext.grid == tuple(maps[ext.layers[0]].shape[1:3])


def test_restricted_outputs_copy_only_what_is_asked_and_equal_the_full_scores(model):
    x = np.asarray(np.random.default_rng(5).normal(size=(6, 64, 64, 3)), np.float32)
    feats = model.features(x)
    full = model.score_features(feats, (None, "patchcore"))
    few = model.score_features(np.asarray(feats), (None, "patchcore"), outputs=("image_scores",))
    assert set(few) == {"image_scores", "variants"}
    np.testing.assert_array_equal(few["image_scores"], full["image_scores"])
    for v in (None, "patchcore"):
        np.testing.assert_array_equal(few["variants"][v][0], full["variants"][v][0])
        assert few["variants"][v][1] is None
    # the image score is the max of the blurred map it came from (literal numpy)
    np.testing.assert_array_equal(full["image_scores"], full["anomaly_maps"].reshape(6, -1).max(-1))


def test_scoring_batches_compiles_once(model):
    scorer = model.scorer((None,))
    x = np.asarray(np.random.default_rng(6).normal(size=(12, 64, 64, 3)), np.float32)
    model.score_features(model.features(x[:4]))
    before = dict(scorer.traces)
    for s in (4, 8):  # two more full batches, then a short one
        model.score_features(model.features(x[s:s + 4]))
    model.score_features(model.features(x[:3]))
    assert scorer.traces == before


def test_to_device_is_a_copy_and_compiles_nothing():
    import jax.monitoring
    import jax.numpy as jnp

    seen = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *_a, **_k: seen.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
    a = np.arange(37 * 3, dtype=np.float64).reshape(37, 3)  # a shape nothing else here uses
    d = transfer.to_device(a)
    assert d.dtype == jnp.float32 and np.array_equal(np.asarray(d), a.astype(np.float32))
    assert seen == []
    a[0, 0] = -1.0  # a copy: later host writes do not reach the device array
    assert float(d[0, 0]) == 0.0


def test_compile_ahead_compiles_what_scoring_then_calls(model):
    import jax.monitoring

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *_a, **_k: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
    scorer = model.scorer((None,))
    scorer.compile_ahead(model.state, 3)  # a batch size nothing here has used
    from pn_jax import ahead

    ahead.wait(scorer._signals_loo)
    ahead.wait(scorer._signals)
    ahead.wait(scorer._scored)
    host = np.asarray(np.random.default_rng(7).normal(size=(3,) + model.features(
        np.zeros((1, 64, 64, 3), np.float32)).shape[1:]), np.float32)
    compiles.clear()
    sig = scorer.signals(model.state, transfer.to_device(host))
    scorer.scored_maps(sig["nearest"])
    assert compiles == []
    # and a shape that was not compiled ahead does compile (the listener sees compiles)
    scorer.signals(model.state, transfer.to_device(host[:2]))
    assert compiles
