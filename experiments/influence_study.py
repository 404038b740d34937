"""Influence-approximation study (SPEC 3): fd / fd_fixed / grad / jvp, a learned predictor and
its fixed part alone, across eps.

    python -m experiments.influence_study --dataset elpv --category mono --max-train 120 --max-test 200
    python -m experiments.influence_study --dataset synthetic --category synthetic --image-size 128

For one category it fits once through the public pipeline (`pn_jax.model.fit`: memory bank,
influence dims S, fit-time statistics, threshold), fits the InfluencePredictor on the held-out
normals and synthetic anomalies made from them (`--predictor-anomalies`), and reports

  1. agreement: on --n-images test images, every estimator's influence [Q,S] at every eps
     against the reference `grad` (the exact derivative times eps): relative error (median,
     p99, max over entries; relative Frobenius), Spearman rank correlation over entries and
     over patches (mean over S), overall and split into normal patches (of normal images) and
     anomalous patches (overlapping the mask of anomalous images; every patch of an anomalous
     image where there are no masks); and the fraction of entries where the literal `fd` saw
     a neighbour switch (where fd and fd_fixed differ beyond a tolerance);
  2. cost: time per image of each estimator (jit-compiled, compile excluded), alone and with
     the k-NN search, against the k-NN search alone (K, and PatchCore's k=1); the
     predictor's training time separately;
  3. effect on metrics: the whole test set scored with each estimator at --eps (statistics
     refitted per estimator on the held-out normals) for every score that uses the influence:
     the seed's mix `seed`, `influence` alone and `proposed` (ADer metrics), beside PatchCore,
     the mean-of-K distance and the default `calibrated_rerank`;
  4. correlations over test patches between patch influence (mean over S) and the k-NN
     distance signal (mean_k dist).

Estimators: the library's four (`pn_jax.influence`), `predictor` (`pn_jax.research.predictor`, learned)
and `nearest` = eps |r_1S| / d_1, the predictor's fixed part without the learned term (what
the learning adds is the difference between those two rows). The library's scoring path
(`detector.make_signal_fn`) takes the four library estimators; the two others are scored by
the same public pieces (k-NN, `noising.signals_from`, `calibration`) assembled here.

Every flag of `experiments.run` is accepted (dataset, backbone, image size, caps, coreset,
k, eps, embed dim, ...); the flags below are this study's own. Writes <out>/influence_study.json,
<out>/influence_study.md and <out>/influence_study.png, and prints the tables.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np

from experiments.common import fmt as _f


REFERENCE = "grad"
PREDICTOR, NEAREST = "predictor", "nearest"
EXTRA_METHODS = (PREDICTOR, NEAREST)
SCORES = ("seed", "influence", "proposed")  # every score that uses the influence
BASELINES = ("patchcore", "distance", "calibrated_rerank")


def parse_args(argv=None):
    # allow_abbrev=False: experiments.run's --eps must not be taken for --eps-list.
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--eps-list", default="1e-1,1e-2,1e-3,1e-4", help="eps values of the agreement part")
    p.add_argument("--methods", default="fd,fd_fixed,grad,jvp,predictor,nearest",
                   help="estimators to compare (library methods, predictor, nearest)")
    p.add_argument("--metrics-methods", default=None,
                   help="estimators scored on the whole test set (default: --methods; the literal fd "
                        "costs one full k-NN search per dim of S)")
    p.add_argument("--n-images", type=int, default=8, help="test images of the agreement and cost parts")
    p.add_argument("--switch-rtol", type=float, default=1e-4,
                   help="fd vs fd_fixed relative difference above which an entry counts as a switch")
    p.add_argument("--timing-repeats", type=int, default=5, help="timing passes (the fastest is kept)")
    p.add_argument("--timing-budget-s", type=float, default=20.0,
                   help="stop repeating a timing once this many seconds are spent (slow methods: fd)")
    p.add_argument("--predictor-steps", type=int, default=1500, help="optax steps of the predictor fit")
    p.add_argument("--predictor-hidden", type=int, default=16, help="hidden width of the predictor")
    p.add_argument("--predictor-anomalies", choices=("synthetic", "perturbed"), default="synthetic",
                   help="anomalous training patches: features of synthetic-anomaly images made from the "
                        "held-out normals (data.make_validation_records), or perturbed normals in feature space")
    p.add_argument("--out", default="results/influence_study")
    mine, rest = p.parse_known_args(argv)
    from pn_jax import cli

    a = cli.build_run_parser().parse_args(rest)  # every experiments.run flag
    if a.holdout_fraction is None:  # held-out normals are required here, whatever the CLI's default
        a.holdout_fraction = 0.1
    mine.eps_list = [float(e) for e in mine.eps_list.split(",") if e.strip()]
    mine.methods = [m.strip() for m in mine.methods.split(",") if m.strip()]
    mine.metrics_methods = ([m.strip() for m in mine.metrics_methods.split(",") if m.strip()]
                            if mine.metrics_methods else list(mine.methods))
    return mine, a


# ============================================================================ helpers
def _corr(x, y):
    from scipy import stats

    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    if x.size < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan"), float("nan")
    return float(stats.pearsonr(x, y)[0]), float(stats.spearmanr(x, y)[0])


def agreement_stats(x, ref) -> dict:
    """x, ref [Q,S] -> relative errors and rank correlations of x against ref."""
    from scipy import stats

    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    if ref.size == 0:
        return {}
    ok = np.abs(ref) > 0
    rel = np.abs(x - ref)[ok] / np.abs(ref)[ok]
    fro = float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300))
    same = np.array_equal(x, ref)
    sp_e = 1.0 if same else float(stats.spearmanr(x.ravel(), ref.ravel())[0])
    sp_p = 1.0 if same else (float(stats.spearmanr(x.mean(-1), ref.mean(-1))[0]) if len(x) > 2 else float("nan"))
    return {"rel_err_median": float(np.median(rel)), "rel_err_p99": float(np.quantile(rel, 0.99)),
            "rel_err_max": float(rel.max()), "rel_fro": fro, "spearman_entries": sp_e,
            "spearman_patches": sp_p, "n_ref_zero": int((~ok).sum()), "n_patches": int(len(x))}


def switch_mask(fd, fd_fixed, rtol: float):
    """Entries where the literal fd saw a neighbour (rank) switch: elsewhere fd and fd_fixed
    compute the same cancellation-free expression and agree to float32 rounding (~1e-6)."""
    fd, fx = np.asarray(fd, np.float64), np.asarray(fd_fixed, np.float64)
    return np.abs(fd - fx) > rtol * np.abs(fx) + 1e-30


def time_per_call(fn, arg_list, repeats: int, budget_s: float = 20.0) -> float:
    """Seconds per call of a jitted fn: the fastest of up to `repeats` passes over arg_list
    (fewer once `budget_s` is spent; at least one), each pass timed as a whole and divided by
    its length; compile excluded (one warm-up call). The minimum is the least noisy estimate
    on a shared host."""
    import jax

    jax.block_until_ready(fn(*arg_list[0]))
    passes, spent = [], 0.0
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        for args in arg_list:
            jax.block_until_ready(fn(*args))
        dt = time.perf_counter() - t0
        passes.append(dt / len(arg_list))
        spent += dt
        if spent > budget_s:
            break
    return float(min(passes))


def pick_images(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n test indices, half anomalous where possible (seeded), in index order."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    n = min(n, len(labels))
    n_pos = min(len(pos), n // 2)
    n_neg = min(len(neg), n - n_pos)
    n_pos = min(len(pos), n - n_neg)
    chosen = np.concatenate([rng.choice(pos, n_pos, replace=False), rng.choice(neg, n_neg, replace=False)])
    return np.sort(chosen.astype(int))


def patch_classes(labels, masks, grid) -> np.ndarray:
    """[n, N]: 0 = patch of a normal image, 1 = anomalous patch (its cell overlaps the defect
    mask of an anomalous image: the backbone's receptive field is larger than a cell; every
    patch of an anomalous image when there are no masks), -1 = neither (the rest of an
    anomalous image)."""
    from pn_jax import tune

    labels = np.asarray(labels)
    n_patches = grid[0] * grid[1]
    out = np.where(labels[:, None] == 0, 0, 1 if masks is None else -1) * np.ones((1, n_patches), int)
    if masks is not None:
        inside = tune.patch_labels(np.asarray(masks) > 0.5, grid) != 0
        out[(labels[:, None] == 1) & inside] = 1
    return out


def extract_test(model, source, keep_masks: bool):
    """Test features [n,N,D] (host), labels [n], masks [n,H,W] or None, extraction seconds."""
    from pn_jax import batches

    t0 = time.perf_counter()
    feats, kept = batches.extract(model, source, desc="features test", keep=("label", "mask"))
    t = time.perf_counter() - t0
    return feats, kept["label"].astype(int), kept["mask"] > 0.5 if keep_masks else None, t


# ---------------------------------------------------------------------------- estimators
def nearest_only(f, bank, dist, idx, dims, eps, bank_s=None):
    """eps |r_1S| / d_1: the k=1 term of `grad`, i.e. the predictor's fixed part with every
    neighbour assumed to look like the nearest one (no learning)."""
    import jax.numpy as jnp

    from pn_jax.research import predictor

    _, d, r1 = predictor.inputs(f, bank, dist, idx, dims, bank_s)
    return eps * jnp.abs(r1) / jnp.maximum(d[:, :1], 1e-12)


def estimators(methods, predictor_params=None) -> dict:
    """name -> fn(f, bank, dist, idx, dims, eps, bank_s=None) -> [Q,S]."""
    from pn_jax import influence as infl
    from pn_jax.research import predictor

    out = {}
    for m in methods:
        if m == PREDICTOR:
            out[m] = functools.partial(predictor.influence, predictor_params)
        elif m == NEAREST:
            out[m] = nearest_only
        else:
            out[m] = functools.partial(infl.influence, m)
    return out


def fit_predictor(model, sources, holdout, mode: str, steps: int, hidden: int, log=print):
    """The InfluencePredictor on the held-out normals (+ anomalies) -> (PredictorFit, seconds incl. extraction)."""
    import jax

    from pn_jax import data, fitting
    from pn_jax.research import predictor

    t0 = time.perf_counter()
    anomalous = None
    if mode == "synthetic":
        _, recs = fitting.validation_records(sources["holdout"], model.cfg.seed)
        anomalous = model.extract(data.records_source(recs, dataset="validation", category="validation",
                                                      split="validation"), desc="features synthetic anomalies")
    cfg = model.cfg
    fit = predictor.fit_predictor(holdout, model.state.bank, model.state.dims, k=cfg.noising.k,
                                  key=jax.random.fold_in(jax.random.key(cfg.seed), 17), steps=steps,
                                  hidden=hidden, anomalous=anomalous, block=cfg.bank.knn_block)
    total = time.perf_counter() - t0
    log(f"predictor: {fit.info['n_params']} params, {fit.info['n_normal']} normal + {fit.info['n_anomalous']} "
        f"anomalous patches ({fit.info['anomalous_source']}), validation loss {fit.val_loss_init:.3f} -> "
        f"{fit.val_loss:.3f}, {total:.1f} s")
    return fit, total


# ---------------------------------------------------------------------------- HOOK (lead)
def noise_scale_hook(state, ctx: dict) -> dict | None:
    """HOOK for the per-dim noise scale (lead): return extra correlation entries, or None.

    ctx: "dims" [S]; "infl_per_dim" [S] (grad influence at --eps averaged over the agreement
    patches); "patch_influence" / "patch_distance" [n_test*N] (configured method).
    Default: when params hold a non-trivial "noise_scale" [D], correlate it over S with the
    per-dim mean influence.
    """
    scale = state.params.get("noise_scale") if isinstance(state.params, dict) else None
    if scale is None:
        return None
    s = np.asarray(scale)[np.asarray(ctx["dims"])]
    if np.allclose(s, s[0]):
        return None
    pear, spear = _corr(ctx["infl_per_dim"], s)
    return {"noise_scale_vs_influence_per_dim": {"pearson": pear, "spearman": spear, "n": int(s.size)}}


# ============================================================================ the parts
def part_agreement(state, cfg, feats, classes, est, eps_list, switch_rtol):
    """feats [n,N,D], classes [n,N] -> rows (method, eps, stats + per class), switch stats per
    eps, per-dim influence, neighbours."""
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from pn_jax import knn

    bank, dims, k, block = state.bank, state.dims, cfg.noising.k, cfg.bank.knn_block
    knn_fn = jax.jit(lambda f, b: knn.knn(f, b, k=k, block=block))
    nbrs = [knn_fn(jnp.asarray(f), bank) for f in feats]
    need = dict(est)
    need.update({m: fn for m, fn in estimators((REFERENCE, "fd", "fd_fixed")).items() if m not in need})
    fns = {m: jax.jit(fn) for m, fn in need.items()}
    cls = np.asarray(classes).reshape(-1)

    def compute(method, eps):
        return np.concatenate([np.asarray(fns[method](jnp.asarray(f), bank, d, i, dims, jnp.float32(eps)))
                               for f, (d, i) in zip(feats, nbrs)])

    rows, switches, per_dim = [], {}, None
    for eps in tqdm(eps_list, desc="agreement (eps)", leave=False):
        ref = compute(REFERENCE, eps)
        vals = {m: (ref if m == REFERENCE else compute(m, eps)) for m in set(est) | {"fd", "fd_fixed"}}
        sw = switch_mask(vals["fd"], vals["fd_fixed"], switch_rtol)
        sw_loose = switch_mask(vals["fd"], vals["fd_fixed"], 1e-2)
        fd_clean = agreement_stats(vals["fd"][~sw], ref[~sw]) if (~sw).any() else {}
        switches[eps] = {"fraction_entries": float(sw.mean()), "fraction_patches": float(sw.any(-1).mean()),
                         "fraction_entries_rtol_1e-2": float(sw_loose.mean()),
                         "fd_rel_err_median_no_switch": fd_clean.get("rel_err_median", float("nan")),
                         "fd_rel_err_max_no_switch": fd_clean.get("rel_err_max", float("nan")),
                         "fd_rel_err_median_switch": (float(np.median(np.abs(vals["fd"][sw] - ref[sw])
                                                                      / np.abs(ref[sw])))
                                                      if sw.any() else float("nan"))}
        for m in est:
            row = {"method": m, "eps": eps, **agreement_stats(vals[m], ref)}
            for name, c in (("normal", 0), ("anomalous", 1)):
                row[name] = agreement_stats(vals[m][cls == c], ref[cls == c])
            rows.append(row)
        if np.isclose(eps, cfg.noising.eps) or per_dim is None:
            per_dim = ref.mean(0) / eps * cfg.noising.eps
    return rows, switches, per_dim, nbrs


def part_cost(state, cfg, feats, nbrs, est, repeats, budget_s, predictor_params=None):
    """Per-image milliseconds: k-NN (K and 1), each estimator alone and fused with the k-NN.
    The predictor's weights are compile-time constants there (as in an exported model); with
    `predictor_params`, also its cost with the weights as runtime arguments (as in the Scorer,
    whose params are traced): XLA's CPU backend runs the small matmuls markedly slower so."""
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from pn_jax import knn

    bank, dims, k, block, eps = state.bank, state.dims, cfg.noising.k, cfg.bank.knn_block, cfg.noising.eps
    fs = [jnp.asarray(f) for f in feats]
    knn_k = jax.jit(lambda f, b: knn.knn(f, b, k=k, block=block))
    knn_1 = jax.jit(lambda f, b: knn.knn(f, b, k=1, block=block))
    out = {"knn_k_ms": 1e3 * time_per_call(knn_k, [(f, bank) for f in fs], repeats, budget_s),
           "knn_1_ms": 1e3 * time_per_call(knn_1, [(f, bank) for f in fs], repeats, budget_s), "methods": {}}
    for m, fn in tqdm(est.items(), desc="cost", leave=False):
        alone = jax.jit(lambda f, b, d, i, s, fn=fn: fn(f, b, d, i, s, eps))

        def fused_fn(f, b, s, fn=fn):
            d, i = knn.knn(f, b, k=k, block=block)
            return fn(f, b, d, i, s, eps)

        fused = jax.jit(fused_fn)
        args = [(f, bank, d, i, dims) for f, (d, i) in zip(fs, nbrs)]
        t_alone = 1e3 * time_per_call(alone, args, repeats, budget_s)
        t_fused = 1e3 * time_per_call(fused, [(f, bank, dims) for f in fs], repeats, budget_s)
        out["methods"][m] = {"influence_ms": t_alone, "knn_plus_influence_ms": t_fused,
                             "overhead_vs_knn_k": t_fused / out["knn_k_ms"] - 1.0,
                             "overhead_vs_patchcore": t_fused / out["knn_1_ms"] - 1.0}
    if predictor_params is not None and PREDICTOR in est:
        from pn_jax.research import predictor

        args_fn = jax.jit(lambda p, f, b, d, i, s: predictor.influence(p, f, b, d, i, s, eps))
        t = 1e3 * time_per_call(args_fn, [(predictor_params, f, bank, d, i, dims) for f, (d, i) in zip(fs, nbrs)],
                                repeats, budget_s)
        out["predictor_weights_as_arguments_ms"] = t
    return out


def _with_params(sig_fn, params, _state_params, *args):
    """Call a library signal function with `params` (the state's plus the fitted predictor)."""
    return sig_fn(params, *args)


def local_signal_fn(cfg, fn):
    """The scoring path of the library (k-NN -> influence -> noise -> signals, plus the
    whitened search and `proposed`) with estimator `fn`, for the estimators the library's
    dispatch does not take (predictor, nearest). Same signature as detector.make_signal_fn's."""
    import jax

    from pn_jax import calibration, influence as infl, knn, noising

    n = cfg.noising
    std_range = (n.noise_std_min, n.noise_std_max)

    def per_image(params, bank, dims, stats, f, bank_s):
        dist, idx = knn.knn(f, bank, k=n.k, block=cfg.bank.knn_block)
        sig, noise = noising.signals_from(params, dims, stats, dist, fn(f, bank, dist, idx, dims, n.eps, bank_s),
                                          std_range)
        cal, cal_idx = calibration.calibrated_signals(f, bank, params["noise_scale"], n.k, cfg.bank.knn_block)
        sig.update(cal)
        sig["proposed"] = calibration.proposed_nll(f, bank, cal_idx[:, 0], dims, noise)
        return sig

    @jax.jit
    def signals(params, bank, dims, stats, feats):
        bank_s = infl.bank_columns(bank, dims)
        return jax.lax.map(lambda f: per_image(params, bank, dims, stats, f, bank_s), feats)

    return signals


def local_stats(cfg, params, bank, dims, holdout, neighbours, fn):
    """Fit-time statistics with estimator `fn` on the held-out normals: the same two passes as
    normalstats.fit_stats (influence/distance moments, then the three signals' moments)."""
    import jax
    import jax.numpy as jnp

    from pn_jax import influence as infl, noising

    n = cfg.noising
    dist, idx = neighbours
    bank_s = infl.bank_columns(bank, dims)
    raw = jax.jit(lambda f, d, i: jax.lax.map(lambda a: fn(a[0], bank, a[1], a[2], dims, n.eps, bank_s),
                                              (f, d, i)))(jnp.asarray(holdout), dist, idx)
    infl_w = raw * params["influence_weight"][dims]
    dsig = jnp.mean(dist, axis=-1)
    sd = lambda x: jnp.maximum(jnp.std(x), 1e-12)  # noqa: E731
    stats = noising.identity_stats()._replace(infl_mean=jnp.mean(infl_w), infl_std=sd(infl_w),
                                              dist_mean=jnp.mean(dsig), dist_std=sd(dsig))
    sig, _ = noising.signals_from(params, dims, stats, dist, raw, (n.noise_std_min, n.noise_std_max))
    parts = jnp.stack([sig[name].reshape(-1) for name in noising.SIGNALS])
    return stats._replace(signal_mean=parts.mean(-1), signal_std=jnp.maximum(parts.std(-1), 1e-12))


def part_metrics(model, holdout, test, est, switch_rtol):
    """Whole test set scored with each estimator (statistics refit per estimator on the
    held-out normals); every influence-using score plus the baselines."""
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from pn_jax import config as config_lib, detector, metrics, normalstats

    cfg, state = model.cfg, model.state
    feats, labels, masks = test
    bs, n = cfg.batch_size, len(feats)
    maps_fn = model.scorer().maps
    neighbours = normalstats.holdout_neighbours(cfg, state.bank, holdout)

    def run_signals(signal_fn, stats, name):
        """-> per-patch signals {name: [n, N]} and scoring seconds per image (compile excluded)."""
        chunks = [detector.pad_batch(feats[s:s + bs], bs) for s in range(0, n, bs)]
        out, t, n_timed = [], 0.0, 0
        # The first batch compiles and is not timed (timed again when it is the only one).
        for j, c in enumerate(tqdm(chunks + chunks[:1] * (len(chunks) == 1), desc=f"scoring ({name})",
                                   unit="batch", leave=False)):
            t0 = time.perf_counter()
            sig = signal_fn(state.params, state.bank, state.dims, stats, jnp.asarray(c))
            sig = {kk: np.asarray(v) for kk, v in sig.items()}
            if j > 0:
                t, n_timed = t + time.perf_counter() - t0, n_timed + bs
            if j < len(chunks):
                out.append(sig)
        return {kk: np.concatenate([o[kk] for o in out])[:n] for kk in out[0]}, t / n_timed

    def pixel_maps(patch):
        return np.concatenate([np.asarray(maps_fn(jnp.asarray(detector.pad_batch(patch[s:s + bs], bs))))
                               for s in range(0, n, bs)])[:n]

    def evaluate(patch):
        amaps = pixel_maps(np.asarray(patch, np.float32))
        img = amaps.reshape(n, -1).max(-1)
        return metrics.evaluate(img, labels, amaps if masks is not None else None, masks), img

    res = {"per_method": {}, "baseline": {}, "scoring_ms_per_image": {}, "image_scores": {},
           "labels": np.asarray(labels).tolist(), "scoring_path": {}}
    base_fn = detector.make_signal_fn(cfg, need_influence=False, rerank=True)
    base_sig, t_base = run_signals(base_fn, state.stats, "baselines")
    res["scoring_ms_per_image"]["patchcore+rerank (no influence)"] = 1e3 * t_base
    for name, key in (("patchcore", "nearest"), ("distance", "distance"), ("calibrated_rerank", "calibrated_rerank")):
        res["baseline"][name] = evaluate(base_sig[key])[0]
    signals = {}
    for m, fn in tqdm(est.items(), desc="metrics (method)", leave=False):
        if m in config_lib.INFLUENCE_METHODS:
            cfg_m = cfg.replace(noising={"influence": m})
            params = state.params if m != PREDICTOR else {**state.params, "predictor": fn.args[0]}
            stats = normalstats.fit_stats(cfg_m, params, state.bank, state.dims, holdout, neighbours)
            sig_fn = detector.make_signal_fn(cfg_m, need_influence=True, calibrated=True)
            sig_fn = functools.partial(_with_params, sig_fn, params) if m == PREDICTOR else sig_fn
            res["scoring_path"][m] = "library (detector.make_signal_fn)"
        else:
            cfg_m = cfg
            stats = local_stats(cfg, state.params, state.bank, state.dims, holdout, neighbours, fn)
            sig_fn = local_signal_fn(cfg, fn)
            res["scoring_path"][m] = "study (public pieces)"
        sig, t = run_signals(sig_fn, stats, m)
        res["scoring_ms_per_image"][m] = 1e3 * t
        res["per_method"][m], res["image_scores"][m] = {}, {}
        for v in SCORES:
            patch = np.asarray(detector.patch_score(cfg_m, {kk: jnp.asarray(x) for kk, x in sig.items()}, stats, v))
            res["per_method"][m][v], img = evaluate(patch)
            res["image_scores"][m][v] = img.tolist()
        signals[m] = sig
    if "fd" in signals and "fd_fixed" in signals:
        res["fd_vs_fd_fixed"] = compare_fd(signals["fd"]["influence"], signals["fd_fixed"]["influence"],
                                           res["image_scores"]["fd"]["influence"],
                                           res["image_scores"]["fd_fixed"]["influence"], labels, switch_rtol)
    return res, signals


def compare_fd(p_fd, p_fx, img_fd, img_fx, labels, rtol):
    """Whole test set: where the literal fd's patch influence (mean over S) departs from fd_fixed's."""
    p_fd, p_fx = np.asarray(p_fd, np.float64), np.asarray(p_fx, np.float64)
    rel = np.abs(p_fd - p_fx) / np.maximum(np.abs(p_fx), 1e-30)
    img_fd, img_fx = np.asarray(img_fd, np.float64), np.asarray(img_fx, np.float64)
    img_rel = np.abs(img_fd - img_fx) / np.maximum(np.abs(img_fx), 1e-30)
    worst = np.argsort(-img_rel)[:5]
    return {"patches_differing": float((rel > rtol).mean()), "patch_rel_diff_max": float(rel.max()),
            "patch_rel_diff_p999": float(np.quantile(rel, 0.999)),
            "images_with_a_differing_patch": float((rel > rtol).any(-1).mean()),
            "images_whose_influence_score_differs": float((img_rel > rtol).mean()),
            "worst_images": [{"index": int(i), "label": int(labels[i]), "fd": float(img_fd[i]),
                              "fd_fixed": float(img_fx[i]), "rel_diff": float(img_rel[i])} for i in worst]}


def part_correlation(signals, labels, n_patches):
    """Pearson/Spearman between patch influence and the k-NN distance signal, per method."""
    per_img = np.repeat(labels, n_patches)
    out = {}
    for m, sig in signals.items():
        x, y = sig["influence"].ravel(), sig["distance"].ravel()
        row = {}
        for name, sel in (("all", slice(None)), ("normal_images", per_img == 0), ("anomalous_images", per_img == 1)):
            p, s = _corr(x[sel], y[sel])
            row[name] = {"pearson": p, "spearman": s, "n": int(np.size(x[sel]))}
        out[m] = row
    return out


# ============================================================================ reporting
def tables(doc) -> str:
    ag = doc["agreement"]
    eps0 = doc["config"]["noising"]["eps"]
    lines = [f"# Influence study: {doc['dataset']} / {doc['category']}", "",
             f"backbone {doc['config']['model']['backbone']}, image {doc['config']['data']['image_size']}, "
             f"D={doc['counts']['dim']}, |S|={doc['counts']['n_dims']}, K={doc['config']['noising']['k']}, "
             f"bank M={doc['counts']['bank']}, patches/image N={doc['counts']['patches_per_image']}, "
             f"device {doc['device']}", "",
             f"## Agreement with `{REFERENCE}` (exact derivative x eps) on {ag['n_images']} test images "
             f"({ag['n_entries']} (patch, dim) entries)", "",
             "| method | eps | rel err median | rel err p99 | rel err max | rel Frobenius | Spearman entries "
             "| Spearman patches |", "|---|---|---|---|---|---|---|---|"]
    for r in ag["rows"]:
        lines.append(f"| {r['method']} | {r['eps']:g} | {_f(r['rel_err_median'])} | {_f(r['rel_err_p99'])} | "
                     f"{_f(r['rel_err_max'])} | {_f(r['rel_fro'])} | {_f(r['spearman_entries'], '%.6f')} | "
                     f"{_f(r['spearman_patches'], '%.6f')} |")
    anomalous = "patches overlapping the defect mask" if doc["has_masks"] else "patches of anomalous images"
    lines += ["", f"## Agreement by patch class at eps {eps0:g} (normal: patches of normal images; anomalous: "
                  f"{anomalous})", "",
              "| method | normal: rel err median | normal: rel err p99 | normal: Spearman entries | "
              "anomalous: rel err median | anomalous: rel err p99 | anomalous: Spearman entries | "
              "patches (normal / anomalous) |", "|---|---|---|---|---|---|---|---|"]
    for r in ag["rows"]:
        if not np.isclose(r["eps"], eps0):
            continue
        nn, aa = r.get("normal", {}), r.get("anomalous", {})
        lines.append(f"| {r['method']} | {_f(nn.get('rel_err_median'))} | {_f(nn.get('rel_err_p99'))} | "
                     f"{_f(nn.get('spearman_entries'), '%.4f')} | {_f(aa.get('rel_err_median'))} | "
                     f"{_f(aa.get('rel_err_p99'))} | {_f(aa.get('spearman_entries'), '%.4f')} | "
                     f"{nn.get('n_patches', 0)} / {aa.get('n_patches', 0)} |")
    pr = doc.get("predictor")
    if pr:
        i = pr["info"]
        lines += ["", f"Predictor: {i['n_params']} trained params (hidden {i['hidden']}), {i['steps']} adam steps "
                      f"on {i['n_normal']} held-out normal + {i['n_anomalous']} anomalous patches "
                      f"({i['anomalous_source']}); validation loss {pr['val_loss_init']:.4f} -> {pr['val_loss']:.4f}; "
                      f"training {pr['fit_s']:.1f} s in all (targets {i['data_s']:.1f} s, optimisation "
                      f"{i['train_s']:.1f} s), not included in the per-image costs below."]
    lines += ["", f"## Neighbour switches seen by `fd` (|fd - fd_fixed| > {ag['switch_rtol']:g} x |fd_fixed|)", "",
              "`fd` re-ranks the whole bank by float32 expanded-form squared distances, so near-ties closer "
              "than float32 rounding can reorder under the shift: some of these switches are rounding, not eps.", "",
              "| eps | switched entries | patches with a switch | entries (rtol 1e-2) | fd rel err median, "
              "no switch | fd rel err max, no switch | fd rel err median, switched |", "|---|---|---|---|---|---|---|"]
    for eps, s in ag["switches"].items():
        lines.append(f"| {float(eps):g} | {100 * s['fraction_entries']:.3f}% | {100 * s['fraction_patches']:.2f}% | "
                     f"{100 * s['fraction_entries_rtol_1e-2']:.3f}% | {_f(s['fd_rel_err_median_no_switch'])} | "
                     f"{_f(s['fd_rel_err_max_no_switch'])} | {_f(s['fd_rel_err_median_switch'])} |")
    c = doc["cost"]
    lines += ["", f"## Cost per image (ms; jit, compile excluded; eps {eps0:g})", "",
              f"k-NN search alone: K={doc['config']['noising']['k']}: {c['knn_k_ms']:.2f} ms, "
              f"k=1 (PatchCore): {c['knn_1_ms']:.2f} ms; backbone + aggregation: "
              f"{c['extract_ms_per_image']:.1f} ms", "",
              "| method | influence alone | k-NN + influence | overhead vs k-NN (K) | overhead vs PatchCore (k=1) "
              "| batched scoring (signals + whitened search) |", "|---|---|---|---|---|---|"]
    sc = doc["metrics"]["scoring_ms_per_image"]
    for m, r in c["methods"].items():
        lines.append(f"| {m} | {r['influence_ms']:.3f} | {r['knn_plus_influence_ms']:.2f} | "
                     f"{100 * r['overhead_vs_knn_k']:+.1f}% | {100 * r['overhead_vs_patchcore']:+.1f}% | "
                     f"{_f(sc.get(m), '%.2f')} |")
    lines.append(f"| no influence (k-NN + rerank) | - | - | - | - | "
                 f"{_f(sc.get('patchcore+rerank (no influence)'), '%.2f')} |")
    if "predictor_weights_as_arguments_ms" in c:
        lines += ["", f"The predictor's weights are compile-time constants in the rows above; passed as runtime "
                      f"arguments (as the scoring path does) it takes {c['predictor_weights_as_arguments_ms']:.3f} ms "
                      f"per image alone."]
    keys = ["mAUROC_sp_max", "mAP_sp_max"]
    if doc["has_masks"]:
        keys += ["mAUROC_px", "mAUPRO_px"]
    lines += ["", f"## Test metrics per estimator (eps {eps0:g}, {doc['counts']['test']} test images, "
                  f"{doc['counts']['test_anomalous']} anomalous)", "",
              "| method | " + " | ".join(f"{s}: {k}" for s in SCORES for k in keys) + " |",
              "|---" * (len(keys) * len(SCORES) + 1) + "|"]
    for m, d in doc["metrics"]["per_method"].items():
        lines.append(f"| {m} | " + " | ".join(_f(d[s].get(k), "%.2f") for s in SCORES for k in keys) + " |")
    lines += ["", "Baselines (no influence): " + "; ".join(
        f"{name} " + ", ".join(f"{k} {_f(mm.get(k), '%.2f')}" for k in keys)
        for name, mm in doc["metrics"]["baseline"].items())]
    fv = doc["metrics"].get("fd_vs_fd_fixed")
    if fv:
        lines += ["", f"Whole test set, fd vs fd_fixed patch influence (mean over S, rtol {ag['switch_rtol']:g}): "
                      f"{100 * fv['patches_differing']:.4f}% of patches differ (max rel diff "
                      f"{fv['patch_rel_diff_max']:.3g}); {100 * fv['images_with_a_differing_patch']:.1f}% of images "
                      f"hold one; {100 * fv['images_whose_influence_score_differs']:.1f}% of influence-only image "
                      f"scores change; worst: " + ", ".join(
                          f"#{w['index']} (label {w['label']}) {w['fd_fixed']:.3g} -> {w['fd']:.3g}"
                          for w in fv["worst_images"][:3])]
    lines += ["", "## Correlation over test patches: influence (mean over S) vs k-NN distance (mean over K)", "",
              "| method | Pearson all | Spearman all | Pearson normal imgs | Spearman normal imgs "
              "| Pearson anomalous imgs | Spearman anomalous imgs |", "|---|---|---|---|---|---|---|"]
    for m, r in doc["correlation"].items():
        if m.startswith("_"):
            continue
        cells = [f"{_f(r[g]['pearson'], '%.3f')} | {_f(r[g]['spearman'], '%.3f')}"
                 for g in ("all", "normal_images", "anomalous_images")]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if doc["correlation"].get("_hook"):
        lines += ["", "Hook (per-dim noise scale): `" + json.dumps(doc["correlation"]["_hook"]) + "`"]
    lines += ["", f"wall time {doc['wall_time_s']:.1f} s " + json.dumps(
        {k: round(v, 1) for k, v in doc["timings"].items()})]
    return "\n".join(lines) + "\n"


def plot(path, doc):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pr = doc.get("predictor")
    fig, axes = plt.subplots(1, 3 if pr else 2, figsize=(16 if pr else 11, 4))
    a1, a2 = axes[0], axes[1]
    methods = list(dict.fromkeys(r["method"] for r in doc["agreement"]["rows"]))
    color = {m: f"C{i}" for i, m in enumerate(methods)}
    for m in methods:
        if m == REFERENCE:
            continue
        rows = [r for r in doc["agreement"]["rows"] if r["method"] == m]
        eps = [r["eps"] for r in rows]
        a1.plot(eps, [max(r["rel_fro"], 1e-12) for r in rows], marker="o", color=color[m], label=f"{m} (Frobenius)")
        a1.plot(eps, [max(r["rel_err_median"], 1e-12) for r in rows], marker="x", ls="--",
                color=color[m], label=f"{m} (median)")
    a1.set_xscale("log")
    a1.set_yscale("log")
    a1.set_xlabel("eps")
    a1.set_ylabel(f"relative error vs {REFERENCE}")
    a1.set_title("agreement with the exact derivative", fontsize=9)
    a1.grid(alpha=0.3, which="both")
    a1.legend(fontsize=6)
    c = doc["cost"]
    names = ["k-NN k=1", "k-NN K"] + [f"k-NN+{m}" for m in c["methods"]]
    vals = [c["knn_1_ms"], c["knn_k_ms"]] + [r["knn_plus_influence_ms"] for r in c["methods"].values()]
    a2.bar(names, vals, color=["gray", "gray"] + [color.get(m, "k") for m in c["methods"]])
    a2.set_yscale("log")
    a2.set_ylabel("ms per image")
    a2.set_title(f"time per image ({doc['device']})", fontsize=9)
    a2.tick_params(axis="x", labelsize=7, rotation=25)
    if pr:
        a3 = axes[2]
        a3.plot(pr["loss_steps"], pr["losses"], color=color.get(PREDICTOR, "k"))
        a3.axhline(pr["val_loss"], ls="--", color="k", lw=0.8, label=f"validation {pr['val_loss']:.3g}")
        a3.set_yscale("log")
        a3.set_xlabel("step")
        a3.set_ylabel("log-space squared error")
        a3.set_title("predictor training loss", fontsize=9)
        a3.grid(alpha=0.3, which="both")
        a3.legend(fontsize=7)
    fig.suptitle(f"influence study: {doc['dataset']}/{doc['category']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ============================================================================ main
def main(argv=None) -> int:
    mine, a = parse_args(argv)
    from pn_jax import cli, influence as infl

    known = sorted(infl.METHODS) + list(EXTRA_METHODS)
    bad = [m for m in mine.methods + mine.metrics_methods if m not in known]
    bad += [m for m in mine.metrics_methods if m not in mine.methods]
    if bad or not mine.eps_list or any(e <= 0 for e in mine.eps_list) or mine.predictor_steps < 1:
        print(f"error: --methods must be among {known}, --metrics-methods among --methods, eps > 0 and "
              f"--predictor-steps >= 1 (got {mine.methods}, {mine.metrics_methods}, {mine.eps_list}, "
              f"{mine.predictor_steps})", file=sys.stderr)
        return 2
    try:
        cfg, category = cli.one_category(a, "the influence study")
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import jax

    from pn_jax import fitting, runner

    t_start = time.perf_counter()
    os.makedirs(mine.out, exist_ok=True)
    print(f"influence study | dataset={cfg.data.dataset} category={category} backbone={cfg.model.backbone} "
          f"image={cfg.data.image_size} D={cfg.model.target_embed_dimension} k={cfg.noising.k} "
          f"coreset={cfg.bank.coreset_ratio} methods={','.join(mine.methods)} eps={mine.eps_list} "
          f"device={jax.devices()[0].platform}")
    timer = runner.Timer()
    sources = runner.load_sources(cfg, category, max_train=a.max_train, max_test=a.max_test)
    if not len(sources.get("holdout", [])):
        print("error: the study needs held-out normal images (statistics, predictor): raise --holdout-fraction",
              file=sys.stderr)
        return 2

    # 1. fit once, through the public pipeline
    with timer("fit_s"):
        model = fitting.fit(cfg, sources["train"], holdout=sources["holdout"], key=jax.random.key(cfg.seed),
                              category=category, dataset=cfg.data.dataset, timer=timer)
    state = model.state
    with timer("extract_holdout_again_s"):  # per-estimator statistics, predictor training
        holdout = model.extract(sources["holdout"], desc="features holdout")
    has_masks = bool(getattr(sources["test"], "has_masks", cfg.data.dataset != "elpv"))
    with timer("extract_test_s"):
        feats, labels, masks, t_ext = extract_test(model, sources["test"], has_masks)
    grid = model.grid
    chosen = pick_images(labels, mine.n_images, cfg.seed)
    classes = patch_classes(labels[chosen], masks[chosen] if masks is not None else None, grid)

    pred_doc, pred_params = None, None
    if PREDICTOR in mine.methods:
        with timer("predictor_fit_s"):
            fit, fit_s = fit_predictor(model, sources, holdout, mine.predictor_anomalies, mine.predictor_steps,
                                       mine.predictor_hidden)
        pred_params = fit.params
        stride = max(1, len(fit.losses) // 200)
        pred_doc = {"info": fit.info, "val_loss": fit.val_loss, "val_loss_init": fit.val_loss_init, "fit_s": fit_s,
                    "loss_steps": list(range(0, len(fit.losses), stride)),
                    "losses": fit.losses[::stride].tolist(), "loss_first": float(fit.losses[0]),
                    "loss_last": float(fit.losses[-1])}
    est = estimators(mine.methods, pred_params)

    # 2. agreement
    with timer("agreement_s"):
        rows, switches, per_dim, nbrs = part_agreement(state, cfg, feats[chosen], classes, est, mine.eps_list,
                                                       mine.switch_rtol)
    # 3. cost
    with timer("cost_s"):
        cost = part_cost(state, cfg, feats[chosen], nbrs, est, mine.timing_repeats, mine.timing_budget_s,
                         pred_params)
    cost["extract_ms_per_image"] = 1e3 * t_ext / len(feats)
    # 4. metrics
    with timer("metrics_s"):
        met, signals = part_metrics(model, holdout, (feats, labels, masks),
                                    {m: est[m] for m in mine.metrics_methods}, mine.switch_rtol)
    # 5. correlations
    with timer("correlation_s"):
        corr = part_correlation(signals, labels, feats.shape[1])
        main_m = cfg.noising.influence if cfg.noising.influence in signals else next(iter(signals))
        hook = noise_scale_hook(state, {"dims": state.dims, "infl_per_dim": per_dim,
                                        "patch_influence": signals[main_m]["influence"].ravel(),
                                        "patch_distance": signals[main_m]["distance"].ravel()})
        if hook:
            corr["_hook"] = hook

    doc = {
        "dataset": cfg.data.dataset, "category": category, "argv": list(sys.argv[1:] if argv is None else argv),
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
        "host_loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "config": cfg.to_dict(), "has_masks": has_masks,
        "counts": {"train": len(sources["train"]), "holdout": len(sources.get("holdout", [])),
                   "test": int(len(labels)), "test_anomalous": int(labels.sum()),
                   "bank": int(state.bank.shape[0]), "dim": int(feats.shape[-1]), "n_dims": int(state.dims.shape[0]),
                   "patches_per_image": int(feats.shape[1]), "grid": list(grid)},
        "threshold": model.threshold,
        "agreement": {"reference": REFERENCE, "n_images": int(len(chosen)), "images": chosen.tolist(),
                      "n_entries": int(len(chosen) * feats.shape[1] * state.dims.shape[0]),
                      "switch_rtol": mine.switch_rtol, "rows": rows,
                      "switches": {str(k): v for k, v in switches.items()}},
        "predictor": pred_doc,
        "cost": cost,
        "metrics": met,
        "correlation": corr,
        "timings": dict(timer),
    }
    doc["wall_time_s"] = time.perf_counter() - t_start
    md = tables(doc)
    json_path = os.path.join(mine.out, "influence_study.json")
    with open(json_path + ".tmp", "w") as f:
        json.dump(doc, f, indent=2, default=runner.json_default)
    os.replace(json_path + ".tmp", json_path)
    with open(os.path.join(mine.out, "influence_study.md"), "w") as f:
        f.write(md)
    plot(os.path.join(mine.out, "influence_study.png"), doc)
    print()
    print(md)
    print(f"results: {json_path}, influence_study.md, influence_study.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
