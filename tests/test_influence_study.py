"""experiments.influence_study end to end on a tiny synthetic configuration."""
import json

from experiments import influence_study


def test_influence_study_tiny(tmp_path):
    out = tmp_path / "study"
    rc = influence_study.main([
        "--dataset", "synthetic", "--category", "synthetic", "--image-size", "64",
        "--max-train", "6", "--max-test", "6", "--embed-dim", "64", "--coreset-ratio", "0.25",
        "--k", "3", "--n-images", "2", "--eps-list", "1e-2,1e-3", "--methods", "fd_fixed,grad",
        "--timing-repeats", "1", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "influence_study.json").read_text())
    for key in ("agreement", "cost", "metrics", "correlation", "counts", "config", "timings"):
        assert key in doc, key
    assert (out / "influence_study.md").read_text().startswith("# Influence study")
    assert (out / "influence_study.png").stat().st_size > 0

    rows = {(r["method"], r["eps"]): r for r in doc["agreement"]["rows"]}
    assert set(rows) == {(m, e) for m in ("fd_fixed", "grad") for e in (1e-2, 1e-3)}
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

    assert set(doc["cost"]["methods"]) == {"fd_fixed", "grad"}
    assert doc["cost"]["knn_k_ms"] > 0
    for m in ("fd_fixed", "grad"):
        assert "mAUROC_sp_max" in doc["metrics"]["per_method"][m]["propose_noising"]
        assert "mAUPRO_px" in doc["metrics"]["per_method"][m]["influence"]  # synthetic has masks
        assert -1.0 <= doc["correlation"][m]["all"]["spearman"] <= 1.0
