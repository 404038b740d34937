"""experiments.influence_study end to end on a tiny synthetic configuration."""
import json

from experiments import influence_study


def test_influence_study_tiny(tmp_path):
    out = tmp_path / "study"
    rc = influence_study.main([
        "--dataset", "synthetic", "--category", "synthetic", "--image-size", "64",
        "--max-train", "6", "--max-test", "6", "--embed-dim", "64", "--coreset-ratio", "0.25",
        "--k", "3", "--n-images", "2", "--eps-list", "1e-2,1e-3", "--methods", "fd_fixed,grad,predictor",
        "--metrics-methods", "grad,predictor",
        "--predictor-steps", "60", "--predictor-hidden", "8",
        "--timing-repeats", "1", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "influence_study.json").read_text())
    for key in ("agreement", "cost", "metrics", "correlation", "counts", "config", "timings"):
        assert key in doc, key
    assert (out / "influence_study.md").read_text().startswith("# Influence study")
    assert (out / "influence_study.png").stat().st_size > 0

    rows = {(r["method"], r["eps"]): r for r in doc["agreement"]["rows"]}
    methods = ("fd_fixed", "grad", "predictor")
    assert set(rows) == {(m, e) for m in methods for e in (1e-2, 1e-3)}
    for r in rows.values():
        for k in ("rel_err_median", "rel_err_max", "rel_fro", "spearman_entries", "spearman_patches"):
            assert k in r
    assert rows[("grad", 1e-3)]["rel_fro"] == 0.0  # the reference itself
    # first-order finite differences: relative error ~ eps, so it shrinks with eps
    assert rows[("fd_fixed", 1e-3)]["rel_fro"] < rows[("fd_fixed", 1e-2)]["rel_fro"]
    assert rows[("fd_fixed", 1e-3)]["rel_err_median"] < rows[("fd_fixed", 1e-2)]["rel_err_median"]
    assert rows[("fd_fixed", 1e-3)]["spearman_entries"] > 0.99
    assert set(doc["agreement"]["switches"]) == {"0.01", "0.001"}
    assert 0.0 <= doc["agreement"]["switches"]["0.001"]["fraction_entries"] <= 1.0

    assert set(doc["cost"]["methods"]) == set(methods)
    assert doc["cost"]["knn_k_ms"] > 0
    assert set(doc["metrics"]["per_method"]) == {"grad", "predictor"}
    for m in ("grad", "predictor"):
        for score in ("seed", "influence", "proposed"):
            assert "mAUROC_sp_max" in doc["metrics"]["per_method"][m][score]
        assert "mAUPRO_px" in doc["metrics"]["per_method"][m]["influence"]  # synthetic has masks
        assert -1.0 <= doc["correlation"][m]["all"]["spearman"] <= 1.0
    # split by patch class: both classes present on 1 normal + 1 anomalous image
    r = rows[("predictor", 1e-3)]
    assert r["normal"]["n_patches"] > 0 and r["anomalous"]["n_patches"] > 0
    # the learned predictor is eps-free: its relative error does not move with eps (grad is linear in eps)
    assert abs(rows[("predictor", 1e-2)]["rel_err_median"] - r["rel_err_median"]) < 1e-3
    pr = doc["predictor"]
    assert pr["info"]["anomalous_source"].startswith("synthetic") and pr["fit_s"] > 0
    assert pr["val_loss"] < pr["val_loss_init"]
    assert set(doc["metrics"]["baseline"]) == {"patchcore", "distance", "calibrated_rerank"}


def test_local_scoring_path_equals_the_library_for_a_library_estimator():
    # The study scores `predictor` and `nearest` with pieces it assembles itself; for `grad` that
    # path must give exactly what detector.make_signal_fn / normalstats.fit_stats give.
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pn_jax import detector, fitting, normalstats
    from pn_jax.config import tiny_config

    cfg = tiny_config(noising={"influence": "grad", "k": 3}, bank={"knn_block": 16})
    rng = np.random.default_rng(0)
    train = rng.normal(size=(3, 16, 12)).astype(np.float32)
    holdout = rng.normal(size=(2, 16, 12)).astype(np.float32)
    state, _ = fitting.fit_state(cfg, train, holdout, jax.random.key(0))
    nbrs = normalstats.holdout_neighbours(cfg, state.bank, holdout)
    fn = influence_study.estimators(["grad"])["grad"]
    want_stats = normalstats.fit_stats(cfg, state.params, state.bank, state.dims, holdout, nbrs)
    got_stats = influence_study.local_stats(cfg, state.params, state.bank, state.dims, holdout, nbrs, fn)
    for a, b in zip(want_stats, got_stats):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    feats = jnp.asarray(rng.normal(size=(2, 16, 12)).astype(np.float32) * 1.5)
    want = detector.make_signal_fn(cfg, need_influence=True, calibrated=True)(
        state.params, state.bank, state.dims, want_stats, feats)
    got = influence_study.local_signal_fn(cfg, fn)(state.params, state.bank, state.dims, want_stats, feats)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=1e-6, err_msg=key)
