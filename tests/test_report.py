"""The run's report page (issue 27): it parses, every inlined image decodes, its numbers are
results.json's, per-defect-type AUROC is scikit-learn's on the subsets, `pn-jax report`
rebuilds the same page, and a bad RUN_DIR is refused by name."""
import base64
import csv
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from experiments import run
from pn_jax import cli, metrics, report, report_data

TINY = ["--dataset", "synthetic", "--category", "synthetic", "--image-size", "64", "--embed-dim", "64",
        "--coreset-ratio", "0.1", "--k", "3", "--batch-size", "4", "--figures", "0"]


class Page(HTMLParser):
    """The page's tables (id -> rows of cell texts), image sources and tags."""

    def __init__(self, text):
        super().__init__()
        self.tables, self.images, self.tags = {}, [], set()
        self._table, self._row, self._cell = None, None, None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
        elif tag == "img":
            self.images.append(a["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def read_json(path):
    with open(path) as fh:
        return json.load(fh)


def fmt(v):
    return "\u2013" if v is None else f"{v:.2f}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    assert run.main(TINY + ["--data-root", str(tmp / "data"), "--out", str(tmp / "train"), "--ablation"]) == 0
    assert run.main(TINY + ["--data-root", str(tmp / "data"), "--out", str(tmp / "test"), "--mode", "test",
                            "--checkpoint", str(tmp / "train" / "checkpoint" / "synthetic")]) == 0
    return tmp


def _load(run_dir):
    text = open(os.path.join(run_dir, "report.html"), encoding="utf-8").read()
    return text, Page(text), read_json(os.path.join(run_dir, "results.json"))


def test_page_parses_and_every_image_decodes(runs):
    for name in ("train", "test"):
        text, page, _ = _load(runs / name)
        assert "script" not in page.tags and "<script" not in text.lower()
        assert len(page.images) >= 1 + 1 + 2  # curves, histogram, gallery cards
        for src in page.images:
            assert src.startswith("data:image/png;base64,"), src[:60]  # inlined: no network
            im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
            im.load()
            assert im.size[0] > 10 and im.size[1] > 10
        assert not os.path.exists(os.path.join(runs / name, "report.html.tmp"))


def test_numbers_on_the_page_are_results_json(runs):
    _, page, res = _load(runs / "train")
    e = res["categories"]["synthetic"]
    rows = {r[0]: r[1:] for r in page.tables["metrics"][1:]}
    assert page.tables["metrics"][0] == ["Name"] + list(report.METRIC_KEYS)  # masks: every metric defined
    assert rows == {"synthetic": [fmt(e["metrics"].get(k)) for k in report.METRIC_KEYS]}  # one category: no mean row
    thr = dict(zip(page.tables["at_threshold"][0], page.tables["at_threshold"][1]))
    for k in report.THRESHOLD_KEYS:
        assert thr[k] == fmt(e["at_threshold"][k])
    tp, fp, fn, tn = (int(thr[k]) for k in ("TP", "FP", "FN", "TN"))
    assert tp + fp + fn + tn == e["counts"]["test"] and tp + fn == e["counts"]["test_anomalous"]
    assert fmt(100 * tp / (tp + fn)) == fmt(e["at_threshold"]["recall"])
    assert fmt(100 * fp / (fp + tn)) == fmt(e["at_threshold"]["FPR"])
    defects = {r[0]: r[1:] for r in page.tables["defects-synthetic"][1:]}
    assert set(defects) == set(e["per_defect_type"]) == {"blob", "scratch"}
    for t, m in e["per_defect_type"].items():
        assert defects[t] == [str(m["n"])] + [fmt(m[k]) for k in ("mAUROC_sp_max", "mAUROC_px", "mAUPRO_px")]
    ablation = {r[0]: r[1:] for r in page.tables["ablation-synthetic"][1:]}
    assert set(ablation) == set(e["ablation"])
    for v, m in e["ablation"].items():
        assert ablation[v][0] == fmt(m["mAUROC_sp_max"])
    conf = page.tables["confusion-synthetic"]
    assert conf[1] == ["defective", str(tp), str(fn)] and conf[2] == ["normal", str(fp), str(tn)]


def test_per_defect_type_auroc_is_sklearns_on_the_subsets(runs):
    res = read_json(runs / "train" / "results.json")["categories"]["synthetic"]
    with np.load(runs / "train" / "report" / "synthetic.npz") as z:
        scores, labels, defects, names = z["scores"][0], z["labels"], z["defects"], z["names"]
    # the defect type carried through the batches is the folder the image came from
    assert [str(d) for d in defects] == [n.split("/")[1] for n in names]
    assert np.isclose(100 * roc_auc_score(labels, scores), res["metrics"]["mAUROC_sp_max"])
    for t, m in res["per_defect_type"].items():
        keep = (labels == 0) | (defects == t)
        assert m["n"] == int(np.sum(defects == t))
        assert np.isclose(m["mAUROC_sp_max"], 100 * roc_auc_score(labels[keep], scores[keep]))


def test_per_defect_type_against_sklearn_with_ties_and_pixels():
    rng = np.random.default_rng(3)
    n = 40
    labels = np.r_[np.zeros(12, int), np.ones(n - 12, int)]
    defects = np.array(["good"] * 12 + list(rng.choice(["crack", "hole", "stain"], n - 12)))
    scores = np.round(rng.normal(size=n) + labels * np.where(defects == "crack", 2.0, 0.3), 1)  # ties
    maps = rng.random((n, 8, 8)).astype(np.float32)
    masks = np.zeros((n, 8, 8), bool)
    masks[labels == 1, 2:5, 3:6] = True
    maps[masks] += 0.4
    got = metrics.per_defect_type(scores, labels, defects, maps, masks)
    assert set(got) == {"crack", "hole", "stain"}
    for t, m in got.items():
        keep = (labels == 0) | (defects == t)
        assert m["n"] == int(np.sum(defects == t))
        assert np.isclose(m["mAUROC_sp_max"], 100 * roc_auc_score(labels[keep], scores[keep]))
        assert np.isclose(m["mAUROC_px"], 100 * roc_auc_score(masks[keep].ravel(), maps[keep].ravel()))
        assert np.isclose(m["mAUPRO_px"], 100 * metrics.aupro(maps[keep], masks[keep]))
    only_image = metrics.per_defect_type(scores, labels, defects)
    assert set(only_image["crack"]) == {"n", "mAUROC_sp_max"}
    with pytest.raises(ValueError, match="must all be"):
        metrics.per_defect_type(scores, labels, defects[:-1])


def test_gallery_keeps_the_worst_false_positives_and_misses():
    rng = np.random.default_rng(0)
    g = report_data.Gallery(3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), size=8)
    all_scores, all_labels, all_names = [], [], []
    for b in range(5):
        lab = rng.integers(0, 2, 6)
        sc = rng.normal(size=6)
        names = [f"img{b}_{i}" for i in range(6)]
        batch = {"image": rng.random((6, 16, 16, 3)), "mask": np.zeros((6, 16, 16)), "label": lab,
                 "name": np.array(names), "defect": np.where(lab == 1, "dent", "good")}
        g.offer(batch, sc, rng.random((6, 16, 16)))
        all_scores += list(sc)
        all_labels += list(lab)
        all_names += names
    s, y, nm = np.array(all_scores), np.array(all_labels), np.array(all_names)
    a = g.arrays()
    normal = nm[y == 0][np.argsort(-s[y == 0], kind="stable")][:3]
    defective = nm[y == 1][np.argsort(s[y == 1], kind="stable")][:3]
    assert list(a["g_normal_name"]) == list(normal) and list(a["g_defective_name"]) == list(defective)
    assert a["g_normal_image"].shape == (3, 8, 8, 3) and a["g_normal_image"].dtype == np.uint8


def test_report_command_rebuilds_the_same_page(runs, tmp_path, capsys):
    out = tmp_path / "again.html"
    assert cli.main(["report", str(runs / "train"), "--out", str(out)]) == 0
    assert out.read_bytes() == (runs / "train" / "report.html").read_bytes()
    os.remove(runs / "test" / "report.html")
    assert cli.main(["report", str(runs / "test")]) == 0
    assert os.path.isfile(runs / "test" / "report.html")


def test_runs_side_by_side(runs, tmp_path, capsys):
    """Two runs on the same test images: both rows in the tables, both runs' curves in the plots."""
    out = tmp_path / "both.html"
    assert cli.main(["report", str(runs / "train"), str(runs / "test"), "--out", str(out)]) == 0
    page = Page(out.read_text(encoding="utf-8"))
    rows = {r[0]: r[1:] for r in page.tables["metrics"][1:]}
    for name in ("train", "test"):
        m = read_json(runs / name / "results.json")["categories"]["synthetic"]["metrics"]
        assert rows[f"synthetic ({name})"] == [fmt(m.get(k)) for k in report.METRIC_KEYS]
    merged = report._merge([(n, str(runs / n), *report.load_run(str(runs / n))) for n in ("train", "test")])
    with np.load(runs / "test" / "report" / "synthetic.npz") as z:
        assert np.array_equal(merged["synthetic"]["scores"][-1], z["scores"][0])
        assert np.array_equal(merged["synthetic"]["px12_fpr"], z["px0_fpr"])  # 12 variants of the ablation run first
    assert list(merged["synthetic"]["variants"][-1:]) == ["test: calibrated_rerank (configured)"]
    assert cli.main(["report", str(runs / "train"), str(runs / "test")]) == 2
    assert "give --out FILE" in capsys.readouterr().err
    other = tmp_path / "other"
    shutil.copytree(runs / "test", other)
    with np.load(other / "report" / "synthetic.npz") as z:
        d = {k: z[k] for k in z.files}
    d["names"] = d["names"][::-1]
    np.savez(other / "report" / "synthetic.npz", **d)
    assert cli.main(["report", str(runs / "train"), str(other), "--out", str(tmp_path / "x.html")]) == 2
    assert f"RUN_DIR {other} scored other synthetic test images" in capsys.readouterr().err


def test_bad_run_dir_is_refused_by_name(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert cli.main(["report", str(missing)]) == 2
    assert f"RUN_DIR {missing} is not a folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["report", str(empty)]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "results.json" in err and "Traceback" not in err
    (empty / "results.json").write_text("{not json")
    assert cli.main(["report", str(empty)]) == 2
    assert "results.json is not a results.json pn_jax wrote" in capsys.readouterr().err
    assert not os.path.exists(empty / "report.html")


def test_predict_writes_a_smaller_page(runs, tmp_path, capsys):
    out = tmp_path / "pred"
    test_dir = runs / "data" / "synthetic" / "test"
    code = cli.main(["predict", "--checkpoint", str(runs / "train" / "checkpoint" / "synthetic"), str(test_dir),
                     "--out", str(out), "--no-overlays"])
    assert code == 0
    text = (out / "report.html").read_text(encoding="utf-8")
    page = Page(text)
    for src in page.images:
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).load()
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    summary = {r[0]: r[1] for r in page.tables["summary"]}
    assert int(summary["images"]) == len(rows)
    assert int(summary["at or above the threshold (anomalous)"]) == sum(r["label"] == "anomalous" for r in rows)
    n_cards = len(page.images) - 1  # the histogram, then one card per image (18 images: each shown once)
    assert n_cards == min(len(rows), 18)
    again = tmp_path / "again.html"
    assert cli.main(["report", str(out), "--out", str(again)]) == 0
    assert again.read_text(encoding="utf-8") == text


def test_predict_page_shows_images_of_any_shape_by_score(tmp_path):
    rng = np.random.default_rng(1)
    g = report_data.ScoreGallery(n_high=3, n_low=2, size=32)
    shapes = [(40, 90), (64, 64), (90, 30), (20, 20), (50, 70), (33, 44)]
    scores = rng.normal(size=len(shapes))
    for i, (h, w) in enumerate(shapes):
        g.offer(f"/data/x/img{i}.png", float(scores[i]), rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
                rng.random((h, w)))
    report_data.write_predict_data(str(tmp_path), [f"/data/x/img{i}.png" for i in range(6)], scores, 0.0, g)
    page = Page(open(report.write_predict_page(str(tmp_path)), encoding="utf-8").read())
    sizes = [Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size for src in page.images[1:]]
    order = np.argsort(-scores, kind="stable")
    shown = list(order[:3]) + list(order[-2:])  # highest three, then the lowest two, by descending score
    assert len(sizes) == 5
    for (w, h), i in zip(sizes, shown):
        sh, sw = shapes[i]
        s = min(1.0, 32 / max(sh, sw))
        assert (w, h) == (2 * round(sw * s) + 4, round(sh * s))  # image | overlay, each its own aspect
    summary = {r[0]: r[1] for r in page.tables["summary"]}
    assert int(summary["at or above the threshold (anomalous)"]) == int(np.sum(scores >= 0.0))


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium installed (CI need not have one)")
def test_page_renders_in_a_headless_browser(runs, tmp_path):
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1280,2400", (runs / "train" / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    im = np.asarray(Image.open(shot).convert("RGB"))
    assert im.shape[:2] == (2400, 1280)
    assert len(np.unique(im.reshape(-1, 3), axis=0)) > 200  # plots and images drawn, not a blank page
