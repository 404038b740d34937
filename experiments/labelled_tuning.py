"""How many labelled defects does tuning need before it helps? (issue 28)

    python -m experiments.labelled_tuning --out results/labelled_tuning            # ELPV mono + poly
    python -m experiments.labelled_tuning --quick --out /tmp/lt                     # a smoke run

Per ELPV type: the default model (every training cell in the bank, `calibrated_rerank`,
threshold from leave-one-image-out normals + synthetic anomalies). The labelled pool is
ELPV's test split (good cells and cells with defect probability 1). For each seed, a seeded
permutation of the good and of the defective cells; the first n of each (n = 5, 10, 20, 40,
nested) are the labelled validation set, the rest of the pool is the test set. Compared on
that test set, with the same optimiser and the same keep-or-drop rule (`pn_jax.labelled`):

* untuned: the default model;
* tuned on synthetic: the noise scale tuned on the 32 leave-one-image-out validation normals
  and one synthetic anomaly of each (what a user without defects has), once per type;
* tuned on real: tuned on the n + n labelled cells.

"rule" is what `pn-jax fit --val-dir --tune` delivers (tuned only if the 5-fold CV AUROC
inside the labelled set gains >= 1 point, otherwise untuned); "forced" keeps the tuned
parameters whatever the CV says. Features are extracted once per type and every score is the
pipeline's exact image score computed from them (`labelled.image_scores`, tested equal to
`Model.score_features`). Also: F1 on the test set at the synthetic threshold and at the
F1-max threshold of the labelled set (untuned scores). Writes labelled_tuning.json, .md, .png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

SIZES = (5, 10, 20, 40)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--categories", nargs="+", default=["mono", "poly"])
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="60 training cells, sizes 5 10, 2 seeds")
    p.add_argument("--out", default="results/labelled_tuning")
    return p.parse_args(argv)


def f1_at(scores, labels, thr) -> float:
    from pn_jax import runner

    return runner.threshold_metrics(scores, labels, thr)["F1"]


def run_category(cat: str, a, log=print) -> dict:
    from pn_jax import fitting, flags, labelled, runner
    from pn_jax.data import records

    argv = ["--dataset", "elpv", "--category", cat] + (["--max-train", "60"] if a.quick else [])
    cfg = flags.build_config(flags.build_run_parser().parse_args(argv))
    t0 = time.perf_counter()
    src = runner.load_sources(cfg, cat, max_train=60 if a.quick else None)
    model = fitting.fit(cfg, src["train"], category=cat, log=lambda *_: None)
    v = model.cfg.noising.score
    t_fit = time.perf_counter() - t0
    # the synthetic validation a user without defects has: LOO normals + one anomaly of each
    val_idx = np.asarray(model.calibration["validation_images"])
    normal, anomal = fitting.validation_records([src["train"][int(i)] for i in val_idx], cfg.seed)
    syn_src = records.records_source(normal + anomal, dataset="elpv", category=cat, split="validation")
    f, y, m, names = labelled.labelled_features(model, syn_src)
    syn = labelled.prepare(model, f, y, m, variant=v, owners=np.concatenate([val_idx, val_idx]))
    syn_cv = labelled.cross_validate(model, syn, v, seed=0)
    syn_theta, _ = labelled.fit_theta(model, syn, v, seed=0)
    del f, syn
    t0 = time.perf_counter()
    pf, py, _, _ = labelled.labelled_features(model, src["test"])
    pool = labelled.prepare(model, pf, py, None, variant=v)
    del pf
    t_pool = time.perf_counter() - t0
    untuned = labelled.image_scores(model, pool, v)
    s_syn = labelled.image_scores(model, pool, v, *labelled.apply_theta(model, v, syn_theta))
    rows = []
    good, bad = np.flatnonzero(py == 0), np.flatnonzero(py == 1)
    for seed in range(a.seeds):
        rng = np.random.default_rng([seed, ("mono", "poly").index(cat) if cat in ("mono", "poly") else 2])
        pg, pb = rng.permutation(good), rng.permutation(bad)
        for n in a.sizes:
            t1 = time.perf_counter()
            val = np.sort(np.concatenate([pg[:n], pb[:n]]))
            test = np.setdiff1d(np.arange(len(py)), val)
            lab = pool.subset(val)
            cv = labelled.cross_validate(model, lab, v, seed=seed)
            theta, _ = labelled.fit_theta(model, lab, v, seed=seed)
            s_real = labelled.image_scores(model, pool, v, *labelled.apply_theta(model, v, theta))
            auc = lambda s: labelled._auc(s[test], py[test])  # noqa: E731
            thr_lab = fitting.choose_threshold(untuned[val][py[val] == 0], untuned[val][py[val] == 1])[0]
            row = {"seed": seed, "n": n, "untuned": auc(untuned), "synthetic_forced": auc(s_syn),
                   "synthetic_rule": auc(s_syn if syn_cv["kept"] else untuned), "real_forced": auc(s_real),
                   "real_rule": auc(s_real if cv["kept"] else untuned), "real_kept": cv["kept"],
                   "cv_untuned": cv["cv_auroc_untuned"], "cv_tuned": cv["cv_auroc_tuned"],
                   "f1_synthetic_threshold": f1_at(untuned[test], py[test], model.threshold),
                   "f1_labelled_threshold": f1_at(untuned[test], py[test], thr_lab),
                   "test_images": int(len(test)), "seconds": time.perf_counter() - t1}
            rows.append(row)
            log(f"[{cat}] seed {seed} n {n}: " + " ".join(f"{k}={row[k]:.2f}" for k in (
                "untuned", "synthetic_forced", "real_forced", "real_rule", "cv_untuned", "cv_tuned")) +
                f" kept={cv['kept']} ({row['seconds']:.1f}s)")
    return {"category": cat, "variant": v, "fit_s": t_fit, "pool_features_s": t_pool, "synthetic_cv": syn_cv,
            "pool": {"good": int(len(good)), "defective": int(len(bad))}, "train": len(src["train"]), "rows": rows}


COLS = ("untuned", "synthetic_rule", "synthetic_forced", "real_rule", "real_forced")


def summary(doc: dict) -> list[dict]:
    out = []
    for c in doc["categories"]:
        for n in sorted({r["n"] for r in c["rows"]}):
            rs = [r for r in c["rows"] if r["n"] == n]
            s = {"category": c["category"], "n": n, "seeds": len(rs), "kept": sum(r["real_kept"] for r in rs)}
            for k in COLS + ("cv_untuned", "cv_tuned", "f1_synthetic_threshold", "f1_labelled_threshold"):
                x = np.array([r[k] for r in rs], float)
                s[k] = (float(x.mean()), float(x.std()), float(x.min()), float(x.max()))
            s["gain_real_forced"] = float(np.mean([r["real_forced"] - r["untuned"] for r in rs]))
            out.append(s)
    return out


def markdown(doc: dict, rows: list[dict]) -> str:
    from experiments import common

    ms = lambda t: f"{t[0]:.2f} ± {t[1]:.2f}"  # noqa: E731
    header = ("type", "labelled defects (+ as many good)", "untuned", "tuned on synthetic: rule / forced",
              "tuned on real: rule / forced", "real kept by CV", "CV AUROC untuned / tuned",
              "F1 at threshold: synthetic / labelled")
    lines = common.md_table(header, [
        (r["category"], r["n"], ms(r["untuned"]), f"{ms(r['synthetic_rule'])} / {ms(r['synthetic_forced'])}",
         f"{ms(r['real_rule'])} / {ms(r['real_forced'])}", f"{r['kept']} of {r['seeds']}",
         f"{r['cv_untuned'][0]:.1f} / {r['cv_tuned'][0]:.1f}",
         f"{r['f1_synthetic_threshold'][0]:.1f} / {r['f1_labelled_threshold'][0]:.1f}") for r in rows])
    lines.append("\nTest image AUROC (mean ± sd over seeds) on the pool minus the labelled cells. "
                 "Synthetic-tuning CV: " + "; ".join(
                     f"{c['category']} {c['synthetic_cv']['cv_auroc_untuned']:.2f} -> "
                     f"{c['synthetic_cv']['cv_auroc_tuned']:.2f} (kept: {c['synthetic_cv']['kept']})"
                     for c in doc["categories"]))
    lines.append(f"CPU: {doc['cpu']}; wall {doc['wall_s']:.0f} s.")
    return "\n".join(lines)


def plot(doc: dict, rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = [c["category"] for c in doc["categories"]]
    fig, axes = plt.subplots(1, len(cats), figsize=(5 * len(cats), 3.6), squeeze=False)
    for ax, cat in zip(axes[0], cats):
        rs = [r for r in rows if r["category"] == cat]
        x = [r["n"] for r in rs]
        for k in COLS:
            m = np.array([r[k][0] for r in rs])
            lo, hi = np.array([r[k][2] for r in rs]), np.array([r[k][3] for r in rs])
            ax.errorbar(x, m, yerr=[m - lo, hi - m], marker="o", capsize=3, label=k.replace("_", " "))
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_xlabel("labelled defective cells (+ as many good)")
        ax.set_ylabel("test image AUROC (mean, min-max over seeds)")
        ax.set_title(f"ELPV {cat}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    from experiments import common
    from pn_jax import hardware

    a = parse_args(argv)
    if a.quick:
        a.sizes, a.seeds = [s for s in a.sizes if s <= 10] or [5], min(a.seeds, 2)
    os.makedirs(a.out, exist_ok=True)
    t0 = time.perf_counter()
    doc = {"sizes": a.sizes, "seeds": a.seeds, "quick": a.quick, "cpu": hardware.describe_cpu(),
           "machine_at_start": common.machine(), "categories": [run_category(c, a) for c in a.categories]}
    doc["wall_s"] = time.perf_counter() - t0
    doc["loadavg_at_end"] = common.load()
    print(write(doc, a.out))
    return 0


def write(doc: dict, out: str) -> str:
    """labelled_tuning.json, .md and .png from the study's rows; returns the markdown."""
    rows = doc["summary"] = summary(doc)
    with open(os.path.join(out, "labelled_tuning.json"), "w") as fh:
        json.dump(doc, fh, indent=1)
    md = markdown(doc, rows)
    with open(os.path.join(out, "labelled_tuning.md"), "w") as fh:
        fh.write(md + "\n")
    plot(doc, rows, os.path.join(out, "labelled_tuning.png"))
    return md


if __name__ == "__main__":
    sys.exit(main())
