"""Coarse-to-fine explanation: full-D influence against jax.grad, one trace for any number of
flagged patches, regions and residual shares against a numpy reference."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pn_jax import knn
from pn_jax.research import explain

GRID = (6, 6)
D, M, K = 24, 80, 3


def _setup(seed=0):
    rng = np.random.default_rng(seed)
    bank = (rng.normal(size=(M, D)) * 2.0 + 5.0).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, D).astype(np.float32)
    # every patch near a bank entry (normal), then two anomalous regions
    feats = bank[rng.integers(0, M, GRID[0] * GRID[1])] + 0.05 * rng.normal(size=(GRID[0] * GRID[1], D))
    scores = np.zeros(GRID[0] * GRID[1])
    region_a = [0, 1, 6, 7]  # top-left 2x2
    region_b = [22, 29]  # (3,4) and (4,5): touching only diagonally, one 8-connected region
    feats[region_a, 3] += 15.0
    feats[region_a, 11] += 9.0
    feats[region_b, 17] -= 12.0
    scores[region_a] = [5, 6, 4, 3]
    scores[region_b] = [2, 7]
    return rng, bank, scale, feats.astype(np.float32), scores


def _numpy_reference(f, bank, scale, eps):
    """Brute-force K-NN, full-D |d dist_k / d f| by jax.grad, whitened residual to the
    smallest whitened distance among the K Euclidean nearest."""
    d_all = np.sqrt(((f[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1))
    idx = np.argsort(d_all, axis=1, kind="stable")[:, :K]
    per_rank = []
    for r in range(K):
        g = jax.grad(lambda x: jnp.sum(knn.exact_distances(x, jnp.asarray(bank), jnp.asarray(idx[:, r:r + 1]))))(
            jnp.asarray(f))
        per_rank.append(np.abs(np.asarray(g)))
    infl = eps * np.mean(per_rank, axis=0)
    res = f[:, None, :] - bank[idx]
    dw = np.sqrt(((res / scale) ** 2).sum(-1))
    nn = idx[np.arange(len(f)), dw.argmin(1)]
    return infl, (f - bank[nn]) / scale


def test_full_d_influence_matches_jax_grad_on_flagged_patches():
    _, bank, scale, feats, scores = _setup()
    ex = explain.Explainer(bank, scale, k=K, eps=1e-3, batch=4, top=3)
    flagged = np.flatnonzero(scores > 1.0)
    infl, w = ex.fine(feats[flagged])
    ref_infl, ref_w = _numpy_reference(feats[flagged], bank, scale, 1e-3)
    assert infl.shape == (len(flagged), D)
    np.testing.assert_allclose(infl, ref_infl, rtol=2e-4, atol=1e-9)
    np.testing.assert_allclose(w, ref_w, rtol=1e-4, atol=1e-4)


def test_one_trace_for_any_number_of_flagged_patches():
    rng, bank, scale, feats, scores = _setup()
    ex = explain.Explainer(bank, scale, k=K, eps=1e-3, batch=4)
    ex.explain(feats, scores, GRID, threshold=1.0)  # 6 flagged: 2 batches
    few = np.where(np.arange(len(scores)) == 1, 10.0, 0.0)  # 1 flagged: 1 batch
    ex.explain(feats, few, GRID, threshold=1.0)
    many = rng.uniform(2, 3, len(scores))  # all 36 flagged: 9 batches
    ex.explain(feats, many, GRID, threshold=1.0)
    assert ex.traces == 1
    none = ex.explain(feats, np.zeros(len(scores)), GRID, threshold=1.0)[0]
    assert none["n_flagged"] == 0 and none["regions"] == []


def test_regions_and_top_dims():
    _, bank, scale, feats, scores = _setup()
    ex = explain.Explainer(bank, scale, k=K, eps=1e-3, batch=8, top=3)
    (out,) = ex.explain(feats[None], scores[None], GRID, threshold=1.0, names=["img0"])
    json.dumps(out)  # JSON-able
    assert out["image"] == "img0" and out["n_flagged"] == 6
    regs = out["regions"]
    assert [r["n_patches"] for r in regs] == [2, 4]  # sorted by max score: region_b (7) first
    b, a = regs
    assert a["bbox_grid"] == [0, 0, 2, 2] and b["bbox_grid"] == [3, 4, 5, 6]
    assert a["top_dims"][0]["dim"] == 3 and a["top_dims"][1]["dim"] == 11
    assert b["top_dims"][0]["dim"] == 17
    # shares against numpy on the region's patches
    _, ref_w = _numpy_reference(feats[[0, 1, 6, 7]], bank, scale, 1e-3)
    sq = (ref_w ** 2).sum(0)
    share = sq / sq.sum()
    for t in a["top_dims"]:
        assert t["share"] == pytest.approx(share[t["dim"]], rel=1e-3)
    cum = np.cumsum(np.sort(share)[::-1])
    assert a["dims_for_half"] == int(np.searchsorted(cum, 0.5) + 1)
    assert a["top_share"] == pytest.approx(sum(t["share"] for t in a["top_dims"]))
    assert a["max_score"] == 6 and b["max_score"] == 7


def test_bad_inputs_are_refused():
    _, bank, scale, feats, scores = _setup()
    with pytest.raises(ValueError, match="noise_scale"):
        explain.Explainer(bank, scale[:5], k=K, eps=1e-3)
    ex = explain.Explainer(bank, scale, k=K, eps=1e-3)
    with pytest.raises(ValueError, match="disagree"):
        ex.explain(feats, scores[:10], GRID, threshold=1.0)


def test_figure(tmp_path):
    _, bank, scale, feats, scores = _setup()
    ex = explain.Explainer(bank, scale, k=K, eps=1e-3, batch=8)
    (out,) = ex.explain(feats, scores, GRID, threshold=1.0)
    lab = explain.label_grid(scores, GRID, 1.0)
    assert set(np.unique(lab)) == {0, 1, 2}
    img = np.zeros((48, 48, 3))
    amap = np.kron(scores.reshape(GRID), np.ones((8, 8)))
    p = explain.save_explanation_figure(str(tmp_path / "e.png"), img, amap, lab, out, "t")
    assert (tmp_path / "e.png").stat().st_size > 0 and p.endswith("e.png")
