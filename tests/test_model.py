"""The public pipeline: pn_jax.fit / Model.predict / save / load, the threshold, and the
`pn-jax` commands on generated data (issue 11)."""
import csv
import os
import re

import jax
import numpy as np
import pytest
from PIL import Image

import pn_jax
from pn_jax import cli, fitting, metrics
from pn_jax.data import pipeline

TINY = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--embed-dim", "64", "--coreset-ratio", "0.1",
        "--k", "3", "--batch-size", "4", "--figures", "1"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_data")
    pipeline.ensure_synthetic(str(root / "synthetic"))
    return root / "synthetic" / "synthetic"


@pytest.fixture(scope="module")
def model(data_root):
    return pn_jax.fit(pn_jax.tiny_config(), str(data_root / "train" / "good"), log=lambda *_: None)


def test_readme_example_runs_as_written(tmp_path, monkeypatch):
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    block = re.search(r"## Use it on your own images.*?```python\n(.*?)```", readme, re.S).group(1)
    assert len(block.strip().splitlines()) == 6 and "pn_jax.fit" in block and "predict" in block
    monkeypatch.chdir(tmp_path)
    pipeline.ensure_synthetic("data/synthetic")
    exec(compile(block, "README.md", "exec"), {})
    assert os.path.isfile("runs/example/checkpoint/config.json")


def test_predict_accepts_every_input_kind_with_the_same_scores(model, data_root):
    folder = data_root / "test" / "blob"
    paths = sorted(str(p) for p in folder.iterdir())
    by_folder = model.predict(str(folder), progress=False)
    by_list = model.predict(paths[::-1], progress=False)  # another order and batch composition
    by_path = model.predict(paths[1], progress=False)
    assert by_folder.names == paths
    np.testing.assert_allclose(by_list.scores[::-1], by_folder.scores, rtol=1e-5)
    np.testing.assert_allclose(by_path.scores[0], by_folder.scores[1], rtol=1e-5)
    rgb = np.asarray(Image.open(paths[1]).convert("RGB"))
    as_uint8 = model.predict(rgb, progress=False)
    as_float = model.predict(rgb.astype(np.float32) / 255.0, progress=False)
    as_rgba = model.predict(np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], -1), progress=False)
    as_16bit = model.predict(rgb.astype(np.uint16) * 257, progress=False)
    for p in (as_uint8, as_float, as_rgba, as_16bit):
        np.testing.assert_allclose(p.scores[0], by_folder.scores[1], rtol=1e-4)
    gray = model.predict(rgb[..., 0], progress=False)  # grayscale: scored, and maps at its size
    assert np.isfinite(gray.scores[0]) and gray.anomaly_maps[0].shape == rgb.shape[:2]


def test_predict_outputs_at_input_resolution_and_decision(model):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (90, 130, 3), np.uint8)
    pred = model.predict(img, progress=False)
    assert pred.anomaly_maps[0].shape == (90, 130)
    assert pred.influence_maps[0].shape == (90, 130) and pred.noise_maps[0].shape == (90, 130)
    assert pred.normalized[0] == pytest.approx(pred.scores[0] / model.threshold)
    assert pred.labels[0] == (pred.scores[0] >= model.threshold)


def test_unreadable_files_are_named_and_the_rest_scored(model, data_root, tmp_path):
    good = sorted((data_root / "test" / "good").iterdir())[:2]
    for p in good:
        (tmp_path / p.name).write_bytes(p.read_bytes())
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "cut.png").write_bytes(good[0].read_bytes()[:200])
    pred = model.predict(str(tmp_path), progress=False)
    assert len(pred.names) == 5 and set(pred.errors) == {str(tmp_path / n) for n in ("empty.png", "notes.txt", "cut.png")}
    assert all(str(tmp_path / n) in msg for n, msg in
               ((os.path.basename(k), v) for k, v in pred.errors.items()))
    assert np.isfinite(pred.scores).sum() == 2


def test_save_load_round_trip_reproduces_predictions(model, data_root, tmp_path):
    model.save(tmp_path / "ck")
    again = pn_jax.load(tmp_path / "ck")
    assert again.threshold == model.threshold and again.grid == model.grid
    assert again.provenance["weights_sha256"] == model.provenance["weights_sha256"] is not None
    folder = str(data_root / "test" / "scratch")
    np.testing.assert_array_equal(again.predict(folder, progress=False).scores,
                                  model.predict(folder, progress=False).scores)


def test_choose_threshold_f1max_and_quantile_against_brute_force():
    rng = np.random.default_rng(1)
    normal, anomal = rng.normal(0, 1, 50), rng.normal(2, 1, 30)
    thr, _ = pn_jax.choose_threshold(normal, anomal)
    scores = np.concatenate([normal, anomal])
    y = np.r_[np.zeros(50, bool), np.ones(30, bool)]

    def f1(t):
        pred = scores >= t
        tp = np.sum(pred & y)
        return 2 * tp / (pred.sum() + y.sum())

    best = max(f1(t) for t in scores)
    assert f1(thr) == pytest.approx(best)
    assert not np.any(scores == thr)  # halfway to the next lower score, not on a sample
    thr_q, _ = pn_jax.choose_threshold(normal, fpr=0.1)
    assert np.mean(normal >= thr_q) <= 0.1 and np.mean(normal >= np.sort(normal)[-6]) > 0.1


def test_cli_fit_then_predict_labels_match_test_metrics_at_threshold(data_root, tmp_path, capsys):
    import json

    out = tmp_path / "fit"
    assert cli.main(["fit", "--train-dir", str(data_root / "train" / "good"), "--test-dir",
                     str(data_root / "test"), "--out", str(out), *TINY]) == 0
    with open(out / "results.json") as fh:
        res = json.load(fh)
    entry = res["categories"]["synthetic"]
    thr = entry["threshold"]
    assert entry["at_threshold"]["threshold"] == thr and entry["pixel_metrics"] is True
    for e in entry["explanations"]:  # issue 17: per flagged region, its top dims in results.json
        assert all(0 < r["top_share"] <= 1 and len(r["top_dims"]) == 5 for r in e["regions"])
    assert cli.main(["predict", "--checkpoint", str(out / "checkpoint"), str(data_root / "test"),
                     "--out", str(tmp_path / "pred"), "--no-overlays"]) == 0
    with open(tmp_path / "pred" / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    scores = np.array([float(r["score"]) for r in rows])
    labels = np.array([os.path.basename(os.path.dirname(r["path"])) != "good" for r in rows])
    pred = np.array([r["label"] == "anomalous" for r in rows])
    assert np.array_equal(pred, scores >= thr)
    tp, fp = np.sum(pred & labels), np.sum(pred & ~labels)
    assert entry["at_threshold"]["precision"] == pytest.approx(100 * tp / max(tp + fp, 1))
    assert entry["at_threshold"]["recall"] == pytest.approx(100 * tp / labels.sum())
    assert entry["metrics"]["mAUROC_sp_max"] == pytest.approx(100 * metrics.auroc(scores, labels), abs=1e-6)


def test_cli_predict_writes_overlays_and_counts_failures(model, data_root, tmp_path):
    model.save(tmp_path / "ckpts" / "parts")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    src = sorted((data_root / "test" / "blob").iterdir())[0]
    (imgs / "a b.png").write_bytes(src.read_bytes())  # a path with a space
    (imgs / "zero.png").write_bytes(b"")
    rc = cli.main(["predict", "--checkpoint", str(tmp_path / "ckpts"), str(imgs), "--out", str(tmp_path / "p")])
    assert rc == 1  # one file failed
    with open(tmp_path / "p" / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["error"] != "" for r in rows] == [False, True] and "zero.png" in rows[1]["error"]
    assert os.listdir(tmp_path / "p" / "overlays") == ["00000_a b.png"]


def test_checkpoint_parent_and_category_mismatch(model, tmp_path):
    for cat in ("gadget", "widget"):
        model.with_state(model.state, provenance={**model.provenance, "category": cat}).save(tmp_path / "ck" / cat)
    with pytest.raises(pn_jax.model.ModelError, match="several categories"):
        pn_jax.load(tmp_path / "ck")
    assert pn_jax.load(tmp_path / "ck", category="widget").provenance["category"] == "widget"
    only = tmp_path / "one"
    model.save(only / "synthetic")
    assert pn_jax.load(only).grid == model.grid  # a parent with one checkpoint resolves to it
    with pytest.raises(pn_jax.model.ModelError, match="fitted on category 'gadget'"):
        pn_jax.load(tmp_path / "ck" / "gadget", category="widget")  # issue 13.2: refused, not scored
    with pytest.raises(Exception, match="COMMIT|checkpoint|does not exist"):
        pn_jax.load(tmp_path / "nothing_here")


def test_unified_checkpoint_loads_in_test_and_predict(tmp_path, data_root):
    root = tmp_path / "data"
    for name in ("gadget", "widget"):
        pipeline.ensure_synthetic(str(root), name)
    out = tmp_path / "u"
    args = ["--dataset", "synthetic", "--data-root", str(root), "--category", "gadget", "widget", "--unified",
            "--out", str(out), *TINY]
    assert cli.run_main(args) == 0
    ck = out / "checkpoint" / "unified"
    assert cli.main(["test", "--checkpoint", str(ck), "--category", "widget", "--out", str(tmp_path / "t")]) == 0
    assert cli.main(["predict", "--checkpoint", str(ck), str(root / "widget" / "test" / "good"), "--out",
                     str(tmp_path / "p"), "--no-overlays"]) == 0


def test_loaded_model_refuses_other_backbone_weights(model, tmp_path):
    """Issue 12.5: a checkpoint records its weights' sha256; other weights are refused by name."""
    model.save(tmp_path / "ck")
    again = pn_jax.load(tmp_path / "ck")
    again.provenance["weights_sha256"] = "0" * 64  # as if fitted with another weights file
    with pytest.raises(pn_jax.model.ModelError, match="sha256"):
        again.predict(np.zeros((64, 64, 3), np.uint8), progress=False)


def test_score_auto_picks_a_concrete_score_on_validation_and_saves_it(data_root, tmp_path):
    from pn_jax.research import select

    m = pn_jax.fit(pn_jax.tiny_config(noising={"score": "auto"}), str(data_root / "train" / "good"),
                   log=lambda *_: None)
    choice = m.calibration["auto"]["choice"]
    assert choice in select.CANDIDATES and m.cfg.noising.score != "auto"
    normal, anomalous = m.validation[choice]
    assert m.threshold == pn_jax.choose_threshold(normal, anomalous)[0]
    m.save(tmp_path / "ck")
    again = pn_jax.load(tmp_path / "ck")
    assert again.calibration["auto"]["choice"] == choice and again.cfg == m.cfg
    # every candidate's validation scores are saved exactly, so a loaded model can score with
    # another candidate, its threshold chosen on that candidate's own validation scores
    assert sorted(again.validation) == sorted(m.validation) and set(select.CANDIDATES) <= set(again.validation)
    for v in m.validation:
        for a, b in zip(again.validation[v], m.validation[v]):
            np.testing.assert_array_equal(a, b)
    other = next(c for c in select.CANDIDATES if c != choice)
    r = fitting.rethreshold(again, score=other)
    assert r.cfg == select.config_for(m.cfg, other) and r.threshold == pn_jax.choose_threshold(*m.validation[other])[0]
    images = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    want = pn_jax.Model(r.cfg, m.grid, m.state).predict(images, progress=False, maps=False).scores
    got = r.predict(images, progress=False, maps=False)
    np.testing.assert_array_equal(got.scores, want)
    np.testing.assert_array_equal(got.labels, want >= r.threshold)
    # another threshold rule: the (1 - q) quantile of the validation normals (numpy here)
    normal = np.asarray(m.validation[choice][0], np.float64)
    q = fitting.rethreshold(again, threshold_fpr=0.25)
    assert q.threshold == float(np.nextafter(np.quantile(normal, 0.75, method="higher"), np.inf))
    assert q.cfg.threshold_fpr == 0.25 and q.cfg.noising == again.cfg.noising


def test_influence_predictor_is_fitted_saved_and_restored_exactly(data_root, tmp_path):
    cfg = pn_jax.tiny_config(noising={"influence": "predictor", "predictor_steps": 30, "score": "seed"})
    m = pn_jax.fit(cfg, str(data_root / "train" / "good"), log=lambda *_: None)
    info = m.calibration["predictor"]
    assert info["val_loss_after"] < info["val_loss_before"]  # its training lowered the held-back loss
    m.save(tmp_path / "ck")
    again = pn_jax.load(tmp_path / "ck")
    for a, b in zip(jax.tree.leaves(m.state.params["predictor"]), jax.tree.leaves(again.state.params["predictor"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    folder = str(data_root / "test" / "blob")
    np.testing.assert_array_equal(again.predict(folder, progress=False).scores, m.predict(folder, progress=False).scores)
