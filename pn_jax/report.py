"""One self-contained HTML page per run (`<out>/report.html`), readable offline and without
JavaScript: the metric table per category and the mean, image and pixel ROC / PR curves,
histograms of the normal and defective image scores with the stored threshold and the
confusion counts at it, per-defect-type results, a gallery of the highest-scoring normal and
lowest-scoring defective images (image | map overlay | mask), the configuration, provenance
and timings. Variants scored on the same bank (`--ablation`, `--tune`) share the curve plots.

Every number on the page is read from `results.json`; the plots and the gallery from
`<out>/report/<category>.npz` (`pn_jax.report_data`: what the test pass already computed,
nothing is extracted or scored again), so `pn-jax report RUN_DIR` rebuilds the same page from
a finished run. `pn-jax predict` writes a smaller page of the same kind (`report_data.npz`
beside predictions.csv): score histogram, threshold, gallery by score. Figures are matplotlib
PNGs and the gallery strips PIL PNGs, inlined as base64; text goes through `html.escape`.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402

from pn_jax import atomic, report_data  # noqa: E402
from pn_jax.report_data import DATA_DIR, PREDICT_DATA  # noqa: E402

PAGE = "report.html"
METRIC_KEYS = ("mAUROC_sp_max", "mAUROC_px", "mAUPRO_px", "mAP_sp_max", "mF1_max_sp_max", "mAP_px",
               "mF1_max_px")
THRESHOLD_KEYS = ("threshold", "precision", "recall", "F1", "accuracy", "FPR")


class ReportError(ValueError):
    """A run folder the page cannot be built from; the message names the folder or file."""


# ----------------------------------------------------------------------------- figures
def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")  # keeps a legend outside the axes
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, alt: str, cls: str = "") -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}"' + (f' class="{cls}"' if cls else "") + ">"


def _curve_figure(d: dict, labels: np.ndarray) -> str:
    """Image ROC and PR (and pixel ROC and PR where masks exist), every variant in the same axes."""
    px = any(k.startswith("px0_") for k in d)
    fig, axes = plt.subplots(1, 4 if px else 2, figsize=(13 if px else 7.5, 3.6))
    names = [str(v) for v in d["variants"]]
    colours = plt.get_cmap("tab10").colors  # saturated; past ten variants the lines turn dashed
    pairs = [(0, "image ROC", "fpr", "tpr"), (1, "image PR", "recall", "precision")]
    if px:
        pairs += [(2, "pixel ROC", "fpr", "tpr"), (3, "pixel PR", "recall", "precision")]
    for ax_i, title, xk, yk in pairs:
        ax = axes[ax_i]
        for i, name in enumerate(names):
            c = report_data.curves(d["scores"][i], labels) if ax_i < 2 else {k: d.get(f"px{i}_{k}") for k in (xk, yk)}
            if not c or c.get(xk) is None:
                continue
            ax.plot(c[xk], c[yk], lw=2.4 if i == 0 else 1.0, label=name, zorder=3 if i == 0 else 2,
                    color=("black" if len(names) > 1 else colours[0]) if i == 0 else colours[(i - 1) % 10],
                    ls="-" if i <= 10 else "--")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("false positive rate" if xk == "fpr" else "recall", fontsize=9)
        ax.set_ylabel("true positive rate" if yk == "tpr" else "precision", fontsize=9)
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    if len(names) > 1:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5),
                   fontsize=8, frameon=False)
    fig.tight_layout()
    return _png(fig)


def _hist_figure(scores: np.ndarray, labels: np.ndarray | None, threshold, title: str) -> str:
    fig, ax = plt.subplots(figsize=(9, 3.4))
    finite = scores[np.isfinite(scores)]
    edges = np.histogram_bin_edges(finite if finite.size else [0, 1], bins=40)
    if labels is None:
        ax.hist(finite, bins=edges, color="#4c72b0", alpha=0.8, label=f"images ({finite.size})")
    else:
        for lab, name, col in ((0, "normal", "#4c72b0"), (1, "defective", "#dd5555")):
            s = scores[labels == lab]
            ax.hist(s, bins=edges, color=col, alpha=0.6, label=f"{name} ({s.size})")
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="black", ls="--", lw=1.5, label=f"stored threshold {threshold:.4g}")
    ax.set_xlabel("image score", fontsize=9)
    ax.set_ylabel("images", fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # never over a bar
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _card(d: dict, prefix: str, i: int, lo: float, hi: float, threshold) -> str:
    """One gallery card: image | anomaly map over it | mask, one PNG, with its caption."""
    img = d[prefix + "image"][i].astype(np.float32) / 255.0
    panels = [img]
    if prefix + "map" in d:
        amap = d[prefix + "map"][i].astype(np.float32)
        over = 0.5 * img + 0.5 * plt.get_cmap("jet")((np.clip((amap - lo) / max(hi - lo, 1e-12), 0, 1)))[..., :3]
        if threshold is not None and np.isfinite(threshold):  # outline the region above the threshold
            above = amap >= threshold
            over[above & ~ndimage.binary_erosion(above, border_value=1)] = 1.0
        panels.append(over)
    if prefix + "mask" in d and bool(d[prefix + "has_mask"][i]):
        panels.append(np.repeat(d[prefix + "mask"][i][..., None].astype(np.float32), 3, axis=2))
    gap = np.ones((img.shape[0], 4, 3), np.float32)
    strip = np.concatenate(sum(([p, gap] for p in panels), [])[:-1], axis=1)
    buf = io.BytesIO()
    Image.fromarray((strip * 255).round().astype(np.uint8)).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    name, score = str(d[prefix + "name"][i]), float(d[prefix + "score"][i])
    decision = ""
    if threshold is not None and np.isfinite(threshold):
        decision = " &rarr; " + ("anomalous" if score >= threshold else "normal")
    defect = str(d[prefix + "defect"][i]) if prefix + "defect" in d else ""
    what = f" &middot; {html.escape(defect)}" if defect and defect not in ("good", "?") else ""
    return (f'<figure class="card">{_img(uri, name)}<figcaption><b>{html.escape(name)}</b><br>'
            f"score {score:.4g}{decision}{what}</figcaption></figure>")


def _gallery(d: dict, threshold, groups) -> str:
    maps = [np.asarray(m, np.float32) for g, _ in groups for m in d.get(f"g_{g}_map", [])]
    if not any(len(d.get(f"g_{g}_name", [])) for g, _ in groups):
        return "<p>No gallery images were kept.</p>"
    lo = hi = 0.0
    if maps:  # one colour scale for every card, red from the threshold up: a cool map is a normal one
        allm = np.concatenate([m.ravel() for m in maps])
        lo, hi = float(np.percentile(allm, 1)), float(np.percentile(allm, 99.5))
        has_thr = threshold is not None and np.isfinite(threshold) and threshold > lo
        hi = float(threshold) if has_thr else hi
        scale = (f"blue at {lo:.3g}, red at the stored threshold {hi:.4g} and above; white outline: the "
                 f"region above the threshold" if has_thr else f"blue at {lo:.3g}, red at {hi:.3g}")
        masks = any(np.any(d.get(f"g_{g}_has_mask", False)) for g, _ in groups)
        out = [f'<p class="note">Each card: image | anomaly map over it (one colour scale for every card: '
               f"{scale}){' | ground-truth mask where there is one' if masks else ''}.</p>"]
    else:
        out = ['<p class="note">Images only (run without anomaly maps).</p>']
    for g, title in groups:
        p = f"g_{g}_"
        n = len(d.get(p + "name", []))
        out.append(f"<h4>{html.escape(title)} ({n})</h4>")
        out.append('<div class="gallery">' + "".join(_card(d, p, i, lo, hi, threshold) for i in range(n))
                   + "</div>" if n else "<p>none</p>")
    return "\n".join(out)


# ----------------------------------------------------------------------------- tables
def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return '<span title="not defined for this data">&ndash;</span>'
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _table(tid: str, header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table id="{html.escape(tid)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _kv_table(tid: str, d: dict, digits: int = 2) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v, digits) if not isinstance(v, (dict, list)) else html.escape(json.dumps(v))}</td></tr>"
                   for k, v in d.items())
    return f'<table id="{html.escape(tid)}" class="kv">{rows}</table>'


def confusion(scores: np.ndarray, labels: np.ndarray, threshold) -> dict:
    """TP, FP, FN, TN of the decision `score >= threshold` (runner.threshold_metrics' rule)."""
    if threshold is None or not np.isfinite(threshold):
        return {}
    pred, y = scores >= threshold, labels.astype(bool)
    return {"TP": int(np.sum(pred & y)), "FP": int(np.sum(pred & ~y)), "FN": int(np.sum(~pred & y)),
            "TN": int(np.sum(~pred & ~y))}


# ----------------------------------------------------------------------------- pages
CSS = """body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1250px;
padding:0 16px;color:#222;line-height:1.4}h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #ddd;
padding-bottom:.2em;margin-top:1.8em}h3{margin-top:1.4em}table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
table.kv th{text-align:left;font-weight:normal;color:#555}table.kv td{text-align:left;font-family:monospace;word-break:break-all}
img.plot{max-width:100%;height:auto;display:block;margin:.4em 0}.gallery{display:flex;flex-wrap:wrap;gap:12px}
.card{margin:0;border:1px solid #ddd;padding:6px;background:#fafafa;font-size:.82em;max-width:500px}
.card img{display:block;height:150px;width:auto}.card figcaption{word-break:break-all}
.note{color:#555;font-size:.9em}pre{background:#f6f6f6;padding:8px;overflow-x:auto;font-size:.8em;max-height:480px}
nav a{margin-right:1em}details{margin:.5em 0}"""


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def _write_atomic(path: str, text: str) -> str:
    with atomic.replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path


def _category_section(cat: str, e: dict, d: dict | None, n_runs: int = 1) -> str:
    out = [f'<h2 id="cat-{html.escape(cat)}">{html.escape(cat)}</h2>']
    c = {**e.get("checkpoint_counts", {}), **e.get("counts", {})}
    out.append(f'<p class="note">mode {html.escape(str(e.get("mode")))}; test images {c.get("test")} '
               f'({c.get("test_anomalous")} defective); train {c.get("train")}, bank {c.get("bank")} of '
               f'{c.get("train_patches")} patches.</p>')
    if d is None:
        out.append('<p class="note">No report data for this category (a run made before report pages, '
                   'or no test split): numbers only.</p>')
    if d is not None and "scores" in d:
        labels = d["labels"].astype(int)
        out.append("<h3>ROC and PR curves</h3>" + _img(_curve_figure(d, labels), f"{cat} curves", "plot"))
        if n_runs > 1:
            out.append('<p class="note">Each run\'s scores of the same test images; the thick black line is the '
                       "first run's configured score. The histogram, gallery and tables below are the first run's.</p>")
        elif len(d["variants"]) > 1:
            out.append('<p class="note">Every variant scored on the same bank and the same test images; the '
                       "thick black line is the configured score.</p>")
        thr = e.get("threshold")
        s = d["scores"][0]
        out.append("<h3>Image scores and the stored threshold</h3>"
                   + _img(_hist_figure(s, labels, thr, f"{cat}: image scores, {d['variants'][0]}"),
                          f"{cat} histogram", "plot"))
        conf = confusion(s, labels, thr)
        if conf:
            out.append(_table(f"confusion-{cat}", ["at the stored threshold", "predicted defective",
                                                     "predicted normal"],
                              [["defective", conf["TP"], conf["FN"]], ["normal", conf["FP"], conf["TN"]]]))
    pdt = e.get("per_defect_type")
    if pdt:
        keys = [k for k in ("mAUROC_sp_max", "mAUROC_px", "mAUPRO_px") if any(k in m for m in pdt.values())]
        out.append("<h3>Per defect type</h3><p class=\"note\">Each on the normal test images plus that "
                   "type's images.</p>")
        out.append(_table(f"defects-{cat}", ["defect type", "n"] + keys,
                          [[t, m.get("n")] + [m.get(k) for k in keys] for t, m in pdt.items()]))
    for key, title in (("ablation", "Variants on the same bank (--ablation)"),
                       ("test_before_after_tuning", "Before and after tuning")):
        if e.get(key):
            ks = [k for k in METRIC_KEYS if any(k in m for m in e[key].values())]
            out.append(f"<h3>{html.escape(title)}</h3>" + _table(f"{key}-{cat}", ["variant"] + ks,
                                                               [[v] + [m.get(k) for k in ks] for v, m in e[key].items()]))
    if d is not None and any(k.startswith("g_") for k in d):
        out.append("<h3>Gallery</h3>" + _gallery(d, e.get("threshold"), [
            ("normal", "Highest-scoring normal images (the worst false positives)"),
            ("defective", "Lowest-scoring defective images (the worst misses)")]))
    out.append("<h3>Provenance, calibration and timings</h3>")
    prov = dict(e.get("provenance") or {})
    out.append("<details open><summary>provenance</summary>" + _kv_table(f"provenance-{cat}", prov, 4) + "</details>")
    if e.get("calibration"):
        out.append("<details><summary>calibration</summary><pre>"
                   + html.escape(json.dumps(e["calibration"], indent=1)[:20000]) + "</pre></details>")
    if e.get("timings"):
        where = e.get("knn_ranking") or {}
        machine = ", ".join(str(where[k]) for k in ("backend", "cpu") if where.get(k))
        out.append(f"<h4>Timings{' on ' + html.escape(machine) if machine else ''}</h4>"
                   + _table(f"timings-{cat}", ["stage", "seconds"], [[k, float(v)] for k, v in e["timings"].items()]))
    if e.get("config"):
        out.append("<details><summary>configuration</summary><pre>"
                   + html.escape(json.dumps(e["config"], indent=1)) + "</pre></details>")
    return "\n".join(out)


def load_run(run_dir: str) -> tuple[dict, dict]:
    """(results.json, {category: report data}) of a finished run; ReportError naming what is missing."""
    if not os.path.isdir(run_dir):
        raise ReportError(f"RUN_DIR {run_dir} is not a folder")
    path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(path):
        raise ReportError(f"RUN_DIR {run_dir} holds no results.json: not a finished run of experiments.run, "
                          f"pn-jax fit or pn-jax test (a predict folder holds {PREDICT_DATA})")
    try:
        with open(path) as fh:
            doc = json.load(fh)
        cats = doc["categories"]
    except (ValueError, KeyError, TypeError) as e:
        raise ReportError(f"{path} is not a results.json pn_jax wrote ({e})") from None
    data = {}
    for cat in cats:
        p = os.path.join(run_dir, DATA_DIR, cat.replace("/", "_") + ".npz")
        if os.path.isfile(p):
            try:
                with np.load(p) as z:
                    data[cat] = {k: z[k] for k in z.files}
            except (OSError, ValueError) as e:
                raise ReportError(f"{p} cannot be read ({e}); rerun the run to rewrite it") from None
    return doc, data


def _merge(runs: list[tuple[str, str, dict, dict]]) -> dict:
    """{category: report data} of the first run with every other run's scores and pixel curves
    on the same test images appended as variants named '<run>: <variant>'."""
    (_, dir0, _, data0), merged = runs[0], {}
    for c, d in data0.items():
        if "scores" not in d:
            continue
        d = dict(d, variants=np.array([f"{runs[0][0]}: {v}" for v in d["variants"]]))
        for name, dir_j, _, data_j in runs[1:]:
            dj = data_j.get(c)
            if dj is None or "scores" not in dj:
                continue
            if list(dj["names"]) != list(d["names"]):
                raise ReportError(f"RUN_DIR {dir_j} scored other {c} test images than {dir0}: runs side by side "
                                  "need the same test images (the same data, --max-test and --seed)")
            n = len(d["variants"])
            for i in range(len(dj["variants"])):
                for k in ("fpr", "tpr", "recall", "precision"):
                    if f"px{i}_{k}" in dj:
                        d[f"px{n + i}_{k}"] = dj[f"px{i}_{k}"]
            d["variants"] = np.concatenate([d["variants"], [f"{name}: {v}" for v in dj["variants"]]])
            d["scores"] = np.concatenate([d["scores"], dj["scores"]])
        merged[c] = d
    return merged


def run_page(run_dirs: str | list[str]) -> str:
    """The HTML of a finished run's page (`results.json` + `report/*.npz`); several runs (e.g.
    `--method patchcore` and the default on the same data): their rows side by side in the
    tables and their curves in the same plots, the first run's histograms and gallery."""
    run_dirs = [run_dirs] if isinstance(run_dirs, str) else list(run_dirs)
    names = [os.path.basename(os.path.abspath(r)) for r in run_dirs]
    if len(set(names)) < len(names):
        names = [os.path.abspath(r) for r in run_dirs]
    runs = [(n, r, *load_run(r)) for n, r in zip(names, run_dirs)]
    doc, data = runs[0][2], runs[0][3]
    if len(runs) > 1:
        data = _merge(runs)
    cats = doc["categories"]
    title = "pn_jax report: " + " vs ".join(names)
    body = [f"<h1>{html.escape(title)}</h1>"]
    for name, _, d_j, _ in runs:
        if d_j.get("argv") is not None:
            body.append(f'<p class="note">{html.escape(name) + ": " if len(runs) > 1 else ""}command: <code>'
                        f'{html.escape(" ".join(map(str, d_j["argv"])))}</code>; wall time '
                        f'{_fmt(d_j.get("wall_time_s"), 1)} s; commit {html.escape(str(d_j.get("commit") or "unknown"))}</p>')
    if len(cats) > 1:
        body.append("<nav>" + "".join(f'<a href="#cat-{html.escape(c)}">{html.escape(c)}</a>' for c in cats) + "</nav>")
    label = (lambda c, name: c) if len(runs) == 1 else (lambda c, name: f"{c} ({name})")  # noqa: E731
    all_entries = [e for _, _, d_j, _ in runs for e in d_j["categories"].values()]
    keys = [k for k in METRIC_KEYS if any(e.get("metrics", {}).get(k) is not None for e in all_entries)]
    rows, thr_rows = [], []
    for name, _, d_j, data_j in runs:
        rows += [[label(c, name)] + [e["metrics"].get(k) for k in keys]
                 for c, e in d_j["categories"].items() if "metrics" in e]
        if d_j.get("mean") and len(d_j["categories"]) > 1:
            rows.append([label("mean", name)] + [d_j["mean"].get(k) for k in keys])
        for c, e in d_j["categories"].items():
            if "at_threshold" in e:
                dc = data_j.get(c)
                conf = confusion(dc["scores"][0], dc["labels"], e.get("threshold")) if dc is not None and "scores" in dc else {}
                thr_rows.append([label(c, name)] + [e["at_threshold"].get(k) for k in THRESHOLD_KEYS]
                                + [conf.get(k, "") for k in ("TP", "FP", "FN", "TN")])
    if rows:
        dropped = [k for k in METRIC_KEYS if k not in keys]
        body.append("<h2>Metrics</h2>" + _table("metrics", ["Name"] + keys, rows)
                    + '<p class="note">Percent. F1-max is an oracle (the best threshold chosen with the test labels); '
                      "the table below is what the stored threshold gives."
                    + (f" Not defined for this data (no pixel masks): {', '.join(dropped)}." if dropped else "")
                    + "</p>")
        body.append("<h3>At the stored threshold</h3>" + _table(
            "at_threshold", ["Name"] + list(THRESHOLD_KEYS) + ["TP", "FP", "FN", "TN"], thr_rows))
    else:
        body.append("<p>This run has no labelled test split: no metrics.</p>")
    for c, e in cats.items():
        body.append(_category_section(c, e, data.get(c), len(runs)))
    if doc.get("undefined"):
        body.append("<h3>Undefined metrics</h3>" + _kv_table("undefined", doc["undefined"]))
    return _page(title, "\n".join(body))


def write_run_page(run_dir: str, out: str | None = None) -> str:
    return _write_atomic(out or os.path.join(run_dir, PAGE), run_page(run_dir))


def commit() -> str | None:
    """The git commit of the pn_jax source that runs, '+' when it has uncommitted changes; None
    when it is not a git checkout (an installed wheel) or git is missing."""
    import subprocess

    src = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", src, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", src, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+" if dirty else "")


# ----------------------------------------------------------------------------- predict
def predict_page(out_dir: str) -> str:
    path = os.path.join(out_dir, PREDICT_DATA)
    try:
        with np.load(path) as z:
            d = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ReportError(f"{path} cannot be read ({e}); rerun pn-jax predict") from None
    d = report_data.predict_gallery(d)
    thr = float(d["threshold"])
    thr = thr if np.isfinite(thr) else None
    shown = [str(n) for g in ("high", "low") for n in d.get(f"g_{g}_name", [])]
    root = os.path.commonpath(shown) if len(shown) > 1 and all(os.path.isabs(n) for n in shown) else ""
    if root and root != os.sep:  # short captions: the names below the common folder
        for g in ("high", "low"):
            d[f"g_{g}_name"] = [os.path.relpath(str(n), root) for n in d.get(f"g_{g}_name", [])]
    s = d["scores"]
    ok = np.isfinite(s)
    title = f"pn_jax predictions: {os.path.basename(os.path.abspath(out_dir))}"
    body = [f"<h1>{html.escape(title)}</h1>"]
    n_anom = int(np.sum(s[ok] >= thr)) if thr is not None else None
    summary = {"images": int(s.size), "scored": int(ok.sum()), "failed": int((~ok).sum()),
               "threshold": thr, "at or above the threshold (anomalous)": n_anom,
               "below the threshold (normal)": None if n_anom is None else int(ok.sum()) - n_anom}
    body.append(_kv_table("summary", summary, 4))
    body.append(_img(_hist_figure(s, None, thr, "image scores"), "score histogram", "plot"))
    body.append("<h2>Gallery by score</h2>" + (f'<p class="note">Paths below {html.escape(root)}</p>' if root else "")
                + _gallery(d, thr, [("high", "Highest scores"), ("low", "Lowest scores")]))
    return _page(title, "\n".join(body))


def write_predict_page(out_dir: str) -> str:
    return _write_atomic(os.path.join(out_dir, PAGE), predict_page(out_dir))


def rebuild(run_dirs: list[str], out: str | None = None) -> str:
    """`pn-jax report RUN_DIR [RUN_DIR ...]`: a run's page, a predict folder's, or several runs
    side by side (then --out is needed: each run keeps its own page)."""
    run_dir = run_dirs[0]
    if len(run_dirs) > 1:
        if out is None:
            raise ReportError("several RUN_DIRs go side by side on one page: give --out FILE (each run keeps "
                              "its own report.html)")
        return _write_atomic(out, run_page(run_dirs))
    if os.path.isdir(run_dir) and not os.path.isfile(os.path.join(run_dir, "results.json")) \
            and os.path.isfile(os.path.join(run_dir, PREDICT_DATA)):
        return _write_atomic(out or os.path.join(run_dir, PAGE), predict_page(run_dir))
    return write_run_page(run_dir, out)
