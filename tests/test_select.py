"""`--score auto`'s choice (pn_jax.research.select): AUROC against a brute-force pair count, the
within-tol-of-best rule on constructed cases, determinism, ties, refusals, and independence
from the test split (issue 14.4)."""
import itertools

import numpy as np
import pytest

import pn_jax
from pn_jax.research import select
from pn_jax.data import READ_LOG, pipeline


def brute_auroc(normal, anomalous) -> float:
    """P(anomaly > normal) + P(tie) / 2 over every pair."""
    pairs = [(a > n) + 0.5 * (a == n) for a, n in itertools.product(anomalous, normal)]
    return float(np.mean(pairs))


def separated(rng, n, gap):
    """Normal ~ N(0, 1) and anomalous ~ N(gap, 1) scores."""
    return rng.normal(0, 1, n), rng.normal(gap, 1, n)


def test_auroc_matches_brute_force_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        normal = rng.integers(0, 6, rng.integers(1, 15)).astype(float)  # many exact ties
        anom = rng.integers(2, 8, rng.integers(1, 15)).astype(float)
        assert select.validation_auroc(normal, anom) == pytest.approx(brute_auroc(normal, anom), abs=1e-12)


def test_choice_follows_the_rule():
    rng = np.random.default_rng(1)
    weak, strong = separated(rng, 30, 0.3), separated(rng, 30, 3.0)
    cands = ("calibrated_rerank", "seed")
    # seed clearly better: it replaces the default
    choice, table = select.choose({"calibrated_rerank": weak, "seed": strong}, cands)
    assert choice == "seed"
    assert table["variants"]["seed"]["auroc"] == pytest.approx(brute_auroc(strong[0], strong[1]))
    assert table["variants"]["calibrated_rerank"]["auroc"] == pytest.approx(brute_auroc(weak[0], weak[1]))
    # seed better by exactly one of 30*30 pairs (< 1 point): the default stays
    n, a = np.arange(30.0), np.arange(30.0) + 15
    a_plus = a.copy()
    a_plus[0] += 0.5  # 15.5 beats the normal 15 it tied with: +0.5 of 900 pairs
    assert 0 < brute_auroc(n, a_plus) - brute_auroc(n, a) < select.TOL
    assert select.choose({"calibrated_rerank": (n, a), "seed": (n, a_plus)}, cands)[0] == "calibrated_rerank"
    # with tol 0 the strictly best wins
    assert select.choose({"calibrated_rerank": (n, a), "seed": (n, a_plus)}, cands, tol=0.0)[0] == "seed"


def test_ties_and_determinism():
    rng = np.random.default_rng(2)
    same = separated(rng, 20, 1.0)
    val = {v: same for v in select.CANDIDATES}
    assert select.choose(val)[0] == select.CANDIDATES[0]  # all tied: the first candidate
    const = {v: (np.ones(10), np.ones(10)) for v in select.CANDIDATES}  # every score tied: AUROC 0.5
    choice, table = select.choose(const)
    assert choice == select.CANDIDATES[0] and table["best"] == 0.5
    # a near-tie among the non-default candidates resolves by candidate order, not dict order
    val = {v: separated(np.random.default_rng(3), 40, 0.2) for v in select.CANDIDATES}
    top = separated(np.random.default_rng(4), 40, 4.0)
    val["patchcore"], val["seed_z"] = top, top
    for perm in itertools.permutations(select.CANDIDATES):
        shuffled = {v: val[v] for v in perm}
        assert select.choose(shuffled)[0] == "seed_z"  # before patchcore in CANDIDATES
    assert select.choose(val, ("patchcore", "seed_z"))[0] == "patchcore"


def test_refusals_name_the_problem():
    good = (np.zeros(3), np.ones(3))
    with pytest.raises(select.SelectError, match="seed_z"):
        select.choose({"calibrated_rerank": good, "seed": good}, ("calibrated_rerank", "seed_z"))
    with pytest.raises(select.SelectError, match="non-finite"):
        select.choose({"a": (np.array([0.0, np.nan]), np.ones(2))}, ("a",))
    with pytest.raises(select.SelectError, match="both are needed"):
        select.choose({"a": (np.zeros(0), np.ones(2))}, ("a",))
    with pytest.raises(select.SelectError, match="no candidate"):
        select.choose({"a": good}, ())
    with pytest.raises(select.SelectError, match="repeat"):
        select.choose({"a": good}, ("a", "a"))
    with pytest.raises(select.SelectError, match="tol"):
        select.choose({"a": good}, ("a",), tol=1.5)


def test_choice_does_not_depend_on_the_test_split(tmp_path):
    """Same training images, two different test splits: identical validation scores and choice,
    and fitting reads no test image at all."""
    kw = dict(n_train=8, n_test_good=6, n_test_defect=6, size=64)
    cfg = pn_jax.tiny_config().replace(data={"root": str(tmp_path)})
    splits = [pipeline.load_category("synthetic", str(tmp_path), "sel", holdout_fraction=0.0, holdout_min=0,
                                     max_test=m, seed=s, synthetic_kwargs=kw)
              for m, s in ((6, 0), (12, 5))]
    assert splits[0]["train"].names == splits[1]["train"].names
    assert splits[0]["test"].names != splits[1]["test"].names
    choices = []
    for src in splits:
        READ_LOG.clear()
        model = pn_jax.fit(cfg, src["train"], validation_variants=select.CANDIDATES, log=lambda *_: None)
        assert not any(split == "test" for _, _, split in READ_LOG.splits_read)
        choices.append((select.choose(model.validation), model.validation))
        list(model.predict_iter([src["test"][i]["image"] for i in range(len(src["test"]))], progress=False,
                                maps=False))  # the test split is scored only after the choice
    (c0, t0), v0 = choices[0][0], choices[0][1]
    (c1, t1), v1 = choices[1][0], choices[1][1]
    assert c0 == c1 and t0 == t1
    for v in select.CANDIDATES:
        np.testing.assert_array_equal(v0[v][0], v1[v][0])
        np.testing.assert_array_equal(v0[v][1], v1[v][1])


def test_config_for_scores_as_the_chosen_variant(tmp_path):
    """A model whose config is config_for(cfg, v) scores exactly as variant v of the model the
    choice was made on (same bank and statistics): what `auto` would store in a checkpoint."""
    from pn_jax import model as model_lib

    kw = dict(n_train=8, n_test_good=6, n_test_defect=6, size=64)
    src = pipeline.load_category("synthetic", str(tmp_path), "sel", holdout_fraction=0.0, holdout_min=0,
                                 synthetic_kwargs=kw)
    model = pn_jax.fit(pn_jax.tiny_config(), src["train"], log=lambda *_: None)
    feats = model.extract(src["test"])
    ref = model.score_features(feats, select.CANDIDATES)["variants"]
    for v in select.CANDIDATES:
        chosen = model_lib.Model(select.config_for(model.cfg, v), model.grid, model.state,
                                 extractor=model.extractor)
        got = chosen.score_features(feats)["image_scores"]
        np.testing.assert_allclose(got, ref[v][0], rtol=1e-5, atol=1e-6, err_msg=v)
    with pytest.raises(select.SelectError, match="no configuration"):
        select.config_for(model.cfg, "nonsense")
