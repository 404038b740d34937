"""Bad input and faults, as a new user makes them (issue 13): each case is an input, the exit
code it must give and a phrase its one-line message must contain. No case may end in a
traceback (an exception escaping `main` fails the test) or in a silently wrong number."""
import csv
import json
import os
import pickle
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

import pn_jax
from pn_jax import cli, flags
from pn_jax.data import pipeline

TINY = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--embed-dim", "64", "--coreset-ratio", "0.1",
        "--k", "3", "--batch-size", "4", "--figures", "0"]
FIX = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Generated MVTec-shaped data, a few broken files and one fitted checkpoint."""
    t = tmp_path_factory.mktemp("bad")
    pipeline.ensure_synthetic(str(t / "data"), "gadget")
    good = t / "data" / "gadget" / "train" / "good"
    w = {"root": t, "data": t / "data", "good": good, "test": t / "data" / "gadget" / "test"}
    (t / "a_file").write_text("x")
    (t / "empty_dir").mkdir()
    (t / "txt_only").mkdir()
    (t / "txt_only" / "readme.txt").write_text("no images here")
    for name, payload in (("zero", b""), ("cut", (good / sorted(os.listdir(good))[0]).read_bytes()[:100]),
                          ("renamed", b"just text, not a png")):
        d = t / f"train_{name}"
        shutil.copytree(good, d)
        (d / f"bad {name}.png").write_bytes(payload)
    ck = t / "ck" / "gadget"
    model = pn_jax.fit(pn_jax.tiny_config(), str(good), category="gadget", log=lambda *_: None)
    model.save(ck)
    w["ck"] = ck
    # weights files a user might pass by mistake
    (t / "garbage.pth").write_bytes(b"\x00not a pickle at all" * 10)
    (t / "garbage.safetensors").write_bytes(b"\xff" * 64)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {t / 'pwned'}",))

    with zipfile.ZipFile(t / "evil.pth", "w") as zf:
        zf.writestr("m/data.pkl", pickle.dumps({"w": Evil()}, protocol=2))
        zf.writestr("m/version", "3\n")
    shutil.copy(os.path.join(FIX, "resnet_tiny_zip.pth"), t / "other_model.pth")
    old = t / "ck_old" / "gadget"  # as saved before checkpoints kept their validation scores
    shutil.copytree(ck, old)
    meta = json.loads((old / "meta.json").read_text())
    meta.pop("validation_scores", None)
    (old / "meta.json").write_text(json.dumps(meta))
    w["ck_old"] = old
    corrupt = t / "ck_corrupt" / "gadget"
    shutil.copytree(ck, corrupt)
    (corrupt / "meta.json").write_text("{ not json")
    return w


def fmt(s: str, w) -> str:
    return s.format(**{k: str(v) for k, v in w.items()})


# (id, command, argv with {placeholders}, exit code, phrase in stderr)
RUN = "run"  # python -m experiments.run
CASES = [
    # flags refused before any work, naming the flag and the allowed values
    ("seed_negative", RUN, "--seed -1", 2, "--seed"),
    ("embed_dim_zero", RUN, "--embed-dim 0", 2, "--embed-dim"),
    ("max_test_zero", RUN, "--max-test 0", 2, "--max-test"),
    ("max_train_zero", RUN, "--max-train 0", 2, "--max-train"),
    ("devices_abc", RUN, "--devices abc", 2, "--devices"),
    ("devices_too_many", RUN, "--dataset synthetic --data-root {data} --category gadget --devices 64", 2, "JAX sees"),
    ("score_weights_nan", RUN, "--score-weights nan,1,1", 2, "--score-weights"),
    ("score_weights_two", RUN, "--score-weights 1,2", 2, "--score-weights"),
    ("score_weights_text", RUN, "--score-weights a,b,c", 2, "--score-weights"),
    ("coreset_ratio_zero", RUN, "--coreset-ratio 0", 2, "--coreset-ratio"),
    ("coreset_ratio_big", RUN, "--coreset-ratio 1.5", 2, "--coreset-ratio"),
    ("k_zero", RUN, "--k 0", 2, "--k"),
    ("image_size_tiny", RUN, "--image-size 8", 2, "--image-size"),
    ("holdout_one", RUN, "--holdout-fraction 1", 2, "--holdout-fraction"),
    ("threshold_fpr_zero", RUN, "--threshold-fpr 0", 2, "--threshold-fpr"),
    ("eps_negative", RUN, "--eps -1", 2, "--eps"),
    ("unknown_method", RUN, "--method nope", 2, "--method"),
    ("unknown_backbone", RUN, "--dataset synthetic --data-root {data} --category gadget --backbone nope", 2,
     "unknown backbone"),
    ("unknown_layer", RUN, "--dataset synthetic --data-root {data} --category gadget --backbone efficientnet_lite0 "
     "--layers blocks4,nope", 2, "no layer"),
    ("category_all_not_mvtec", RUN, "--dataset synthetic --category all", 2, "MVTec AD's 15"),
    ("category_all_mixed", RUN, "--category all bottle", 2, "cannot be mixed"),
    ("unified_tune", RUN, "--dataset synthetic --data-root {data} --category gadget --unified --tune", 2,
     "--unified"),
    # data that is not there or not readable, named
    ("mvtec_root_missing", RUN, "--category bottle --data-root {root}/nope --no-download", 2, "nope"),
    ("mvtec_category_missing", RUN, "--category widget --data-root {data} --no-download", 2, "widget"),
    ("train_dir_missing", "fit", "--train-dir {root}/nope", 2, "nope"),
    ("train_dir_empty", "fit", "--train-dir {root}/empty_dir", 2, "empty_dir"),
    ("train_dir_no_images", "fit", "--train-dir {root}/txt_only", 2, ".txt"),
    ("train_zero_byte_image", "fit", "--train-dir {root}/train_zero", 2, "bad zero.png"),
    ("train_truncated_image", "fit", "--train-dir {root}/train_cut", 2, "bad cut.png"),
    ("train_text_as_png", "fit", "--train-dir {root}/train_renamed", 2, "bad renamed.png"),
    ("test_dir_alone", "fit", "--test-dir {test}", 2, "--test-dir goes with"),
    ("train_dir_and_dataset", "fit", "--train-dir {good} --dataset synthetic", 2, "--train-dir"),
    ("test_dir_without_good", "fit", "--train-dir {good} --test-dir {root}/txt_only", 2, "good"),
    ("visa_without_csv", "fit", "--dataset visa --data-root {root}/empty_dir --category candle", 2, "1cls.csv"),
    # outputs checked before the fit, not after it
    ("out_under_a_file", RUN, "--dataset synthetic --data-root {data} --category gadget --out {root}/a_file/sub",
     2, "is a file"),
    ("out_unwritable", RUN, "--dataset synthetic --data-root {data} --category gadget --out /proc/pn_jax_out",
     2, "cannot be written"),
    ("checkpoint_under_a_file", RUN, "--dataset synthetic --data-root {data} --category gadget "
     "--checkpoint {root}/a_file/ck", 2, "is a file"),
    # checkpoints
    ("test_without_checkpoint", RUN, "--mode test", 2, "--checkpoint"),
    ("test_with_tune", RUN, "--mode test --checkpoint {ck} --tune", 2, "--tune"),
    ("checkpoint_missing", "test", "--checkpoint {root}/nope", 2, "does not exist"),
    ("checkpoint_corrupt_meta", "test", "--checkpoint {root}/ck_corrupt/gadget", 2, "meta.json"),
    ("checkpoint_other_category", RUN, "--mode test --dataset synthetic --data-root {data} --category widget "
     "--checkpoint {ck}", 2, "fitted on category 'gadget'"),
    ("run_test_flag_conflicts", RUN, "--mode test --dataset synthetic --data-root {data} --category gadget "
     "--checkpoint {ck} --image-size 128", 2, "image_size"),
    # test mode: a flag that changes what the bank, the statistics or the threshold mean is refused
    # by name with the reason (issue 23.3), in both entry points; never dropped without a word
    ("test_k", "test", "--checkpoint {ck} --k 5", 2, "--k 5 cannot apply"),
    ("run_test_k", RUN, "--mode test --checkpoint {ck} --k 5", 2, "--k 5 cannot apply"),
    ("run_test_method", RUN, "--mode test --checkpoint {ck} --method patchcore", 2, "--method patchcore cannot apply"),
    ("run_test_influence", RUN, "--mode test --checkpoint {ck} --influence fd", 2, "--influence fd cannot apply"),
    ("run_test_eps", RUN, "--mode test --checkpoint {ck} --eps 0.1", 2, "--eps 0.1 cannot apply"),
    ("run_test_seed", RUN, "--mode test --checkpoint {ck} --seed 3", 2, "--seed 3 cannot apply"),
    ("run_test_image_score", RUN, "--mode test --checkpoint {ck} --image-score patch_max", 2,
     "--image-score patch_max cannot apply"),
    ("run_test_score_not_fitted", RUN, "--mode test --checkpoint {ck} --score seed", 2,
     "no validation scores for score 'seed'"),
    ("test_score_auto_not_fitted", "test", "--checkpoint {ck} --score auto", 2, "--score auto chooses"),
    ("test_threshold_fpr_old_checkpoint", "test", "--checkpoint {ck_old} --threshold-fpr 0.1", 2,
     "--threshold-fpr 0.1 cannot apply"),
    ("run_test_max_train", RUN, "--mode test --checkpoint {ck} --max-train 3", 2, "--max-train caps"),
    ("run_test_train_dir", RUN, "--mode test --checkpoint {ck} --train-dir {good}", 2, "--train-dir is what"),
    ("run_test_unified", RUN, "--mode test --checkpoint {ck} --unified", 2, "--unified: checkpoint"),
    ("test_other_dataset", "test", "--checkpoint {ck} --dataset visa", 2, "--dataset visa: checkpoint"),
    ("test_devices_too_many", "test", "--checkpoint {ck} --devices 64", 2, "JAX sees"),
    ("predict_missing_checkpoint", "predict", "--checkpoint {root}/nope {good} --out {root}/p1", 2, "does not exist"),
    ("export_missing_checkpoint", "export", "--checkpoint {root}/nope --out {root}/m.jaxexport", 2,
     "does not exist"),
    # weights files: one line naming the file and what is wrong
    ("weights_missing", "fit", "--train-dir {good} --weights {root}/nope.pth --no-download", 2, "nope.pth"),
    ("weights_garbage_pth", "fit", "--train-dir {good} --weights {root}/garbage.pth", 2, "garbage.pth"),
    ("weights_garbage_safetensors", "fit", "--train-dir {good} --weights {root}/garbage.safetensors", 2,
     "garbage.safetensors"),
    ("weights_unsafe_pickle", "fit", "--train-dir {good} --weights {root}/evil.pth", 2, "evil.pth"),
    ("weights_other_model", "fit", "--train-dir {good} --weights {root}/other_model.pth", 2, "missing"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_message(case, world, tmp_path, capsys, monkeypatch):
    _, command, argv, code, phrase = case
    monkeypatch.chdir(tmp_path)  # default --out folders land here
    args = fmt(argv, world).split()
    if command in ("fit",) and not any(a.startswith("--backbone") for a in args):
        args += TINY + ["--out", str(tmp_path / "out")]
    if command == "test" and "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    try:
        rc = cli.run_main(args) if command == RUN else cli.main([command] + args)
    except SystemExit as e:  # argparse's own refusal: "argument --flag: ..." and exit 2
        rc = e.code
    err = capsys.readouterr().err
    assert rc == code, err
    assert phrase in err, err
    assert "Traceback" not in err
    assert not (world["root"] / "pwned").exists()  # the malicious pickle never ran


def test_predict_reports_bad_files_by_name_and_scores_the_rest(world, tmp_path, capsys):
    folder = tmp_path / "photos with spaces"
    folder.mkdir()
    good = sorted(world["good"].iterdir())
    shutil.copy(good[0], folder / "ok.png")
    Image.open(good[1]).convert("RGB").save(folder / "phone.jpg", quality=90)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    frames = [Image.open(good[i]).convert("L") for i in range(2)]
    frames[0].save(folder / "stack.tif", save_all=True, append_images=frames[1:])
    Image.open(good[2]).convert("I;16").save(folder / "depth16.png")
    rc = cli.main(["predict", "--checkpoint", str(world["ck"]), str(folder), str(tmp_path / "missing.png"),
                   "--out", str(tmp_path / "pred"), "--no-overlays"])
    with open(tmp_path / "pred" / "predictions.csv") as fh:
        rows = {os.path.basename(r["path"]): r for r in csv.DictReader(fh)}
    failed = {n for n, r in rows.items() if r["error"]}
    assert failed == {"empty.png", "notes.txt", "stack.tif", "missing.png"}
    assert rc == len(failed)
    assert all(n in rows[n]["error"] for n in failed)
    assert {n for n, r in rows.items() if r["score"]} == {"ok.png", "phone.jpg", "depth16.png"}
    assert "Traceback" not in capsys.readouterr().err


def test_repeated_category_is_scored_once(world, tmp_path, capsys):
    rc = cli.run_main(["--dataset", "synthetic", "--data-root", str(world["data"]), "--category", "gadget", "gadget",
                       "--out", str(tmp_path / "o"), "--max-train", "8", "--max-test", "6", *TINY])
    assert rc == 0 and "given twice" in capsys.readouterr().err
    with open(tmp_path / "o" / "results.json") as fh:
        assert list(json.load(fh)["categories"]) == ["gadget"]


def test_results_json_is_strict_json_with_null_and_reason(world, tmp_path):
    # a test split with a single class makes the image metrics undefined: null, never NaN
    test = tmp_path / "test"
    shutil.copytree(world["test"] / "good", test / "good")
    (test / "scratch").mkdir()  # a defect folder with no images: only normal test images
    rc = cli.main(["fit", "--train-dir", str(world["good"]), "--test-dir", str(test), "--out", str(tmp_path / "o"),
                   *TINY])
    assert rc == 0
    text = (tmp_path / "o" / "results.json").read_text()
    assert "NaN" not in text
    doc = json.loads(text)
    assert doc["categories"]["gadget"]["metrics"]["mAUROC_sp_max"] is None
    assert "categories.gadget.metrics.mAUROC_sp_max" in doc["undefined"]


def test_masks_stored_as_zero_one_give_the_same_pixel_metrics(world, tmp_path):
    """Issue 13.1: a converted dataset with 0/1 masks must not silently lose its defects."""
    root = tmp_path / "d"
    shutil.copytree(world["data"] / "gadget", root / "gadget")
    args = ["--dataset", "synthetic", "--data-root", str(root), "--category", "gadget", *TINY]
    assert cli.run_main(args + ["--out", str(tmp_path / "a")]) == 0
    for p in (root / "gadget" / "ground_truth").rglob("*.png"):
        m = np.asarray(Image.open(p))
        Image.fromarray((m > 0).astype(np.uint8)).save(p)  # 0/1
    # (the synthetic dataset's parameter file still matches: only the mask values changed)
    assert cli.run_main(args + ["--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / x / "results.json").read_text())["categories"]["gadget"]["metrics"]
            for x in ("a", "b"))
    assert b["mAUROC_px"] == pytest.approx(a["mAUROC_px"]) and b["mAP_px"] == pytest.approx(a["mAP_px"])


def test_test_mode_applies_the_threshold_rule_and_counts_this_run(world, tmp_path):
    """Issue 23.3/23.4: --threshold-fpr in test mode re-chooses the threshold from the validation
    scores saved at fit time (the (1 - q) quantile of the validation normals, computed here
    with numpy), and results.json counts the images this run scored."""
    ck = pn_jax.load(world["ck"])
    normal = np.asarray(ck.validation["calibrated_rerank"][0], np.float64)
    want = float(np.nextafter(np.quantile(normal, 0.8, method="higher"), np.inf))
    assert want != ck.threshold
    out = tmp_path / "o"
    rc = cli.main(["test", "--checkpoint", str(world["ck"]), "--dataset", "synthetic", "--data-root",
                   str(world["data"]), "--category", "gadget", "--threshold-fpr", "0.2", "--max-test", "4",
                   "--batch-size", "2", "--figures", "0", "--out", str(out)])
    assert rc == 0
    e = json.loads((out / "results.json").read_text())["categories"]["gadget"]
    assert e["threshold"] == want and e["at_threshold"]["threshold"] == want
    assert e["calibration"]["threshold"]["fpr"] == 0.2
    assert e["config"]["threshold_fpr"] == 0.2 and e["config"]["batch_size"] == 2
    assert e["counts"]["test"] == 4


@pytest.mark.parametrize("parser", ["run", "test"])
def test_every_flag_has_a_test_mode_rule(parser):
    """A new flag must say whether test mode applies or refuses it (none may be dropped)."""
    test_mode = {  # every flag of the two parsers, and what test mode does with it
        "applied": set(flags.APPLIED_IN_TEST) | {"checkpoint", "mode", "out", "figures", "ablation", "category",
                                               "data_root", "test_dir", "max_test", "no_masks", "download",
                                               "data_backend", "tfds_dir",
                                               # how the run executes (tests/test_distributed.py, test_stages.py)
                                               "distributed", "coordinator", "num_processes", "process_id",
                                               "no_compile_cache"},
        "refused unless the checkpoint's own": set(flags.FIXED_IN_TEST) | {"dataset", "unified"},
        "refused": {"train_dir", "max_train", "tune"},
    }
    p = cli.build_run_parser() if parser == "run" else cli.build_parser()._subparsers._group_actions[0].choices["test"]
    dests = {a.dest for a in p._actions if a.dest != "help"}
    known = set().union(*test_mode.values())
    assert dests <= known, sorted(dests - known)
    if parser == "run":
        assert set(flags.CONFIG_FLAGS) | {"batch_size"} == set(flags.APPLIED_IN_TEST) | set(flags.FIXED_IN_TEST)


def test_data_backend_is_validated_by_name():
    from pn_jax.config import Config

    with pytest.raises(ValueError, match="data.backend must be one of"):
        Config().replace(data={"backend": "sql"})
    with pytest.raises(ValueError, match="data.backend 'tfds' reads .* not 'folder'"):
        Config().replace(data={"backend": "tfds", "dataset": "folder"})
    assert Config().replace(data={"backend": "tfds", "dataset": "elpv"}).data.backend == "tfds"
