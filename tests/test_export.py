"""The jax.export artifact reproduces the in-process pipeline (pipeline batches -> FeatureExtractor
-> Scorer), in this process and in a fresh one without flax/orbax/pn_jax model code; corrupted
or mismatched artifacts are refused naming the file; the loader's host preprocessing equals
pn_jax.data.preprocess."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from pn_jax import backbones, detector, export, fitting
from pn_jax import model as model_lib
from pn_jax.config import tiny_config
from pn_jax.data import pipeline, preprocess

SYNTH = dict(n_train=12, n_test_good=3, n_test_defect=4, size=96)


def features(cfg, ext, source):
    return model_lib.Model(cfg, (0, 0), None, extractor=ext).extract(source)


def reference(cfg, ext, state, source, root):
    """The in-process pipeline's scores and maps of `source`, and a threshold with about half
    of them above it."""
    ref = detector.Scorer(cfg, ext.grid)(state, features(cfg, ext, source))
    scores = np.asarray(ref["image_scores"])
    s = np.sort(scores)
    return dict(scores=scores, maps=np.asarray(ref["anomaly_maps"]),
                threshold=float(0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])),
                paths=[os.path.join(root, "synthetic", name) for name in source.names])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    cfg, root = tiny_config(), str(tmp / "data")
    src = pipeline.load_category("synthetic", root, "synthetic", holdout_fraction=cfg.data.holdout_fraction,
                                 holdout_min=2, seed=0, synthetic_kwargs=SYNTH)
    ext = detector.FeatureExtractor(cfg)
    state, _ = fitting.fit_state(cfg, features(cfg, ext, src["train"]), features(cfg, ext, src["holdout"]),
                            jax.random.key(0))
    m = dict(cfg=cfg, ext=ext, state=state, grid=ext.grid, src=src, root=root,
             **reference(cfg, ext, state, src["test"], root))
    path = str(tmp / "model.jaxexport")
    meta = {"dataset": "synthetic", "category": "synthetic", "weights_sha256": "abc"}
    m["metadata"] = export.export_model(cfg, state, m["grid"], m["threshold"], meta, path)
    m["path"] = path
    return m


def check_against_reference(out, m):
    np.testing.assert_allclose(out["scores"], m["scores"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["anomaly_maps"], m["maps"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["normalized"], m["scores"] / m["threshold"], rtol=1e-5)
    np.testing.assert_array_equal(out["labels"], m["scores"] >= m["threshold"])


def test_exported_model_reproduces_the_in_process_scorer(fitted):
    m = fitted
    predict = export.load_exported(m["path"], max_batch=4)  # 11 images: 4 + 4 + (3 -> 4)
    out = predict(m["paths"])
    check_against_reference(out, m)
    assert 0 < out["labels"].sum() < len(m["paths"])
    assert out["names"] == m["paths"] and out["errors"] == {}
    # the same images as arrays of their original size, one at a time and as one list
    images = [preprocess.load_rgb(p) for p in m["paths"]]
    np.testing.assert_allclose(predict(images[2])["scores"], m["scores"][2:3], rtol=1e-5, atol=1e-5)
    check_against_reference(predict(images), m)
    # a folder: every file in it, sorted by name
    folder = os.path.dirname(m["paths"][-1])
    files = sorted(p for p in m["paths"] if os.path.dirname(p) == folder)
    np.testing.assert_allclose(predict(folder)["scores"], [m["scores"][m["paths"].index(p)] for p in files],
                               rtol=1e-5, atol=1e-5)


def test_metadata_describes_the_artifact(fitted):
    md = json.load(open(export.metadata_path(fitted["path"])))
    assert md == fitted["metadata"]
    assert md["input"] == {**md["input"], "size": 64, "layout": "NHWC", "dtype": "uint8",
                           "resize": "PIL bilinear (antialiased) on the host"}
    info = backbones.info("efficientnet_lite0")
    assert md["input"]["normalization"]["mean"] == list(info.mean)
    assert md["batch"] == {"symbolic": True, "size": None}
    assert md["threshold"] == fitted["threshold"] and md["label_rule"] == "scores >= threshold (normalized >= 1.0)"
    assert md["score"]["variant"] == fitted["cfg"].noising.score
    assert md["versions"]["jax"] == jax.__version__
    assert md["provenance"]["weights_sha256"] == "abc"
    import hashlib
    assert md["sha256"] == hashlib.sha256(open(fitted["path"], "rb").read()).hexdigest()
    # only the backbone stages the model uses are constants of the artifact, not the whole tree
    full = sum(x.nbytes for x in jax.tree.leaves(fitted["ext"].backbone.params))
    assert md["size_bytes"] == os.path.getsize(fitted["path"]) < full / 2


MINIMAL = r"""
import importlib.abc, json, sys
BLOCKED = ("flax", "orbax", "grain", "tensorflow", "tensorflow_datasets", "optax", "pn_jax.detector",
           "pn_jax.data", "pn_jax.backbones", "pn_jax.checkpoint", "pn_jax.noising")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED or any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"the minimal loader imported {name}")
sys.meta_path.insert(0, Block())
import jax, numpy
from pn_jax.export import load_exported
out = load_exported(sys.argv[1])(sys.argv[2:])
bad = [m for m in sys.modules if m.split(".")[0] in ("flax", "orbax") or m == "pn_jax.detector"]
assert not bad, bad
print(json.dumps({"scores": out["scores"].tolist(), "labels": out["labels"].tolist(),
                  "modules": sorted(m for m in sys.modules if m.startswith("pn_jax"))}))
"""


def test_fresh_process_with_only_jax_numpy_and_the_loader(fitted):
    m = fitted
    proc = subprocess.run([sys.executable, "-c", MINIMAL, m["path"], *m["paths"][:4]], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(got["scores"], m["scores"][:4], rtol=1e-5, atol=1e-5)
    assert got["labels"] == (m["scores"][:4] >= m["threshold"]).tolist()
    assert set(got["modules"]) == {"pn_jax", "pn_jax.export", "pn_jax.imageread"}


def test_the_two_loader_files_copied_without_the_package(fitted, tmp_path):
    """README: a deployment box may copy pn_jax/export.py and pn_jax/imageread.py alone."""
    import pn_jax

    src = os.path.dirname(pn_jax.__file__)
    for f in ("export.py", "imageread.py"):
        shutil.copy(os.path.join(src, f), tmp_path / f)
    script = MINIMAL.replace('BLOCKED = ("flax"', 'BLOCKED = ("pn_jax", "flax"').replace(
        "from pn_jax.export import load_exported", "from export import load_exported")
    proc = subprocess.run([sys.executable, "-c", script, fitted["path"], *fitted["paths"][:2]], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(got["scores"], fitted["scores"][:2], rtol=1e-5, atol=1e-5)
    assert got["modules"] == []


@pytest.fixture()
def copy(fitted, tmp_path):
    """A private copy of the artifact and its metadata, to damage."""
    path = str(tmp_path / "copy.jaxexport")
    shutil.copyfile(fitted["path"], path)
    md = json.load(open(export.metadata_path(fitted["path"])))
    md["artifact"] = os.path.basename(path)
    json.dump(md, open(export.metadata_path(path), "w"))
    return path, md


def test_corrupted_artifact_is_refused_naming_the_file(copy):
    path, _ = copy
    export.load_exported(path)  # the undamaged copy loads
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    with pytest.raises(export.ExportError, match=f"{path} is corrupted.*sha256"):
        export.load_exported(path)
    open(path, "wb").write(bytes(data[:1000]))  # truncated
    with pytest.raises(export.ExportError, match="corrupted"):
        export.load_exported(path)


def test_missing_files_are_refused_naming_the_file(copy, tmp_path):
    path, _ = copy
    with pytest.raises(export.ExportError, match="not found: .*nothing.jaxexport"):
        export.load_exported(str(tmp_path / "nothing.jaxexport"))
    os.unlink(export.metadata_path(path))
    with pytest.raises(export.ExportError, match=f"{path} has no metadata file {path}.json"):
        export.load_exported(path)


def _rewrite(path, md):
    json.dump(md, open(export.metadata_path(path), "w"))


def test_metadata_mismatch_is_refused(copy):
    path, md = copy
    _rewrite(path, {**md, "input": {**md["input"], "size": 128}})
    with pytest.raises(export.ExportError, match=r"does not match the artifact .*input shape"):
        export.load_exported(path)
    _rewrite(path, {**md, "batch": {"symbolic": False, "size": 4}})
    with pytest.raises(export.ExportError, match=r"does not match the artifact .*batch"):
        export.load_exported(path)
    _rewrite(path, {**md, "format_version": export.FORMAT_VERSION + 1})
    with pytest.raises(export.ExportError, match="format version"):
        export.load_exported(path)
    _rewrite(path, {**md, "calling_convention_version": 10 ** 6})
    with pytest.raises(export.ExportError, match=r"calling convention 1000000 .*this jax"):
        export.load_exported(path)
    _rewrite(path, {**md, "threshold": md["threshold"] * 2})  # only the artifact's run can tell
    predict = export.load_exported(path)
    with pytest.raises(export.ExportError, match="records threshold .* exported with"):
        predict(np.zeros((64, 64, 3), np.uint8))
    open(export.metadata_path(path), "w").write("{not json")
    with pytest.raises(export.ExportError, match="cannot read the metadata"):
        export.load_exported(path)


def test_bad_export_requests_are_refused(fitted, tmp_path):
    m = fitted
    args = (m["cfg"], m["state"], m["grid"])
    with pytest.raises(export.ExportError, match="threshold must be"):
        export.export_model(*args, 0.0, None, str(tmp_path / "a"))
    with pytest.raises(export.ExportError, match="no decision threshold"):
        export.export_model(*args, None, None, str(tmp_path / "a"))
    with pytest.raises(export.ExportError, match="unknown platform"):
        export.export_model(*args, 1.0, None, str(tmp_path / "a"), platforms=("gpu",))
    with pytest.raises(export.ExportError, match="is a directory"):
        export.export_model(*args, 1.0, None, str(tmp_path))
    with pytest.raises(export.ExportError, match="not JSON-serialisable"):
        export.export_model(*args, 1.0, {"x": object()}, str(tmp_path / "a"))
    assert not os.listdir(tmp_path)  # nothing half-written



def test_unreadable_inputs_are_reported_by_name(fitted, tmp_path):
    m = fitted
    predict = export.load_exported(m["path"])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    missing = str(tmp_path / "missing.png")
    out = predict([m["paths"][0], str(tmp_path / "broken.png"), missing, np.full((5, 7), 2.0), m["paths"][1]])
    np.testing.assert_allclose(out["scores"][[0, 4]], m["scores"][:2], rtol=1e-5, atol=1e-5)
    assert np.isnan(out["scores"][1:4]).all() and not out["labels"][1:4].any()
    assert np.isnan(out["anomaly_maps"][1:4]).all()
    assert set(out["errors"]) == {str(tmp_path / "broken.png"), missing, "array[3]"}
    assert "cannot read image" in out["errors"][str(tmp_path / "broken.png")]
    assert "not found" in out["errors"][missing] and "[0, 1]" in out["errors"]["array[3]"]
    with pytest.raises(ValueError, match="ambiguous"):  # the container itself, as Model.predict
        predict(np.zeros((3, 64, 64), np.uint8))


def test_fixed_batch_multi_platform_and_patchcore_geometry(fitted, tmp_path):
    """A fixed batch of 3 (11 images: chunked, the last chunk padded), lowered for cpu and cuda
    together (no GPU needed to lower), with the resize + centre-crop geometry (the fitted state
    scores 64 px crops of 80 px images as well as 64 px resizes)."""
    cfg = fitted["cfg"].replace(data={"resize_mode": "patchcore", "image_size": 80, "crop_size": 64})
    m = reference(cfg, fitted["ext"], fitted["state"], fitted["src"]["test"], fitted["root"])
    path = str(tmp_path / "fixed.jaxexport")
    md = export.export_model(cfg, fitted["state"], fitted["grid"], m["threshold"], None, path,
                             platforms=("cpu", "cuda"), batch_size=3)
    assert md["batch"] == {"symbolic": False, "size": 3} and md["platforms"] == ["cpu", "cuda"]
    assert md["input"]["crop_size"] == 64 and md["input"]["resize_mode"] == "patchcore"
    out = export.load_exported(path)(m["paths"])
    assert len(m["paths"]) % 3 and out["anomaly_maps"].shape == (len(m["paths"]), 64, 64)
    check_against_reference(out, m)


def test_model_export_reproduces_model_predict(fitted, tmp_path):
    import pn_jax

    src = fitted["src"]
    model = pn_jax.fit(fitted["cfg"], src["train"], holdout=src["holdout"], log=lambda *a: None)
    path = str(tmp_path / "model.jaxexport")
    md = model.export(path)
    assert md["threshold"] == model.threshold and md["provenance"]["provenance"] == model.provenance
    predict = pn_jax.load_exported(path, max_batch=4)
    paths = fitted["paths"]
    want, got = model.predict(paths, progress=False), predict(paths)
    np.testing.assert_allclose(got["scores"], want.scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["normalized"], want.normalized, rtol=1e-5)
    np.testing.assert_array_equal(got["labels"], want.labels)
    # at the model's input size predict's maps are not resized, so they must match too
    small = np.stack([np.asarray(preprocess.resize_image(preprocess.load_rgb(p), 64)) for p in paths[:4]])
    want, got = model.predict(small, progress=False), predict(small)
    np.testing.assert_allclose(got["anomaly_maps"], np.stack(want.anomaly_maps), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["scores"], want.scores, rtol=1e-5, atol=1e-5)


def test_host_preprocessing_matches_the_data_pipeline(tmp_path):
    """Every file format the reader supports, both geometries: the loader's inputs and its
    metadata-driven resize give the pipeline's images."""
    from pn_jax import imageread
    from pn_jax.data import synthetic

    synthetic.generate_category(str(tmp_path), "mixed", n_train=7, n_test_good=1, n_test_defect=1,
                                size=72, mixed_formats=True)
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "mixed")
                   for f in fs if preprocess.is_image_file(f) and "ground_truth" not in d)
    assert len({os.path.splitext(f)[1] for f in files}) >= 4
    for (name, read), f in zip(imageread.input_items(files), files):
        want = preprocess.load_rgb(f)
        got = read()
        assert name == f
        np.testing.assert_array_equal(got, want, err_msg=f)
        for mode, size, crop in (("resize", 64, None), ("patchcore", 80, 64)):
            geo = {"resize_mode": mode, "image_size": size, "crop_size": crop}
            np.testing.assert_array_equal(export.resize_for_model(got, geo),
                                          preprocess.resize_image(want, size, mode, crop or 224), err_msg=f)


def _bomb(path, fitted, monkeypatch):
    from PIL import Image

    Image.fromarray(np.zeros((400, 400, 3), np.uint8)).save(path)  # 160k pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # > 2x the limit: DecompressionBombError


def _stack(path, fitted, monkeypatch):
    from PIL import Image

    frames = [Image.open(p).convert("L") for p in fitted["paths"][:2]]
    frames[0].save(path, save_all=True, append_images=frames[1:])


# One table of bad inputs, each run through Model.predict and the exported predictor:
# (id, file name or None for an array, how to make it, a phrase of the reason)
BAD_INPUTS = [
    ("empty_file", "empty.png", lambda p, f, mp: open(p, "wb").close(), "empty (0 bytes)"),
    ("text_as_png", "text.png", lambda p, f, mp: open(p, "wb").write(b"not a png"), "cannot read image"),
    ("truncated", "cut.png", lambda p, f, mp: open(p, "wb").write(open(f["paths"][0], "rb").read()[:100]),
     "cannot read image"),
    ("not_an_image", "notes.txt", lambda p, f, mp: open(p, "w").write("notes"), "cannot read image"),
    ("multi_page_tiff", "stack.tif", _stack, "multi-page TIFF (2 pages)"),
    ("decompression_bomb", "bomb.png", _bomb, "decompression bomb"),
    ("missing", "missing.png", lambda p, f, mp: None, "image not found"),
    ("float_array_out_of_range", None, None, "[0, 1]"),
]


@pytest.fixture(scope="module")
def exported_predictor(fitted):
    return export.load_exported(fitted["path"])


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_are_reported_alike_by_predict_and_the_exported_model(case, fitted, exported_predictor,
                                                                         tmp_path, monkeypatch):
    """The same reason, keyed by the same name, in both `errors`; the good image beside it scored."""
    import pn_jax

    _, file_name, make, phrase = case
    if file_name is None:
        bad, key = np.full((5, 7), 2.0), "array[1]"
    else:
        bad = key = str(tmp_path / file_name)
        make(bad, fitted, monkeypatch)
    model = pn_jax.Model(fitted["cfg"], fitted["grid"], fitted["state"], threshold=fitted["threshold"],
                         extractor=fitted["ext"])
    want = model.predict([fitted["paths"][0], bad], progress=False, maps=False)
    got = exported_predictor([fitted["paths"][0], bad])
    assert list(got["errors"]) == [key] and got["errors"] == want.errors
    assert phrase in got["errors"][key], got["errors"][key]
    assert np.isnan(got["scores"][1]) and np.isnan(want.scores[1]) and not got["labels"][1]
    np.testing.assert_allclose(got["scores"][0], want.scores[0], rtol=1e-5, atol=1e-5)


def test_patch_max_export_reproduces_model_predict(fitted, tmp_path):
    """noising.image_score = "patch_max": the artifact scores images by their max patch score,
    as Model.predict does, and its metadata says so."""
    import pn_jax

    cfg = fitted["cfg"].replace(noising={"image_score": "patch_max"})
    model = pn_jax.Model(cfg, fitted["grid"], fitted["state"], threshold=1.0, extractor=fitted["ext"])
    paths = fitted["paths"]
    s = np.sort(model.predict(paths, progress=False, maps=False).scores)
    model.threshold = float(0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2]))  # about half on each side, none on it
    want = model.predict(paths, progress=False, maps=False)
    assert 0 < want.labels.sum() < len(paths)
    path = str(tmp_path / "patch_max.jaxexport")
    md = model.export(path)
    assert md["score"]["image_score"] == "patch_max" and "patch scores" in md["score"]["image_score_rule"]
    got = pn_jax.load_exported(path)(paths)
    np.testing.assert_array_equal(got["labels"], want.labels)
    np.testing.assert_allclose(got["scores"], want.scores, rtol=1e-5, atol=1e-5)
