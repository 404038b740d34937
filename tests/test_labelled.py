"""Tuning on a few labelled defects (issue 28): the overlap refusal, exact signal-level
scores, the cross-validated keep-or-drop rule, the F1 threshold and the checkpoint round trip."""
import shutil

import jax
import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

import pn_jax
from pn_jax import cli, fitting, labelled
from pn_jax import model as model_lib
from pn_jax.config import tiny_config
from pn_jax.data import pipeline


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled_data")
    pipeline.ensure_synthetic(str(root / "synthetic"))
    return root / "synthetic" / "synthetic"


@pytest.fixture(scope="module")
def fitted(data_root):
    return pn_jax.fit(tiny_config(), str(data_root / "train" / "good"), log=lambda *_: None)


def _val_dir(tmp_path, data_root, *, extra_good=None, extra_defect=None):
    """A labelled folder made of copies of the synthetic test split (+ optional extra files)."""
    d = tmp_path / "val"
    shutil.copytree(data_root / "test", d)
    if extra_good:
        shutil.copy(extra_good, d / "good" / "copied_from_elsewhere.png")
    if extra_defect:
        defect = sorted(p for p in d.iterdir() if p.name != "good")[0]
        shutil.copy(extra_defect, defect / "copied_test_image.png")
    return d


# ----------------------------------------------------------------------------- refusal
def test_a_validation_set_sharing_a_training_image_is_refused_before_extraction(data_root, tmp_path, monkeypatch):
    train = data_root / "train" / "good"
    shared = sorted(train.iterdir())[3]
    val = _val_dir(tmp_path, data_root, extra_good=shared)
    called = []
    monkeypatch.setattr(model_lib.Model, "extract", lambda *a, **k: called.append(1) or 1 / 0)
    with pytest.raises(labelled.LabelledError) as e:
        pn_jax.fit(tiny_config(), str(train), validation=str(val), log=lambda *_: None)
    msg = str(e.value)
    assert "training" in msg and "copied_from_elsewhere.png" in msg and str(shared) in msg
    assert not called  # refused before any feature was extracted


def test_a_validation_set_sharing_a_test_image_is_refused_by_the_cli(data_root, tmp_path, capsys):
    test_img = sorted((data_root / "test" / "good").iterdir())[0]
    test_dir = tmp_path / "test"
    (test_dir / "good").mkdir(parents=True)
    (test_dir / "bad").mkdir()
    shutil.copy(test_img, test_dir / "good" / "a.png")
    shutil.copy(sorted((data_root / "test" / "blob").iterdir())[0], test_dir / "bad" / "b.png")
    val = tmp_path / "val"
    for sub in ("good", "crack"):
        (val / sub).mkdir(parents=True)
    shutil.copy(sorted((data_root / "test" / "good").iterdir())[1], val / "good" / "g.png")
    shutil.copy(test_dir / "bad" / "b.png", val / "crack" / "renamed.png")  # same content as a test image
    rc = cli.main(["fit", "--train-dir", str(data_root / "train" / "good"), "--test-dir", str(test_dir),
                   "--val-dir", str(val), "--out", str(tmp_path / "out"), "--backbone", "efficientnet_lite0",
                   "--image-size", "64", "--embed-dim", "64"])
    err = capsys.readouterr().err
    assert rc == 2 and "test images" in err and "renamed.png" in err and "b.png" in err


def test_disjoint_check_by_pixels_where_there_is_no_file():
    from pn_jax.data import records

    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    src = lambda xs, names: records.records_source(  # noqa: E731
        [records.make_record(x, None, i % 2, "d", n, "v") for i, (x, n) in enumerate(zip(xs, names))],
        dataset="t", category="t", split="v")
    labelled.check_disjoint(src(imgs[:2], ["a", "b"]), {"training": src(imgs[2:], ["c"])})
    with pytest.raises(labelled.LabelledError, match="b = c"):
        labelled.check_disjoint(src(imgs[:2], ["a", "b"]), {"training": src([imgs[1].copy()], ["c"])})


def test_val_dir_is_refused_in_test_mode_and_needs_a_folder(tmp_path, capsys):
    rc = cli.run_main(["--mode", "test", "--checkpoint", str(tmp_path), "--val-dir", str(tmp_path)])
    assert rc == 2 and "--val-dir" in capsys.readouterr().err
    rc = cli.main(["fit", "--train-dir", str(tmp_path), "--val-dir", str(tmp_path / "nope"),
                   "--out", str(tmp_path / "o")])
    assert rc == 2 and "--val-dir" in capsys.readouterr().err
    (tmp_path / "v" / "scratch").mkdir(parents=True)  # no good/ folder: refused by name, before any fit
    rc = cli.main(["fit", "--train-dir", str(tmp_path), "--val-dir", str(tmp_path / "v"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "--val-dir" in err and "good/" in err


# ----------------------------------------------------------------------------- exact scores
@pytest.mark.parametrize("score", ["calibrated_rerank", "seed"])
def test_signal_level_scores_equal_the_pipeline(data_root, score):
    m = pn_jax.fit(tiny_config(noising={"score": score}), str(data_root / "train" / "good"), log=lambda *_: None)
    feats, y, masks, _ = labelled.labelled_features(m, labelled.as_source(str(data_root / "test")))
    lab = labelled.prepare(m, feats, y, masks, variant=score)
    np.testing.assert_allclose(labelled.image_scores(m, lab, score), m.score_features(feats)["image_scores"],
                               rtol=1e-5)
    theta = labelled.initial_theta(score, feats.shape[-1])  # move the parameters, then compare again
    theta = {k: v + 0.3 * jax.random.normal(jax.random.key(1), v.shape) for k, v in theta.items()}
    state, cfg = labelled.apply_theta(m, score, theta)
    moved = m.with_state(state)
    moved.cfg = cfg
    np.testing.assert_allclose(labelled.image_scores(m, lab, score, state, cfg),
                               moved.score_features(feats)["image_scores"], rtol=1e-5)


def test_folds_split_by_image_stratified_and_seeded():
    y = np.array([0] * 7 + [1] * 5)
    folds = labelled.stratified_folds(y, 3, seed=4)
    assert sorted(np.concatenate(folds).tolist()) == list(range(12))  # each image in exactly one fold
    assert [int(y[f].sum()) for f in folds] in ([2, 2, 1], [2, 1, 2], [1, 2, 2])
    assert all(abs(int((y[f] == 0).sum()) - 7 / 3) < 1 for f in folds)
    assert [f.tolist() for f in labelled.stratified_folds(y, 3, seed=4)] == [f.tolist() for f in folds]
    assert [f.tolist() for f in labelled.stratified_folds(y, 3, seed=5)] != [f.tolist() for f in folds]


def test_pairwise_surrogate_orders_like_auroc():
    rng = np.random.default_rng(0)
    neg = rng.normal(size=40)
    losses, aucs = [], []
    for shift in (-1.0, 0.0, 0.5, 1.0, 3.0):
        pos = rng.normal(size=30) + shift
        losses.append(float(labelled.pairwise_loss(pos, neg)))
        aucs.append(roc_auc_score(np.r_[np.zeros(40), np.ones(30)], np.r_[neg, pos]))
    assert np.all(np.diff(aucs) > 0) and np.all(np.diff(losses) < 0)


# ----------------------------------------------------------------------------- keep or drop
def _feature_model(seed=0, sd=None):
    """A model fitted on generated patch features (N(0, sd^2) per dim; default: dims 0-15 vary
    10x more than dims 16-31)."""
    cfg = tiny_config(noising={"score": "calibrated_rerank"}, model={"target_embed_dimension": 32,
                                                                     "pretrain_embed_dimension": 32})
    rng = np.random.default_rng(seed)
    sd = np.r_[np.full(16, 3.0), np.full(16, 0.3)].astype(np.float32) if sd is None else sd
    gen = lambda n: (rng.normal(size=(n, 64, 32)) * sd).astype(np.float32)  # noqa: E731
    state, report = fitting.fit_state(cfg, gen(12), gen(4), jax.random.key(seed))
    m = model_lib.Model(cfg, (8, 8), state)
    m.bank_owner = report.bank_owner
    return m, gen


def test_tuning_is_dropped_when_labels_are_independent_of_the_features():
    m, gen = _feature_model()
    feats = gen(24)  # all drawn from the normal distribution
    y = np.random.default_rng(3).permutation(np.r_[np.zeros(12, int), np.ones(12, int)])  # labels: coin flips
    lab = labelled.prepare(m, feats, y, variant="calibrated_rerank")
    out, rec = labelled.tune(m, lab, "calibrated_rerank", seed=0, log=lambda *_: None)
    cv = rec["cv"]
    assert rec["kept"] is False and cv["cv_auroc_tuned"] < cv["cv_auroc_untuned"] + labelled.MARGIN
    assert out is m  # the untuned model, parameters untouched
    assert len(cv["per_fold"]) == 5 and sum(f["images"] for f in cv["per_fold"]) == 24
    assert rec["validation_auroc"]["untuned"] == pytest.approx(
        100 * roc_auc_score(y, labelled.image_scores(m, lab, "calibrated_rerank")))


def test_tuning_is_kept_when_the_noise_scale_hides_the_defects():
    m, gen = _feature_model(sd=np.ones(32, np.float32))
    feats = gen(20)
    y = np.r_[np.zeros(10, int), np.ones(10, int)]
    feats[10:, :4, :8] += 4.0  # defects: a shift in dims 0-7 of four patches ...
    s = np.ones(32, np.float32)
    s[:8] = 100.0  # ... which this noise scale whitens away
    m = m.with_state(m.state._replace(params={**m.state.params, "noise_scale": jax.numpy.asarray(s)}))
    lab = labelled.prepare(m, feats, y, variant="calibrated_rerank")
    before = roc_auc_score(y, labelled.image_scores(m, lab, "calibrated_rerank"))
    out, rec = labelled.tune(m, lab, "calibrated_rerank", seed=0, log=lambda *_: None)
    assert rec["kept"] is True, rec["cv"]
    assert rec["cv"]["cv_auroc_tuned"] >= rec["cv"]["cv_auroc_untuned"] + labelled.MARGIN
    after = roc_auc_score(y, labelled.image_scores(out, lab, "calibrated_rerank"))
    assert after > before + 0.05 and rec["validation_auroc"]["tuned"] == pytest.approx(100 * after)
    assert np.asarray(out.state.params["noise_scale"])[:8].mean() < 50  # the hiding scale was undone


# ----------------------------------------------------------------------------- threshold, round trip
def test_threshold_is_f1_max_on_the_labelled_defects_and_the_round_trip_keeps_what_was_tuned(fitted, data_root,
                                                                                            tmp_path):
    val = _val_dir(tmp_path, data_root)
    m = labelled.fit_on_labelled(fitted.with_state(fitted.state), str(val), margin=-1000.0, log=lambda *_: None,
                                 choose_threshold=fitting.choose_threshold)
    rec = m.calibration["labelled"]
    assert rec["tuning"]["kept"] and rec["tuning"]["tuned"] == "noise_scale"
    assert not np.allclose(m.state.params["noise_scale"], fitted.state.params["noise_scale"])
    normal, anom = m.validation["calibrated_rerank"]
    scores, y = np.r_[normal, anom], np.r_[np.zeros(len(normal)), np.ones(len(anom))]
    best = max(f1_score(y, scores >= t) for t in scores)  # sklearn over every threshold
    assert f1_score(y, scores >= m.threshold) == pytest.approx(best)
    assert rec["threshold"]["validation_f1"] == pytest.approx(100 * best) and "labelled defects" in rec["threshold"]["rule"]
    assert rec["good"] == int((y == 0).sum()) and rec["defective"] == int(y.sum())
    m.save(tmp_path / "ck")
    back = pn_jax.load(tmp_path / "ck")
    assert back.calibration["labelled"] == rec
    assert back.threshold == m.threshold
    np.testing.assert_array_equal(back.state.params["noise_scale"], m.state.params["noise_scale"])
    np.testing.assert_array_equal(back.validation["calibrated_rerank"][0], normal)
    feats, *_ = labelled.labelled_features(m, labelled.as_source(str(val)))
    np.testing.assert_allclose(back.score_features(feats)["image_scores"], m.score_features(feats)["image_scores"],
                               rtol=1e-6)


def test_fit_with_val_dir_end_to_end_records_the_labelled_choices(data_root, tmp_path, capsys):
    """pn-jax fit --val-dir --tune --score auto on a train folder and a disjoint test folder:
    results.json and the checkpoint carry the threshold, auto's choice and the CV decision."""
    import json

    val, test = tmp_path / "val", tmp_path / "test"
    for d in (val, test):
        for sub in ("good", "blob"):
            (d / sub).mkdir(parents=True)
    for sub in ("good", "blob"):
        files = sorted((data_root / "test" / sub).iterdir())
        for i, f in enumerate(files):
            shutil.copy(f, (val if i % 2 == 0 else test) / sub / f.name)
    rc = cli.main(["fit", "--train-dir", str(data_root / "train" / "good"), "--test-dir", str(test),
                   "--val-dir", str(val), "--tune", "--score", "auto", "--out", str(tmp_path / "out"),
                   "--backbone", "efficientnet_lite0", "--image-size", "64", "--embed-dim", "64",
                   "--coreset-ratio", "0.1", "--k", "3", "--batch-size", "4", "--figures", "0"])
    out = capsys.readouterr().out
    assert rc == 0 and "labelled tuning" in out and "92.60" not in out  # no synthetic-tuning warning
    entry = next(iter(json.loads((tmp_path / "out" / "results.json").read_text())["categories"].values()))
    rec = entry["calibration"]["labelled"]
    n_val = sum(1 for _ in val.rglob("*.png"))
    assert rec["good"] + rec["defective"] == n_val and rec["auto"]["on"] == "labelled defects"
    assert "cv_auroc_untuned" in rec["tuning"]["cv"] and "cv_auroc_tuned" in rec["tuning"]["cv"]
    assert entry["labelled_tuning"]["kept"] == rec["tuning"]["kept"]
    assert entry["calibration"]["threshold"]["validation"].startswith("labelled set val")
    back = pn_jax.load(tmp_path / "out" / "checkpoint")
    assert back.calibration["labelled"]["auto"]["choice"] == rec["auto"]["choice"]
    assert back.threshold == pytest.approx(entry["threshold"])
