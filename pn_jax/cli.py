"""The commands of `pn-jax` (fit, test, predict, export, suggest, report) and `python -m experiments.run`:
each a thin layer over `pn_jax.fitting`, `pn_jax.model` and `pn_jax.runner`. Their flags and
usage are in `pn_jax.flags` (`flags.USAGE`). Bad input is refused before any long work starts,
with a message that names the flag or file (exit 2).
"""
from __future__ import annotations

import csv
import functools
import os
import sys
import time
import warnings

from pn_jax.flags import (DEFAULT_ROOTS, MVTEC_CATEGORIES, UsageError, apply_test_flags, build_config,
                          build_parser, build_run_parser, check_val_dir, data_backend, dataset_of,
                          refuse_fit_only_flags)


# ----------------------------------------------------------------------------- checks before work
def check_writable(path: str, flag: str) -> str:
    """Create `path` if needed and prove it writable with a probe file, before any long work."""
    path = os.path.abspath(path)
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: {parent} is a file, not a folder; choose another {flag}")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".pn_jax-write-probe-{os.getpid()}")
        with open(probe, "w") as fh:
            fh.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"{flag} {path} cannot be written ({e.strerror or e}); choose a writable folder") from None
    return path


def resolve_categories(a, ds: str) -> list[str]:
    if ds == "folder":
        return [folder_name(a.train_dir)]
    cats = a.category or (["mono"] if ds == "elpv" else ["synthetic"] if ds == "synthetic" else ["bottle"])
    if cats == ["all"]:
        if ds != "mvtec_ad":
            raise UsageError(f"--category all means MVTec AD's 15 categories; for --dataset {ds} name them")
        root = a.data_root or DEFAULT_ROOTS["mvtec_ad"]
        if os.path.isdir(os.path.join(root, "all")):
            raise UsageError(f"--category all means MVTec AD's 15 categories, but {root} also has a folder "
                             "named 'all'; rename that folder to use it")
        return list(MVTEC_CATEGORIES)
    if "all" in cats:
        raise UsageError("--category all means MVTec AD's 15 categories and cannot be mixed with other names")
    seen = []
    for c in cats:
        if c in seen:
            print(f"note: --category {c} given twice; scoring it once", file=sys.stderr)
        else:
            seen.append(c)
    return seen


def one_category(a, what: str):
    """(config, category) for a tool that studies one dataset category (influence study,
    active learning); refuses --train-dir and several categories before any work."""
    if getattr(a, "train_dir", None):
        raise UsageError(f"{what} runs on --dataset/--category, not --train-dir")
    cfg = build_config(a)
    categories = resolve_categories(a, cfg.data.dataset)
    if len(categories) != 1:
        raise UsageError(f"{what} takes one --category, got {categories}")
    check_data(cfg, a, categories)
    return cfg, categories[0]


def check_data(cfg, a, categories: list[str]) -> None:
    """Fail fast, before any backbone loads, when the data is not there."""
    from pn_jax.data import mvtec

    if getattr(a, "train_dir", None):
        if not os.path.isdir(a.train_dir):
            raise UsageError(f"--train-dir {a.train_dir} is not a folder")
        return
    from pn_jax import download

    flag = getattr(a, "download", None)
    download.set_policy(flag)  # weights: downloaded unless --no-download or PN_JAX_OFFLINE=1
    if cfg.data.dataset == "mvtec_ad":  # the dataset only with --download (or a yes at a terminal)
        download.ensure_mvtec(cfg.data.root, categories, allow=flag)
    if cfg.data.dataset == "mvtec_ad":
        mvtec.check_root(cfg.data.root)
        for c in categories:
            mvtec.index_category(cfg.data.root, c)


def folder_name(train_dir: str) -> str:
    from pn_jax import fitting

    return fitting.folder_category(train_dir)


def folder_sources(cfg, a):
    from pn_jax import data

    return data.load_folders(a.train_dir, a.test_dir, holdout_fraction=cfg.data.holdout_fraction,
                             holdout_min=cfg.data.holdout_min if cfg.data.holdout_fraction > 0 else 0,
                             seed=cfg.seed, max_train=a.max_train,
                             max_test=a.max_test, masks=not a.no_masks, category=folder_name(a.train_dir))


# ----------------------------------------------------------------------------- commands
def cmd_fit(a, *, experiments_mode: bool = False) -> int:
    from pn_jax import runner

    if getattr(a, "train_dir", None) and (a.dataset or a.category):
        raise UsageError("--train-dir fits on a folder; drop --dataset/--category (or drop --train-dir)")
    if a.test_dir and not getattr(a, "train_dir", None):
        raise UsageError("--test-dir goes with --train-dir")
    cfg = build_config(a)
    ds = dataset_of(a)
    categories = resolve_categories(a, ds)
    out = check_writable(a.out or "results/run", "--out")
    if a.checkpoint:
        check_writable(os.path.dirname(os.path.abspath(a.checkpoint)) or ".", "--checkpoint")
    if a.unified and (a.tune or ds == "folder"):
        raise UsageError("--unified fits one bank over several --category; it does not take --tune or --train-dir")
    val_dir = check_val_dir(a, cfg, categories)
    if a.tune and cfg.data.tile:
        raise UsageError("--tune learns from per-patch labels on one patch grid; it does not take --tile yet")
    if a.tune and not val_dir and cfg.data.holdout_fraction == 0:
        raise UsageError("--tune fits weights on held-out normal images: add --holdout-fraction 0.2 "
                         "(by default every training image is in the bank), or give labelled defects "
                         "with --val-dir")
    check_data(cfg, a, categories)
    from pn_jax import labelled

    try:  # the labelled folder's layout, checked before any work
        validation = labelled.as_source(val_dir, masks=not a.no_masks) if val_dir else None
    except ValueError as e:
        raise UsageError(f"--val-dir: {e}") from None
    print(banner(cfg))
    if a.tune and not val_dir:
        print(f"warning: {labelled.TUNE_WARNING}")
    t0 = time.perf_counter()
    if a.unified:
        entries = runner.run_unified(cfg, categories, out, checkpoint_dir=_ckpt_dir(a, out, "unified", 1),
                                     max_train=a.max_train, max_test=a.max_test, ablation=a.ablation,
                                     n_figures=a.figures)
    else:
        entries = []
        for cat in categories:
            sources = folder_sources(cfg, a) if ds == "folder" else runner.load_sources(
                cfg, cat, max_train=a.max_train, max_test=a.max_test, masks=not a.no_masks)
            ck = _ckpt_dir(a, out, cat, len(categories))
            e = runner.run_category(cfg, cat, out, mode="train", checkpoint_dir=ck, tune=a.tune,
                                    max_train=a.max_train, max_test=a.max_test, ablation=a.ablation,
                                    n_figures=a.figures, sources=_no_masks(sources, a), validation=validation)
            print(summary_line(e, ck))
            entries.append(e)
    return report(a, entries, out, t0)


def _ckpt_dir(a, out: str, category: str, n: int) -> str:
    if a.checkpoint is None:
        return os.path.join(out, "checkpoint", category)
    return os.path.abspath(a.checkpoint if n == 1 else os.path.join(a.checkpoint, category))


def _no_masks(sources, a):
    if sources is not None and getattr(a, "no_masks", False) and sources.get("test") is not None:
        sources["test"].has_masks = False
    return sources


def test_dir_source(test_dir: str, max_test: int | None, *, masks: bool = True):
    """A `--test-dir` (good/ + defect sub-folders, optional masks) as a test source."""
    from pn_jax import data
    from pn_jax.data import records

    if not os.path.isdir(test_dir):
        raise UsageError(f"--test-dir {test_dir} is not a folder")
    samples = records.cap_samples(data.index_test_dir(test_dir, masks=masks), max_test, 1)
    return records.samples_source(samples, dataset="folder", category=os.path.basename(os.path.normpath(test_dir)),
                                  split="test")


def cmd_test(a) -> int:
    """Score a test split with a checkpoint: its configuration, with the flags a user typed
    applied (`apply_test_flags`) or refused by name before any image is read."""
    from pn_jax import download
    from pn_jax import model as model_lib
    from pn_jax import runner

    out = check_writable(a.out or "results/test", "--out")
    download.set_policy(getattr(a, "download", None))  # the backbone weights, whatever the dataset
    refuse_fit_only_flags(a)
    if a.category:  # 'all' is MVTec AD's 15
        categories = resolve_categories(a, a.dataset or "mvtec_ad")
    else:
        probe = model_lib.load(a.checkpoint)
        categories = str(probe.provenance.get("category") or "category").split("+")
    models = {c: apply_test_flags(model_lib.load(a.checkpoint, category=c), a) for c in categories}  # all refusals first
    t0 = time.perf_counter()
    entries = []
    for cat in categories:
        cfg = models[cat].cfg
        if a.data_root:
            cfg = cfg.replace(data={"root": a.data_root})
        if a.data_backend or a.tfds_dir:  # how the test data is read, not what the model means
            try:
                cfg = cfg.replace(data=data_backend(a))
            except ValueError as e:
                raise UsageError(f"--data-backend: {e}") from None
        print(banner(cfg))
        if a.test_dir:
            sources = {"test": test_dir_source(a.test_dir, a.max_test, masks=not a.no_masks)}
        else:
            if cfg.data.dataset == "mvtec_ad":
                check_data(cfg, a, [cat])
            sources = {"test": runner.load_sources(cfg, cat, max_test=a.max_test, masks=not a.no_masks)["test"]}
        if a.no_masks:
            sources["test"].has_masks = False
        e = runner.run_category(cfg, cat, out, mode="test", checkpoint_dir=a.checkpoint, ablation=a.ablation,
                                n_figures=a.figures, sources=sources, model=models[cat])
        print(summary_line(e, a.checkpoint))
        entries.append(e)
    return report(a, entries, out, t0)


def cmd_predict(a) -> int:
    from pn_jax import atomic
    from pn_jax import model as model_lib
    from pn_jax import report as report_page
    from pn_jax import report_data, viz

    out = check_writable(a.out, "--out")
    model = model_lib.load(a.checkpoint, category=a.category)
    if a.batch_size:
        model = model_lib.Model(model.cfg.replace(batch_size=a.batch_size), model.grid, model.state,
                                threshold=model.threshold, provenance=model.provenance,
                                calibration=model.calibration)
    items = model_lib.as_items(a.paths if len(a.paths) > 1 else a.paths[0])
    if not items:
        raise UsageError(f"no files found in {' '.join(a.paths)}")
    if model.threshold is None:
        print("warning: the checkpoint has no decision threshold; labels are empty", file=sys.stderr)
    csv_path = os.path.join(out, "predictions.csv")
    n_bad = n_anom = 0
    t0 = time.perf_counter()
    overlay_dir = os.path.join(out, "overlays")
    gallery, names, scores = report_data.ScoreGallery(), [], []
    with atomic.replacing(csv_path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=model_lib.CSV_FIELDS)
        w.writeheader()
        for i, rec in enumerate(model.predict_iter(items, maps=not a.no_overlays)):
            row = model_lib.csv_row(rec)
            w.writerow(row)
            names.append(rec["name"])
            scores.append(rec["score"])
            if rec["error"]:
                n_bad += 1
                print(f"error: {rec['name']}: {rec['error']}", file=sys.stderr)
                continue
            n_anom += bool(rec["label"])
            gallery.offer(rec["name"], rec["score"], rec["image"], rec.get("anomaly_map"))
            if not a.no_overlays:
                stem = f"{i:05d}_" + os.path.splitext(os.path.basename(rec["name"]))[0]
                viz.save_overlay(os.path.join(overlay_dir, stem + ".png"), rec["image"], rec["anomaly_map"],
                                 model.threshold, f"{rec['name']}: score {rec['score']:.4g} "
                                 f"({rec['normalized']:.2f} x threshold) -> {row['label']}")
    report_data.write_predict_data(out, names, scores, model.threshold, gallery)
    page = report_page.write_predict_page(out)
    dt = time.perf_counter() - t0
    n = len(items)
    print(f"{n - n_bad} of {n} images scored ({n_anom} anomalous, {n_bad} failed) in {dt:.1f}s, "
          f"{(n - n_bad) / max(dt, 1e-9):.2f} images/s; threshold {model.threshold}")
    print(f"predictions: {csv_path}" + ("" if a.no_overlays else f"; overlays: {overlay_dir}") + f"; report: {page}")
    return min(n_bad, 100)


def cmd_report(a) -> int:
    """`pn-jax report RUN_DIR [RUN_DIR ...]`: rebuild the page of a finished run (or predict
    folder) from its results.json and report data, or put several runs side by side; nothing
    is scored again."""
    from pn_jax import report as report_page

    if a.out:
        check_writable(os.path.dirname(os.path.abspath(a.out)), "--out")
    print(f"report: {report_page.rebuild(a.run_dir, a.out)}")
    return 0


def cmd_export(a) -> int:
    from pn_jax import model as model_lib

    parent = os.path.dirname(os.path.abspath(a.out))
    check_writable(parent, "--out")
    model = model_lib.load(a.checkpoint, category=a.category)
    platforms = tuple(p.strip() for p in a.platforms.split(",") if p.strip())
    meta = model.export(a.out, platforms=platforms, batch_size=a.batch_size)
    print(f"exported {a.out} ({', '.join(platforms)}); metadata: {meta.get('metadata_path', '')}")
    return 0


# ----------------------------------------------------------------------------- output
def banner(cfg) -> str:
    return (f"pn_jax | dataset={cfg.data.dataset} backbone={cfg.model.backbone} layers={','.join(cfg.model.layers)} "
            f"method={cfg.noising.method} score={cfg.noising.score} influence={cfg.noising.influence} "
            f"k={cfg.noising.k} coreset={cfg.bank.coreset_ratio} image={cfg.data.image_size} seed={cfg.seed} "
            f"precision={cfg.model.precision}"
            + (f" tile={cfg.data.tile} overlap={cfg.data.tile_overlap} tile_bank={cfg.bank.tile_bank}" if cfg.data.tile else ""))


def summary_line(e: dict, ck) -> str:
    c, t = {**e.get("checkpoint_counts", {}), **e["counts"]}, e["timings"]  # test mode: the fit's beside this run's
    thr = e.get("threshold")
    return (f"[{e['category']}] mode={e['mode']} train={c.get('train')} holdout={c.get('holdout')} "
            f"test={c.get('test')} ({c.get('test_anomalous')} anomalous) bank={c.get('bank')}/"
            f"{c.get('train_patches')} threshold={thr if thr is None else f'{thr:.5g}'} checkpoint={ck} | "
            + " ".join(f"{k}={v:.1f}" for k, v in t.items()))


def report(a, entries: list[dict], out: str, t0: float) -> int:
    from pn_jax import metrics, runner

    rows = [(e["category"], e["metrics"]) for e in entries if "metrics" in e]
    if len(rows) > 1:
        rows.append(("mean", metrics.mean_over_categories([m for _, m in rows])))
    if rows:
        print()
        print(runner.format_table(rows))
        thr_rows = [(e["category"], e["at_threshold"]) for e in entries if "at_threshold" in e]
        print("\nAt the stored threshold (what to expect in production; F1-max above is an oracle):")
        print(runner.format_table(thr_rows, keys=["threshold", "precision", "recall", "F1", "accuracy", "FPR"]))
    if getattr(a, "tune", False):
        for e in entries:
            if "test_before_after_tuning" in e:
                print(f"\nTuning ({e['category']}): test metrics before -> after")
                print(runner.format_table(list(e["test_before_after_tuning"].items())))
    if getattr(a, "ablation", False):
        for e in entries:
            if "ablation" in e:
                print(f"\nAblation ({e['category']}, same bank):")
                print(runner.format_table(list(e["ablation"].items()),
                                          keys=["mAUROC_sp_max", "mAUROC_px", "mAUPRO_px", "mAP_sp_max"]))
    path = os.path.join(out, "results.json")
    from pn_jax import compile_cache, distributed
    from pn_jax import report as report_page

    runner.write_results(path, entries, {"wall_time_s": time.perf_counter() - t0, "argv": sys.argv[1:],
                                         "runtime": {"processes": distributed.info(),
                                                     "compile_cache": compile_cache.active()},
                                         "commit": report_page.commit()})
    page = report_page.write_run_page(out)
    print(f"\nwall time {time.perf_counter() - t0:.1f}s; results: {path}; figures: {os.path.join(out, 'figures')}; "
          f"report: {page}")
    return 0


# ----------------------------------------------------------------------------- entry points
def _known_errors():
    errs = [ValueError, FileNotFoundError, PermissionError, NotADirectoryError, KeyError]
    return tuple(errs)


def _guard(fn, a) -> int:
    """Known failures (bad data, weights, checkpoints, flags, downloads) -> one message, exit 2."""
    try:
        return fn(a)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _known_errors() as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions: name the file
        print(f"error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return 2


def main(argv=None) -> int:
    """`pn-jax` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    a = build_parser().parse_args(argv)
    warnings.simplefilter("default")
    if a.command == "suggest":
        from pn_jax.research import suggest

        return _guard(functools.partial(_runtime, suggest.run_command, fit=False), a)
    if a.command == "report":  # reads files and draws: no JAX runtime to set up
        return _guard(cmd_report, a)
    fn = {"fit": cmd_fit, "test": cmd_test, "predict": cmd_predict, "export": cmd_export}[a.command]
    return _guard(functools.partial(_runtime, fn, fit=a.command == "fit"), a)


def run_main(argv=None) -> int:
    """`python -m experiments.run`: --mode train fits and tests; --mode test scores a checkpoint."""
    a = build_run_parser().parse_args(argv)
    if a.mode == "test":
        if not a.checkpoint:
            print("error: --mode test needs --checkpoint DIR (a checkpoint written by --mode train)", file=sys.stderr)
            return 2
        if a.tune:
            print("error: --tune needs --mode train (it reads held-out training images)", file=sys.stderr)
            return 2
        return _guard(functools.partial(_runtime, cmd_test_from_run, fit=False), a)
    return _guard(functools.partial(_runtime, cmd_fit, fit=True), a)


def _runtime(fn, a, *, fit: bool) -> int:
    """Run `fn(a)` in this process, or as one process of a jax.distributed run (see
    `pn_jax.distributed`): every process computes everything; process 0 alone keeps what it
    writes, the others write into a private temporary folder and print one line."""
    import contextlib

    from pn_jax import compile_cache, distributed

    args = distributed.check_flags(a)  # bad flags are refused before anything starts
    if args is not None:
        info = distributed.initialize(args)  # before any computation
    if getattr(a, "no_compile_cache", False):
        compile_cache.disable()
    else:
        compile_cache.enable()
    if args is None:
        return fn(a)
    import jax

    a.devices = distributed.check_devices(a.devices, jax.device_count())  # every process's devices
    if distributed.is_primary():
        print(f"distributed: process 0 of {info['processes']}, {info['devices']} devices "
              f"({info['platform']}); this process writes the results")
        return fn(a)
    out = a.out or ("results/run" if fit else "results/test")
    a.out = os.path.join(distributed.scratch_dir(), os.path.basename(os.path.normpath(out)) or "out")
    if fit:
        a.checkpoint = None  # under the scratch --out
    t0 = time.perf_counter()
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            rc = fn(a)
    finally:
        distributed.cleanup()
    print(f"distributed: process {info['process_id']} of {info['processes']} done in "
          f"{time.perf_counter() - t0:.1f}s (exit {rc}); process 0 writes the results to {out}")
    return rc


def cmd_test_from_run(a) -> int:
    """experiments.run --mode test: `pn-jax test` with the run parser's flags (each flag typed
    is applied or refused by name, see `apply_test_flags` and `refuse_fit_only_flags`)."""
    return cmd_test(a)


if __name__ == "__main__":
    sys.exit(main())
