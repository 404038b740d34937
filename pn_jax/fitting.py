"""The fit protocol, in the order it runs (SPEC 6): every choice a fit makes without test labels.

    fit(cfg, train)
      1. split      which training images calibrate and which validate (`calibration_split`);
                    held-out images calibrate instead when given
      2. bank       backbone features of every training image -> greedy coreset (`fit_state`)
      3. statistics noise scale s, influence dims S, signal statistics (`normalstats`), on the
                    calibration images scored leave-one-image-out
      4. threshold  validation images and one seeded synthetic anomaly of each, scored
                    leave-one-image-out: F1-max or an FPR quantile (`set_threshold_loo`)
      5. --score auto  the candidate score that wins on those validation scores (`choose_score`)
      6. --tune     optax on held-out images + synthetic anomalies, kept only if it helps on a
                    half not tuned on (`tune`)
    fit(cfg, train, validation=labelled set)   4-6 on the user's labelled defects instead
                    (`pn_jax.labelled`): threshold, --score auto, tuning kept by k-fold CV
    rethreshold(model, ...)  a loaded model's threshold chosen again from its saved scores

`detector` holds the maths (features, signals, the Scorer, the bank), `model` the public
object (fit / predict / save / load / export), `runner` evaluation and reporting.

(Over 450 lines on purpose: the fit protocol is one module, read in the order it runs
(STYLE.md, "one module for the fit protocol"); splitting its steps apart would hide which
choice sees which data.)
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import time
import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pn_jax import ahead, batches, calibration, detector, distributed, metrics, noising, normalstats, tilebank, transfer
from pn_jax import coreset as coreset_lib
from pn_jax import model as model_lib
from pn_jax import precision as precision_lib
from pn_jax.config import Config
from pn_jax.model import Model, ModelError
from pn_jax.timing import Timer


# ----------------------------------------------------------------------------- 1-3. split, bank, statistics
def fit(cfg: Config, train, *, holdout=None, key: jax.Array | None = None, category: str | None = None,
        dataset: str | None = None, log: Callable = print, timer: dict | None = None,
        extractor: detector.FeatureExtractor | None = None, validation_variants: Sequence[str] = (),
        validation=None, tune: bool = False, disjoint_from: dict | None = None) -> Model:
    """Fit a model on normal images: a folder, paths, an array, or a data `Source`.

    `validation`: a labelled set (folder or source, `pn_jax.labelled`) instead of steps 4-6: the
    threshold, --score auto and, with `tune`, the score's parameters (k-fold CV keep-or-drop).
    Refused before any extraction if it shares an image with train or `disjoint_from` sources.

    `holdout`: normal images kept out of the bank for the fit-time statistics and the
    threshold; None splits them off `train` by `cfg.data.holdout_fraction` (seeded). `timer`
    receives the stage timings (seconds). `validation_variants`: score variants whose image
    scores on the validation split are kept in `model.validation` (score selection, studies)."""
    from pn_jax.data import records

    auto = cfg.noising.score == "auto"
    if auto:  # fit as the first candidate, then choose among all on validation data
        from pn_jax.research import select

        cfg = select.config_for(cfg, select.CANDIDATES[0])
        validation_variants = tuple(validation_variants) + select.CANDIDATES
    timer = {} if timer is None else timer
    category = category or (getattr(train, "category", None) if model_lib.is_source(train) else None)
    key = jax.random.key(cfg.seed) if key is None else key
    if isinstance(train, (str, os.PathLike)) and os.path.isdir(train):
        from pn_jax import data

        category = category or folder_category(os.fspath(train))
        train = data.folder_source(os.fspath(train), category=category)  # skips non-images with a note
    elif not model_lib.is_source(train):
        train = model_lib.items_source(model_lib.as_items(train))
    if holdout is None and cfg.data.holdout_fraction > 0:
        tr_idx, ho_idx = records.split_train_holdout(list(range(len(train))), cfg.data.holdout_fraction,
                                                     cfg.data.holdout_min, cfg.seed)
        train, holdout = subset(train, tr_idx, "train"), subset(train, ho_idx, "holdout")
    if validation is not None:
        from pn_jax import labelled

        validation = labelled.as_source(validation)
        labelled.check_disjoint(validation, {"training": train, "held-out training": holdout, **(disjoint_from or {})})
    model = Model(cfg, (0, 0), None, extractor=extractor)  # grid is known after the first batch
    store = None
    if cfg.max_memory_gb is not None:  # refuse before any image is read; then stream (pn_jax/streaming.py)
        from pn_jax import membudget, streaming

        membudget.check(cfg, len(train))
        if cfg.noising.influence == "predictor":
            raise model_lib.ModelError("--influence predictor learns from the calibration features held whole; "
                                       "it does not take --max-memory (drop one of them)")
        if cfg.devices > 1 or jax.process_count() > 1:
            raise model_lib.ModelError("--max-memory streams the train features on one device in one process; "
                                       "drop --devices (and run one process)")
    if tilebank.n_positions(cfg) and jax.process_count() > 1:
        raise model_lib.ModelError("--tile-bank per-position fits on one process; drop it or run one process")
    if jax.process_count() > 1 and (cfg.noising.influence == "predictor" or tune or validation is not None):
        # these read the bank whole on one device; a distributed fit's bank is sharded over the processes
        what = "--influence predictor" if cfg.noising.influence == "predictor" else (
            "--tune" if tune else "--validation")
        raise model_lib.ModelError(f"{what} reads the memory bank whole on one device; a --distributed fit "
                                   f"keeps it sharded over the processes: drop {what} or run one process")
    t0 = time.perf_counter()
    if cfg.max_memory_gb is not None:
        # fit_state splits `key` into (coreset key, dims key): the projection is the coreset key's
        store = train_feats = streaming.extract(model, train, jax.random.split(key)[0])
    else:
        train_feats = distributed.extract_local(model, train)  # each process keeps its own block, if several
    timer["extract_train_s"] = time.perf_counter() - t0
    try:
        return _fit_rest(cfg, model, train, train_feats, holdout, key, category, dataset, log, timer,
                         validation_variants, auto, validation, tune)
    finally:
        if store is not None:
            store.close()


def _fit_rest(cfg, model, train, train_feats, holdout, key, category, dataset, log, timer, validation_variants,
              auto, validation=None, tune=False) -> Model:
    holdout_feats, calib, val = None, None, None
    if holdout is not None and len(holdout):
        t0 = time.perf_counter()
        holdout_feats = distributed.extract(model, holdout, desc="features holdout")
        timer["extract_holdout_s"] = time.perf_counter() - t0
    if len(train) >= 2:
        # Leave-one-image-out: every image serves the bank; disjoint samples of them calibrate
        # (s, dims, statistics; unless held-out images do) and validate (the threshold), each
        # scored without its own entries. Calibration and validation never share an image.
        calib, val = calibration_split(len(train), cfg.seed, calibrate=holdout_feats is None)
    model.grid = tuple(model.extractor.grid)  # the threshold's scoring compiles while the statistics run:
    ahead = None if validation is not None or val is None or not len(val) else lambda shapes: model.scorer(
        (None,) + tuple(v for v in validation_variants if v)).compile_ahead(shapes, cfg.batch_size)
    state, report = fit_state(cfg, train_feats, holdout_feats, key, calibrate_on=calib, on_bank=ahead)
    timer.update(report.timings)
    model.state = state
    model.bank_owner = report.bank_owner
    model.provenance = model_lib.provenance(cfg, dataset=dataset or getattr(train, "dataset", None), category=category,
                                  n_train=len(train), n_holdout=0 if holdout is None else len(holdout),
                                  bank_size=report.bank_size, train_patches=report.n_train_patches)
    model.calibration = dict(report.calibration)
    if report.calibration["images"] == 0:
        log(f"warning: {report.calibration['source']}")
    t0 = time.perf_counter()
    if validation is not None:  # 4-6 on the labelled set instead of the synthetic validation
        from pn_jax import labelled

        model = labelled.fit_on_labelled(model, validation, tune_weights=tune, auto=auto, log=log,
                                         choose_threshold=choose_threshold)
        timer["labelled_s"] = time.perf_counter() - t0
        return model
    if val is not None and len(val):
        set_threshold_loo(model, train, val, train_feats=train_feats, validation_variants=validation_variants,
                          log=log)
    else:
        warnings.warn("fit: no validation images (a single training image): no decision threshold; "
                      "labels stay empty", stacklevel=2)
    if auto and model.validation:
        choose_score(model, log=log)
    timer["threshold_s"] = time.perf_counter() - t0
    return model


def calibration_split(n_images: int, seed: int, max_images: int = 32, *,
                      calibrate: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """Disjoint seeded samples of training images: (calibration, validation), each at most
    `max_images` (32 images = 32k patches at 32x32: the per-dim RMS residual s_j is then an
    average over thousands of roughly independent patches, a few percent of standard error)."""
    perm = np.random.default_rng([seed, 1729]).permutation(n_images)
    if not calibrate:  # held-out images calibrate: every training image may validate
        return None, np.sort(perm[:max_images])
    n_cal = min(max_images, max(1, -(-n_images // 2)))
    n_val = min(max_images, n_images - n_cal)
    return np.sort(perm[:n_cal]), np.sort(perm[n_cal:n_cal + n_val])


@dataclasses.dataclass
class FitReport:
    n_train_patches: int
    bank_size: int
    timings: dict
    bank_owner: np.ndarray | None = None  # [M] the training image each bank entry came from
    calibration: dict = dataclasses.field(default_factory=dict)  # what the statistics were fitted on


def fit_state(cfg: Config, train_feats: np.ndarray, holdout_feats: np.ndarray | None,
        key: jax.Array | None = None, *, calibrate_on: np.ndarray | None = None,
        on_bank: Callable | None = None) -> tuple[detector.DetectorState, FitReport]:
    """train_feats [n, N, D] (host) -> state. The noise scale, the importance dims and the
    statistics come from `holdout_feats` [h, N, D] (normal images not in the bank) or, with
    `calibrate_on` (training image indices), from those images scored leave-one-image-out.
    `on_bank(DetectorState of shapes)`: before the coreset, with the bank's shape (`Scorer.compile_ahead`)."""
    key = jax.random.key(cfg.seed) if key is None else key
    k_core, k_dims = jax.random.split(key)
    n_img, n_patch, dim = train_feats.shape
    # streaming.FeatureStore (on disk) or distributed.ProcessFeatures (each process its own images)
    streamed = hasattr(train_feats, "coreset")
    flat = None if streamed else train_feats.reshape(-1, dim)
    n_calib = len(holdout_feats) if holdout_feats is not None and len(holdout_feats) else (
        0 if calibrate_on is None or n_img < 2 else len(calibrate_on))
    if n_calib:  # the statistics' programs compile beside the coreset, first (they run first)
        normalstats.compile_ahead(cfg, coreset_lib.n_coreset(n_img * n_patch, cfg.bank.coreset_ratio), dim, n_patch,
                                  n_calib, loo=holdout_feats is None or not len(holdout_feats))
    random_dims = None
    if cfg.noising.dim_selection == "random" or not n_calib:  # from the key alone: drawn beside the coreset
        random_dims = ahead.submit(lambda: jax.block_until_ready(normalstats.select_dims(cfg, k_dims, dim)))
    calib_copy = None
    if isinstance(train_feats, np.ndarray) and n_calib and (holdout_feats is None or not len(holdout_feats)):
        # the leave-one-image-out sample's features, copied beside the coreset (first writes to
        # fresh memory fault pages: ~0.5 s for ELPV's 134 MB on the critical path before)
        calib_copy = ahead.submit(lambda: train_feats[np.asarray(calibrate_on)])
    if on_bank is not None:  # the bank's shape is known before the coreset runs
        shapes = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
        on_bank(detector.DetectorState(shapes(coreset_lib.n_coreset(n_img * n_patch, cfg.bank.coreset_ratio), dim),
                                       jax.ShapeDtypeStruct((detector.n_influence_dims(cfg, dim),), jnp.int32),
                                       detector.init_params(dim), noising.identity_stats()))
    t0 = time.perf_counter()
    if tilebank.n_positions(cfg):  # one greedy per tile position, on the shared fit's projection
        proj = train_feats.projection(k_core) if streamed else tilebank.project_all(k_core, flat, cfg)
        idx = tilebank.coreset(k_core, proj, n_img, n_patch, cfg)
        del proj
    elif streamed:
        idx = train_feats.coreset(k_core, cfg)
    elif cfg.devices > 1:
        from pn_jax import sharding

        mesh = sharding.make_bank_mesh(jax.devices()[:cfg.devices])
        idx = sharding.coreset_indices_sharded(k_core, flat, cfg.bank.coreset_ratio,
                                               cfg.bank.coreset_proj_dim, cfg.bank.coreset_starts, mesh)
    else:
        idx = coreset_lib.coreset_indices(k_core, flat, cfg.bank.coreset_ratio,
                                          cfg.bank.coreset_proj_dim, cfg.bank.coreset_starts, progress=True,
                                          precision=precision_lib.of(cfg), preselect=cfg.bank.coreset_preselect)
    idx = np.asarray(idx)
    if isinstance(train_feats, distributed.ProcessFeatures):  # sharded as it is fetched: never whole on a host
        from pn_jax import sharding

        bank = train_feats.bank(idx, sharding.make_bank_mesh(jax.devices()[:cfg.devices]))
    else:
        bank = transfer.to_device(train_feats.rows(idx) if streamed else flat[idx])
    m_bank = len(idx)
    bank_owner = (idx // n_patch).astype(np.int32)
    t_core = time.perf_counter() - t0
    if m_bank < cfg.noising.k:
        raise ValueError(f"memory bank has {m_bank} entries but k={cfg.noising.k}; "
                         f"raise --coreset-ratio or lower --k")
    params = detector.init_params(dim)
    t0 = time.perf_counter()
    neighbours, calib_feats = None, None
    if holdout_feats is not None and len(holdout_feats):
        calib_feats = holdout_feats
        neighbours = normalstats.holdout_neighbours(cfg, bank, holdout_feats)  # one search serves all below
        info = {"source": "held-out images", "images": int(len(holdout_feats))}
    elif calibrate_on is not None and len(calibrate_on):
        calib = np.asarray(calibrate_on)
        if n_img < 2:
            raise ValueError("leave-one-image-out calibration needs at least 2 training images "
                             "(one image's patches are searched against the others')")
        from pn_jax import streaming

        if isinstance(train_feats, streaming.FeatureStore):  # read back batch by batch: never [c, N, D] twice
            calib_feats = streaming.Subset(train_feats, calib, normalstats.image_batch(cfg, len(calib)))
        else:
            calib_feats = calib_copy.result() if calib_copy is not None else train_feats[calib]
        neighbours = normalstats.loo_neighbours(cfg, bank, bank_owner, calib_feats, calib)
        info = {"source": "leave-one-image-out", "images": int(len(calib))}
    else:
        info = {"source": "none: identity statistics and noise scale 1", "images": 0}
        warnings.warn("fit: no calibration images (no held-out images and no leave-one-image-out sample): "
                      "identity statistics and noise scale s = 1 are used, so calibrated scores equal "
                      "unwhitened distances", stacklevel=2)
    # [c * N, D] on the device: from the host array, or a streamed sample's rows filled in place
    flat_calib = None if calib_feats is None else (
        calib_feats.device_rows() if streamed and hasattr(calib_feats, "device_rows")
        else transfer.to_device(calib_feats.reshape(-1, dim)))
    rows = getattr(bank, "rows", bank)  # a ShardedBank's padded rows: the statistics only gather from them
    if calib_feats is not None:
        params["noise_scale"] = calibration.fit_noise_scale(
            rows, flat_calib, shrinkage=cfg.noising.noise_shrinkage,
            floor=cfg.noising.noise_floor, nearest=neighbours[1])
    dims = (random_dims.result() if random_dims is not None
            else normalstats.select_dims(cfg, k_dims, dim, flat_calib, rows, neighbours))
    del flat_calib  # the whole sample's features are not needed below (influence runs per image)
    info["dim_selection"] = cfg.noising.dim_selection if calib_feats is not None else "random"
    if cfg.noising.dim_selection != info["dim_selection"]:
        warnings.warn("fit: dim_selection=importance needs calibration images; the dims S were drawn at "
                      "random instead (recorded in the checkpoint's calibration info)", stacklevel=2)
    info["patches"] = 0 if calib_feats is None else int(len(calib_feats) * n_patch)
    if cfg.noising.influence == "predictor":
        if calib_feats is None:
            raise ValueError("--influence predictor learns from calibration images: fit on at least 2 "
                             "training images (or give held-out images)")
        from pn_jax.research import predictor

        # Targets: grad influence of the calibration patches (under leave-one-image-out they are
        # also in the bank, so the smallest distances are over-represented; see README).
        pf = predictor.fit_predictor(calib_feats, bank, dims, k=cfg.noising.k, key=jax.random.fold_in(key, 17),
                                     steps=cfg.noising.predictor_steps, hidden=cfg.noising.predictor_hidden,
                                     block=cfg.bank.knn_block)
        params["predictor"] = pf.params
        info["predictor"] = {**pf.info, "val_loss_before": pf.val_loss_init, "val_loss_after": pf.val_loss}
    loo = (bank_owner, np.asarray(calibrate_on)) if info["source"] == "leave-one-image-out" else None
    stats = normalstats.fit_stats(cfg, params, bank, dims, calib_feats, neighbours, exclude=loo)
    t_stats = time.perf_counter() - t0
    state = detector.DetectorState(bank=bank, dims=dims, params=params, stats=stats)
    return state, FitReport(n_img * n_patch, m_bank, {"coreset_s": t_core, "stats_s": t_stats},
                            bank_owner=bank_owner, calibration=info)


def subset(source, idx: Sequence[int], split: str):
    from pn_jax.data import records

    idx = list(idx)
    names = [source.names[i] for i in idx] if hasattr(source, "names") else [str(i) for i in idx]
    sub = records.Source(len(idx), lambda i: source[idx[i]], names,
                         dataset=getattr(source, "dataset", "user"),
                         category=getattr(source, "category", "user"), split=split)
    if getattr(source, "paths", None) is not None:  # the files, for labelled.check_disjoint
        sub.paths = [source.paths[i] for i in idx]
    return sub


def folder_category(train_dir: str) -> str:
    """A name for a fit on a folder: the folder's, or the one above an MVTec-style train/good."""
    parts = os.path.normpath(os.path.abspath(train_dir)).split(os.sep)
    while len(parts) > 1 and parts[-1] in ("good", "train"):
        parts.pop()
    return parts[-1] or "folder"


# ----------------------------------------------------------------------------- 4. threshold
def set_threshold_loo(model: Model, train, val, *, train_feats=None, validation_variants: Sequence[str] = (),
                      log: Callable = print) -> None:
    """Choose and store the threshold from training images `val` (indices into `train`) and one
    seeded synthetic anomaly of each, all scored leave-one-image-out (never a test image)."""
    val = np.asarray(val)
    variants = (None,) + tuple(v for v in validation_variants if v is not None)
    bs = model.cfg.batch_size
    if train_feats is not None:  # a batch of images at a time (at 1024 px 32 images are 2.1 GB)
        batches_ = ((val[lo:lo + bs], train_feats[val[lo:lo + bs]]) for lo in range(0, len(val), bs))
    else:
        src = subset(train, val, "validation")
        batches_ = batches.owned(batches.feature_batches(model, src, desc="threshold"), val)
    # one stream of batches, the normals' then the anomalies': on the CPU two are scored at once
    # throughout (`batches.in_flight`), and the anomalies' first batch overlaps the normals' last
    both = batches.score_loo(model, itertools.chain(batches_, _loo_anomaly_batches(model, train, val)), variants)
    half = lambda r, part: {"image_scores": r["image_scores"][part],  # noqa: E731
                            "variants": {v: (sc[part], None) for v, (sc, _) in r["variants"].items()}}
    normal, anomal = half(both, slice(None, len(val))), half(both, slice(len(val), None))
    _keep_validation(model, normal, anomal, variants)
    model.calibration["validation_images"] = [int(i) for i in val]
    _store_threshold(model, normal["image_scores"], anomal["image_scores"],
                     f"leave-one-image-out on {len(val)} training images", log)


def validation_records(holdout, seed: int) -> tuple[list, list]:
    """(normal records, synthetic anomaly records) made from held-out normal images."""
    from pn_jax import data

    recs = data.make_validation_records(holdout, seed=seed)  # [normal_i, anomaly_i, ...]
    return recs[0::2], recs[1::2]


def _loo_anomaly_batches(model: Model, train, val):
    """(owners, features) batches of one seeded synthetic anomaly of each validation training
    image, to be scored without that image's own bank entries (`batches.score_loo`)."""
    from pn_jax.data import anomalies, records

    # Each anomaly is read and made where the batch loop reads its images (decode workers,
    # beside the backbone), not all of them first on this thread: the same records
    # (data.make_validation_records' seeds), never all held at once.
    seed, val = model.cfg.seed, np.asarray(val)
    src = records.Source(len(val), lambda i: anomalies.anomaly_record(train[int(val[i])], seed=seed, index=i),
                         [f"{i}" for i in range(len(val))], dataset="validation", category="validation",
                         split="validation", has_masks=True)
    if distributed.active():  # each process makes and extracts its own batches; features all-gathered
        feats = ((None, f) for f in distributed.own_feature_batches(model, src, desc="threshold"))
    else:
        feats = batches.feature_batches(model, src, desc="threshold")
    return batches.owned(feats, val)


def _keep_validation(model: Model, normal: dict, anomal: dict, variants) -> None:
    """model.validation[variant] = (normal image scores, synthetic-anomaly image scores), keyed
    by the variant's name (None: the configured one's)."""
    model.validation = {v or detector.default_variant(model.cfg): (normal["variants"][v][0], anomal["variants"][v][0])
                        for v in variants}


def _store_threshold(model: Model, normal, anomal, where: str, log: Callable) -> None:
    thr, info = choose_threshold(normal, anomal, fpr=model.cfg.threshold_fpr)
    model.threshold = thr
    model.calibration["threshold"] = {**info, "value": thr, "validation": where}
    log(f"threshold {thr:.5g} ({info['rule']}; {where})")


def choose_threshold(normal_scores, anomaly_scores=None, *, fpr: float | None = None) -> tuple[float, dict]:
    """The decision threshold from validation image scores (never test labels).

    fpr=None: F1-max over the normals and synthetic anomalies, placed halfway between the
    F1-max threshold and the next lower validation score (the same F1 on validation, and not
    flush against one synthetic anomaly's score). fpr=q: the (1 - q) quantile of the normals.
    """
    normal = np.asarray(normal_scores, np.float64)
    if normal.size == 0:
        raise ModelError("no validation normal images to choose a threshold from")
    if fpr is not None:
        thr = float(np.quantile(normal, 1.0 - fpr, method="higher"))
        thr = float(np.nextafter(thr, np.inf))  # strictly above that normal: FPR <= q on validation
        return thr, {"rule": f"quantile 1-{fpr} of {normal.size} validation normal scores", "fpr": fpr}
    anom = np.asarray(anomaly_scores, np.float64)
    if anom.size == 0:
        raise ModelError("no synthetic anomalies to choose an F1-max threshold from")
    scores = np.concatenate([normal, anom])
    labels = np.concatenate([np.zeros(normal.size, bool), np.ones(anom.size, bool)])
    f1, thr = metrics.f1_max_with_threshold(scores, labels)
    below = scores[scores < thr]
    if below.size:
        thr = 0.5 * (thr + below.max())
    return float(thr), {"rule": f"F1-max on validation ({normal.size} normal, {anom.size} synthetic anomalies)",
                        "validation_f1": 100.0 * f1}


# ----------------------------------------------------------------------------- 5. --score auto
def choose_score(model: Model, *, log: Callable = print) -> None:
    """`--score auto`: the candidate score that wins on this model's own validation data
    (`select.choose`; never test data); the model's config and threshold become that score's."""
    from pn_jax.research import select

    choice, table = select.choose(model.validation, select.CANDIDATES)
    model.cfg = select.config_for(model.cfg, choice)
    model.calibration["auto"] = {"choice": choice, "validation_auroc": table}
    log(f"--score auto chose {choice} on validation data")
    _store_threshold(model, *model.validation[choice], model.calibration["threshold"]["validation"], log)


# ----------------------------------------------------------------------------- 6. --tune
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


def tune_state(model, val_source, timer: Timer, log=print):
    """Tune the note's weights (on the seed score) and the noise scale (on the calibrated score)
    on a validation source; returns (tuned state, loss curves)."""
    from pn_jax import tune as tune_lib

    if model.cfg.data.tile:
        raise ValueError("--tune learns from per-patch labels on one patch grid; it does not take --tile yet")
    feats, kept = batches.extract(model, val_source, desc="validation", keep=("mask",))
    masks = kept["mask"]
    curves = {}
    state, cfg = model.state, model.cfg
    with timer("tune_s"):
        score = cfg.noising.score
        for variant in ("seed", score if score.startswith("calibrated") else "calibrated"):
            res = tune_lib.tune(cfg, state, feats, masks, model.grid, variant=variant, log=log)
            state = res.state
            curves[variant] = res.losses
            log(f"  tune[{variant}]: validation loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f}")
    return state, curves


def selection_criterion(m: dict) -> float:
    """How validation results are compared (tuning kept or not; the default score): the mean of
    image AUROC and pixel AUROC, ADer's two headline numbers."""
    return (m["mAUROC_sp_max"] + m["mAUROC_px"]) / 2


def tune(model: Model, sources: dict, category: str, timer: Timer, log: Callable = print):
    """`--tune`: optax on one half of the held-out images and their synthetic anomalies
    (`validation_split`), every score variant judged on the other half; the tuned weights are
    kept only if they raise `selection_criterion` there, and then the threshold is chosen
    again for the tuned scores. Returns ({"untuned", "tuned"} models, the key of the one kept,
    {"tune_curves", "validation", "tuning_kept"})."""
    vals = validation_split(model.cfg, sources, category)
    tuned, curves = tune_state(model, vals["validation_tune"], timer, log)
    models = {"untuned": model, "tuned": model.with_state(tuned)}
    # metrics before / after on the validation half NOT tuned on, every score variant
    vres = batches.score_source(models, vals["validation_select"], Timer(),
                                variants=(None,) + detector.ABLATION_VARIANTS, keep_maps=True, desc="validation")
    vm = metrics.evaluate_all(vres, True)
    crit = {s: selection_criterion(vm[(s, None)]) for s in models}
    kept = "tuned" if crit["tuned"] > crit["untuned"] else "untuned"
    log(f"  tuning {'kept' if kept == 'tuned' else 'discarded'}: validation criterion "
        f"(mean of image and pixel AUROC) untuned {crit['untuned']:.2f}, tuned {crit['tuned']:.2f}")
    if kept == "tuned":  # the threshold belongs to the scores it will be applied to
        set_threshold_loo(models["tuned"], sources["train"], model.calibration["validation_images"], log=log)
    return models, kept, {"tune_curves": curves, "validation": {f"{s}/{v or 'default'}": m for (s, v), m in vm.items()},
                          "tuning_kept": kept == "tuned"}


# ----------------------------------------------------------------------------- after loading
def rethreshold(model: Model, *, score: str | None = None, threshold_fpr=...) -> Model:
    """The same model scoring with `score` (a configured score name, as `--score`) and/or
    another threshold rule (`threshold_fpr`: None = F1-max, q = FPR q; `...` keeps the
    model's), its threshold chosen again from the validation scores saved with it (never
    test data). Refused when it holds none for that score: a threshold chosen on another
    score's values would label by a meaningless number."""
    from pn_jax.research import select

    cfg = model.cfg if score is None else select.config_for(model.cfg, score)
    if threshold_fpr is not ...:
        cfg = cfg.replace(threshold_fpr=threshold_fpr)
    variant = detector.default_variant(cfg)
    if variant not in model.validation:
        have = sorted(model.validation)
        raise ModelError(
            f"this model holds no validation scores for score {variant!r} "
            + (f"(only for {have})" if have else "(it was saved by an older pn_jax)")
            + ", so no threshold can be chosen for it without re-fitting; re-fit with that score"
            + (" or --score auto (which keeps every candidate's validation scores)" if score else ""))
    thr, info = choose_threshold(*model.validation[variant], fpr=cfg.threshold_fpr)
    where = (model.calibration.get("threshold") or {}).get("validation", "validation images")
    calib = {**model.calibration, "threshold": {**info, "value": thr, "validation": where,
                                               "rechosen": "from the validation scores saved with the model"}}
    out = model.with_state(model.state, threshold=thr, calibration=calib)
    out.cfg, out.validation = cfg, model.validation
    return out
