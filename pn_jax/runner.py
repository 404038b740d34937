"""Fit, score and evaluate one category end to end (what `experiments.run` calls)."""
from __future__ import annotations

import json
import os
import time
from typing import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from pn_jax import backbones, detector, metrics, viz
from pn_jax.config import Config

# Score variants of the ablation, all computed from one pass on the same bank.
ABLATION_VARIANTS = ("patchcore", "distance", "influence", "noise", "propose_noising", "propose_noising_z")


def load_sources(cfg: Config, category: str, *, max_train=None, max_test=None):
    from pn_jax import data

    return data.load_category(cfg.data.dataset, cfg.data.root, category,
                              holdout_fraction=cfg.data.holdout_fraction,
                              holdout_min=cfg.data.holdout_min, seed=cfg.seed,
                              max_train=max_train, max_test=max_test)


def batches(cfg: Config, source, mean, std):
    from pn_jax.data import pipeline

    return pipeline.make_batches(source, image_size=cfg.data.image_size, mean=mean, std=std,
                                 batch_size=cfg.batch_size, resize_mode=cfg.data.resize_mode,
                                 crop_size=cfg.data.crop_size)


class Timer(dict):
    def __call__(self, name):
        timer = self

        class _T:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer[name] = timer.get(name, 0.0) + time.perf_counter() - self.t0

        return _T()


def fit_category(cfg: Config, sources: dict, extractor, timer: Timer, mean, std):
    with timer("extract_train_s"):
        train = detector.extract_all(extractor, batches(cfg, sources["train"], mean, std),
                                     cfg.batch_size, desc="features train")
    holdout = None
    if len(sources.get("holdout", [])):
        with timer("extract_holdout_s"):
            holdout = detector.extract_all(extractor, batches(cfg, sources["holdout"], mean, std),
                                           cfg.batch_size, desc="features holdout")
    state, report = detector.fit(cfg, train, holdout, jax.random.key(cfg.seed))
    timer["coreset_s"] = report.timings["coreset_s"]
    timer["stats_s"] = report.timings["stats_s"]
    del train
    return state, report


def score_source(cfg: Config, state, extractor, source, mean, std, timer: Timer, *,
                 variants=(None,), keep_maps=True, n_figures=0, fig_dir=None,
                 on_figure: Callable | None = None):
    """Score every image of `source`; returns labels, masks, {variant: (image scores, maps)}."""
    scorer = None
    labels, masks, names, fig_items = [], [], [], []
    scores = {v: [] for v in variants}
    maps = {v: [] for v in variants}
    need_infl = any(v not in ("patchcore", "distance") for v in variants if v) or cfg.noising.method != "patchcore"
    for batch in tqdm(batches(cfg, source, mean, std), desc="scoring", unit="batch", leave=False):
        n = len(batch["image"])
        with timer("extract_test_s"):
            feats = extractor(detector._pad_batch(np.asarray(batch["image"]), cfg.batch_size))
            feats.block_until_ready()
        with timer("score_s"):
            if scorer is None:
                scorer = detector.Scorer(cfg, extractor.grid, need_influence=need_infl)
            out = scorer(state, feats)
            for v in variants:
                if v is None:
                    amap = out["anomaly_maps"]
                else:
                    amap = scorer.maps(detector.patch_score(cfg, out["signals"], state.stats, v))
                amap = np.asarray(amap[:n])
                scores[v].append(amap.reshape(n, -1).max(-1))
                if keep_maps:
                    maps[v].append(amap.astype(np.float32))
        labels.append(np.asarray(batch["label"][:n]))
        masks.append(np.asarray(batch["mask"][:n]) > 0.5 if keep_maps else None)
        names.extend(list(batch["name"][:n]))
        if len(fig_items) < n_figures:
            extra = {k: np.asarray(out[k][:n]) for k in ("anomaly_maps", "influence_maps", "noise_maps") if k in out}
            for i in range(n):
                if len(fig_items) < n_figures:
                    fig_items.append((np.asarray(batch["image"][i]), {k: v[i] for k, v in extra.items()},
                                      np.asarray(batch["mask"][i]) > 0.5, str(batch["name"][i]),
                                      int(batch["label"][i])))
    result = {
        "labels": np.concatenate(labels),
        "masks": np.concatenate(masks) if keep_maps else None,
        "names": names,
        "scores": {v: np.concatenate(s) for v, s in scores.items()},
        "maps": {v: np.concatenate(m) for v, m in maps.items()} if keep_maps else None,
        "figures": fig_items,
        "scorer": scorer,
    }
    return result


def write_figures(items, out_dir, mean, std, category):
    paths = []
    for img, maps, mask, name, label in items:
        stem = name.replace("/", "_").rsplit(".", 1)[0]
        title = f"{category}: {name} ({'anomalous' if label else 'normal'})"
        named = {{"anomaly_maps": "anomaly map", "influence_maps": "influence map",
                  "noise_maps": "noise map"}[k]: v for k, v in maps.items()}
        paths.append(viz.save_figure(os.path.join(out_dir, f"{stem}.png"), viz.denormalize(img, mean, std),
                                     named, mask if mask.any() else None, title))
    return paths


def run_category(cfg: Config, category: str, out_dir: str, *, max_train=None, max_test=None,
                 ablation: bool = False, n_figures: int = 8, extractor=None, log=print) -> dict:
    """Fit on train, score test, compute metrics, write figures; returns the results entry."""
    timer = Timer()
    t_start = time.perf_counter()
    info = backbones.info(cfg.model.backbone)
    mean, std = info.mean, info.std
    sources = load_sources(cfg, category, max_train=max_train, max_test=max_test)
    extractor = extractor or detector.FeatureExtractor(cfg)
    state, report = fit_category(cfg, sources, extractor, timer, mean, std)
    has_masks = cfg.data.dataset != "elpv"
    variants = (None,) + (ABLATION_VARIANTS if ablation else ())
    res = score_source(cfg, state, extractor, sources["test"], mean, std, timer, variants=variants,
                       keep_maps=has_masks, n_figures=n_figures)
    with timer("metrics_s"):
        masks = res["masks"] if has_masks else None
        m = metrics.evaluate(res["scores"][None], res["labels"],
                             res["maps"][None] if has_masks else None, masks)
        abl = {}
        for v in variants[1:]:
            abl[v] = metrics.evaluate(res["scores"][v], res["labels"],
                                      res["maps"][v] if has_masks else None, masks)
    fig_paths = write_figures(res["figures"], os.path.join(out_dir, "figures", category), mean, std, category)
    timer["total_s"] = time.perf_counter() - t_start
    n_test = len(res["labels"])
    entry = {
        "category": category,
        "metrics": m,
        "timings": dict(timer),
        "throughput": {"test_images_per_s": n_test / max(timer.get("extract_test_s", 0) + timer.get("score_s", 0), 1e-9)},
        "counts": {"train": len(sources["train"]), "holdout": len(sources.get("holdout", [])),
                   "test": n_test, "test_anomalous": int(res["labels"].sum()),
                   "train_patches": report.n_train_patches, "bank": report.bank_size},
        "figures": fig_paths,
        "config": cfg.to_dict(),
    }
    if ablation:
        entry["ablation"] = abl
    entry["_state"] = state
    entry["_test"] = res
    return entry


def write_results(path: str, entries: list[dict], extra: dict | None = None) -> None:
    """results.json (atomic): per-category metrics, timings, counts, config; plus the means."""
    cats = {e["category"]: {k: v for k, v in e.items() if not k.startswith("_")} for e in entries}
    doc = {"categories": cats, "mean": metrics.mean_over_categories([e["metrics"] for e in entries])}
    if extra:
        doc.update(extra)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, default=_json_default)
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def format_table(rows: list[tuple[str, dict]], keys=None) -> str:
    keys = keys or ["mAUROC_sp_max", "mAUROC_px", "mAUPRO_px", "mAP_sp_max", "mF1_max_sp", "mAP_px", "mF1_max_px"]
    header = "| Name | " + " | ".join(keys) + " |"
    sep = "|" + "---|" * (len(keys) + 1)
    lines = [header, sep]
    for name, m in rows:
        vals = [("%.2f" % m[k]) if k in m and m[k] == m[k] else "-" for k in keys]
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return "\n".join(lines)
