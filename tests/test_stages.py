"""Per-stage compile seconds and CPU use (pn_jax.stages, runner.Timer), and the persistent
compilation cache (pn_jax.compile_cache) with its --no-compile-cache flag."""
import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pn_jax import cli, compile_cache, runner, stages


def _busy(seconds: float) -> None:
    end = time.process_time() + seconds
    x = np.ones(1000)
    while time.process_time() < end:
        x = np.sqrt(x + 1.0)


def test_compile_spans_are_merged_and_clipped_to_the_interval():
    c = stages.Clock.__new__(stages.Clock)  # no listener, no sampler: spans given by hand
    import threading

    c._lock, c._spans = threading.Lock(), []
    ev = stages._EVENTS
    c._on_span(ev[0], 100.0, 102.0)          # a trace ...
    c._on_span(ev[0], 100.5, 101.0)          # ... with a nested trace inside it: counted once
    c._on_span(ev[2], 103.0, 104.0)          # a backend compile
    c._on_span("/jax/other/event", 100.0, 110.0)  # not compilation
    assert c.compile_seconds(0, 200) == pytest.approx(3.0)
    assert c.compile_seconds(101.5, 103.5) == pytest.approx(1.0)  # 101.5-102 and 103-103.5
    assert c.compile_seconds(104.0, 200) == 0.0


def test_a_stage_that_compiles_reports_it_and_one_that_does_not_reports_none():
    timer = runner.Timer()
    f = jax.jit(lambda x: jnp.cumsum(jnp.sin(x) * 3.0 + x ** 2, axis=0))
    with timer("compiles"):
        jax.block_until_ready(f(jnp.ones((37, 53))))  # a shape no other test compiles
    with timer("runs"):
        jax.block_until_ready(f(jnp.ones((37, 53))))
        _busy(0.3)
    s = timer.stages()
    assert 0 < s["compiles"]["compile_s"] <= s["compiles"]["wall_s"]
    assert s["compiles"]["run_s"] == pytest.approx(s["compiles"]["wall_s"] - s["compiles"]["compile_s"])
    assert s["runs"]["compile_s"] == 0.0
    for k in s:  # the intervals and the wall seconds of `timings` agree
        assert timer[k] == pytest.approx(s[k]["wall_s"], abs=1e-3)


def test_cpu_percent_matches_the_process_cpu_clock():
    timer = runner.Timer()
    w0, c0 = time.perf_counter(), time.process_time()
    with timer("busy"):
        _busy(0.5)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0  # the independent reference
    s = timer.stages()["busy"]
    # The sampler reads the CPU clock every 50 ms and interpolates at both ends (the other
    # threads of the process add a little too).
    assert s["cpu_s"] == pytest.approx(cpu, abs=0.12)
    assert s["cpu_percent"] == pytest.approx(100 * s["cpu_s"] / s["wall_s"])
    assert s["wall_s"] == pytest.approx(wall, abs=0.01)


def test_stages_timed_by_their_own_code_get_contiguous_intervals():
    timer = runner.Timer()
    t = time.time()
    timer.update({"a_s": 1.0, "b_s": 2.0})  # a ran, then b, ending now
    timer["backbone_s"] = 5.0  # a sum over batches inside other stages: no interval
    (a0, a1), = timer.intervals["a_s"]
    (b0, b1), = timer.intervals["b_s"]
    assert b1 >= t and b1 - b0 == pytest.approx(2.0) and a1 == pytest.approx(b0) and a1 - a0 == pytest.approx(1.0)
    assert "backbone_s" not in timer.intervals and timer["backbone_s"] == 5.0


@pytest.fixture
def cache_off_after():
    yield
    compile_cache.disable()  # the rest of the suite runs as before: no persistent cache


def _ns(**kw):
    return argparse.Namespace(distributed=False, coordinator=None, num_processes=None, process_id=None, **kw)


def test_compile_cache_is_on_by_default_and_the_flag_turns_it_off(tmp_path, monkeypatch, cache_off_after):
    monkeypatch.setenv("PN_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(compile_cache, "MIN_COMPILE_S", 0.0)  # cache even the tiny function below
    seen = {}

    def command(shape):
        def fn(a):
            seen["active"] = compile_cache.active()
            jax.block_until_ready(jax.jit(lambda x: jnp.tanh(x) @ x.T + 1.5)(jnp.ones(shape)))
            return 0
        return fn

    where = tmp_path / "cache" / "jax_compilation_cache"
    assert cli._runtime(command((29, 31)), _ns(no_compile_cache=False), fit=True) == 0
    assert seen["active"] == str(where) and len(os.listdir(where)) >= 1
    before = set(os.listdir(where))
    assert cli._runtime(command((23, 41)), _ns(no_compile_cache=True), fit=True) == 0
    assert seen["active"] is None and set(os.listdir(where)) == before  # nothing written with the flag


def test_every_compiling_command_takes_the_flag():
    p = cli.build_parser()
    for argv in (["fit", "--train-dir", "x"], ["test", "--checkpoint", "c"], ["predict", "--checkpoint", "c",
                 "--out", "o", "x"], ["export", "--checkpoint", "c", "--out", "o"],
                 ["suggest", "--checkpoint", "c", "x"]):
        assert p.parse_args(argv + ["--no-compile-cache"]).no_compile_cache, argv
    assert cli.build_run_parser().parse_args(["--no-compile-cache"]).no_compile_cache


@pytest.mark.slow
def test_results_record_the_cache_and_every_stage(tmp_path, cache_off_after):
    from experiments import run

    args = ["--dataset", "synthetic", "--category", "synthetic", "--image-size", "64", "--embed-dim", "64",
            "--coreset-ratio", "0.1", "--k", "3", "--batch-size", "4", "--figures", "0", "--max-train", "6",
            "--max-test", "6", "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "o"),
            "--no-compile-cache"]
    assert run.main(args) == 0
    r = json.load(open(tmp_path / "o" / "results.json"))
    assert r["runtime"]["compile_cache"] is None
    e = r["categories"]["synthetic"]
    for name in ("extract_train_s", "coreset_s", "stats_s", "threshold_s", "extract_test_s", "score_s"):
        st = e["stages"][name]
        assert 0 <= st["compile_s"] <= st["wall_s"] + 1e-6 and st["cpu_percent"] >= 0
        assert st["wall_s"] == pytest.approx(e["timings"][name], abs=0.05)


def test_decode_workers_follow_the_cores_this_process_may_use(monkeypatch):
    from pn_jax import hardware, model as model_lib
    from pn_jax.data import pipeline

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert hardware.usable_cores() == 3 and hardware.decode_workers() == 3
    seen = {}
    monkeypatch.setattr(pipeline, "make_batches", lambda source, **kw: seen.update(kw) or iter(()))
    m = model_lib.Model.__new__(model_lib.Model)
    m.cfg, m.mean, m.std = __import__("pn_jax").tiny_config(), (0, 0, 0), (1, 1, 1)
    list(m.batches([]))
    assert seen["num_workers"] == 3
    list(m.batches([], num_workers=1))
    assert seen["num_workers"] == 1  # an explicit count is applied as given
