"""Does uncertainty-guided data collection beat random collection? A simulation.

    python -m experiments.active_learning --dataset elpv --category mono --max-test 100
    python -m experiments.active_learning --dataset synthetic --category synthetic_al --image-size 128

Start from `--initial` normal training images; in each of `--rounds` rounds add `--per-round`
images from an unlabelled pool of normal training images, chosen by

  * uncertainty  the ranking of `pn_jax.suggest` (score near the threshold + high proposed
                 noise, weight a = 0.5);
  * score / noise  its two terms alone (a = 1 / a = 0), with --ablation;
  * random       a seeded random choice (--random-seeds repeats, mean and range reported);

then refit (bank, statistics, threshold from the held-out normals + synthetic anomalies made
from them) and score the fixed test set. Features are extracted once (`Model.extract`); every
refit uses `detector.fit` on them and scores with `Model.score_features`. The pool holds only
normal images (the datasets' train splits); nothing here tells whether picking by uncertainty
would also pull unlabelled defects into the bank. Writes <out>/active_learning.json and
<out>/active_learning.png (test AUROC against the number of added images).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

STRATEGIES = {"uncertainty": 0.5, "score": 1.0, "noise": 0.0}  # name -> weight a of the score term


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--initial", type=int, default=8, help="training images at the start")
    p.add_argument("--per-round", type=int, default=8, help="images added per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--pool-max", type=int, default=64, help="seeded cap on the unlabelled pool")
    p.add_argument("--random-seeds", type=int, default=3, help="repeats of the random strategy")
    p.add_argument("--ablation", action="store_true", help="also the score-only and noise-only rankings")
    p.add_argument("--synthetic-train", type=int, default=60,
                   help="synthetic data only: train images generated for a category other than 'synthetic'")
    p.add_argument("--synthetic-test", type=int, default=12, help="synthetic: test images per defect type and good")
    p.add_argument("--out", default="results/active_learning")
    mine, rest = p.parse_known_args(argv)
    from pn_jax import cli

    a = cli.build_run_parser().parse_args(rest)
    if a.holdout_fraction is None:  # held-out normals are required here, whatever the CLI's default
        a.holdout_fraction = 0.1
    return mine, a


def load(cfg, a, category: str, mine):
    """Sources; the synthetic data gets a bigger generated category (its own name and parameters)."""
    from pn_jax import data, runner

    if cfg.data.dataset == "synthetic" and category != "synthetic":
        return data.load_category("synthetic", cfg.data.root, category, holdout_fraction=cfg.data.holdout_fraction,
                                  holdout_min=cfg.data.holdout_min, seed=cfg.seed, max_train=a.max_train,
                                  max_test=a.max_test,
                                  synthetic_kwargs={"n_train": mine.synthetic_train, "n_test_good": mine.synthetic_test,
                                                    "n_test_defect": mine.synthetic_test})
    return runner.load_sources(cfg, category, max_train=a.max_train, max_test=a.max_test)


def extract_labelled(model, source):
    feats, labels, masks = [], [], []
    for batch in model.batches(source):
        feats.append(np.asarray(model.features(batch["image"])))
        labels.append(np.asarray(batch["label"]))
        masks.append(np.asarray(batch["mask"]) > 0.5)
    return np.concatenate(feats), np.concatenate(labels).astype(int), np.concatenate(masks)


def simulate(cfg, feats, pool_idx, initial_idx, holdout, val, test, *, strategy: str, per_round: int,
             rounds: int, seed: int, grid, extractor, log=print) -> list[dict]:
    """One strategy: [{"added", "n_train", metrics..., "picked"}] per round (round 0 = initial set)."""
    import jax

    from pn_jax import fitting, metrics, model as model_lib, suggest

    n = cfg.noising
    std_range = (n.noise_std_min, n.noise_std_max)
    current, remaining = list(initial_idx), list(pool_idx)
    random_ids = [remaining[i] for i in suggest.random_order(len(remaining), seed)] if strategy == "random" else None
    test_feats, test_labels, test_masks, has_masks = test
    out = []
    for r in range(rounds + 1):
        t0 = time.perf_counter()
        state, _ = fitting.fit_state(cfg, feats[current], holdout, jax.random.key(cfg.seed))
        model = model_lib.Model(cfg, grid, state, extractor=extractor)
        thr, _ = fitting.choose_threshold(model.score_features(val[0])["image_scores"],
                                            model.score_features(val[1])["image_scores"], fpr=cfg.threshold_fpr)
        res = model.score_features(test_feats)
        m = metrics.evaluate(res["image_scores"], test_labels, res["anomaly_maps"] if has_masks else None,
                             test_masks if has_masks else None)
        row = {"round": r, "added": len(current) - len(initial_idx), "n_train": len(current), "threshold": thr,
               **{k: m[k] for k in m if k.startswith("mAUROC") or k.startswith("mAP") or k == "mAUPRO_px"}}
        if r < rounds and remaining:
            if strategy == "random":
                picked = random_ids[r * per_round:(r + 1) * per_round]
            else:
                pool = model.score_features(feats[remaining])
                q = [suggest.noise_quantile(x) for x in pool["noise_maps"]]
                unc = suggest.uncertainty(pool["image_scores"], q, thr, std_range, weight=STRATEGIES[strategy])
                order = suggest.rank(unc.total, seed)
                pick_pos = order[:per_round].tolist()
                row["picked_uncertainty"] = [float(unc.total[i]) for i in pick_pos]
                row["picked_normalized"] = [float(unc.normalized[i]) for i in pick_pos]
                row["pool_uncertainty_mean"] = float(np.mean(unc.total))
                row["pool_normalized_mean"] = float(np.mean(unc.normalized))
                picked = [remaining[i] for i in pick_pos]
            row["picked"] = [int(i) for i in picked]
            current += picked
            remaining = [x for x in remaining if x not in set(picked)]
        row["seconds"] = time.perf_counter() - t0
        log(f"  {strategy}{'' if strategy != 'random' else f'[{seed}]'} round {r}: {row['n_train']} "
            f"train images, image AUROC {row['mAUROC_sp_max']:.2f}"
            + (f", pixel AUROC {row['mAUROC_px']:.2f}" if "mAUROC_px" in row else "") + f" ({row['seconds']:.1f} s)")
        out.append(row)
    return out


def plot(path, doc, key):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for j, (name, runs) in enumerate(doc["curves"].items()):
        x = [r["added"] for r in runs[0]]
        ys = np.array([[r[key] for r in run] for run in runs])
        if len(runs) > 1:
            ax.fill_between(x, ys.min(0), ys.max(0), color=f"C{j}", alpha=0.2)
        ax.plot(x, ys.mean(0), marker="o", color=f"C{j}",
                label=name + (f" (mean of {len(runs)} seeds, range shaded)" if len(runs) > 1 else ""))
    ax.set_xlabel(f"images added to the {doc['settings']['initial']} initial training images")
    ax.set_ylabel(f"test {key}")
    ax.set_title(f"active learning: {doc['dataset']}/{doc['category']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    mine, a = parse_args(argv)
    from pn_jax import cli

    try:
        if min(mine.initial, mine.per_round, mine.rounds, mine.pool_max, mine.random_seeds) < 1:
            raise cli.UsageError("--initial, --per-round, --rounds, --pool-max and --random-seeds must be >= 1")
        if (a.method or "propose_noising") != "propose_noising":
            raise cli.UsageError("uncertainty needs the proposed noise: --method propose_noising")
        cfg, category = cli.one_category(a, "the simulation")
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from pn_jax import data, model as model_lib

    t_start = time.perf_counter()
    os.makedirs(mine.out, exist_ok=True)
    sources = load(cfg, a, category, mine)
    if not len(sources.get("holdout", [])):
        print("error: held-out normal images are needed (statistics, threshold): raise --holdout-fraction",
              file=sys.stderr)
        return 2
    n_train = len(sources["train"])
    if n_train < mine.initial + mine.per_round:
        print(f"error: {n_train} training images, fewer than --initial + --per-round; lower them", file=sys.stderr)
        return 2
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(n_train)
    initial_idx = sorted(perm[:mine.initial].tolist())
    pool_idx = sorted(perm[mine.initial:mine.initial + mine.pool_max].tolist())
    rounds = min(mine.rounds, len(pool_idx) // mine.per_round)
    print(f"active learning | {cfg.data.dataset}/{category} {cfg.model.backbone} image {cfg.data.image_size} | "
          f"{mine.initial} initial + {len(pool_idx)} pool of {n_train} train, {rounds} rounds of "
          f"{mine.per_round}, {len(sources['holdout'])} held out, {len(sources['test'])} test")

    extractor_model = model_lib.Model(cfg, (0, 0), None)
    t0 = time.perf_counter()
    train_src = sources["train"]
    keep = sorted(initial_idx + pool_idx)
    sub = data.records_source([train_src[i] for i in keep], dataset=cfg.data.dataset, category=category,
                              split="train")
    feats_sub = extractor_model.extract(sub, desc="features train")
    feats = np.zeros((n_train,) + feats_sub.shape[1:], np.float32)
    feats[keep] = feats_sub
    holdout = extractor_model.extract(sources["holdout"], desc="features holdout")
    normal_recs, anom_recs = fitting.validation_records(sources["holdout"], cfg.seed)
    src = lambda recs: data.records_source(recs, dataset="validation", category="validation",  # noqa: E731
                                           split="validation")
    val = (extractor_model.extract(src(normal_recs), desc="validation"),
           extractor_model.extract(src(anom_recs), desc="validation"))
    test_feats, test_labels, test_masks = extract_labelled(extractor_model, sources["test"])
    has_masks = bool(getattr(sources["test"], "has_masks", False))
    t_extract = time.perf_counter() - t0
    grid = tuple(extractor_model.extractor.grid)

    runs = [(s, 0) for s in (STRATEGIES if mine.ablation else ("uncertainty",))]
    runs += [("random", s) for s in range(mine.random_seeds)]
    curves: dict = {}
    for strategy, seed in runs:
        rows = simulate(cfg, feats, pool_idx, initial_idx, holdout, val,
                        (test_feats, test_labels, test_masks, has_masks), strategy=strategy,
                        per_round=mine.per_round, rounds=rounds, seed=cfg.seed + seed, grid=grid,
                        extractor=extractor_model.extractor)
        curves.setdefault(strategy, []).append(rows)

    key = "mAUROC_px" if has_masks else "mAUROC_sp_max"
    summary = {}
    for name, rs in curves.items():
        ys = np.array([[r[key] for r in run] for run in rs])
        im = np.array([[r["mAUROC_sp_max"] for r in run] for run in rs])
        summary[name] = {"added": [r["added"] for r in rs[0]], key: ys.mean(0).tolist(),
                         f"{key}_min": ys.min(0).tolist(), f"{key}_max": ys.max(0).tolist(),
                         "mAUROC_sp_max": im.mean(0).tolist(), "area_mean": float(ys.mean())}
    doc = {"dataset": cfg.data.dataset, "category": category, "config": cfg.to_dict(),
           "argv": list(sys.argv[1:] if argv is None else argv),
           "settings": {"initial": mine.initial, "per_round": mine.per_round, "rounds": rounds,
                        "pool": len(pool_idx), "random_seeds": mine.random_seeds,
                        "weights": {k: STRATEGIES[k] for k in curves if k in STRATEGIES}},
           "counts": {"train_available": n_train, "holdout": len(sources["holdout"]), "test": int(len(test_labels)),
                      "test_anomalous": int(test_labels.sum())},
           "metric": key, "curves": curves, "summary": summary,
           "timings": {"extract_s": t_extract, "total_s": time.perf_counter() - t_start}}
    from pn_jax import runner

    path = os.path.join(mine.out, "active_learning.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=2, default=runner.json_default)
    png = plot(os.path.join(mine.out, "active_learning.png"), doc, key)
    print(f"\n{key} (mean over runs) by images added:")
    for name, s in summary.items():
        print(f"  {name:12s} " + " ".join(f"{v:6.2f}" for v in s[key]) + f"   (mean over rounds {s['area_mean']:.2f})")
    print(f"results: {path}, {png} ({doc['timings']['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
