"""The command-line flags of `pn-jax` and `experiments.run`: their types and ranges, the parser
tree, the Config they build, and what each config flag does to a loaded checkpoint in test mode
(applied or refused by name, never ignored). `cli` holds the commands that read them.
"""
from __future__ import annotations

import argparse
import functools
import math
import os

USAGE = """`pn-jax fit | test | predict | export | suggest | report`, and `python -m experiments.run` (the benchmark-style
alias with `--mode train|test`, which fits and tests in one run).

    pn-jax fit --train-dir good/ --test-dir test/ --out runs/parts       # a folder of good images
    pn-jax fit --dataset mvtec_ad --data-root data/mvtec_ad --category bottle --out runs/bottle
    pn-jax test --checkpoint runs/bottle/checkpoint                       # config from the checkpoint
    pn-jax predict --checkpoint runs/parts/checkpoint new_photos/ --out runs/parts/pred
    pn-jax export --checkpoint runs/parts/checkpoint --out parts.jaxexport
    pn-jax suggest --checkpoint runs/parts/checkpoint unlabelled/ --top 16  # which images to label next
    pn-jax report runs/parts                                              # rebuild runs/parts/report.html

Bad input is refused before any long work starts, with a message that names the flag or file
(exit 2). `predict` never stops at one bad image: its CSV names it in an error column and the
exit status is the number of images that could not be scored (at most 100).
"""
MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
                    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
DATASETS = ("mvtec_ad", "visa", "elpv", "synthetic")
DEFAULT_ROOTS = {"mvtec_ad": os.environ.get("MVTEC_ROOT", "data/mvtec_ad"), "visa": "data/visa", "elpv": "",
                 "synthetic": "data/synthetic"}
DEFAULT_BACKBONE = {"mvtec_ad": "wide_resnet50_2", "visa": "wide_resnet50_2", "elpv": "efficientnet_lite0",
                    "synthetic": "efficientnet_lite0", "folder": "wide_resnet50_2"}
# Config flags default to None so a checkpoint's config can tell which ones a user typed.
DEFAULTS = dict(image_size=256, resize_mode="resize", embed_dim=1024, coreset_ratio=0.01, k=9,
                method="propose_noising", influence="fd_fixed", influence_ratio=0.1, dim_selection="random",
                eps=1e-3, score_weights="0.4,0.4,0.2", holdout_fraction=0.0, seed=0, batch_size=8, devices="1",
                precision="highest", tile=0, tile_overlap=0, coreset_preselect=0.0, tile_bank="shared")


class UsageError(ValueError):
    """A flag value or combination that cannot work; the message names the flag."""


def _int(name: str, lo: int, hi: int | None = None):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a whole number") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is out of range: {name} takes {lo}"
                                             + (f"..{hi}" if hi is not None else " or more"))
        return v
    return parse


def _float(name: str, lo: float, hi: float, lo_open=True, hi_open=False):
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            raise argparse.ArgumentTypeError(
                f"{s} is out of range: {name} takes a value in {'(' if lo_open else '['}{lo}, {hi}"
                f"{')' if hi_open else ']'}")
        return v
    return parse


def _devices(s: str) -> str:
    if s == "all" or (s.isdigit() and int(s) >= 1):
        return s
    raise argparse.ArgumentTypeError(f"{s!r}: give a number of devices >= 1, or 'all'")


def add_config_flags(p: argparse.ArgumentParser) -> None:
    from pn_jax import config as C

    g = p.add_argument_group("model and scoring (stored in the checkpoint)")
    g.add_argument("--backbone", default=None, help="wide_resnet50_2 | resnet18 | efficientnet_lite0")
    g.add_argument("--weights", default=None, help="backbone weights (.pth/.safetensors); default: standard places")
    g.add_argument("--layers", default=None, help="comma-separated stage names; default: the backbone's")
    g.add_argument("--image-size", type=_int("--image-size", 32, 4096), default=None, help="default 256")
    g.add_argument("--resize-mode", choices=C.RESIZE_MODES, default=None)
    g.add_argument("--tile", type=_int("--tile", 0, 4096), default=None, help="cut each --image-size image into "
                   "overlapping tiles of this size, featurise each, stitch the maps back (default 0: no tiles)")
    g.add_argument("--tile-bank", choices=("shared", "per_position"), default=None, type=lambda s: s.replace("-", "_"),
                   help="with --tile: one bank for every tile position (default), or per-position: one per position")
    g.add_argument("--tile-overlap", type=_int("--tile-overlap", 0, 4096), default=None, help="pixels shared by "
                   "neighbouring tiles, blended by a linear ramp (default 0)")
    g.add_argument("--embed-dim", type=_int("--embed-dim", 1, 65536), default=None, help="pretrain and target "
                   "embedding dimension (default 1024)")
    g.add_argument("--precision", choices=C.PRECISIONS, default=None, help="matmuls and convolutions: highest = "
                   "float32 on every backend, the same metrics on CPU, GPU and TPU (default); fast = the backend's "
                   "default (TF32 / bf16 passes on accelerators, other digits)")
    g.add_argument("--coreset-ratio", type=_float("--coreset-ratio", 0, 1), default=None, help="default 0.01")
    g.add_argument("--coreset-preselect", type=_float("--coreset-preselect", 0, 1e4, lo_open=False), default=None,
                   metavar="FACTOR", help="two-stage coreset: every 32,768 train patches keep FACTOR x the ratio first, "
                   "then the greedy runs on those (default 0: the exact greedy over all patches)")
    g.add_argument("--k", type=_int("--k", 1, 1024), default=None, help="K nearest neighbours (default 9; 1 for --method patchcore)")
    g.add_argument("--method", choices=C.METHODS, default=None)
    g.add_argument("--influence", choices=C.INFLUENCE_METHODS, default=None)
    g.add_argument("--influence-ratio", type=_float("--influence-ratio", 0, 1), default=None)
    g.add_argument("--dim-selection", choices=C.DIM_SELECTION, default=None)
    g.add_argument("--eps", type=_float("--eps", 0, 1e3), default=None)
    g.add_argument("--znorm", action="store_true", default=None, help="z-normalise the three signals")
    g.add_argument("--score-weights", default=None, help="influence,distance,noise (default 0.4,0.4,0.2)")
    g.add_argument("--score", choices=C.FIT_SCORES, default=None,
                   help="patch score of propose_noising; auto: chosen per category on its validation data")
    if hasattr(C, "IMAGE_SCORES"):
        g.add_argument("--image-score", choices=C.IMAGE_SCORES, default=None,
                       help="blurred_max: max of the blurred map (ADer's sp_max); patch_max: max patch score")
    g.add_argument("--holdout-fraction", type=_float("--holdout-fraction", 0, 1, lo_open=False, hi_open=True),
                   default=None, help="normal train images held out of the bank for calibration and the threshold "
                        "(default 0: every image in the bank, calibration leave-one-image-out)")
    g.add_argument("--threshold-fpr", type=_float("--threshold-fpr", 0, 1, hi_open=True), default=None, help="decision "
                   "threshold = the (1-q) quantile of validation normal scores (default: F1-max on validation normals "
                   "+ synthetic anomalies)")
    g.add_argument("--seed", type=_int("--seed", 0, 2**31 - 1), default=None)
    g.add_argument("--batch-size", type=_int("--batch-size", 1, 4096), default=None)
    g.add_argument("--max-memory", type=_float("--max-memory", 0, 1e6), default=None, metavar="GB", help="bound the "
                   "run's peak memory: stream the train features to disk (the same bank) and refuse, before reading "
                   "an image, a run estimated to need more")
    g.add_argument("--devices", type=_devices, default=None,
                   help="shard the bank and coreset over this many devices ('all' = every device JAX sees)")


def add_data_flags(p: argparse.ArgumentParser, *, train: bool) -> None:
    g = p.add_argument_group("data")
    if train:
        g.add_argument("--train-dir", default=None, help="a folder (recursive) of good images only")
    g.add_argument("--test-dir", default=None,
                   help="test images: good/ and one sub-folder per defect type (masks optional)")
    g.add_argument("--dataset", choices=DATASETS, default=None)
    g.add_argument("--data-root", default=None, help="dataset root (MVTec or VisA layout); default per dataset")
    g.add_argument("--category", nargs="+", default=None, help="one or more; 'all' = MVTec AD's 15")
    if train:
        g.add_argument("--max-train", type=_int("--max-train", 1), default=None,
                       help="seeded cap on train images (quick runs)")
        g.add_argument("--val-dir", default=None, help="labelled images (the --test-dir layout) for the threshold, "
                       "--score auto and, with --tune, the score's parameters (kept if they win in CV)")
    g.add_argument("--max-test", type=_int("--max-test", 1), default=None,
                   help="seeded, label-stratified cap on test images")
    g.add_argument("--no-masks", action="store_true", help="image metrics only, even where masks exist")
    g.add_argument("--data-backend", choices=("direct", "tfds"), default=None,
                   help="read --dataset mvtec_ad|elpv|synthetic from the files (direct, default) or through "
                        "its tensorflow-datasets builder (array_record, no TensorFlow; the same records)")
    g.add_argument("--tfds-dir", default=None, help="where the tfds backend writes its records (default <root>/_tfds)")
    from pn_jax import download

    download.add_cli_flags(p)


def add_output_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="output folder (results.json, figures, checkpoint)")
    g.add_argument("--figures", type=_int("--figures", 0), default=8, help="figures per category")
    g.add_argument("--ablation", action="store_true", help="also score each signal alone and PatchCore")


def add_runtime_flags(p: argparse.ArgumentParser) -> None:
    """Where and how the run executes (not stored in the checkpoint): several processes, and
    the compilation cache."""
    from pn_jax import compile_cache, distributed

    distributed.add_cli_flags(p)
    compile_cache.add_cli_flag(p)


def build_parser() -> argparse.ArgumentParser:
    from pn_jax import compile_cache

    p = argparse.ArgumentParser(prog="pn-jax", description=USAGE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="fit on good images (and test, when a test split is given)")
    add_config_flags(f)
    add_data_flags(f, train=True)
    add_output_flags(f)
    add_runtime_flags(f)
    f.add_argument("--checkpoint", default=None, help="checkpoint directory (default <out>/checkpoint[/<category>])")
    f.add_argument("--tune", action="store_true", help="tune the learnable weights on validation data")
    f.add_argument("--unified", action="store_true", help="one bank over all --category (multi-class)")
    t = sub.add_parser("test", help="score a labelled test split with a checkpoint (its config)")
    t.add_argument("--checkpoint", required=True)
    add_config_flags(t)  # each one typed is applied (threshold rule, score, devices) or refused by name
    add_data_flags(t, train=False)
    add_output_flags(t)
    add_runtime_flags(t)
    pr = sub.add_parser("predict", help="score new images with a checkpoint: CSV + overlays")
    pr.add_argument("--checkpoint", required=True)
    pr.add_argument("paths", nargs="+", help="image files and/or folders (recursive)")
    pr.add_argument("--out", required=True, help="folder for predictions.csv and overlays/")
    pr.add_argument("--category", default=None, help="which category, when --checkpoint holds several")
    pr.add_argument("--no-overlays", action="store_true", help="CSV only")
    pr.add_argument("--batch-size", type=_int("--batch-size", 1, 4096), default=None)
    compile_cache.add_cli_flag(pr)
    e = sub.add_parser("export", help="write a self-contained jax.export artifact of a checkpoint")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--out", required=True, help="artifact file")
    e.add_argument("--category", default=None)
    e.add_argument("--platforms", default="cpu", help="comma-separated: cpu,cuda,tpu")
    e.add_argument("--batch-size", type=_int("--batch-size", 1, 4096), default=None,
                   help="fixed batch size (default: symbolic where jax.export allows it)")
    compile_cache.add_cli_flag(e)
    from pn_jax.research import suggest  # numpy and the standard library at import: cheap

    sg = sub.add_parser("suggest", help="rank unlabelled images by how uncertain the model is (which to label next)",
                        description=suggest.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    suggest.add_arguments(sg)
    compile_cache.add_cli_flag(sg)
    rp = sub.add_parser("report", help="rebuild <RUN_DIR>/report.html from a finished run (or predict folder)")
    rp.add_argument("run_dir", metavar="RUN_DIR", nargs="+",
                    help="the --out folder of experiments.run, fit, test or predict; several runs on the same "
                         "test images (e.g. --method patchcore and the default) go side by side on one page")
    rp.add_argument("--out", default=None, help="write the page here instead of RUN_DIR/report.html "
                                                "(needed with several RUN_DIRs)")
    return p


def build_run_parser() -> argparse.ArgumentParser:
    """`python -m experiments.run`: fit + test in one (`--mode train`) or test a checkpoint."""
    p = argparse.ArgumentParser(prog="python -m experiments.run", description=USAGE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p)
    add_data_flags(p, train=True)
    add_output_flags(p)
    add_runtime_flags(p)
    p.add_argument("--mode", choices=("train", "test"), default="train",
                   help="train: fit, test and save a checkpoint; test: score with --checkpoint (its config)")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--tune", action="store_true")
    p.add_argument("--unified", action="store_true")
    return p


def _given(a, name):
    return getattr(a, name, None) is not None


def dataset_of(a) -> str:
    if getattr(a, "train_dir", None):
        return "folder"
    return a.dataset or "mvtec_ad"


def data_backend(a) -> dict:
    """The data-reading flags as DataConfig fields (only those given)."""
    out = {}
    if getattr(a, "data_backend", None):
        out["backend"] = a.data_backend
    if getattr(a, "tfds_dir", None):
        if (getattr(a, "data_backend", None) or "direct") != "tfds":
            raise UsageError("--tfds-dir is read only with --data-backend tfds")
        out["tfds_dir"] = os.path.abspath(a.tfds_dir)
    return out


def build_config(a):
    """The run's Config from the flags (defaults where a flag was not given)."""
    from pn_jax import backbones
    from pn_jax.config import Config

    v = {k: (getattr(a, k) if _given(a, k) else d) for k, d in DEFAULTS.items()}
    ds = dataset_of(a)
    backbone = a.backbone or DEFAULT_BACKBONE[ds]
    try:
        layers = tuple(a.layers.split(",")) if a.layers else backbones.info(backbone).default_layers
    except KeyError as e:
        raise UsageError(f"--backbone: {e}") from None
    root = a.data_root if a.data_root is not None else (a.train_dir if ds == "folder" else DEFAULT_ROOTS[ds])
    weights = parse_score_weights(v["score_weights"])
    if v["method"] == "patchcore" and not _given(a, "k"):
        v["k"] = 1  # PatchCore as in the paper: the nearest bank entry, one search with k = 1
    noising = {"method": v["method"], "k": v["k"], "influence": v["influence"],
               "influence_ratio": v["influence_ratio"], "dim_selection": v["dim_selection"], "eps": v["eps"],
               "znorm_signals": bool(a.znorm), "score_weights": weights}
    if a.score:
        noising["score"] = a.score
    if getattr(a, "image_score", None):
        noising["image_score"] = a.image_score
    try:
        return Config().replace(
            data={"dataset": ds, "root": root, "image_size": v["image_size"],
                  "resize_mode": v["resize_mode"], "holdout_fraction": v["holdout_fraction"],
                  "tile": v["tile"], "tile_overlap": v["tile_overlap"],
                  **data_backend(a)},
            model={"backbone": backbone, "weights": a.weights, "layers": layers,
                   "pretrain_embed_dimension": v["embed_dim"], "target_embed_dimension": v["embed_dim"],
                   "precision": v["precision"]},
            bank={k: v[k] for k in ("coreset_ratio", "coreset_preselect", "tile_bank")},
            noising=noising, seed=v["seed"],
            batch_size=v["batch_size"], devices=n_devices(v["devices"]), threshold_fpr=a.threshold_fpr,
            max_memory_gb=getattr(a, "max_memory", None))
    except ValueError as e:
        raise UsageError(str(e)) from None


def parse_score_weights(s: str) -> tuple[float, float, float]:
    try:
        w = tuple(float(x) for x in s.split(","))
    except ValueError:
        raise UsageError(f"--score-weights {s!r}: give three comma-separated numbers, e.g. 0.4,0.4,0.2") from None
    if len(w) != 3 or not all(math.isfinite(x) for x in w):
        raise UsageError(f"--score-weights {s!r}: give three finite numbers (influence,distance,noise), "
                         f"got {len(w)} value(s)")
    return w


def n_devices(flag: str) -> int:
    import jax

    avail = len(jax.devices())
    n = avail if flag == "all" else int(flag)
    if not 1 <= n <= avail:
        raise UsageError(f"--devices {flag}: JAX sees {avail} device(s) ({jax.devices()[0].platform}); "
                         f"give 1..{avail} or 'all'")
    return n


CONFIG_FLAGS = ("backbone", "weights", "layers", "image_size", "resize_mode", "tile", "tile_overlap", "tile_bank",
                "embed_dim", "precision", "coreset_preselect", "max_memory",
                "coreset_ratio", "k", "method", "influence", "influence_ratio", "dim_selection", "eps", "znorm",
                "score_weights", "score", "image_score", "holdout_fraction", "threshold_fpr", "seed", "devices")


# Config flags that test mode cannot change: what the memory bank, the dims, the statistics or
# the threshold mean was fixed at fit time. Typed with the checkpoint's own value they agree.
FIXED_IN_TEST = {
    "backbone": ("model.backbone", "the memory bank holds that backbone's features"),
    "layers": ("model.layers", "the memory bank holds features of those layers"),
    "image_size": ("data.image_size", "the memory bank holds features of images of that size"),
    "resize_mode": ("data.resize_mode", "the memory bank holds features of images of that geometry"),
    "tile": ("data.tile", "the memory bank holds features of tiles of that size"),
    "tile_overlap": ("data.tile_overlap", "the statistics and the threshold were fitted on maps stitched that way"),
    "embed_dim": ("model.target_embed_dimension", "the memory bank's features have that dimension"),
    "precision": ("model.precision", "the memory bank and the statistics were computed at that precision"),
    "coreset_ratio": ("bank.coreset_ratio", "the memory bank was subsampled at that ratio"),
    "coreset_preselect": ("bank.coreset_preselect", "the memory bank was subsampled that way"),
    "tile_bank": ("bank.tile_bank", "the memory bank was built per tile position or shared"),
    "k": ("noising.k", "the statistics, the noise scale and the threshold were fitted with that K"),
    "method": ("noising.method", "the statistics and the threshold were fitted for that method"),
    "influence": ("noising.influence", "the influence statistics were fitted with that estimator"),
    "influence_ratio": ("noising.influence_ratio", "the influence dims were chosen with that ratio"),
    "dim_selection": ("noising.dim_selection", "the influence dims were chosen that way"),
    "eps": ("noising.eps", "the influence statistics were fitted with that eps"),
    "znorm": ("noising.znorm_signals", "the threshold was chosen on scores computed that way"),
    "score_weights": ("noising.score_weights", "the threshold was chosen on scores with those weights"),
    "image_score": ("noising.image_score", "the threshold was chosen on those image scores"),
    "holdout_fraction": ("data.holdout_fraction", "the held-out images were set aside at fit time"),
    "seed": ("seed", "the coreset, the influence dims and the validation images were drawn with that seed"),
}


# Applied in test mode: they change where it runs, or re-choose the threshold from the
# validation scores saved with the checkpoint (never from test data).
APPLIED_IN_TEST = ("threshold_fpr", "score", "devices", "batch_size", "weights", "max_memory")


def _typed_value(a, flag: str):
    v = getattr(a, flag)
    if flag == "layers":
        return tuple(v.split(","))
    if flag == "score_weights":
        return parse_score_weights(v)
    return v


def _flag(flag: str) -> str:
    return "--" + flag.replace("_", "-")


def apply_test_flags(model, a):
    """The loaded `model` with every config flag the user typed applied, or a UsageError naming
    the flag and why it cannot apply. Nothing typed is ever dropped without a word."""
    from pn_jax import fitting
    from pn_jax import model as model_lib

    saved = model.cfg
    typed = [f for f in CONFIG_FLAGS + ("batch_size",) if _given(a, f)]
    for f in typed:
        if f not in FIXED_IN_TEST:
            continue
        path, why = FIXED_IN_TEST[f]
        want, have = _typed_value(a, f), functools.reduce(getattr, path.split("."), saved)
        if want != have:
            typed_as = _flag(f) if f == "znorm" else f"{_flag(f)} {getattr(a, f)}"
            raise UsageError(f"{typed_as} cannot apply to checkpoint {a.checkpoint}: it was fitted with "
                             f"{path.split('.')[-1]}={have!r}, and {why}. Drop {_flag(f)} (test takes it from the "
                             f"checkpoint) or re-fit with it.")
    if getattr(a, "dataset", None) and a.dataset != saved.data.dataset:
        raise UsageError(f"--dataset {a.dataset}: checkpoint {a.checkpoint} was fitted on {saved.data.dataset} "
                         f"data, and test scores that dataset's test split of its category; to score other "
                         f"images give --test-dir")
    if getattr(a, "unified", False) and not model.provenance.get("unified"):
        raise UsageError(f"--unified: checkpoint {a.checkpoint} holds one category's bank, not a unified one; "
                         f"drop --unified (test scores with the bank the checkpoint holds)")
    if _given(a, "weights") and a.weights != saved.model.weights:
        if not model.provenance.get("weights_sha256"):
            raise UsageError(f"--weights {a.weights}: checkpoint {a.checkpoint} records no weights checksum, so "
                             f"another weights file cannot be checked against its bank; drop --weights")
        if not os.path.isfile(a.weights):
            raise UsageError(f"--weights {a.weights}: no such file")
        moved = saved.replace(model={"weights": a.weights})
        if model_lib.weights_sha256(moved) != model.provenance["weights_sha256"]:
            raise UsageError(f"--weights {a.weights} is not the weights file checkpoint {a.checkpoint} was fitted "
                             f"with (its sha256 differs): the features would not match the bank")
        model.cfg = moved  # the same weights at another path
    score = a.score if _given(a, "score") else None
    if score == "auto":
        if "auto" not in model.calibration:
            raise UsageError(f"--score auto chooses the score at fit time on validation data; checkpoint "
                             f"{a.checkpoint} was fitted with --score {saved.noising.score}. Drop --score or "
                             f"re-fit with --score auto")
        score = None  # the checkpoint holds auto's choice
    if score is not None:
        from pn_jax import detector
        from pn_jax.research import select

        if detector.default_variant(select.config_for(saved, score)) == detector.default_variant(saved):
            score = None  # the score it already uses
    fpr = a.threshold_fpr if _given(a, "threshold_fpr") and a.threshold_fpr != saved.threshold_fpr else ...
    if score is not None or fpr is not ...:
        try:
            model = fitting.rethreshold(model, score=score, threshold_fpr=fpr)
        except model_lib.ModelError as e:
            flag = f"--score {score}" if score is not None else f"--threshold-fpr {a.threshold_fpr}"
            raise UsageError(f"{flag} cannot apply to checkpoint {a.checkpoint}: {e}") from None
    runtime = {}
    if _given(a, "devices"):
        runtime["devices"] = n_devices(a.devices)  # only where the bank is searched
    if _given(a, "batch_size"):
        runtime["batch_size"] = a.batch_size  # scores do not depend on the batch
    if _given(a, "max_memory"):
        runtime["max_memory_gb"] = a.max_memory  # the test run's estimate is checked against it
    if runtime:
        model.cfg = model.cfg.replace(**runtime)
    return model


def check_val_dir(a, cfg, categories) -> str | None:
    """--val-dir, if given: a folder, for one category on one patch grid."""
    if getattr(a, "val_dir", None) and (a.unified or len(categories) > 1 or cfg.data.tile):
        raise UsageError("--val-dir is one category's labelled set: one --category, no --unified, no --tile yet")
    return getattr(a, "val_dir", None)  # a missing folder is refused by name when it is read


def refuse_fit_only_flags(a) -> None:
    """Flags of `experiments.run` that only a fit reads, refused in --mode test."""
    if getattr(a, "train_dir", None):
        raise UsageError("--train-dir is what a fit reads; --mode test fits nothing. To score a folder of test "
                         "images give --test-dir (good/ and one folder per defect type)")
    if getattr(a, "val_dir", None):
        raise UsageError("--val-dir is read by a fit; --mode test fits nothing (the checkpoint holds what it set)")
    if getattr(a, "max_train", None) is not None:
        raise UsageError("--max-train caps the training images of a fit; --mode test fits nothing "
                         "(--max-test caps the test images)")
