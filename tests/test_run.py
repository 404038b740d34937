"""End to end through `python -m experiments.run` on generated MVTec-layout data."""
import json
import os

import pytest

from experiments import run
from pn_jax import fitting
from pn_jax.data import READ_LOG

TINY = ["--dataset", "synthetic", "--category", "synthetic", "--image-size", "64", "--embed-dim", "64",
        "--coreset-ratio", "0.1", "--k", "3", "--batch-size", "4", "--figures", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    args = TINY + ["--data-root", str(tmp / "data"), "--out", str(tmp / "train"), "--tune", "--holdout-fraction", "0.25"]
    READ_LOG.clear()
    seen = {}
    real_tune = fitting.tune_state

    def spy(*a, **kw):  # splits read by the time tuning has finished
        out = real_tune(*a, **kw)
        seen["after_tuning"] = set(READ_LOG.splits())
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fitting, "tune_state", spy)
        assert run.main(args) == 0
    seen["end"] = set(READ_LOG.splits())
    return tmp, json.load(open(tmp / "train" / "results.json")), seen


def test_train_run_writes_results_figures_and_checkpoint(trained):
    tmp, res, _ = trained
    entry = res["categories"]["synthetic"]
    for key in ("mAUROC_sp_max", "mAUROC_px", "mAUPRO_px", "mAP_px", "mF1_max_px"):
        assert 0 <= entry["metrics"][key] <= 100
    assert entry["metrics"]["mAUROC_sp_max"] > 80  # obvious synthetic defects
    assert entry["config"]["data"]["image_size"] == 64
    assert all(os.path.isfile(p) for p in entry["figures"])
    assert len([p for p in entry["figures"] if "explain_" not in os.path.basename(p)]) == 2
    assert os.path.isfile(entry["tune_plot"])
    assert os.path.isdir(tmp / "train" / "checkpoint" / "synthetic")
    assert set(entry["test_before_after_tuning"]) == {"untuned", "tuned"}


def test_fit_and_tuning_read_no_test_image(trained):
    _, _, seen = trained
    assert seen["after_tuning"] == {"train", "holdout", "validation", "validation_tune"}  # validation: the threshold
    assert "test" in seen["end"]  # read only by the final scoring pass


def test_test_mode_reads_no_training_image_and_reproduces_metrics(trained):
    tmp, res, _ = trained
    READ_LOG.clear()
    args = TINY + ["--data-root", str(tmp / "data"), "--out", str(tmp / "test"), "--mode", "test",
                   "--checkpoint", str(tmp / "train" / "checkpoint" / "synthetic")]
    assert run.main(args) == 0
    assert READ_LOG.splits() == {"test"}
    got = json.load(open(tmp / "test" / "results.json"))["categories"]["synthetic"]["metrics"]
    assert got == res["categories"]["synthetic"]["metrics"]


def test_test_mode_counts_are_this_runs(trained):
    """Issue 23.4: results.json counts the images this test run scored; the checkpoint's fit
    counts sit beside them under their own key (and never its training run's test count)."""
    tmp, res, _ = trained
    args = TINY + ["--data-root", str(tmp / "data"), "--out", str(tmp / "test_counts"), "--mode", "test",
                   "--checkpoint", str(tmp / "train" / "checkpoint" / "synthetic"), "--max-test", "5", "--figures", "0"]
    assert run.main(args) == 0
    e = json.load(open(tmp / "test_counts" / "results.json"))["categories"]["synthetic"]
    fit = res["categories"]["synthetic"]["counts"]
    assert fit["test"] > 5 and e["counts"]["test"] == 5 and "train" not in e["counts"]
    assert e["checkpoint_counts"] == {k: fit[k] for k in ("train", "holdout", "train_patches", "bank")}


def test_conflicting_checkpoint_is_refused_naming_the_field(trained, capsys):
    tmp, _, _ = trained
    args = TINY + ["--data-root", str(tmp / "data"), "--out", str(tmp / "bad"), "--mode", "test",
                   "--checkpoint", str(tmp / "train" / "checkpoint" / "synthetic")]
    args[args.index("--image-size") + 1] = "96"
    assert run.main(args) == 2
    assert "image_size" in capsys.readouterr().err


def test_missing_mvtec_fails_fast_with_instructions(tmp_path, capsys):
    assert run.main(["--category", "bottle", "--data-root", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nope") in err and "mvtec" in err.lower() and "--dataset elpv" in err


def test_unified_bank_reports_each_category(tmp_path):
    args = TINY + ["--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "uni"), "--unified",
                   "--figures", "0"]
    args[args.index("--category") + 1: args.index("--category") + 2] = ["synthetic", "synthetic_b"]
    assert run.main(args) == 0
    res = json.load(open(tmp_path / "uni" / "results.json"))
    assert set(res["categories"]) == {"synthetic", "synthetic_b"}
    a, b = (res["categories"][c] for c in ("synthetic", "synthetic_b"))
    assert a["counts"]["categories_in_bank"] == 2 and a["counts"]["bank"] == b["counts"]["bank"]
    assert a["counts"]["train"] == 2 * 20  # both categories' train images, all of them, in one bank
    assert os.path.isdir(tmp_path / "uni" / "checkpoint" / "unified")


def test_results_record_which_knn_ranking_ran_and_why(trained):
    from pn_jax import hardware, knn

    _, res, _ = trained
    entry = res["categories"]["synthetic"]
    assert entry["knn_ranking"] == hardware.knn_ranking()                 # this run's search
    assert entry["knn_ranking"]["bfloat16"] == knn.default_low() and entry["knn_ranking"]["reason"]
    assert entry["provenance"]["knn_ranking"] == hardware.knn_ranking()   # the fit's, kept in the checkpoint


def test_tfds_data_backend_reproduces_the_direct_metrics(trained, capsys):
    """--data-backend tfds reads the test split through the tensorflow-datasets builder
    (array_record, no TensorFlow): the same records, so the same metrics as the files."""
    tmp, res, _ = trained
    ck = str(tmp / "train" / "checkpoint" / "synthetic")
    base = TINY + ["--data-root", str(tmp / "data"), "--mode", "test", "--checkpoint", ck]
    assert run.main(base + ["--out", str(tmp / "tfds"), "--data-backend", "tfds",
                            "--tfds-dir", str(tmp / "tfds_records")]) == 0
    assert os.path.isdir(tmp / "tfds_records")                          # the records were written there
    got = json.load(open(tmp / "tfds" / "results.json"))["categories"]["synthetic"]
    assert got["metrics"] == res["categories"]["synthetic"]["metrics"]
    assert got["config"]["data"]["backend"] == "tfds"
    assert run.main(base + ["--out", str(tmp / "bad"), "--tfds-dir", str(tmp / "x")]) == 2
    assert "--tfds-dir is read only with --data-backend tfds" in capsys.readouterr().err
