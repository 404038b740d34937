"""Fit, score and evaluate one category end to end (what `experiments.run` calls)."""
from __future__ import annotations

import json
import os
import time
import numpy as np

from pn_jax import atomic, fitting, hardware, metrics, report_data, viz
from pn_jax.batches import MAP_TITLES, score_source
from pn_jax.detector import ABLATION_VARIANTS, default_variant
from pn_jax.timing import Timer
from pn_jax.config import Config



def load_sources(cfg: Config, category: str, *, max_train=None, max_test=None, masks: bool = True):
    """The category's train / holdout / test sources; masks=False: image metrics only."""
    src = _load_category(cfg, category, max_train, max_test, masks)
    if not masks and src.get("test") is not None:
        src["test"].has_masks = False
    return src


def _load_category(cfg, category, max_train, max_test, masks):
    from pn_jax import data

    return data.load_category(cfg.data.dataset, cfg.data.root, category, require_masks=masks,
                              holdout_fraction=cfg.data.holdout_fraction,
                              holdout_min=cfg.data.holdout_min if cfg.data.holdout_fraction > 0 else 0,
                              seed=cfg.seed, backend=cfg.data.backend, tfds_dir=cfg.data.tfds_dir,
                              max_train=max_train, max_test=max_test)




def write_figures(items, out_dir, mean, std, category):
    """One PNG per sampled test image; each map type shares one colour range over the figures."""
    paths = []
    limits = {}
    for key, title in MAP_TITLES.items():
        vals = [f.maps[key] for f in items if key in f.maps]
        if vals:
            limits[title] = (float(min(v.min() for v in vals)), float(max(v.max() for v in vals)))
    for img, maps, mask, name, label, *_ in items:
        stem = name.replace("/", "_").rsplit(".", 1)[0]
        title = f"{category}: {name} ({'anomalous' if label else 'normal'})"
        named = {MAP_TITLES[k]: v for k, v in maps.items()}
        paths.append(viz.save_figure(os.path.join(out_dir, f"{stem}.png"), viz.denormalize(img, mean, std),
                                     named, mask if mask.any() else None, title, limits))
    return paths


def explain_figures(model, items, out_dir: str) -> tuple[list[dict], list[str]]:
    """Coarse-to-fine explanation of the figure images (issue 17): for the patches above the
    decision threshold, the full-D influence and each flagged region's top dimensions by share
    of the whitened residual; a PNG panel per image with a flagged region. `items`: the
    `batches.Figure`s of the test pass, whose features and patch scores it reuses."""
    from pn_jax.research import explain

    feats = np.stack([f.feats for f in items])
    patch = np.stack([f.patch_scores for f in items])
    expl = explain.Explainer.from_state(model.state, model.cfg).explain(
        feats, patch, model.grid, model.threshold, [f.name for f in items])
    paths = []
    for (img, maps, _, name, *_), e, p in zip(items, expl, patch):
        if e["regions"]:
            stem = name.replace("/", "_").rsplit(".", 1)[0]
            paths.append(explain.save_explanation_figure(
                os.path.join(out_dir, f"explain_{stem}.png"), viz.denormalize(img, model.mean, model.std),
                maps["anomaly_maps"], explain.label_grid(p, model.grid, model.threshold), e,
                f"{name}: top dims per flagged region"))
    return expl, paths


def threshold_metrics(scores, labels, threshold) -> dict:
    """Precision, recall, F1, accuracy and FPR (percent) of the decision `score >= threshold`:
    what a user gets in production, unlike the oracle F1-max."""
    nan = float("nan")
    if threshold is None or not np.isfinite(threshold):
        return {k: nan for k in ("precision", "recall", "F1", "accuracy", "FPR")} | {"threshold": nan}
    pred = np.asarray(scores) >= threshold
    y = np.asarray(labels).astype(bool)
    tp, fp = int(np.sum(pred & y)), int(np.sum(pred & ~y))
    fn, tn = int(np.sum(~pred & y)), int(np.sum(~pred & ~y))
    div = lambda a, b: 100.0 * a / b if b else nan  # noqa: E731
    return {"threshold": float(threshold), "precision": div(tp, tp + fp), "recall": div(tp, tp + fn),
            "F1": div(2 * tp, 2 * tp + fp + fn), "accuracy": div(tp + tn, len(y)), "FPR": div(fp, fp + tn)}


def has_masks(cfg: Config, source) -> bool:
    """Whether a test split has pixel masks: decided by its files, not the dataset's name."""
    found = getattr(source, "has_masks", None)
    return bool(found) if found is not None else cfg.data.dataset not in ("elpv",)


def check_memory(cfg: Config, n_train: int, sources: dict) -> None:
    """--max-memory: refuse before any image is read a run estimated not to fit (pn_jax/membudget.py)."""
    if cfg.max_memory_gb is None:
        return
    from pn_jax import membudget

    test = sources.get("test")
    n_test = len(test) if test is not None else 0
    membudget.check(cfg, n_train, n_test, pixel_metrics=bool(n_test) and has_masks(cfg, test))


def run_category(cfg: Config, category: str, out_dir: str, *, mode: str = "train",
                 checkpoint_dir: str | None = None, tune: bool = False, max_train=None, max_test=None,
                 ablation: bool = False, n_figures: int = 8, sources: dict | None = None,
                 model=None, validation=None, log=print) -> dict:
    """Fit on train (or load a checkpoint), score test, compute metrics, write figures.
    `sources`: {"train", "holdout", "test"} data sources (default: `load_sources`). `model`:
    in test mode, the loaded model to score with (default: loaded from `checkpoint_dir`).
    entry["counts"] are this run's; a test run puts the checkpoint's fit counts beside them
    under "checkpoint_counts". `validation`: a labelled set (`pn_jax.labelled`) the fit takes its
    threshold, --score auto's choice and, with `tune`, its tuned parameters from."""
    from pn_jax import model as model_lib

    timer = Timer()
    t_start = time.perf_counter()
    extra = {}
    t_ext = {"batches": 0}
    if mode == "test":
        if tune:
            raise ValueError("--tune needs --mode train (it reads held-out training images)")
        model = model or model_lib.load(checkpoint_dir, category=category)
        # The model's config, with where and how this run read its data (which the caller may
        # have changed: --data-root, --data-backend; they do not change what the model means).
        cfg = model.cfg.replace(data={"root": cfg.data.root, "backend": cfg.data.backend,
                                      "tfds_dir": cfg.data.tfds_dir})
        if sources is None:
            sources = load_sources(cfg, category, max_train=max_train, max_test=max_test)
        counts = {"test": len(sources["test"])}
        check_memory(cfg, 0, sources)  # the model's bound, or the one typed (cli.apply_test_flags)
        extra["checkpoint_counts"] = {k: v for k, v in (model.provenance.get("counts") or {}).items()
                                      if not k.startswith("test")}  # older checkpoints kept their run's test count
        models = {"checkpoint": model}
        main_key = "checkpoint"
    else:
        if sources is None:
            sources = load_sources(cfg, category, max_train=max_train, max_test=max_test)
        check_memory(cfg, len(sources["train"]), sources)
        model = fitting.fit(cfg, sources["train"], holdout=sources.get("holdout"), category=category,
                            timer=timer, log=log, validation=validation, tune=tune,
                            disjoint_from={"test": sources.get("test")})
        counts = {"test": len(sources["test"]) if sources.get("test") is not None else 0,
                  "train": len(sources["train"]), "holdout": len(sources.get("holdout") or []),
                  "train_patches": model.provenance["train_patches"], "bank": model.provenance["bank_size"]}
        model.provenance["counts"] = {k: v for k, v in counts.items() if k != "test"}  # the fit's, not this test's
        models = {"untuned": model}
        main_key = "untuned"
        if tune and validation is not None:  # tuned on the labelled set inside fit (CV keep-or-drop)
            extra["labelled_tuning"] = model.calibration["labelled"]["tuning"]
            before = getattr(model, "before_tuning", None)
            if before is not None:  # the tuned parameters were kept: test both, report both
                models, main_key = {"untuned": before, "tuned": model}, "tuned"
        elif tune:
            from pn_jax import labelled

            extra["tune_warning"] = labelled.TUNE_WARNING
            models, main_key, tuned_info = fitting.tune(model, sources, category, timer, log)
            extra.update(tuned_info)
            extra["tune_plot"] = viz.plot_curves(
                os.path.join(out_dir, "figures", category, "tune_loss.png"),
                {k: (list(range(len(v))), v) for k, v in tuned_info["tune_curves"].items()}, "step",
                "validation ranking loss", f"{category}: tuning")
        if checkpoint_dir:
            with timer("checkpoint_s"):
                models[main_key].save(checkpoint_dir)
    entry = {"category": category, "mode": mode, "threshold": models[main_key].threshold,
             "calibration": models[main_key].calibration, "provenance": models[main_key].provenance,
             "knn_ranking": hardware.knn_ranking()}  # this run's search (the fit's is in provenance)
    test_src = sources.get("test")
    if test_src is not None and len(test_src):
        masks = has_masks(cfg, test_src)
        variants = (None,) + (ABLATION_VARIANTS if ablation else ())
        gallery = report_data.Gallery(report_data.N_GALLERY, models[main_key].mean, models[main_key].std)
        res = score_source({main_key: models[main_key], **models}, test_src, timer,
                           variants=variants, keep_maps=masks, n_figures=n_figures, gallery=gallery)
        with timer("metrics_s"):
            allm = metrics.evaluate_all(res, masks)
            entry["per_defect_type"] = _per_defect_type(res, (main_key, None), masks)
        entry["metrics"] = allm[(main_key, None)]
        with timer("report_data_s"):
            report_data.save_category_data(out_dir, category, report_data.category_data(
                res, main_key, default_variant(models[main_key].cfg), masks, gallery))
        entry["at_threshold"] = threshold_metrics(res["scores"][(main_key, None)], res["labels"],
                                                  models[main_key].threshold)
        entry["figures"] = write_figures(res["figures"], os.path.join(out_dir, "figures", category),
                                         models[main_key].mean, models[main_key].std, category)
        # Explanations read regions off one patch grid; a tiled model's patches span T grids.
        if res["figures"] and models[main_key].threshold is not None and not cfg.data.tile:
            with timer("explain_s"):
                entry["explanations"], figs = explain_figures(models[main_key], res["figures"],
                                                              os.path.join(out_dir, "figures", category))
            entry["figures"] += figs
        counts["test_anomalous"] = int(res["labels"].sum())
        entry["pixel_metrics"] = masks
        if tune and len(models) > 1:
            entry["test_before_after_tuning"] = {s: allm[(s, None)] for s in models}
        if ablation:
            entry["ablation"] = {f"{v}" + ("" if s == main_key else f" ({s})"): allm[(s, v)]
                                 for s in models for v in variants[1:]}
        entry["_test"] = res
        entry["throughput"] = {"test_images_per_s": len(res["labels"]) / max(
            timer.get("extract_test_s", 0) + timer.get("score_s", 0), 1e-9)}
    else:
        report_data.save_category_data(out_dir, category, None)  # no test split: no stale page data
    timer["total_s"] = time.perf_counter() - t_start
    ext = models[main_key]._extractor  # batches through the backbone, this run (its seconds are not
    if ext is not None:                # split out: one asynchronous call per batch, issue 25)
        counts["backbone_batches"] = ext.timings["batches"] - t_ext["batches"]
    entry.update({"timings": dict(timer), "stages": timer.stages(), "counts": counts, "config": cfg.to_dict(),
                  **extra})
    entry["_models"] = models
    entry["_states"] = {k: m.state for k, m in models.items()}
    return entry


def run_unified(cfg: Config, categories: list[str], out_dir: str, *, checkpoint_dir: str | None = None,
                max_train=None, max_test=None, ablation: bool = False, n_figures: int = 8,
                log=print) -> list[dict]:
    """ADer-style multi-class setting: ONE bank over every category's train images, then
    metrics per category on that shared bank."""
    from pn_jax import fitting

    timer = Timer()
    t_start = time.perf_counter()
    sources = {c: load_sources(cfg, c, max_train=max_train, max_test=max_test) for c in categories}
    cat = lambda split: _concat_sources([s[split] for s in sources.values()], split)  # noqa: E731
    model = fitting.fit(cfg, cat("train"), holdout=cat("holdout"), category="+".join(categories),
                          timer=timer, log=log)
    model.provenance["unified"] = True
    if checkpoint_dir:
        model.save(checkpoint_dir)
    fit_timings, fit_stages = dict(timer), timer.stages()
    variants = (None,) + (ABLATION_VARIANTS if ablation else ())
    entries = []
    for c in categories:
        t = Timer()
        masks = has_masks(cfg, sources[c]["test"])
        gallery = report_data.Gallery(report_data.N_GALLERY, model.mean, model.std)
        res = score_source({"unified": model}, sources[c]["test"], t, variants=variants, keep_maps=masks,
                           n_figures=n_figures, gallery=gallery)
        allm = metrics.evaluate_all(res, masks)
        with t("report_data_s"):
            report_data.save_category_data(out_dir, c, report_data.category_data(
                res, "unified", default_variant(model.cfg), masks, gallery))
        entry = {"category": c, "mode": "unified", "metrics": allm[("unified", None)],
                 "threshold": model.threshold,
                 "at_threshold": threshold_metrics(res["scores"][("unified", None)], res["labels"], model.threshold),
                 "timings": {**{f"shared_{k}": v for k, v in fit_timings.items()}, **t},
                 "stages": {**{f"shared_{k}": v for k, v in fit_stages.items()}, **t.stages()},
                 "counts": {"train": sum(len(s["train"]) for s in sources.values()), "test": len(res["labels"]),
                            "test_anomalous": int(res["labels"].sum()), "bank": model.provenance["bank_size"],
                            "train_patches": model.provenance["train_patches"],
                            "categories_in_bank": len(categories)},
                 "figures": write_figures(res["figures"], os.path.join(out_dir, "figures", c), model.mean,
                                          model.std, c),
                 "config": cfg.to_dict(), "per_defect_type": _per_defect_type(res, ("unified", None), masks)}
        if ablation:
            entry["ablation"] = {v: allm[("unified", v)] for v in variants[1:]}
        entries.append(entry)
    log(f"unified bank over {len(categories)} categories: {model.provenance['bank_size']} entries from "
        f"{model.provenance['train_patches']} patches; total {time.perf_counter() - t_start:.1f}s")
    return entries


def _per_defect_type(res: dict, key, masks: bool) -> dict:
    """Per-defect-type image AUROC (and pixel AUROC / AUPRO with masks) of one score."""
    return metrics.per_defect_type(res["scores"][key], res["labels"], res["defects"],
                                   res["maps"][key] if masks else None, res["masks"] if masks else None)


def _concat_sources(sources: list, split: str):
    """One source reading several in turn (a unified bank's train or holdout split)."""
    from pn_jax.data import records

    offsets = np.cumsum([0] + [len(s) for s in sources])

    def read(i):
        j = int(np.searchsorted(offsets, i, side="right") - 1)
        return sources[j][i - offsets[j]]

    names = [f"{s.category}/{n}" for s in sources for n in s.names]
    return records.Source(int(offsets[-1]), read, names, dataset=sources[0].dataset, category="unified",
                          split=split)


def write_results(path: str, entries: list[dict], extra: dict | None = None) -> None:
    """results.json (atomic, strict JSON): per-category metrics, timings, counts, config, the
    means. An undefined metric is null, with the reason under "undefined"."""
    cats = {e["category"]: {k: v for k, v in e.items() if not k.startswith("_")} for e in entries}
    with_metrics = [e["metrics"] for e in entries if "metrics" in e]
    doc = {"categories": cats}
    if with_metrics:
        doc["mean"] = metrics.mean_over_categories(with_metrics)
    if extra:
        doc.update(extra)
    undefined = []
    doc = _strict(doc, "", undefined)
    if undefined:
        doc["undefined"] = {p: "not defined for this data (e.g. a split with a single class, or no "
                               "pixel masks)" for p in undefined}
    with atomic.replacing(path) as tmp, open(tmp, "w") as f:
        json.dump(doc, f, indent=2, default=json_default, allow_nan=False)


def _strict(o, where: str, undefined: list):
    """NaN / inf -> None (recording where), through dicts, lists and numpy values."""
    if isinstance(o, dict):
        return {k: _strict(v, f"{where}.{k}" if where else str(k), undefined) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_strict(v, f"{where}[{i}]", undefined) for i, v in enumerate(o)]
    if isinstance(o, (float, np.floating)) and not np.isfinite(o):
        undefined.append(where)
        return None
    if isinstance(o, np.ndarray) and o.dtype.kind == "f":
        return _strict(o.tolist(), where, undefined)
    return o


def json_default(o):
    """json.dump fallback for numpy scalars and arrays."""
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.bool_):
        return bool(o)
    return str(o)


def format_table(rows: list[tuple[str, dict]], keys=None) -> str:
    keys = keys or ["mAUROC_sp_max", "mAUROC_px", "mAUPRO_px", "mAP_sp_max", "mF1_max_sp_max", "mAP_px", "mF1_max_px"]
    header = "| Name | " + " | ".join(keys) + " |"
    sep = "|" + "---|" * (len(keys) + 1)
    lines = [header, sep]
    for name, m in rows:
        vals = [("%.2f" % m[k]) if k in m and m[k] == m[k] else "-" for k in keys]
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return "\n".join(lines)
