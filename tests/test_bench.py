"""experiments.bench: its pieces against hand computations, a tiny end-to-end run (default
suite) and the --quick run (slow)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from experiments import bench
from pn_jax.config import Config

REPO = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "resnet18", "--image-size", "64", "--n-train", "12", "--n-test-good", "3",
        "--n-test-defect", "2", "--embed-dim", "64", "--coreset-ratio", "0.1", "--k", "3", "--batch-size", "4",
        "--rounds", "1", "--figures", "1", "--probe-repeats", "1", "--compare-images", "4"]


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_benchmarks_use_no_private_pn_jax_names():
    """The benchmarks time the public pipeline: no `obj._name` of pn_jax (issue 11.2).
    bench_backbones reaches into the PyTorch reference model only, which is not pn_jax."""
    for name in ("bench.py", "bench_unified.py"):
        src = (REPO / "experiments" / name).read_text()
        assert not re.findall(r"\._[a-z]\w*", src), name
    hits = re.findall(r"\._[a-z]\w*", (REPO / "experiments" / "bench_backbones.py").read_text())
    assert set(hits) <= {"._swish", "._bn0", "._conv_stem", "._blocks"}, hits


def test_contenders_are_the_configs_the_cli_builds():
    """PatchCore is judged at k = 1 with exactly the CLI's config; each contender differs from
    the run only where its flags say (compared with configs built by Config.replace)."""
    argv = bench.run_argv(bench.parse_args(["--out", "x"] + TINY), Path("/data"), Path("/out"))
    run = bench.config_of(argv)
    assert run.noising.k == 3 and run.noising.method == "propose_noising" and run.model.backbone == "resnet18"
    expected = {
        "patchcore_k1": {"method": "patchcore", "k": 1},
        "patchcore_cli": {"method": "patchcore"},
        "patchcore_run_k": {"method": "patchcore", "k": 3},
        "default_fd_fixed": {"influence": "fd_fixed"},
        "default_grad": {"influence": "grad"},
        "seed_fd_fixed": {"score": "seed", "influence": "fd_fixed"},
        "seed_grad": {"score": "seed", "influence": "grad"},
    }
    got = bench.contenders(argv)
    assert set(got) == set(expected)
    for name, change in expected.items():
        assert bench.config_of(got[name][0]) == run.replace(noising=change), name
    assert Config().noising.score == run.noising.score  # "default" means the shipped default score


def test_with_flags_replaces_or_appends():
    assert bench.with_flags(["--k", "9", "--out", "a"], k=1, method="patchcore") == \
        ["--k", "1", "--out", "a", "--method", "patchcore"]


def test_backbone_batches_counts_every_pass_through_the_backbone():
    # held-out images: 187 bank images -> 24 batches of 8; 22 held out -> 3 batches for their
    # features, then 3 + 3 in the threshold stage (the normals, one synthetic anomaly of each)
    held_out = {"train": 187, "holdout": 22, "test": 84}
    assert bench.backbone_batches(held_out, {}, 8) == {"extract_train_s": 24, "extract_holdout_s": 3,
                                                       "threshold_s": 6, "extract_test_s": 11}
    # leave-one-image-out: 209 bank images -> 27; the anomalies of 20 validation images -> 3
    loo = {"train": 209, "holdout": 0, "test": 84}
    cal = {"threshold": {"validation": "leave-one-image-out on 20 training images"}}
    assert bench.backbone_batches(loo, cal, 8) == {"extract_train_s": 27, "extract_holdout_s": 0,
                                                   "threshold_s": 3, "extract_test_s": 11}
    with pytest.raises(ValueError, match="backbone_batches"):
        bench.backbone_batches(loo, {"threshold": {"validation": "something new"}}, 8)


def test_stage_table_accounts_for_the_whole_process():
    t = {"extract_train_s": 10.0, "coreset_s": 2.0, "stats_s": 1.0, "score_s": 3.0, "metrics_s": 0.5,
         "total_s": 20.0}
    st = bench.stage_table(t, process_wall_s=30.0, results_wall_s=21.0)
    assert st["startup"] == 9.0 and st["report"] == 1.0 and st["other"] == 3.5
    assert sum(st.values()) == pytest.approx(30.0)
    assert sum(bench.stage_table(t).values()) == pytest.approx(20.0)  # in-process: the run's total


def test_post_backbone_fraction_from_the_runs_own_feature_stages():
    bb = {"backbone_share_of_features": 0.9, "compile_s": 5.0}
    stages = {"extract_train_s": 30.0, "threshold_s": 12.0, "extract_test_s": 10.0, "coreset_s": 7.0}
    batches = {"extract_train_s": 10, "extract_holdout_s": 0, "threshold_s": 2, "extract_test_s": 5}
    cold = bench.summarise_run(stages, 100.0, batches, bb, cold=True)
    # features: 30 + 2 threshold batches at 10 s / 5 batches + 10 = 44 s; backbone 0.9 of that
    assert cold["feature_extraction_s"] == pytest.approx(44.0)
    assert cold["backbone_s_by_stage"] == pytest.approx({"extract_train_s": 27.0, "threshold_s": 3.6,
                                                         "extract_test_s": 9.0})
    assert cold["backbone_s"] == pytest.approx(39.6) and cold["post_backbone_fraction"] == pytest.approx(0.604)
    assert cold["post_backbone_fraction_compile_as_overhead"] == pytest.approx(0.654)
    # the threshold stage's share is capped at its own time
    capped = bench.summarise_run({**stages, "threshold_s": 1.0}, 100.0, batches, bb, cold=False)
    assert capped["backbone_s_by_stage"]["threshold_s"] == pytest.approx(0.9)
    assert capped["post_backbone_fraction_compile_as_overhead"] == capped["post_backbone_fraction"]


def test_interleaved_rotates_the_order_and_paired_ratio_is_per_round():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    times = bench.interleaved(fns, 3)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")  # one warm-up call each first
    assert all(len(v) == 3 for v in times.values())
    assert bench.paired_ratio([2.0, 9.0, 3.0], [1.0, 3.0, 3.0]) == 2.0  # median of 2, 3, 1


def test_tiny_end_to_end(tmp_path):
    """The whole benchmark at toy sizes: a fresh-process cold run, two in-process passes, the
    backbone probe and the comparison; the report's numbers agree with each other."""
    out = tmp_path / "bench"
    doc = bench.main(["--out", str(out)] + TINY)
    on_disk = json.loads((out / "bench.json").read_text())
    for key in ("post_backbone_fraction", "influence_overhead", "default_score_overhead", "peak_rss_gb",
                "cold_wall_s", "warm_wall_s", "headline", "warm", "backbone", "comparison", "device", "config",
                "targets_apply"):
        assert key in on_disk, key
    h = on_disk["headline"]
    assert h["command"].startswith("python -m experiments.run ") and "--weights random" in h["command"]
    assert sum(h["stages_s"].values()) == pytest.approx(h["wall_s"], rel=1e-6)
    assert h["post_backbone_fraction"] == pytest.approx(1 - h["backbone_s"] / h["wall_s"])
    assert 0 < on_disk["backbone"]["backbone_share_of_features"] <= 1
    assert 0 < h["post_backbone_fraction"] < 1 and _finite_positive(h["peak_rss_gb"])
    assert h["counts"]["test"] == 3 + 2 * 2 and h["counts"]["test_anomalous"] == 4
    w = on_disk["warm"]
    assert sum(w["stages_s"].values()) == pytest.approx(w["timings"]["total_s"], rel=1e-6)
    c = on_disk["comparison"]["contenders"]
    assert c["patchcore_k1"]["k"] == 1 and c["patchcore_k1"]["method"] == "patchcore"
    assert c["patchcore_k1"]["overhead"] == 1.0
    assert all(_finite_positive(v["overhead"]) and _finite_positive(v["ms_per_image_median"]) for v in c.values())
    assert on_disk["influence_overhead"]["grad"] == c["seed_grad"]["overhead"]
    assert on_disk["targets_apply"] is True and doc["config"]["n_train"] == 12
    md = (out / "bench.md").read_text()
    assert md.startswith("# pn_jax benchmark") and ("| PASS |" in md or "| FAIL |" in md)
    assert (out / "bench.png").stat().st_size > 0
    # Every stage's wall, compile and run seconds and CPU, and images/s of fit and test: the
    # cold run started with an empty compilation cache of its own, so it compiled.
    assert h["compile_cache"] == str(out / "compile_cache" / "jax_compilation_cache")
    for st in h["stages"].values():
        assert st["run_s"] == pytest.approx(st["wall_s"] - st["compile_s"]) and st["compile_s"] >= 0
    assert h["stages"]["coreset_s"]["compile_s"] > 0
    fit_s = sum(h["timings"].get(k) or 0 for k in bench.FIT_STAGES)
    assert on_disk["throughput"]["cold_fit_images_per_s"] == pytest.approx(
        (h["counts"]["train"] + h["counts"]["holdout"]) / fit_s)
    assert "| stage | wall s | compile s | run s | CPU |" in md


@pytest.mark.slow
def test_quick_run_reports_the_same_keys_and_says_targets_are_for_the_full_run(tmp_path):
    out = tmp_path / "quick"
    doc = bench.main(["--out", str(out), "--quick"])
    full_keys = {"post_backbone_fraction", "influence_overhead", "default_score_overhead", "peak_rss_gb",
                 "cold_wall_s", "warm_wall_s", "throughput", "headline", "warm", "warm_first_pass", "backbone",
                 "comparison", "extra_runs", "device", "config", "targets_apply"}
    assert set(doc) == full_keys
    assert doc["targets_apply"] is False
    assert "targets apply to the full run only" in (out / "bench.md").read_text()
    assert doc["headline"]["counts"]["train"] + doc["headline"]["counts"]["holdout"] == 40
