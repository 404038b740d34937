"""experiments.bench: the benchmark's pieces (fast) and a tiny end-to-end run (slow)."""
from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_synthetic_data_is_deterministic_with_masks():
    a = bench.synth_batch("test", [0, 5], 64, (0.5,) * 3, (0.25,) * 3, n_good=2)
    b = bench.synth_batch("test", [0, 5], 64, (0.5,) * 3, (0.25,) * 3, n_good=2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    imgs, masks, labels = a
    assert imgs.shape == (2, 64, 64, 3) and imgs.dtype == np.float32
    assert labels.tolist() == [0, 1]
    assert not masks[0].any() and masks[1].any()
    train = bench.synth_batch("train", [0], 64, (0.5,) * 3, (0.25,) * 3)
    assert not np.array_equal(train[0][0], imgs[0])  # splits draw different images


def test_holdout_count_matches_the_data_layer():
    from pn_jax.data.records import split_train_holdout

    for n in (3, 8, 40, 209):
        train, hold = split_train_holdout(list(range(n)), 0.1, 2, 0)
        assert bench.n_holdout(n, 0.1, 2) == len(hold)


def test_timers_and_compile_meter():
    bench.CompileMeter.install()
    st = bench.Stages()
    import jax

    f = jax.jit(lambda x: jnp.sin(x) * 3.0 + x.shape[0])
    with st("a"):
        f(jnp.ones((7, 3))).block_until_ready()
    assert st.compile["a"] > 0 and st.wall["a"] >= st.compile["a"]
    with st("a"):
        f(jnp.ones((7, 3))).block_until_ready()  # cached: no compile
    t = bench.time_fn(lambda: f(jnp.ones((7, 3))), repeats=2)
    assert 0 < t["min_s"] <= t["median_s"]
    ti = bench.time_interleaved({"x": lambda: f(jnp.ones((7, 3))), "y": lambda: f(jnp.ones((7, 3)))}, 2)
    assert set(ti) == {"x", "y"} and all(v["min_s"] > 0 for v in ti.values())


def test_scaling_point_and_report(tmp_path):
    args = bench.parse_args(["--out", str(tmp_path), "--quick", "--image-size", "64", "--embed-dim", "32",
                             "--scaling-m", "16", "--scaling-d", "32", "--scaling-ratio", "0.5",
                             "--scaling-base-m", "16", "--scaling-methods", "grad", "--repeats", "1"])
    cfg = bench.make_config(args, "efficientnet_lite0", None).replace(noising={"k": 3})
    sc = bench.bench_scaling(args, cfg, (4, 4), repeats=1)
    for axis in ("M", "D", "ratio"):
        for name, ys in sc[axis]["series"].items():
            assert all(_finite_positive(y) for y in ys if y is not None), (axis, name, ys)
    bench.plot_scaling(tmp_path / "bench.png", sc)
    assert (tmp_path / "bench.png").stat().st_size > 0


@pytest.mark.slow
def test_tiny_end_to_end(tmp_path):
    """The whole benchmark (pipeline passes, stage benches, comparison, scaling, peak-RSS
    subprocess) at toy sizes. Minutes on a busy 2-core machine, mostly compilation."""
    out = tmp_path / "bench"
    doc = bench.main(["--out", str(out), "--quick", "--n-train", "8", "--n-test", "4", "--image-size", "64",
                      "--embed-dim", "64", "--coreset-ratio", "0.1", "--batch-size", "2", "--repeats", "1",
                      "--scaling-m", "32", "--scaling-d", "64", "--scaling-ratio", "0.5", "--scaling-base-m", "32"])
    on_disk = json.loads((out / "bench.json").read_text())
    for key in ("influence_overhead", "post_backbone_fraction", "peak_rss_gb", "fd_vs_grad", "stages", "scaling",
                "device", "config", "comparison", "pipelines"):
        assert key in on_disk, key
    assert set(on_disk["influence_overhead"]) == {"fd", "fd_fixed", "grad", "jvp"}
    assert all(_finite_positive(v) for v in on_disk["influence_overhead"].values())
    assert 0 < on_disk["post_backbone_fraction"] < 1
    assert _finite_positive(on_disk["peak_rss_gb"]) and on_disk["peak_rss_gb"] < 64
    assert _finite_positive(on_disk["fd_vs_grad"])
    for name in ("backbone", "aggregation", "coreset", "knn", "influence_fd", "influence_fd_fixed", "influence_grad",
                 "influence_jvp", "maps", "metrics"):
        assert name in on_disk["stages"], name
        assert _finite_positive(on_disk["stages"][name]["min_s"]), name
    w = on_disk["pipelines"]["efficientnet_lite0"]["warm"]
    assert _finite_positive(w["fit_images_per_s"]) and _finite_positive(w["test_images_per_s"])
    assert on_disk["device"]["platform"] and on_disk["device"]["devices"]
    assert (out / "bench.md").read_text().startswith("# pn_jax benchmark")
    assert (out / "bench.png").stat().st_size > 0
    assert doc["config"]["n_train"] == 8


def test_report_renders_from_a_minimal_document():
    """verdicts/render_markdown on a hand-made document (no timing)."""
    stage = {"min_s": 1e-3, "median_s": 2e-3, "per": "image", "n": 1}
    comp = {k: {"scoring_ms_per_image": 2.0, "scoring_ms_per_image_median": 2.0, "signals_ms_per_image": 1.0,
                "overhead": 1.0 if k == "patchcore" else 1.2, "overhead_signals": 1.1,
                "influence_ms_per_image": None if k == "patchcore" else 0.5}
            for k in ("patchcore", "fd", "fd_fixed", "grad", "jvp")}
    warm = {"fit_images_per_s": 1.0, "test_images_per_s": 2.0, "total_s": 10.0, "backbone_s": 8.0,
            "post_backbone_s": 2.0, "post_backbone_fraction": 0.2, "post_backbone_fraction_with_compile": 0.3,
            "dominant_post_backbone_stage": "fit/coreset", "stages_s": {"fit/backbone": 8.0, "fit/coreset": 2.0},
            "compile_s": {"fit/backbone": 0.0, "fit/coreset": 0.0}}
    doc = {"influence_overhead": {m: comp[m]["overhead"] for m in ("fd", "fd_fixed", "grad", "jvp")},
           "post_backbone_fraction": 0.2, "peak_rss_gb": 1.5, "fd_vs_grad": 3.0,
           "peak_rss": {"x": {"peak_rss_gb": 1.5}}, "comparison": comp,
           "stages": {"backbone": stage, "knn": stage, "maps": stage, "influence_fd_fixed": stage},
           "pipelines": {"x": {"warm": warm, "cold": {"total_wall_s": 20.0}, "metrics": {}}},
           "device": {"platform": "cpu", "device_kind": "cpu", "n_devices": 1, "jax": "0", "cpus": 2,
                      "loadavg_start": 1.0, "loadavg_end": 1.0},
           "config": {"primary_backbone": "x", "n_train": 1, "n_test": 1, "image_size": 64, "embed_dim": 8,
                      "coreset_ratio": 0.1, "k": 3, "influence_ratio": 0.1, "batch_size": 1, "quick": True,
                      "weights": {"x": "random"}}}
    rows = bench.verdicts(doc)
    assert [r[3] for r in rows] == [False, False, False, True]
    md = bench.render_markdown(doc)
    assert "| FAIL |" in md and "| PASS |" in md
    assert isinstance(bench.diagnose(doc), list)
