"""pn_jax.data inputs as users have them: mask encodings, plain folders, VisA's own layout,
predict inputs (paths, folders, arrays), bad files, threaded batches."""
import csv
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from pn_jax import data as D
from pn_jax.data import records, visa

MEAN, STD = D.IMAGENET_MEAN, D.IMAGENET_STD


def _img(seed, h=24, w=32):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path, array, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    (array if isinstance(array, Image.Image) else Image.fromarray(array)).save(path, **kw)
    return str(path)


def _defect(h=24, w=32):
    m = np.zeros((h, w), bool)
    m[8:16, 8:24] = True  # aligned to JPEG's 8x8 blocks
    m[3, 2] = True  # a single pixel: any non-zero value counts
    return m


# ---------------------------------------------------------------- masks

def _encode(kind, m):
    u8 = m.astype(np.uint8)
    if kind == "0/255":
        return Image.fromarray(u8 * 255)
    if kind == "0/1":
        return Image.fromarray(u8)
    if kind == "0/7 (VisA-like)":
        return Image.fromarray(u8 * 7)
    if kind == "bool mode 1":
        return Image.fromarray(u8 * 255).convert("1")
    if kind == "palette":  # index 1 is the defect, whatever colour the palette gives it
        p = Image.fromarray(u8, "P")
        p.putpalette([0, 0, 0, 0, 128, 0] + [0] * 762)
        return p
    if kind == "16-bit 0/1":
        return Image.fromarray(u8.astype(np.uint16))
    if kind == "16-bit 0/65535":
        return Image.fromarray(u8.astype(np.uint16) * 65535)
    if kind == "RGB red":
        return Image.fromarray(np.stack([u8 * 255, 0 * u8, 0 * u8], -1))
    if kind == "RGBA":
        return Image.fromarray(np.stack([0 * u8, u8 * 3, 0 * u8, np.full_like(u8, 255)], -1))
    if kind == "LA":
        return Image.fromarray(np.stack([u8, np.full_like(u8, 255)], -1), "LA")
    raise ValueError(kind)


MASK_KINDS = ["0/255", "0/1", "0/7 (VisA-like)", "bool mode 1", "palette", "16-bit 0/1",
              "16-bit 0/65535", "RGB red", "RGBA", "LA"]


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_every_mask_encoding_gives_the_same_binary_mask(tmp_path, kind):
    m = _defect()
    path = _save(tmp_path / "m.png", _encode(kind, m))
    with Image.open(path) as img:  # the file really is in that encoding
        assert img.mode == {"bool mode 1": "1", "palette": "P", "16-bit 0/1": "I;16",
                            "16-bit 0/65535": "I;16", "RGB red": "RGB", "RGBA": "RGBA",
                            "LA": "LA"}.get(kind, "L")
    out = D.load_mask(path)
    assert out.dtype == np.uint8 and out.shape == m.shape
    np.testing.assert_array_equal(out, m.astype(np.uint8) * 255)
    # Through the batch pipeline (lazy path record) the 0/1 mask equals the 0/255 one; the
    # old reader thresholded at half of 255 and gave an all-zero mask here.
    ref = np.asarray(Image.fromarray(m.astype(np.float32)).resize((12, 12), Image.BILINEAR)) > 0.5
    assert ref.any()
    rec = {"image": np.zeros((24, 32, 3), np.uint8), "mask": path, "label": 1, "defect": "d",
           "name": "n"}
    b = next(D.make_batches([rec], image_size=12, mean=MEAN, std=STD, batch_size=1))
    np.testing.assert_array_equal(b["mask"][0], ref)


def test_jpeg_mask_noise_is_not_a_defect(tmp_path):
    m = np.zeros((24, 32), bool)
    m[5:13, 7:21] = True  # off JPEG's 8x8 grid: ringing around the edges
    for value in (255, 120):
        path = _save(tmp_path / f"m{value}.jpg", (m * value).astype(np.uint8), quality=75)
        raw = np.asarray(Image.open(path))
        assert (raw[~m] != 0).any()  # the file does have compression noise off the defect
        np.testing.assert_array_equal(D.load_mask(path) > 0, m)


def test_zero_one_masks_in_an_mvtec_tree_give_the_same_batches(tmp_path):
    root = str(tmp_path / "r")
    D.generate_category(root, "c", n_train=3, n_test_good=1, n_test_defect=2, size=32)
    before = list(D.make_batches(D.load_category("mvtec_ad", root, "c")["test"], image_size=16,
                                 mean=MEAN, std=STD, batch_size=8))
    gt = os.path.join(root, "c", "ground_truth")
    for d in os.listdir(gt):
        for f in os.listdir(os.path.join(gt, d)):
            p = os.path.join(gt, d, f)
            Image.fromarray((np.asarray(Image.open(p)) > 0).astype(np.uint8)).save(p)
    after = list(D.make_batches(D.load_category("mvtec_ad", root, "c")["test"], image_size=16,
                                mean=MEAN, std=STD, batch_size=8))
    assert before[0]["mask"].sum() > 0
    np.testing.assert_array_equal(before[0]["mask"], after[0]["mask"])


def test_all_zero_defect_mask_warns_once_naming_the_file(tmp_path):
    img = _save(tmp_path / "test/crack/0.png", _img(0))
    empty = _save(tmp_path / "gt/0_mask.png", np.zeros((24, 32), np.uint8))
    good = _save(tmp_path / "test/good/1.png", _img(1))
    samples = [records.Sample("crack/0.png", img, "test", 1, "crack", empty),
               records.Sample("good/1.png", good, "test", 0, "good", empty)]
    src = records.samples_source(samples, dataset="t", category="c", split="test")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")  # our own once-per-file rule, not Python's registry
        for _ in range(3):
            list(src)
    msgs = [str(x.message) for x in w if issubclass(x.category, D.DataWarning)]
    assert len(msgs) == 1 and empty in msgs[0] and img in msgs[0]


# ---------------------------------------------------------------- bad files

def _bad_files(tmp_path):
    good = _save(tmp_path / "ok.png", _img(0))
    zero = str(tmp_path / "zero.png")
    open(zero, "wb").close()
    txt = str(tmp_path / "notes.png")
    with open(txt, "w") as f:
        f.write("this is text, renamed .png\n")
    trunc = str(tmp_path / "trunc.png")
    with open(good, "rb") as f:
        data = f.read()
    with open(trunc, "wb") as f:
        f.write(data[: len(data) // 2])
    return good, zero, txt, trunc


def test_zero_byte_truncated_and_renamed_text_are_named(tmp_path):
    good, zero, txt, trunc = _bad_files(tmp_path)
    assert D.load_rgb(good).shape == (24, 32, 3)
    for path, phrase in ((zero, "empty (0 bytes)"), (txt, "cannot read image"),
                         (trunc, "cannot read image")):
        with pytest.raises(D.DataError, match="Replace or remove") as e:
            D.load_rgb(path)
        assert path in str(e.value) and phrase in str(e.value)
    with pytest.raises(D.DataError, match="mask"):
        D.load_mask(zero)
    stack = str(tmp_path / "stack.tif")
    Image.fromarray(_img(0)).save(stack, save_all=True,
                                  append_images=[Image.fromarray(_img(1))])
    with pytest.raises(D.DataError, match="multi-page TIFF \\(2 pages\\)") as e:
        D.load_rgb(stack)
    assert str(e.value).startswith(f"image {stack} is")
    os.remove(good)
    with pytest.raises(D.DataError, match="multi-page"):  # found at indexing, before any work
        D.folder_source(str(tmp_path), notify=lambda m: None)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_unreadable_training_image_is_a_data_error_naming_it(tmp_path, num_workers):
    train = tmp_path / "train"
    for i in range(5):
        _save(train / f"{i}.png", _img(i))
    good, zero, txt, trunc = _bad_files(tmp_path / "bad")
    os.replace(zero, train / "z0.png")
    os.replace(txt, train / "z1.png")
    # Header problems are all found at indexing, before any work, in one message.
    with pytest.raises(D.DataError) as e:
        D.folder_source(str(train))
    msg = str(e.value)
    assert "2 files cannot be used" in msg
    assert str(train / "z0.png") in msg and str(train / "z1.png") in msg
    os.remove(train / "z0.png")
    os.remove(train / "z1.png")
    # A truncated file has a valid header: it fails when the batch reads it, naming it, also
    # from a grain worker thread, as the reader's own DataError (no grain note).
    os.replace(trunc, train / "3.png")
    src = D.folder_source(str(train))
    with pytest.raises(D.DataError) as e:
        list(D.make_batches(src, image_size=16, mean=MEAN, std=STD, batch_size=2,
                            num_workers=num_workers))
    assert type(e.value) is D.DataError and str(train / "3.png") in str(e.value)
    assert not getattr(e.value, "__notes__", None)


# ---------------------------------------------------------------- plain folders

def _train_tree(root):
    names = ["a.png", "B.JPG", "c.jpeg", "d.BMP", "sub/e.tif", "sub/deeper/f.TIFF", "sub/g.png"]
    for i, n in enumerate(names):
        fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}
        _save(os.path.join(root, *n.split("/")), _img(i),
              format=fmt.get(os.path.splitext(n)[1].lower(), "PNG"))
    _save(os.path.join(root, ".hidden.png"), _img(9))
    _save(os.path.join(root, ".cache", "x.png"), _img(9))
    for n in ("readme.txt", "sub/labels.txt", "sub/meta.json"):
        with open(os.path.join(root, *n.split("/")), "w") as f:
            f.write("x")
    return names


def test_folder_source_recursive_sorted_names(tmp_path):
    root = str(tmp_path / "parts")
    names = _train_tree(root)
    with pytest.warns(D.DataWarning) as w:
        src = D.folder_source(root)
    notes = [str(x.message) for x in w]
    assert len(notes) == 1 and "skipped 3 non-image files" in notes[0]
    assert "2 .txt files, 1 .json file" in notes[0] and root in notes[0]
    assert src.names == sorted(names) and len(src) == 7
    assert (src.dataset, src.category, src.split, src.has_masks) == ("folder", "parts", "train",
                                                                     False)
    for name, r in zip(src.names, src):
        assert r["name"] == name and r["label"] == 0 and r["mask"] is None
        np.testing.assert_array_equal(r["image"],
                                      D.load_rgb(os.path.join(root, *name.split("/"))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert D.folder_source(root).names == src.names
    seen = []
    D.folder_source(root, notify=seen.append)  # notes to the caller's log instead
    assert len(seen) == 1
    os.symlink(root, os.path.join(root, "sub", "loop"))  # a cycle is walked once
    assert D.folder_source(root, notify=seen.append).names == src.names


def test_folder_without_images_says_what_it_holds(tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    for i in range(12):
        (root / f"{i}.txt").write_text("x")
    (root / "a.csv").write_text("x")
    with pytest.raises(D.DataError) as e:
        D.folder_source(str(root))
    assert str(root) in str(e.value) and "12 .txt files, 1 .csv file" in str(e.value)
    (tmp_path / "empty" / ".git").mkdir(parents=True)
    with pytest.raises(D.DataError, match="it holds nothing"):
        D.folder_source(str(tmp_path / "empty"))
    with pytest.raises(D.MissingDataError, match="nowhere"):
        D.folder_source(str(tmp_path / "nowhere"))
    with pytest.raises(D.DataError, match="is a file"):
        D.folder_source(str(root / "a.csv"))


def _test_tree(tmp_path, gt="../ground_truth", mask_value=1):
    """tmp/ds/train/*, tmp/ds/test/{good,crack,dent}, masks under ds/<gt>."""
    ds = tmp_path / "ds"
    for i in range(10):
        _save(ds / "train" / f"{i:02d}.png", _img(i))
    masks = {}
    for d, n in (("good", 3), ("crack", 2), ("dent", 2)):
        for i in range(n):
            _save(ds / "test" / d / f"{i}.png", _img(100 + i))
            if d != "good" and gt:
                m = np.zeros((24, 32), np.uint8)
                m[i:i + 5, 4:9] = mask_value
                mdir = os.path.normpath(os.path.join(ds / "test", gt, d))
                masks[f"{d}/{i}.png"] = _save(os.path.join(mdir, f"{i}_mask.png"), m)
    return str(ds / "train"), str(ds / "test"), masks


@pytest.mark.parametrize("gt", ["../ground_truth", "ground_truth"])
def test_load_folders_with_masks(tmp_path, gt):
    train, test, masks = _test_tree(tmp_path, gt)
    src = D.load_folders(train, test, holdout_fraction=0.2, holdout_min=1, seed=0)
    assert set(src) == {"train", "holdout", "test"}
    assert len(src["train"]) == 8 and len(src["holdout"]) == 2
    assert sorted(src["train"].names + src["holdout"].names) == [f"{i:02d}.png" for i in range(10)]
    t = src["test"]
    assert t.has_masks and not src["train"].has_masks
    assert t.names == sorted(["good/0.png", "good/1.png", "good/2.png", "crack/0.png",
                              "crack/1.png", "dent/0.png", "dent/1.png"])
    for r in t:
        assert r["label"] == int(r["defect"] != "good") and r["defect"] == r["name"].split("/")[0]
        if r["label"]:
            ref = np.asarray(Image.open(masks[r["name"]])) != 0
            np.testing.assert_array_equal(r["mask"] > 0, ref)
        else:
            assert r["mask"] is None
    again = D.load_folders(train, test, holdout_fraction=0.2, holdout_min=1, seed=0)
    assert again["holdout"].names == src["holdout"].names
    other = D.load_folders(train, test, holdout_fraction=0.2, holdout_min=1, seed=5)
    assert other["holdout"].names != src["holdout"].names
    capped = D.load_folders(train, test, max_train=4, max_test=3, holdout_min=1)
    assert len(capped["train"]) + len(capped["holdout"]) == 4 and len(capped["test"]) == 3
    nomask = D.load_folders(train, test, masks=False)["test"]
    assert not nomask.has_masks and all(r["mask"] is None for r in nomask)
    assert set(D.load_folders(train)) == {"train", "holdout"}
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_test"):
            D.load_folders(train, test, max_test=bad)


def test_load_folders_without_masks_is_image_only(tmp_path):
    train, test, _ = _test_tree(tmp_path, gt=None)
    t = D.load_folders(train, test)["test"]
    assert not t.has_masks and sum(r["label"] for r in t) == 4


def test_load_folders_partial_masks_names_the_missing(tmp_path):
    train, test, masks = _test_tree(tmp_path)
    os.remove(masks["dent/1.png"])
    with pytest.raises(D.MissingDataError) as e:
        D.load_folders(train, test)
    msg = str(e.value)
    assert "1 of 4 defect images" in msg and os.path.join(test, "dent", "1.png") in msg
    assert "--no-masks" in msg
    assert not D.load_folders(train, test, masks=False)["test"].has_masks


def test_load_folders_layout_errors(tmp_path):
    train, test, _ = _test_tree(tmp_path)
    os.rename(os.path.join(test, "good"), os.path.join(test, "ok"))
    with pytest.raises(D.DataError, match="no good/ sub-folder") as e:
        D.load_folders(train, test)
    assert "crack, dent, ok" in str(e.value)
    os.rename(os.path.join(test, "ok"), os.path.join(test, "good"))
    _save(os.path.join(test, "loose.png"), _img(0))
    with pytest.raises(D.DataError, match="directly inside it"):
        D.load_folders(train, test)
    os.remove(os.path.join(test, "loose.png"))
    with pytest.warns(D.DataWarning, match="has a ground_truth and a test sub-folder"):
        with pytest.raises(D.DataError, match="both in the training folder"):
            D.load_folders(os.path.dirname(test), test, masks=False)  # train holds test/


def test_has_masks_follows_the_files_on_disk(tmp_path):
    root = str(tmp_path / "r")
    D.generate_category(root, "c", n_train=3, n_test_good=1, n_test_defect=2, size=32)
    assert D.load_category("mvtec_ad", root, "c")["test"].has_masks
    kw = dict(n_train=3, n_test_good=1, n_test_defect=2, size=32)
    assert D.load_category("synthetic", root, "c", synthetic_kwargs=kw)["test"].has_masks is True
    gt = os.path.join(root, "c", "ground_truth", "blob")
    os.remove(os.path.join(gt, "000_mask.png"))
    with pytest.warns(D.DataWarning, match="1 anomalous test images"):
        src = D.load_category("mvtec_ad", root, "c", require_masks=False)
    assert not src["test"].has_masks
    for f in os.listdir(gt):
        os.remove(os.path.join(gt, f))
    os.remove(os.path.join(root, "c", "ground_truth", "scratch", "000_mask.png"))
    os.remove(os.path.join(root, "c", "ground_truth", "scratch", "001_mask.png"))
    assert not D.load_category("mvtec_ad", root, "c", require_masks=False)["test"].has_masks
    assert not D.load_category("elpv", None, "mono", max_train=5, max_test=5)["test"].has_masks
    recs = [{"image": _img(0), "mask": None, "label": 0, "name": "a"},
            {"image": _img(1), "mask": np.ones((24, 32), np.uint8), "label": 1, "name": "b"}]
    assert D.records_source(recs, dataset="v", category="c", split="val").has_masks
    assert not D.records_source(recs[:1], dataset="v", category="c", split="val").has_masks


# ---------------------------------------------------------------- VisA

def _visa_tree(root, objects=("candle", "capsules")):
    """A small tree in VisA's own layout: JPG images, masks with small non-zero values."""
    rows = []
    for o, obj in enumerate(objects):
        base = os.path.join(root, obj, "Data")
        for i in range(6):
            rel = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            _save(os.path.join(root, *rel.split("/")), _img(10 * o + i), quality=95)
            rows.append([obj, "train" if i < 4 else "test", "normal", rel, ""])
        for i in range(3):
            rel = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG"
            mrel = f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
            _save(os.path.join(root, *rel.split("/")), _img(50 + i), quality=95)
            m = np.zeros((24, 32), np.uint8)
            m[4 + i:12, 6:20] = 1 + i  # VisA stores small values, not 255
            _save(os.path.join(root, *mrel.split("/")), m)
            rows.append([obj, "test", "anomaly", rel, mrel])
        assert os.path.isdir(base)
    os.makedirs(os.path.join(root, "split_csv"), exist_ok=True)
    with open(os.path.join(root, "split_csv", "1cls.csv"), "w", newline="",
              encoding="utf-8-sig") as f:  # with a BOM, as spreadsheet tools write it
        w = csv.writer(f)
        w.writerow(visa.COLUMNS)
        w.writerows(rows)
    return rows


def test_visa_in_its_own_layout(tmp_path):
    root = str(tmp_path / "VisA")
    rows = _visa_tree(root)
    assert "visa" in D.DATASETS
    assert D.available_categories("visa", root) == ["candle", "capsules"]
    src = D.load_category("visa", root, "candle", holdout_fraction=0, holdout_min=1, seed=0)
    mine = [r for r in rows if r[0] == "candle"]
    assert len(src["train"]) + len(src["holdout"]) == sum(r[1] == "train" for r in mine) == 4
    assert len(src["holdout"]) == 1
    assert src["test"].names == sorted(r[3][len("candle/"):] for r in mine if r[1] == "test")
    assert src["test"].has_masks and src["test"].dataset == "visa"
    for r in src["test"]:
        row = [x for x in mine if x[3] == "candle/" + r["name"]][0]
        assert r["label"] == (row[2] == "anomaly")
        assert r["defect"] == ("anomaly" if r["label"] else "good")
        if r["label"]:
            raw = np.asarray(Image.open(os.path.join(root, *row[4].split("/"))))
            assert raw.max() <= 3  # would be empty at the old > 127 threshold
            np.testing.assert_array_equal(r["mask"] > 0, raw != 0)
        else:
            assert r["mask"] is None
    b = next(D.make_batches(src["test"], image_size=16, mean=MEAN, std=STD, batch_size=16))
    assert b["mask"][b["label"] == 1].reshape(3, -1).any(axis=1).all()
    with pytest.raises(ValueError, match="backend 'direct'"):
        D.load_category("visa", root, "candle", backend="tfds")


def _rewrite_csv(root, fn):
    path = os.path.join(root, "split_csv", "1cls.csv")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    rows = fn(rows)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


@pytest.mark.parametrize("case, edit, phrase", [
    ("no category", None, "'pcb9' is not in"),
    ("bad label", lambda rows: rows[:1] + [rows[1][:2] + ["bad"] + rows[1][3:]] + rows[2:],
     "label 'bad'"),
    ("anomaly in train", lambda rows: rows + [["candle", "train", "anomaly", rows[-1][3], ""]],
     "anomaly in the train split"),
    ("outside root", lambda rows: rows + [["candle", "test", "normal", "../secret.png", ""]],
     "outside the dataset root"),
    ("columns", lambda rows: [["object", "split", "label", "img", "mask"]] + rows[1:],
     "lacks the column(s) image"),
    ("missing mask", lambda rows: [r[:4] + [r[4].replace("000.png", "404.png")] for r in rows],
     "404.png"),
])
def test_visa_errors_name_the_problem(tmp_path, case, edit, phrase):
    root = str(tmp_path / "VisA")
    _visa_tree(root, objects=("candle",))
    _save(os.path.join(str(tmp_path), "secret.png"), _img(0))
    if edit:
        _rewrite_csv(root, edit)
    with pytest.raises(D.DataError) as e:
        D.load_category("visa", root, "pcb9" if case == "no category" else "candle")
    assert phrase in str(e.value)
    if case == "no category":
        assert "candle" in str(e.value)


def test_visa_missing_csv_says_where_to_get_it(tmp_path):
    with pytest.raises(D.MissingDataError, match="does not exist"):
        D.load_category("visa", str(tmp_path / "none"), "candle")
    (tmp_path / "v").mkdir()
    with pytest.raises(D.MissingDataError, match="1cls.csv") as e:
        D.load_category("visa", str(tmp_path / "v"), "candle")
    assert visa.VISA_URL in str(e.value)
    assert D.available_categories("visa", str(tmp_path / "v")) == []


# ---------------------------------------------------------------- predict inputs

def test_resolve_inputs(tmp_path):
    root = str(tmp_path / "in")
    _train_tree(root)
    files = D.resolve_inputs(root)
    rel = [os.path.relpath(f, root).replace(os.sep, "/") for f in files]
    assert rel == sorted(["a.png", "B.JPG", "c.jpeg", "d.BMP", "readme.txt", "sub/e.tif",
                          "sub/deeper/f.TIFF", "sub/g.png", "sub/labels.txt", "sub/meta.json"])
    one = os.path.join(root, "a.png")
    assert D.resolve_inputs(one) == [one]
    from pathlib import Path
    missing = str(tmp_path / "typo.png")
    both = D.resolve_inputs([Path(one), missing, os.path.join(root, "sub", "deeper")])
    assert both == [one, missing, os.path.join(root, "sub", "deeper", "f.TIFF")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DataError, match="holds no files"):
        D.resolve_inputs(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no inputs"):
        D.resolve_inputs([])
    with pytest.raises(TypeError, match="array_to_images"):
        D.resolve_inputs(np.zeros((4, 4)))
    with pytest.raises(TypeError, match="int"):
        D.resolve_inputs([one, 3])


def _via_png(tmp_path, array, mode=None):
    """The file reader's answer for the same pixels: the reference for array_to_rgb."""
    img = Image.fromarray(array) if mode is None else Image.fromarray(array, mode)
    path = str(tmp_path / "ref.png")
    img.save(path)
    return D.load_rgb(path)


def test_array_to_rgb_matches_the_file_reader(tmp_path):
    rgb = _img(3)
    gray = rgb[..., 0]
    rgba = np.concatenate([rgb, np.full((24, 32, 1), 90, np.uint8)], -1)
    g16 = gray.astype(np.uint16) * 250 + np.uint16(100)  # not a multiple of 257: rounding
    ref_gray = _via_png(tmp_path, gray)
    cases = [(rgb, rgb), (gray, ref_gray), (gray[..., None], ref_gray),
             (rgba, _via_png(tmp_path, rgba)), (g16, _via_png(tmp_path, g16))]
    for arr, ref in cases:
        out = D.array_to_rgb(arr)
        assert out.dtype == np.uint8 and out.shape == (24, 32, 3), arr.shape
        np.testing.assert_array_equal(out, ref)
    f = rgb / 255.0
    np.testing.assert_array_equal(D.array_to_rgb(f), rgb)
    np.testing.assert_array_equal(D.array_to_rgb(f.astype(np.float32)), rgb)
    np.testing.assert_array_equal(D.array_to_rgb(np.clip(f + 5e-4, 0, None)), np.rint(
        np.clip(f + 5e-4, 0, 1) * 255).astype(np.uint8))  # rounding overshoot tolerated
    mask = np.zeros((4, 5), bool)
    mask[1, 2] = True
    np.testing.assert_array_equal(D.array_to_rgb(mask)[..., 1], mask * 255)
    np.testing.assert_array_equal(D.array_to_rgb(rgb.astype(np.int64)), rgb)


@pytest.mark.parametrize("arr, phrase", [
    (np.full((4, 4), 200.0), "must hold values in [0, 1], found 200..200"),
    (np.full((4, 4), -0.5, np.float32), "[0, 1]"),
    (np.full((4, 4), np.nan), "NaN"),
    (np.full((4, 4), 300, np.int32), "found 300..300"),
    (np.zeros((4, 4, 2), np.uint8), "shape (4, 4, 2)"),
    (np.zeros((4, 4, 5), np.uint8), "got shape (4, 4, 5)"),
    (np.zeros((0, 4), np.uint8), "no pixels"),
    (np.zeros((4, 4), np.complex64), "dtype complex64"),
    (np.array([["a"]]), "dtype <U1"),
])
def test_array_to_rgb_refuses_with_the_shape_or_dtype(arr, phrase):
    with pytest.raises(ValueError) as e:
        D.array_to_rgb(arr)
    assert phrase in str(e.value)


def test_array_to_images_batches():
    batch = np.stack([_img(i) for i in range(3)])
    out = D.array_to_images(batch)
    assert len(out) == 3 and all(np.array_equal(o, b) for o, b in zip(out, batch))
    assert len(D.array_to_images(batch[0])) == 1
    grays = batch[..., 0]  # [B, H, W] with B = 3: ambiguous with a channels-first image
    with pytest.raises(ValueError, match="ambiguous image array shape \\(3, 24, 32\\)"):
        D.array_to_images(grays)
    five = np.stack([_img(i)[..., 0] for i in range(5)])  # [5, 24, 32]: a gray batch
    out = D.array_to_images(five)
    assert len(out) == 5 and np.array_equal(out[4][..., 2], five[4])
    out = D.array_to_images(grays[..., None])
    assert len(out) == 3 and np.array_equal(out[1][..., 0], grays[1])
    assert len(D.array_to_images([batch[0], batch[1][..., 0]])) == 2
    with pytest.raises(ValueError, match="\\[B, H, W, C\\]"):
        D.array_to_images(np.zeros((2, 4, 4, 7)))
    with pytest.raises(ValueError, match="2, 3 or 4 dimensions"):
        D.array_to_images(np.zeros((1, 2, 4, 4, 3)))


# ---------------------------------------------------------------- threaded batches

def test_threaded_batches_equal_serial_for_every_source_kind(tmp_path):
    root = str(tmp_path / "r")
    D.generate_category(root, "c", n_train=7, n_test_good=2, n_test_defect=2, size=32,
                        mixed_formats=True)
    mv = D.load_category("mvtec_ad", root, "c")["test"]
    recs = [mv[i] for i in range(len(mv))]
    train_dir = os.path.join(root, "c", "train", "good")
    kinds = {"samples": mv, "records": D.records_source(recs, dataset="v", category="c",
                                                        split="val"),
             "list": recs, "folder": D.folder_source(train_dir),
             "tfds": D.load_category("mvtec_ad", root, "c", backend="tfds",
                                     tfds_dir=str(tmp_path / "tfds"))["test"]}
    for kind, src in kinds.items():
        kw = dict(image_size=16, mean=MEAN, std=STD, batch_size=3)
        serial = list(D.make_batches(src, **kw))
        threaded = list(D.make_batches(src, num_workers=3, **kw))
        assert len(serial) == len(threaded) == -(-len(src) // 3), kind
        for a, b in zip(serial, threaded):
            for k in ("image", "mask", "label", "name"):
                np.testing.assert_array_equal(a[k], b[k])
        names = [n for b in threaded for n in b["name"]]
        expected = src.names if hasattr(src, "names") else [r["name"] for r in src]
        assert names == expected, kind
