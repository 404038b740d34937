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
ABLATION_VARIANTS = ("patchcore", "distance", "influence", "noise", "seed", "seed_z",
                     "calibrated", "calibrated_mean", "calibrated_nll", "calibrated_rerank", "proposed")


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


def fit_category(cfg: Config, sources: dict | list[dict], extractor, timer: Timer, mean, std):
    """Fit one bank on the train split of one category, or of several (a unified bank)."""
    many = sources if isinstance(sources, list) else [sources]
    with timer("extract_train_s"):
        train = np.concatenate([detector.extract_all(extractor, batches(cfg, s["train"], mean, std),
                                                     cfg.batch_size, desc="features train") for s in many])
    holdout = None
    if any(len(s.get("holdout", [])) for s in many):
        with timer("extract_holdout_s"):
            holdout = np.concatenate([detector.extract_all(extractor, batches(cfg, s["holdout"], mean, std),
                                                           cfg.batch_size, desc="features holdout")
                                      for s in many if len(s.get("holdout", []))])
    state, report = detector.fit(cfg, train, holdout, jax.random.key(cfg.seed))
    timer["coreset_s"] = report.timings["coreset_s"]
    timer["stats_s"] = report.timings["stats_s"]
    del train
    return state, report


def score_source(cfg: Config, states: dict, extractor, source, mean, std, timer: Timer, *,
                 variants=(None,), keep_maps=True, n_figures=0, desc="scoring"):
    """Score every image of `source` with each state; features are extracted once per batch.

    Returns labels, masks and {(state name, variant): image scores / maps}. Variant None is
    the configured score.
    """
    scorer = None
    labels, masks, names, fig_items = [], [], [], []
    keys = [(s, v) for s in states for v in variants]
    scores = {k: [] for k in keys}
    maps = {k: [] for k in keys}
    first = next(iter(states))
    for batch in tqdm(batches(cfg, source, mean, std), desc=desc, unit="batch", leave=False):
        n = len(batch["image"])
        with timer("extract_test_s"):
            feats = extractor(detector._pad_batch(np.asarray(batch["image"]), cfg.batch_size))
            feats.block_until_ready()
        with timer("score_s"):
            if scorer is None:
                scorer = detector.Scorer(cfg, extractor.grid, variants=variants)
            for sname, state in states.items():
                out = scorer(state, feats)
                for v in variants:
                    amap = out["anomaly_maps"] if v is None else \
                        scorer.maps(detector.patch_score(cfg, out["signals"], state.stats, v))
                    amap = np.asarray(amap[:n])
                    scores[(sname, v)].append(amap.reshape(n, -1).max(-1))
                    if keep_maps:
                        maps[(sname, v)].append(amap.astype(np.float32))
                if sname == first and len(fig_items) < n_figures:
                    # up to half the figures per label, so both normal and anomalous images are shown
                    extra = {k: np.asarray(out[k][:n]) for k in ("anomaly_maps", "influence_maps", "noise_maps")
                             if k in out}
                    for i in range(n):
                        label = int(batch["label"][i])
                        if sum(f[4] == label for f in fig_items) < -(-n_figures // 2) and len(fig_items) < n_figures:
                            fig_items.append((np.asarray(batch["image"][i]), {k: v[i] for k, v in extra.items()},
                                              np.asarray(batch["mask"][i]) > 0.5, str(batch["name"][i]), label))
        labels.append(np.asarray(batch["label"][:n]))
        if keep_maps:
            masks.append(np.asarray(batch["mask"][:n]) > 0.5)
        names.extend(list(batch["name"][:n]))
    return {
        "labels": np.concatenate(labels),
        "masks": np.concatenate(masks) if keep_maps else None,
        "names": names,
        "scores": {k: np.concatenate(v) for k, v in scores.items()},
        "maps": {k: np.concatenate(v) for k, v in maps.items()} if keep_maps else None,
        "figures": fig_items,
    }


def evaluate_all(res: dict, has_masks: bool) -> dict:
    """{(state, variant): metrics dict} for every scored combination."""
    out = {}
    for key, sc in res["scores"].items():
        out[key] = metrics.evaluate(sc, res["labels"], res["maps"][key] if has_masks else None,
                                    res["masks"] if has_masks else None)
    return out


MAP_TITLES = {"anomaly_maps": "anomaly map", "influence_maps": "influence map", "noise_maps": "noise map"}


def write_figures(items, out_dir, mean, std, category):
    """One PNG per sampled test image; each map type shares one colour range over the figures."""
    paths = []
    limits = {}
    for key, title in MAP_TITLES.items():
        vals = [maps[key] for _, maps, _, _, _ in items if key in maps]
        if vals:
            limits[title] = (float(min(v.min() for v in vals)), float(max(v.max() for v in vals)))
    for img, maps, mask, name, label in items:
        stem = name.replace("/", "_").rsplit(".", 1)[0]
        title = f"{category}: {name} ({'anomalous' if label else 'normal'})"
        named = {MAP_TITLES[k]: v for k, v in maps.items()}
        paths.append(viz.save_figure(os.path.join(out_dir, f"{stem}.png"), viz.denormalize(img, mean, std),
                                     named, mask if mask.any() else None, title, limits))
    return paths


def selection_criterion(m: dict) -> float:
    """How validation results are compared (tuning kept or not; the default score): the mean of
    image AUROC and pixel AUROC, ADer's two headline numbers."""
    return (m["mAUROC_sp_max"] + m["mAUROC_px"]) / 2


def validation_split(cfg: Config, sources: dict, category: str):
    """Held-out normal images + one seeded synthetic anomaly of each (never test images),
    split by image into a half to tune on and a half to judge the tuning and the scores on."""
    from pn_jax import data

    recs = data.make_validation_records(sources["holdout"], seed=cfg.seed)  # [normal_i, anomaly_i, ...]
    halves = {"validation_tune": [], "validation_select": []}
    for i in range(0, len(recs), 2):
        halves["validation_tune" if (i // 2) % 2 == 0 else "validation_select"].extend(recs[i:i + 2])
    if not halves["validation_select"]:  # a single held-out image: tune and judge on it
        halves["validation_select"] = halves["validation_tune"]
    return {name: data.records_source(r, dataset=cfg.data.dataset, category=category, split=name)
            for name, r in halves.items()}


def tune_state(cfg: Config, state, extractor, val_source, mean, std, timer: Timer, log=print):
    """Tune the note's weights (on the seed score) and the noise scale (on the calibrated score)."""
    from pn_jax import tune as tune_lib

    feats, masks = [], []
    for batch in batches(cfg, val_source, mean, std):
        n = len(batch["image"])
        feats.append(np.asarray(extractor(detector._pad_batch(np.asarray(batch["image"]), cfg.batch_size)))[:n])
        masks.append(np.asarray(batch["mask"][:n]))
    feats, masks = np.concatenate(feats), np.concatenate(masks)
    curves = {}
    with timer("tune_s"):
        score = cfg.noising.score
        for variant in ("seed", score if score.startswith("calibrated") else "calibrated"):
            res = tune_lib.tune(cfg, state, feats, masks, extractor.grid, variant=variant, log=log)
            state = res.state
            curves[variant] = res.losses
            log(f"  tune[{variant}]: validation loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f}")
    return state, curves


def run_category(cfg: Config, category: str, out_dir: str, *, mode: str = "train",
                 checkpoint_dir: str | None = None, tune: bool = False, max_train=None, max_test=None,
                 ablation: bool = False, n_figures: int = 8, extractor=None, log=print) -> dict:
    """Fit on train (or load a checkpoint), score test, compute metrics, write figures."""
    from pn_jax import checkpoint as ckpt

    timer = Timer()
    t_start = time.perf_counter()
    info = backbones.info(cfg.model.backbone)
    mean, std = info.mean, info.std
    sources = load_sources(cfg, category, max_train=max_train, max_test=max_test)
    extractor = extractor or detector.FeatureExtractor(cfg)
    counts = {"test": len(sources["test"])}
    extra = {}
    if mode == "test":
        if tune:
            raise ValueError("--tune needs --mode train (it reads held-out training images)")
        state, saved_cfg, meta = ckpt.load(checkpoint_dir, expected=cfg)
        counts.update(meta.get("counts", {}))
        states = {"checkpoint": state}
        main_key = "checkpoint"
    else:
        state, report = fit_category(cfg, sources, extractor, timer, mean, std)
        counts.update({"train": len(sources["train"]), "holdout": len(sources.get("holdout", [])),
                       "train_patches": report.n_train_patches, "bank": report.bank_size})
        states = {"untuned": state}
        main_key = "untuned"
        if tune:
            vals = validation_split(cfg, sources, category)
            tuned, curves = tune_state(cfg, state, extractor, vals["validation_tune"], mean, std, timer, log)
            states["tuned"] = tuned
            extra["tune_curves"] = curves
            extra["tune_plot"] = viz.plot_curves(
                os.path.join(out_dir, "figures", category, "tune_loss.png"),
                {k: (list(range(len(v))), v) for k, v in curves.items()}, "step", "validation ranking loss",
                f"{category}: tuning")
            # metrics before / after on the validation half NOT tuned on, every score variant
            vres = score_source(cfg, states, extractor, vals["validation_select"], mean, std, Timer(),
                                variants=(None,) + ABLATION_VARIANTS, keep_maps=True, desc="validation")
            vm = evaluate_all(vres, True)
            extra["validation"] = {f"{s}/{v or 'default'}": m for (s, v), m in vm.items()}
            # Keep the tuned weights only if they help on the validation half not tuned on.
            crit = {s: selection_criterion(vm[(s, None)]) for s in states}
            main_key = "tuned" if crit["tuned"] > crit["untuned"] else "untuned"
            extra["tuning_kept"] = main_key == "tuned"
            log(f"  tuning {'kept' if main_key == 'tuned' else 'discarded'}: validation criterion "
                f"(mean of image and pixel AUROC) untuned {crit['untuned']:.2f}, tuned {crit['tuned']:.2f}")
        if checkpoint_dir:
            with timer("checkpoint_s"):
                ckpt.save(checkpoint_dir, states[main_key], cfg,
                          {"grid": list(extractor.grid), "category": category, "counts": counts,
                           "weights_path": getattr(extractor, "weights_path", None),
                           "tuned": main_key == "tuned"})
    has_masks = cfg.data.dataset != "elpv"
    variants = (None,) + (ABLATION_VARIANTS if ablation else ())
    res = score_source(cfg, {main_key: states[main_key], **states}, extractor, sources["test"], mean, std, timer,
                       variants=variants, keep_maps=has_masks, n_figures=n_figures)
    with timer("metrics_s"):
        allm = evaluate_all(res, has_masks)
    fig_paths = write_figures(res["figures"], os.path.join(out_dir, "figures", category), mean, std, category)
    timer["total_s"] = time.perf_counter() - t_start
    n_test = len(res["labels"])
    counts["test_anomalous"] = int(res["labels"].sum())
    entry = {
        "category": category,
        "mode": mode,
        "metrics": allm[(main_key, None)],
        "timings": dict(timer),
        "throughput": {"test_images_per_s": n_test / max(timer.get("extract_test_s", 0) + timer.get("score_s", 0), 1e-9)},
        "counts": counts,
        "figures": fig_paths,
        "config": cfg.to_dict(),
        **extra,
    }
    if tune:
        entry["test_before_after_tuning"] = {s: allm[(s, None)] for s in states}
    if ablation:
        entry["ablation"] = {f"{v}" + ("" if s == main_key else f" ({s})"): allm[(s, v)]
                             for s in states for v in variants[1:]}
    entry["_states"] = states
    entry["_test"] = res
    return entry


def run_unified(cfg: Config, categories: list[str], out_dir: str, *, checkpoint_dir: str | None = None,
                max_train=None, max_test=None, ablation: bool = False, n_figures: int = 8,
                log=print) -> list[dict]:
    """ADer-style multi-class setting: ONE bank over every category's train images, then
    metrics per category on that shared bank."""
    from pn_jax import checkpoint as ckpt

    timer = Timer()
    t_start = time.perf_counter()
    info = backbones.info(cfg.model.backbone)
    mean, std = info.mean, info.std
    sources = {c: load_sources(cfg, c, max_train=max_train, max_test=max_test) for c in categories}
    extractor = detector.FeatureExtractor(cfg)
    state, report = fit_category(cfg, list(sources.values()), extractor, timer, mean, std)
    if checkpoint_dir:
        ckpt.save(checkpoint_dir, state, cfg, {"grid": list(extractor.grid), "category": "+".join(categories),
                                               "unified": True})
    fit_timings = dict(timer)
    has_masks = cfg.data.dataset != "elpv"
    variants = (None,) + (ABLATION_VARIANTS if ablation else ())
    entries = []
    for c in categories:
        t = Timer()
        res = score_source(cfg, {"unified": state}, extractor, sources[c]["test"], mean, std, t,
                           variants=variants, keep_maps=has_masks, n_figures=n_figures)
        allm = evaluate_all(res, has_masks)
        entry = {"category": c, "mode": "unified", "metrics": allm[("unified", None)],
                 "timings": {**{f"shared_{k}": v for k, v in fit_timings.items()}, **t},
                 "counts": {"train": sum(len(s["train"]) for s in sources.values()), "test": len(res["labels"]),
                            "test_anomalous": int(res["labels"].sum()), "bank": report.bank_size,
                            "train_patches": report.n_train_patches, "categories_in_bank": len(categories)},
                 "figures": write_figures(res["figures"], os.path.join(out_dir, "figures", c), mean, std, c),
                 "config": cfg.to_dict()}
        if ablation:
            entry["ablation"] = {v: allm[("unified", v)] for v in variants[1:]}
        entries.append(entry)
    log(f"unified bank over {len(categories)} categories: {report.bank_size} entries from "
        f"{report.n_train_patches} patches; total {time.perf_counter() - t_start:.1f}s")
    return entries


def write_results(path: str, entries: list[dict], extra: dict | None = None) -> None:
    """results.json (atomic): per-category metrics, timings, counts, config; plus the means."""
    cats = {e["category"]: {k: v for k, v in e.items() if not k.startswith("_")} for e in entries}
    doc = {"categories": cats, "mean": metrics.mean_over_categories([e["metrics"] for e in entries])}
    if extra:
        doc.update(extra)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, default=json_default)
    os.replace(tmp, path)


def json_default(o):
    """json.dump fallback for numpy scalars and arrays."""
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
