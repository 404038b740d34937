"""Two batches at once on the CPU (issue 25, `batches.in_flight`, `hardware.cpu_streams`) and the
statistics compiled beside the coreset (`normalstats.compile_ahead`): the same bits as one
stream, order and errors kept, and nothing left to compile when the statistics run."""
import threading
import time

import jax
import jax.monitoring
import numpy as np
import pytest

import pn_jax
from pn_jax import ahead, batches, calibration, detector, hardware, normalstats, transfer
from pn_jax.data import preprocess, records
from pn_jax.timing import Timer


def test_in_flight_keeps_order_and_runs_at_most_streams_calls_at_once():
    running, most, threads, waits = [0], [0], [], []
    lock = threading.Lock()

    def fn(x):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        threads.append(threading.current_thread() is threading.main_thread())
        time.sleep(0.02 * (5 - x % 5))  # later items finish first: the order must still hold
        with lock:
            running[0] -= 1
        return x * x

    class Waiting:
        def __enter__(self):
            waits.append(1)

        def __exit__(self, *a):
            pass

    got = list(batches.in_flight(range(9), fn, 2, waiting=Waiting))
    assert got == [(i, i * i) for i in range(9)]
    assert most[0] == 2 and not any(threads)  # every call on the streams' threads
    assert len(waits) == 9  # each call waited for here, once
    # one stream: plain calls on this thread
    threads.clear()
    assert list(batches.in_flight(range(3), fn, 1)) == [(0, 0), (1, 1), (2, 4)]
    assert all(threads)
    assert list(batches.in_flight([], fn, 2)) == []


def test_in_flight_hands_on_the_items_before_an_error_then_raises_it():
    def fn(x):
        if x == 3:
            raise preprocess.DataError("cannot read /data/bad3.png")
        return x

    got = []
    with pytest.raises(preprocess.DataError, match="bad3.png"):
        for item, _ in batches.in_flight(range(6), fn, 2):
            got.append(item)
    assert got == [0, 1, 2]


def test_two_first_calls_at_once_compile_a_jitted_function_once():
    compiled = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _d, **kw: compiled.append(kw.get("fun_name", "")) if event.endswith("backend_compile_duration") else None)

    @jax.jit
    def fresh(x):
        for _ in range(20):
            x = jax.numpy.sin(x) @ x
        return x

    x = jax.numpy.ones((48, 48))
    outs = [np.asarray(o) for _, o in batches.in_flight(range(4), lambda _: jax.block_until_ready(fresh(x)), 2)]
    assert sum("fresh" in c for c in compiled) == 1, compiled
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


def test_cpu_streams_by_backend_and_cores(monkeypatch):
    monkeypatch.setattr(hardware, "usable_cores", lambda: 2)
    assert hardware.cpu_streams("cpu") == 2 and hardware.cpu_streams("gpu") == 1 and hardware.cpu_streams("tpu") == 1
    monkeypatch.setattr(hardware, "usable_cores", lambda: 1)
    assert hardware.cpu_streams("cpu") == 1


def _records(n, seed, size=64):
    rng = np.random.default_rng(seed)
    return [records.make_record(rng.integers(0, 256, (size, size, 3), np.uint8), None, i % 2,
                                "good" if i % 2 == 0 else "x", f"img{i}.png", "test") for i in range(n)]


def _fit_and_test(streams, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_streams", lambda backend=None: streams)
    cfg = pn_jax.tiny_config(batch_size=2)  # several batches in every stage, the last one short
    train = records.records_source(_records(11, seed=1), dataset="t", category="t", split="train")
    model = pn_jax.fit(cfg, train, log=lambda *_: None)
    test = records.records_source(_records(7, seed=2), dataset="t", category="t", split="test")
    res = batches.score_source({"m": model}, test, Timer(), variants=(None, "patchcore"))
    return model, res


def test_two_streams_give_the_one_stream_fit_threshold_and_scores(monkeypatch):
    a, ra = _fit_and_test(1, monkeypatch)
    b, rb = _fit_and_test(2, monkeypatch)
    assert a.calibration["images"] >= 4  # the statistics ran over several image batches
    for name, x, y in zip(a.state.stats._fields, a.state.stats, b.state.stats):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
    np.testing.assert_array_equal(np.asarray(a.state.params["noise_scale"]), np.asarray(b.state.params["noise_scale"]))
    np.testing.assert_array_equal(np.asarray(a.state.dims), np.asarray(b.state.dims))
    for v in a.validation:
        for x, y in zip(a.validation[v], b.validation[v]):
            np.testing.assert_array_equal(x, y)
    assert a.threshold == b.threshold
    assert ra["names"] == rb["names"] == [f"img{i}.png" for i in range(7)]
    for key in ra["scores"]:
        np.testing.assert_array_equal(ra["scores"][key], rb["scores"][key])
        np.testing.assert_array_equal(ra["maps"][key], rb["maps"][key])
    np.testing.assert_array_equal(ra["labels"], rb["labels"])


def test_statistics_compiled_ahead_leave_nothing_to_compile():
    cfg = pn_jax.tiny_config(batch_size=2)
    rng = np.random.default_rng(3)
    m, d, n_patch, n_img = 40, 64, 16, 5  # shapes nothing else in this module uses
    bank = jax.numpy.asarray(rng.normal(size=(m, d)).astype(np.float32))
    bank_owner = np.repeat(np.arange(10), 4).astype(np.int32)
    feats = rng.normal(size=(n_img, n_patch, d)).astype(np.float32)
    owners = np.array([0, 2, 4, 6, 8], np.int32)
    normalstats.compile_ahead(cfg, m, d, n_patch, n_img, loo=True)
    watched = (normalstats._loo_knn, normalstats._holdout_influence, normalstats._stats_from,
               calibration.noise_scale_program)
    for fn in watched:
        ahead.wait(fn)
    compiled = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _d, **kw: compiled.append(kw.get("fun_name", "")) if event.endswith("backend_compile_duration") else None)

    def stats(feats, owners):
        nb = normalstats.loo_neighbours(cfg, bank, bank_owner, feats, owners)
        params = detector.init_params(d)
        flat = transfer.to_device(feats.reshape(-1, d))
        params["noise_scale"] = calibration.fit_noise_scale(bank, flat, shrinkage=cfg.noising.noise_shrinkage,
                                                            floor=cfg.noising.noise_floor, nearest=nb[1])
        dims = normalstats.select_dims(cfg, jax.random.key(1), d)
        return normalstats.fit_stats(cfg, params, bank, dims, feats, nb, exclude=(bank_owner, owners))

    names = ("_loo_knn", "_holdout_influence", "_stats_from", "noise_scale_program", "_bank_tables", "augment_low")
    stats(feats, owners)
    assert not [c for c in compiled if any(n in c for n in names)], compiled
    # the listener does see these programs compile for a sample not compiled ahead
    stats(np.ascontiguousarray(feats[:, :8]), owners)
    assert all(any(n in c for c in compiled) for n in names[:4]), compiled
