"""Fit and test Propose Noising / PatchCore on one or more categories.

    python -m experiments.run --category bottle                       # MVTec AD (data/mvtec_ad)
    python -m experiments.run --dataset elpv --category mono          # offline demo (ELPV)
    python -m experiments.run --dataset synthetic --category synthetic --image-size 128

Prints `Name | mAUROC_sp_max | mAUROC_px | mAUPRO_px | ...`, writes <out>/results.json and
PNG figures under <out>/figures/<category>/.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from pn_jax import backbones, config as config_lib
from pn_jax.config import Config

MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
                    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
DEFAULT_ROOTS = {"mvtec_ad": os.environ.get("MVTEC_ROOT", "data/mvtec_ad"), "elpv": "",
                 "synthetic": "data/synthetic"}
DEFAULT_BACKBONE = {"mvtec_ad": "wide_resnet50_2", "elpv": "efficientnet_lite0", "synthetic": "efficientnet_lite0"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("mvtec_ad", "elpv", "synthetic"), default="mvtec_ad")
    p.add_argument("--data-root", default=None, help="dataset root (MVTec layout); default per dataset")
    p.add_argument("--category", nargs="+", default=["bottle"], help="one or more; 'all' = MVTec's 15")
    p.add_argument("--backbone", default=None, help=f"one of {sorted(backbones.list_backbones())}")
    p.add_argument("--weights", default=None, help="backbone weights (.pth/.safetensors); default: standard places")
    p.add_argument("--layers", default=None, help="comma-separated stage names; default: the backbone's")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--resize-mode", choices=config_lib.RESIZE_MODES, default="resize")
    p.add_argument("--embed-dim", type=int, default=1024, help="pretrain and target embedding dimension")
    p.add_argument("--coreset-ratio", type=float, default=0.01)
    p.add_argument("--k", type=int, default=9, help="K nearest neighbours (patchcore uses the nearest)")
    p.add_argument("--method", choices=config_lib.METHODS, default="propose_noising")
    p.add_argument("--influence", choices=config_lib.INFLUENCE_METHODS, default="fd_fixed")
    p.add_argument("--influence-ratio", type=float, default=0.1)
    p.add_argument("--dim-selection", choices=config_lib.DIM_SELECTION, default="random")
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--znorm", action="store_true", help="z-normalise the three signals before weighting")
    p.add_argument("--score-weights", default="0.4,0.4,0.2", help="influence,distance,noise")
    p.add_argument("--holdout-fraction", type=float, default=0.1,
                   help="normal train images held out of the bank for fit-time statistics")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--devices", default="1",
                   help="shard the memory bank and coreset over this many devices ('all' = every device JAX sees)")
    p.add_argument("--max-train", type=int, default=None, help="seeded cap on train images (quick runs)")
    p.add_argument("--max-test", type=int, default=None, help="seeded, label-stratified cap on test images")
    p.add_argument("--score", choices=config_lib.SCORES, default=None,
                   help="patch score of propose_noising (default: the config default, see README)")
    p.add_argument("--mode", choices=("train", "test"), default="train",
                   help="train: fit, test and save a checkpoint; test: score with --checkpoint only")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint directory (train default: <out>/checkpoint/<category>)")
    p.add_argument("--tune", action="store_true",
                   help="tune the learnable weights with optax on held-out normals + synthetic anomalies")
    p.add_argument("--ablation", action="store_true", help="also score each signal alone and PatchCore")
    p.add_argument("--unified", action="store_true",
                   help="one memory bank over all --category (multi-class), metrics per category")
    p.add_argument("--figures", type=int, default=8, help="figures per category")
    p.add_argument("--out", default="results/run")
    return p.parse_args(argv)


def build_config(a) -> Config:
    backbone = a.backbone or DEFAULT_BACKBONE[a.dataset]
    layers = tuple(a.layers.split(",")) if a.layers else backbones.info(backbone).default_layers
    root = a.data_root if a.data_root is not None else DEFAULT_ROOTS[a.dataset]
    weights = tuple(float(w) for w in a.score_weights.split(","))
    return Config().replace(
        data={"dataset": a.dataset, "root": root, "image_size": a.image_size, "resize_mode": a.resize_mode,
              "holdout_fraction": a.holdout_fraction},
        model={"backbone": backbone, "weights": a.weights, "layers": layers,
               "pretrain_embed_dimension": a.embed_dim, "target_embed_dimension": a.embed_dim},
        bank={"coreset_ratio": a.coreset_ratio},
        noising={"method": a.method, "k": a.k, "influence": a.influence, "influence_ratio": a.influence_ratio,
                 "dim_selection": a.dim_selection, "eps": a.eps, "znorm_signals": a.znorm,
                 "score_weights": weights, **({"score": a.score} if a.score else {})},
        seed=a.seed, batch_size=a.batch_size, devices=n_devices(a.devices))


def n_devices(flag: str) -> int:
    import jax

    avail = len(jax.devices())
    n = avail if flag == "all" else int(flag)
    if not 1 <= n <= avail:
        raise ValueError(f"--devices {flag}: JAX sees {avail} device(s) ({jax.devices()[0].platform})")
    return n


def check_dataset(cfg: Config, categories) -> None:
    """Fail fast (before loading any backbone) when the data is not there."""
    from pn_jax.data import mvtec

    if cfg.data.dataset == "mvtec_ad":
        mvtec.check_root(cfg.data.root)
        for c in categories:
            mvtec.index_category(cfg.data.root, c)


def checkpoint_dir(a, category: str, n_categories: int) -> str:
    if a.checkpoint is None:
        return os.path.abspath(os.path.join(a.out, "checkpoint", category))
    return os.path.abspath(a.checkpoint if n_categories == 1 else os.path.join(a.checkpoint, category))


def main(argv=None) -> int:
    a = parse_args(argv)
    categories = list(MVTEC_CATEGORIES) if a.category == ["all"] else a.category
    if a.mode == "test" and not a.checkpoint:
        print("error: --mode test needs --checkpoint DIR (a checkpoint written by --mode train)", file=sys.stderr)
        return 2
    try:
        cfg = build_config(a)
        check_dataset(cfg, categories)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pn_jax import runner

    os.makedirs(a.out, exist_ok=True)
    print(f"pn_jax | dataset={cfg.data.dataset} backbone={cfg.model.backbone} layers={','.join(cfg.model.layers)} "
          f"method={cfg.noising.method} influence={cfg.noising.influence} k={cfg.noising.k} "
          f"coreset={cfg.bank.coreset_ratio} image={cfg.data.image_size} seed={cfg.seed}")
    entries, t0 = [], time.perf_counter()
    if a.unified:
        if a.mode != "train" or a.tune:
            print("error: --unified supports --mode train without --tune", file=sys.stderr)
            return 2
        entries = runner.run_unified(cfg, categories, a.out, checkpoint_dir=checkpoint_dir(a, "unified", 1),
                                     max_train=a.max_train, max_test=a.max_test, ablation=a.ablation,
                                     n_figures=a.figures)
        categories = []
    for cat in categories:
        ck = checkpoint_dir(a, cat, len(categories))
        try:
            e = runner.run_category(cfg, cat, a.out, mode=a.mode, checkpoint_dir=ck, tune=a.tune,
                                    max_train=a.max_train, max_test=a.max_test, ablation=a.ablation,
                                    n_figures=a.figures)
        except (ValueError, FileNotFoundError) as err:  # data, weights and checkpoint errors say what to do
            print(f"error [{cat}]: {err}", file=sys.stderr)
            return 2
        t = e["timings"]
        c = e["counts"]
        print(f"[{cat}] mode={a.mode} train={c.get('train')} holdout={c.get('holdout')} test={c['test']} "
              f"({c['test_anomalous']} anomalous) bank={c.get('bank')}/{c.get('train_patches')} "
              f"checkpoint={ck} | " + " ".join(f"{k}={v:.1f}" for k, v in t.items()))
        entries.append(e)
    rows = [(e["category"], e["metrics"]) for e in entries]
    if len(entries) > 1:
        from pn_jax import metrics
        rows.append(("mean", metrics.mean_over_categories([e["metrics"] for e in entries])))
    print()
    print(runner.format_table(rows))
    if a.tune:
        for e in entries:
            print(f"\nTuning ({e['category']}): test metrics before -> after")
            print(runner.format_table(list(e["test_before_after_tuning"].items())))
            val = {k: v for k, v in e["validation"].items() if k.endswith("/default")}
            print("validation (held-out normals + synthetic anomalies):")
            print(runner.format_table(list(val.items()), keys=["mAUROC_sp_max", "mAUROC_px", "mAUPRO_px"]))
    if a.ablation:
        for e in entries:
            print(f"\nAblation ({e['category']}, same bank):")
            print(runner.format_table(list(e["ablation"].items()),
                                      keys=["mAUROC_sp_max", "mAUROC_px", "mAUPRO_px", "mAP_sp_max"]))
    path = os.path.join(a.out, "results.json")
    runner.write_results(path, entries, {"wall_time_s": time.perf_counter() - t0, "argv": sys.argv[1:]})
    print(f"\nwall time {time.perf_counter() - t0:.1f}s; results: {path}; figures: {os.path.join(a.out, 'figures')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
