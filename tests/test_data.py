"""pn_jax.data: reader errors, formats, geometry, synthetic data, splits, tfds, grain, ELPV."""
import filecmp
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from pn_jax import data as D
from pn_jax.data import elpv, mvtec, records

MEAN, STD = D.IMAGENET_MEAN, D.IMAGENET_STD


PLAIN = dict(n_train=10, n_test_good=3, n_test_defect=3, size=64)


@pytest.fixture(scope="module")
def syn_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("syn"))
    D.generate_category(root, "plain", **PLAIN)
    D.generate_category(root, "mixed", n_train=8, n_test_good=3, n_test_defect=3, size=48,
                        mixed_formats=True)
    return root


def _copy(src_root, tmp_path, category="plain"):
    dst = str(tmp_path / "root")
    shutil.copytree(os.path.join(src_root, category), os.path.join(dst, category))
    return dst, os.path.join(dst, category)


# ---------------------------------------------------------------- reader errors

def test_missing_root_says_where_to_get_data(tmp_path):
    with pytest.raises(D.MissingDataError) as e:
        D.index_category(str(tmp_path / "nowhere"), "bottle")
    msg = str(e.value)
    assert "nowhere" in msg and mvtec.MVTEC_URL in msg and "--dataset elpv" in msg


def test_missing_category_lists_found(syn_root):
    with pytest.raises(D.MissingDataError, match="plain") as e:
        D.index_category(syn_root, "bottle")
    assert "mixed" in str(e.value) and "bottle" in str(e.value)


def test_missing_or_empty_train_good(syn_root, tmp_path):
    root, cat = _copy(syn_root, tmp_path)
    train = os.path.join(cat, "train", "good")
    for f in os.listdir(train):
        os.remove(os.path.join(train, f))
    open(os.path.join(train, "Thumbs.db"), "w").close()  # a non-image is not an image
    with pytest.raises(D.DataError, match="holds no images") as e:
        D.index_category(root, "plain")
    assert train in str(e.value)
    shutil.rmtree(os.path.join(cat, "train"))
    with pytest.raises(D.MissingDataError, match="train/good"):
        D.index_category(root, "plain")


def test_missing_test_folder(syn_root, tmp_path):
    root, cat = _copy(syn_root, tmp_path)
    shutil.rmtree(os.path.join(cat, "test"))
    with pytest.raises(D.MissingDataError) as e:
        D.index_category(root, "plain")
    assert os.path.join(cat, "test") in str(e.value)


def test_anomalous_image_without_mask_names_expected_mask(syn_root, tmp_path):
    root, cat = _copy(syn_root, tmp_path)
    expected = os.path.join(cat, "ground_truth", "blob", "001_mask.png")
    os.remove(expected)
    with pytest.raises(D.MissingDataError) as e:
        D.index_category(root, "plain")
    assert expected in str(e.value) and os.path.join("test", "blob", "001.png") in str(e.value)
    # Datasets without masks can opt out; the image keeps label 1 with mask None.
    idx = D.index_category(root, "plain", require_masks=False)
    s = [s for s in idx["test"] if s.name == "test/blob/001.png"][0]
    assert s.label == 1 and s.mask_path is None


def test_unreadable_image_named(syn_root, tmp_path):
    root, cat = _copy(syn_root, tmp_path)
    bad = os.path.join(cat, "train", "good", "003.png")
    with open(bad, "wb") as f:
        f.write(b"not an image")
    with pytest.raises(D.DataError) as e:
        D.index_category(root, "plain")
    assert bad in str(e.value)
    # A truncated file passes the header check but fails when read, naming the file.
    with open(os.path.join(syn_root, "plain", "train", "good", "003.png"), "rb") as f:
        head = f.read(200)
    with open(bad, "wb") as f:
        f.write(head)
    src = D.load_category("mvtec_ad", root, "plain", holdout_fraction=0, holdout_min=0)["train"]
    with pytest.raises(D.DataError) as e:
        src[src.names.index("train/good/003.png")]
    assert bad in str(e.value)


def test_mask_size_mismatch_names_both_files(syn_root, tmp_path):
    root, cat = _copy(syn_root, tmp_path)
    mask = os.path.join(cat, "ground_truth", "scratch", "000_mask.png")
    Image.new("L", (32, 40)).save(mask)
    with pytest.raises(D.DataError) as e:
        D.index_category(root, "plain")
    msg = str(e.value)
    assert mask in msg and os.path.join(cat, "test", "scratch", "000.png") in msg
    assert "32x40" in msg and "64x64" in msg
    # Also caught at read time when indexing skipped the header check.
    idx = D.index_category(root, "plain", check_files=False)
    src = records.samples_source(idx["test"], dataset="t", category="plain", split="test")
    with pytest.raises(D.DataError, match="32x40"):
        src[src.names.index("test/scratch/000.png")]


# ---------------------------------------------------------------- formats, labels, geometry

def test_mixed_formats_case_and_sizes(syn_root):
    idx = D.index_category(syn_root, "mixed")
    exts = {os.path.splitext(s.path)[1] for s in idx["train"] + idx["test"]}
    assert {".png", ".JPG", ".bmp", ".Tiff"} <= exts
    modes = set()
    for s in idx["train"] + idx["test"]:
        with Image.open(s.path) as img:
            modes.add(img.mode)
    assert {"L", "RGBA", "I;16", "RGB"} <= modes
    src = D.load_category("mvtec_ad", syn_root, "mixed")
    sizes = set()
    for split in ("train", "test"):
        for r in src[split]:
            assert r["image"].dtype == np.uint8 and r["image"].ndim == 3 and r["image"].shape[2] == 3
            sizes.add(r["image"].shape[:2])
            if r["mask"] is not None:
                assert r["mask"].shape == r["image"].shape[:2]
    assert len(sizes) > 1
    batches = list(D.make_batches(src["test"], image_size=32, mean=MEAN, std=STD, batch_size=4))
    assert all(b["image"].shape[1:] == (32, 32, 3) for b in batches)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "I;16", "1", "CMYK"])
def test_load_rgb_modes(tmp_path, mode):
    rgb = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    img = Image.fromarray(rgb)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257)
    else:
        img = img.convert(mode)
    path = str(tmp_path / ("x.tif" if mode == "CMYK" else "x.png"))
    img.save(path)
    out = D.load_rgb(path)
    assert out.dtype == np.uint8 and out.shape == (9, 7, 3)
    if mode in ("L", "I;16"):  # 16-bit is rescaled to full range, not clipped
        np.testing.assert_array_equal(out[..., 0], np.asarray(Image.fromarray(rgb).convert("L")))
    if mode == "RGBA":
        np.testing.assert_array_equal(out, rgb)


def test_mask_nonzero_is_defect_and_resize_does_not_grow_it():
    # Any non-zero value marks the defect (1, 100, 200 alike); after binarising, the 8 -> 4
    # bilinear (triangle, support 2) resize gives column j the mean weight of the defect
    # columns around 2j+1: columns 4:6 -> [0, 0, .75, .14] -> [0, 0, 1, 0] at 0.5.
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 4], mask[:, 5] = 1, 100
    mask[::2, 5] = 200
    out = D.resize_mask(mask, 4)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.tile([0, 0, 1, 0], (4, 1)))
    np.testing.assert_array_equal(D.resize_mask(mask.astype(bool), 4), out)
    np.testing.assert_array_equal(D.resize_mask((mask > 0).astype(np.uint16) * 7, 4), out)
    rec = {"image": np.zeros((8, 8, 3), np.uint8), "mask": mask, "label": 1, "defect": "x",
           "name": "n"}
    np.testing.assert_array_equal(
        D.preprocess_record(rec, image_size=4, mean=MEAN, std=STD)["mask"], out)


def test_mask_file_modes(tmp_path):
    m = np.zeros((6, 6), np.uint8)
    m[2:4, 2:4] = 255
    Image.fromarray(np.stack([m, 0 * m, 0 * m], -1)).save(tmp_path / "red.png")  # red mask
    Image.fromarray(m.astype(np.uint16) * 257).save(tmp_path / "m16.png")
    Image.fromarray(m).convert("1").save(tmp_path / "bw.png")
    for f in ("red.png", "m16.png", "bw.png"):
        np.testing.assert_array_equal(D.load_mask(str(tmp_path / f)) > 127, m > 127)


def test_label_from_folder_even_with_empty_mask(syn_root, tmp_path):
    root, cat = _copy(syn_root, tmp_path)
    empty = os.path.join(cat, "ground_truth", "blob", "000_mask.png")
    Image.new("L", (64, 64), 0).save(empty)
    test = D.load_category("mvtec_ad", root, "plain")["test"]
    with pytest.warns(D.DataWarning, match="all zero") as w:
        r = test[test.names.index("test/blob/000.png")]
    assert empty in str(w[0].message)
    assert r["label"] == 1 and r["defect"] == "blob" and r["mask"].max() == 0
    labels = {n.split("/")[1]: [] for n in test.names}
    for r in test:
        labels[r["defect"]].append(r["label"])
    assert set(labels["good"]) == {0} and set(labels["scratch"]) == {1}


def test_patchcore_geometry():
    img = np.zeros((300, 400, 3), np.uint8)
    img[:, 200:] = 255
    out = D.resize_image(img, 256, "patchcore", 224)
    assert out.shape == (224, 224, 3)
    # 300x400 -> 256x341, crop left = round((341 - 224) / 2) = 58: the edge is at 170 - 58.
    edge = int(np.argmax(out[0, :, 0] > 127))
    assert abs(edge - (170 - 58)) <= 1
    assert D.resize_mask(np.zeros((300, 400), np.uint8), 256, "patchcore", 224).shape == (224, 224)


# ---------------------------------------------------------------- synthetic data and defects

def test_synthetic_deterministic(tmp_path):
    for name in ("a", "b"):
        D.generate_category(str(tmp_path / name), "c", n_train=3, n_test_good=1,
                            n_test_defect=2, size=48, seed=3, mixed_formats=True)
    cmp = filecmp.dircmp(tmp_path / "a", tmp_path / "b")
    files = []
    for dirpath, _, names in os.walk(tmp_path / "a"):
        files += [os.path.relpath(os.path.join(dirpath, n), tmp_path / "a") for n in names]
    assert len(files) == 3 + 1 + 4 + 4 + 1  # + synthetic.json
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)
    assert not mismatch and not errors and not cmp.left_only
    D.generate_category(str(tmp_path / "d"), "c", n_train=3, n_test_good=0, n_test_defect=0,
                        size=48, seed=4)
    assert not filecmp.cmp(tmp_path / "a/c/train/good/000.png", tmp_path / "d/c/train/good/000.png",
                           shallow=False)


def test_synthetic_generated_once_into_root(tmp_path):
    root = str(tmp_path)
    kw = dict(n_train=4, n_test_good=1, n_test_defect=1, size=32)
    src = D.load_category("synthetic", root, "tiny", synthetic_kwargs=kw, backend="tfds",
                          holdout_min=1)
    assert (len(src["train"]), len(src["holdout"]), len(src["test"])) == (3, 1, 3)
    assert os.path.isdir(os.path.join(root, "_tfds"))  # default tfds_dir, not a category
    assert D.list_categories(root) == ["tiny"] == D.available_categories("synthetic", root)
    mtime = os.path.getmtime(os.path.join(root, "tiny", "train", "good", "000.png"))
    D.load_category("synthetic", root, "tiny", synthetic_kwargs=kw)  # reused, not rewritten
    assert os.path.getmtime(os.path.join(root, "tiny", "train", "good", "000.png")) == mtime
    with pytest.raises(D.DataError, match="delete it to regenerate"):
        D.load_category("synthetic", root, "tiny", synthetic_kwargs={**kw, "seed": 1})
    with pytest.raises(TypeError, match="n_trian"):
        D.load_category("synthetic", root, "other", synthetic_kwargs={"n_trian": 3})


def test_synthetic_defects_are_visible(syn_root):
    test = D.load_category("mvtec_ad", syn_root, "plain")["test"]
    for r in test:
        if r["label"] == 1:
            m = r["mask"] > 127
            assert 0 < m.mean() < 0.3


@pytest.mark.parametrize("kind", ["perlin", "cutpaste"])
def test_synthetic_anomalies(kind):
    img = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    fn = {"perlin": D.perlin_anomaly, "cutpaste": D.cutpaste_anomaly}[kind]
    for seed in range(10):
        out, mask = fn(img, seed)
        out2, mask2 = fn(img, np.random.default_rng(seed))
        np.testing.assert_array_equal(out, out2)
        np.testing.assert_array_equal(mask, mask2)
        assert out.dtype == np.uint8 and out.shape == img.shape and mask.shape == (64, 80)
        assert set(np.unique(mask)) <= {0, 255} and (mask > 0).any()
        np.testing.assert_array_equal(out[mask == 0], img[mask == 0])  # only the defect changes
        assert (out[mask > 0] != img[mask > 0]).any()


def test_perlin_noise_any_shape():
    n = D.perlin_noise((37, 53), (4, 8), 0)
    assert n.shape == (37, 53) and n.dtype == np.float32 and np.abs(n).max() <= 1.5
    np.testing.assert_array_equal(n, D.perlin_noise((37, 53), (4, 8), 0))


# ---------------------------------------------------------------- splits and provenance

def test_split_train_holdout():
    items = list(range(50))
    a = D.split_train_holdout(items, 0.1, 2, seed=1)
    assert a == D.split_train_holdout(items, 0.1, 2, seed=1)
    train, hold = a
    assert len(hold) == 5 and not set(train) & set(hold) and sorted(train + hold) == items
    assert train == sorted(train) and hold == sorted(hold)
    assert D.split_train_holdout(items, 0.1, 2, seed=2)[1] != hold
    assert len(D.split_train_holdout(items[:5], 0.1, 2, 0)[1]) == 2  # min_count
    assert len(D.split_train_holdout(items[:2], 0.5, 5, 0)[0]) == 1  # never empties the bank
    assert D.split_train_holdout(items, 0.0, 0, 0) == (items, [])


def test_cap_samples_stratified():
    s = [records.Sample(f"{i:03d}", "", "test", int(i >= 80), "d") for i in range(100)]
    c = D.cap_samples(s, 10, seed=0)
    assert len(c) == 10 and sum(x.label for x in c) == 2 and c == sorted(c, key=lambda x: x.name)
    assert c == D.cap_samples(s, 10, seed=0)


def test_read_log_records_only_splits_read(syn_root):
    log = D.ReadLog()
    src = D.load_category("synthetic", syn_root, "plain", log=log, holdout_min=3,
                          synthetic_kwargs=PLAIN)
    assert log.splits_read == set()  # indexing reads no pixels
    assert len(src["holdout"]) == 3 and not set(src["holdout"].names) & set(src["train"].names)
    val = D.make_validation_records(src["holdout"], seed=0)
    assert log.splits_read == {("synthetic", "plain", "holdout")}
    assert len(val) == 6 and [r["label"] for r in val] == [0, 1] * 3
    assert all(r["mask"].any() for r in val if r["label"] == 1)
    list(D.make_batches(src["test"], image_size=32, mean=MEAN, std=STD, batch_size=4,
                        num_workers=2))  # thread workers still log in this process
    assert log.splits() == {"holdout", "test"} and log.counts[("synthetic", "plain", "test")] == 9


# ---------------------------------------------------------------- grain batches

def test_make_batches_shapes_and_normalisation():
    recs = []
    for i in range(5):
        img = np.full((20, 30, 3), (255, 0, 51 * i), np.uint8)
        mask = None if i % 2 else np.full((20, 30), 255, np.uint8)
        recs.append({"image": img, "mask": mask, "label": i % 2, "defect": "d", "name": f"n{i}",
                     "split": "test"})
    batches = list(D.make_batches(recs, image_size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.1),
                                  batch_size=2))
    assert [b["image"].shape[0] for b in batches] == [2, 2, 1]  # ragged last batch kept
    b = batches[0]
    assert b["image"].dtype == np.float32 and b["image"].shape == (2, 16, 16, 3)
    assert b["mask"].dtype == np.float32 and b["mask"].shape == (2, 16, 16)
    assert b["label"].dtype == np.int32 and list(b["name"]) == ["n0", "n1"]
    np.testing.assert_allclose(b["image"][1, 0, 0], [(1 - .5) / .5, (0 - .5) / .25, (.2 - .5) / .1],
                               rtol=1e-6)
    np.testing.assert_array_equal(b["mask"][0], 1)
    np.testing.assert_array_equal(b["mask"][1], 0)
    names = [n for b in D.make_batches(recs, image_size=8, mean=MEAN, std=STD, batch_size=2,
                                       shuffle=True, seed=1) for n in b["name"]]
    again = [n for b in D.make_batches(recs, image_size=8, mean=MEAN, std=STD, batch_size=2,
                                       shuffle=True, seed=1) for n in b["name"]]
    assert names == again and sorted(names) == [f"n{i}" for i in range(5)]


def test_lazy_path_records(syn_root):
    cat = os.path.join(syn_root, "plain")
    rec = {"image": os.path.join(cat, "test/blob/000.png"),
           "mask": os.path.join(cat, "ground_truth/blob/000_mask.png"),
           "label": 1, "defect": "blob", "name": "test/blob/000.png"}
    b = next(D.make_batches([rec], image_size=64, mean=MEAN, std=STD, batch_size=1))
    direct = D.load_category("mvtec_ad", syn_root, "plain")["test"]
    ref = direct[direct.names.index("test/blob/000.png")]
    np.testing.assert_array_equal(b["mask"][0], ref["mask"] > 127)


# ---------------------------------------------------------------- tfds

def test_tfds_round_trip_equals_direct(syn_root, tmp_path):
    kw = dict(holdout_fraction=0.2, holdout_min=1, seed=3, tfds_dir=str(tmp_path / "tfds"))
    for cat in ("plain", "mixed"):
        direct = D.load_category("mvtec_ad", syn_root, cat, **kw)
        via = D.load_category("mvtec_ad", syn_root, cat, backend="tfds", **kw)
        for split in D.SPLITS:
            assert via[split].names == direct[split].names and len(via[split]) > 0
            for a, b in zip(direct[split], via[split]):
                assert a.keys() == b.keys()
                for k in a:
                    if isinstance(a[k], np.ndarray):
                        np.testing.assert_array_equal(a[k], b[k])
                    else:
                        assert a[k] == b[k], (k, a[k], b[k])
    # The raw tfds data source works with grain directly, and gives the same batches.
    from pn_jax.data import tfds_builders
    raw = tfds_builders.prepare("mvtec_ad", "plain", str(tmp_path / "tfds")).as_data_source()["test"]
    direct_test = D.load_category("mvtec_ad", syn_root, "plain")["test"]
    assert len(raw) == len(direct_test) == 9
    b1 = next(D.make_batches(raw, image_size=32, mean=MEAN, std=STD, batch_size=20))
    b2 = next(D.make_batches(direct_test, image_size=32, mean=MEAN, std=STD, batch_size=20))
    for k in ("image", "mask", "label", "name"):
        np.testing.assert_array_equal(b1[k], b2[k])


def test_tfds_elpv_matches_direct(tmp_path):
    kw = dict(max_train=40, max_test=30, seed=0, tfds_dir=str(tmp_path))
    direct = D.load_category("elpv", None, "mono", **kw)
    via = D.load_category("elpv", None, "mono", backend="tfds", **kw)
    for split in D.SPLITS:
        assert via[split].names == direct[split].names
        for i in (0, len(direct[split]) - 1):
            a, b = direct[split][i], via[split][i]
            np.testing.assert_array_equal(a["image"], b["image"])
            assert a["image"].shape == (300, 300, 3) and b["mask"] is None
            assert (a["label"], a["defect"], a["split"]) == (b["label"], b["defect"], b["split"])


# ---------------------------------------------------------------- ELPV protocol

def test_elpv_protocol():
    probs = {p: prob for p, prob, _ in elpv.read_labels()}
    idx = {c: D.index_elpv(c) for c in D.ELPV_CATEGORIES}
    expected = {"mono": (470, 118, 313), "poly": (736, 184, 402), "all": (1206, 302, 715)}
    for c, (n_train, n_good, n_bad) in expected.items():
        train, test = idx[c]["train"], idx[c]["test"]
        assert len(train) == n_train and sum(s.label == 0 for s in test) == n_good
        assert sum(s.label == 1 for s in test) == n_bad
        assert all(probs[s.name] == 0.0 for s in train)
        assert all(probs[s.name] == float(s.label) for s in test)  # no 1/3 or 2/3 cell
        assert not {s.name for s in train} & {s.name for s in test}
        assert all(s.mask_path is None for s in train + test)
    union = {s.name for c in ("mono", "poly") for s in idx[c]["train"]}
    assert union == {s.name for s in idx["all"]["train"]}
    assert D.index_elpv("mono") == idx["mono"]
    assert D.index_elpv("mono", split_seed=1)["train"] != idx["mono"]["train"]
    src = D.load_category("elpv", None, "poly", max_train=50, max_test=20, holdout_min=5)
    assert (len(src["train"]), len(src["holdout"]), len(src["test"])) == (45, 5, 20)
    with pytest.raises(D.MissingDataError, match="mono, poly, all"):
        D.index_elpv("bottle")
