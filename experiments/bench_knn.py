"""k-NN and coreset speed on real features (issue 15): float32 vs bfloat16 ranking vs faiss, and the
greedy coreset by candidate batching vs deferred batches.

    python -m experiments.bench_knn --out runs/bench_knn.json
    python -m experiments.bench_knn --out runs/bench_knn_q.json --quick

Features: efficientnet_lite0 (its pip weights) on ELPV `all` at 256x256, 1024 patches of
D = 1024 per image, extracted once through the library (`data.load_category`,
`Model.extract`) and cached as float16 under --cache.
Random Gaussian features would hide what real features look like: they are nearly low-rank.
`--features synthetic` uses points with a decaying spectrum instead (no download needed).

k-NN: banks of M entries are greedy coresets of the train patches (what a fit stores); the
queries are test images, one image (Q = 1024) per call, as `detector.Scorer` maps them.
Contenders, interleaved image by image for --rounds rounds:
  * matmul      q @ bank.T alone (float32, HIGHEST): the rate ceiling of any dense search;
  * knn         `knn.knn(q, bank, k, block)`: exact, bank prepared on every call;
  * matmul_bf16 the same product in bfloat16 with float32 accumulation (dot_general on the
                stored layout): the ceiling of the bf16 ranking;
  * dense       `knn.knn_indexed` on `knn.prepare_bank(bank, low=False)` (float32);
  * dense_bf16  `knn.knn_indexed` on `knn.prepare_bank(bank, low=True)`: ranking in
                bfloat16, proof and residual distances in float32 (the default on CPUs
                with native bf16 dot products, `pn_jax.hardware`);
  * faiss       faiss-cpu's exact IndexFlatL2 (when importable; never a pn_jax dependency),
                with as many threads as the process may use.
GFLOP/s counts the dense work 2 Q M D for every contender. `identical`: indices and
distances bit for bit equal to `knn.knn` on every timed image (faiss: the fraction of equal
indices). `proven by the bound`: the fraction of queries settled by the float32 (knn, dense)
or bfloat16 (dense_bf16) bound; the rest took a fallback search. (The pruned search measured
here until issue 24 is in docs/bench/bench_knn.json and the git history.)

Coreset: `coreset.coreset_indices` on the first --coreset-n train patches at --coreset-ratio
with the candidate batching (`greedy_select_stepwise`, the previous default) and with
deferred batches (`greedy_select`, the default), interleaved; `identical` compares the
selected indices. The projection's time is measured on its own too.

Prints a table; writes everything, with the load average beside each timing, to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from experiments.common import fmt, load, md_table


# ----------------------------------------------------------------------------- features
def elpv_features(cache: Path, n_train: int, n_test: int, batch_size: int = 8):
    """(train patches [N, D] float16, test features [n_test, 1024, D] float16), cached."""
    tag = f"elpv_all_lite0_256_t{n_train}_q{n_test}"
    f_train, f_test = cache / f"{tag}_train.npy", cache / f"{tag}_test.npy"
    if f_train.exists() and f_test.exists():
        return np.load(f_train, mmap_mode="r"), np.load(f_test, mmap_mode="r")
    from pn_jax import backbones, data
    from pn_jax import model as model_lib
    from pn_jax.config import Config

    info = backbones.info("efficientnet_lite0")
    cfg = Config().replace(
        data={"dataset": "elpv", "root": None, "image_size": 256},
        model={"backbone": "efficientnet_lite0", "weights": None, "layers": tuple(info.default_layers),
               "pretrain_embed_dimension": 1024, "target_embed_dimension": 1024},
        batch_size=batch_size)
    try:
        src = data.load_category("elpv", None, "all", require_masks=False, max_train=n_train, max_test=n_test)
    except data.MissingDataError as e:
        sys.exit(f"bench_knn: {e}\n(or run with --features synthetic)")
    extractor = model_lib.Model(cfg, (0, 0), None)  # the pipeline a user runs, up to the features

    def extract(source, desc):
        return extractor.extract(source, desc=desc).astype(np.float16)

    # Train and holdout are both normal training images: both feed the bank / coreset.
    train = np.concatenate([extract(src[s], s) for s in ("train", "holdout") if len(src.get(s) or [])])
    test = extract(src["test"], "test")
    cache.mkdir(parents=True, exist_ok=True)
    np.save(f_train, train.reshape(-1, train.shape[-1]))
    np.save(f_test, test)
    return np.load(f_train, mmap_mode="r"), np.load(f_test, mmap_mode="r")


def synthetic_features(n_train_patches: int, n_test: int, d: int = 1024, seed: int = 0):
    """Points with a decaying spectrum (cheap stand-in for real features)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0].astype(np.float32)
    scale = (np.arange(1, d + 1) ** -0.7).astype(np.float32) * 40

    def draw(n):
        out = np.empty((n, d), np.float16)
        for i in range(0, n, 65536):
            m = min(65536, n - i)
            out[i:i + m] = (rng.normal(size=(m, d)).astype(np.float32) * scale) @ basis.T + 5
        return out

    return draw(n_train_patches), draw(n_test * 1024).reshape(n_test, 1024, d)


# ----------------------------------------------------------------------------- k-NN
def knn_table(train, test, banks, ks, *, rounds, block, seed):
    import jax
    import jax.numpy as jnp

    from pn_jax import coreset, hardware, knn

    try:
        import faiss
        faiss.omp_set_num_threads(hardware.usable_cores())
    except ImportError:
        faiss = None
    rows = []
    images = [np.asarray(test[i], np.float32) for i in range(len(test))]
    n_train = len(train)
    for m in banks:
        t0 = time.perf_counter()
        flat = np.asarray(train, np.float32)
        idx = np.asarray(coreset.coreset_indices(jax.random.key(seed), flat, m / n_train + 1e-12))
        bank_np = flat[idx]
        del flat
        bank = jnp.asarray(bank_np)
        t_bank = time.perf_counter() - t0
        t0 = time.perf_counter()
        dense_ix = knn.prepare_bank(bank, low=False)
        low_ix = knn.prepare_bank(bank, low=True)
        t_prep = time.perf_counter() - t0
        fidx = None
        if faiss is not None:
            fidx = faiss.IndexFlatL2(bank_np.shape[1])
            fidx.add(bank_np)
        q_n, d = images[0].shape
        for k in ks:
            hi = jax.lax.Precision.HIGHEST
            bf = jnp.bfloat16
            nk = (((1,), (1,)), ((), ()))
            fns = {"matmul": jax.jit(lambda q, b: jnp.matmul(q, b.T, precision=hi)),
                   "matmul_bf16": jax.jit(lambda q, b: jax.lax.dot_general(
                       q.astype(bf), b, nk, preferred_element_type=jnp.float32)),
                   "knn": jax.jit(lambda q, b, k=k: knn.knn(q, b, k, block)),
                   "dense": jax.jit(lambda q, ix, k=k: knn.knn_indexed(q, ix, k, block=block)),
                   "dense_bf16": jax.jit(lambda q, ix, k=k: knn.knn_indexed(q, ix, k, block=block))}
            arg = {"matmul": bank, "matmul_bf16": bank.astype(bf), "knn": bank, "dense": dense_ix,
                   "dense_bf16": low_ix}
            names = list(fns) + (["faiss"] if fidx is not None else [])
            times = {n: [] for n in names}
            same = {n: True for n in names}
            faiss_agree = []
            q0 = jnp.asarray(images[0])
            for n in fns:                                   # compile outside the timing
                jax.block_until_ready(fns[n](q0, arg[n]))
            l0 = load()
            for r in range(rounds):
                for img in images:
                    q = jnp.asarray(img)
                    ref = None
                    for n in names:
                        t = time.perf_counter()
                        out = fidx.search(img, k) if n == "faiss" else jax.block_until_ready(fns[n](q, arg[n]))
                        times[n].append(time.perf_counter() - t)
                        if n == "knn":
                            ref = (np.asarray(out[0]), np.asarray(out[1]))
                        elif n in ("dense", "dense_bf16"):
                            same[n] &= bool(np.array_equal(np.asarray(out[1]), ref[1])
                                            and np.array_equal(np.asarray(out[0]), ref[0]))
                        elif n == "faiss":
                            faiss_agree.append(float(np.mean(out[1] == ref[1])))
            stats = [knn.search_stats(jnp.asarray(img), dense_ix, k, block=block) for img in images]
            proven = float(np.mean([float(s["dense_proven"]) for s in stats]))
            low_stats = [knn.search_stats(jnp.asarray(img), low_ix, k, block=block) for img in images]
            low_proven = float(np.mean([float(s["low_proven"]) for s in low_stats]))
            gflop = 2.0 * q_n * m * d / 1e9
            for n in names:
                med = statistics.median(times[n])
                rows.append({"bank": m, "k": k, "method": n, "ms_per_image": med * 1e3,
                             "ms_min": min(times[n]) * 1e3, "gflops": gflop / med,
                             "identical": (True if n == "knn" else None if n.startswith("matmul")
                                           else float(np.mean(faiss_agree)) if n == "faiss" else same[n]),
                             "dense_proven": (proven if n in ("knn", "dense")
                                              else low_proven if n == "dense_bf16" else None),
                             "n_timed": len(times[n]), "loadavg": [l0, load()]})
            base = statistics.median(times["knn"])
            for row in rows[-len(names):]:
                row["vs_knn"] = row["ms_per_image"] / (base * 1e3)
        rows.append({"bank": m, "method": "_setup", "coreset_s": t_bank, "prepare_s": t_prep})
    return rows


# ----------------------------------------------------------------------------- coreset
def coreset_table(train, n, ratio, rounds, seed):
    import jax

    from pn_jax import coreset

    flat = np.asarray(train[:n], np.float32)
    key = jax.random.key(seed)
    methods = {"candidate batching": coreset.greedy_select_stepwise, "deferred batches": coreset.greedy_select}
    out = {name: [] for name in methods}
    sel = {}
    proj_s = []
    for r in range(rounds):
        t = time.perf_counter()
        p = coreset.project_chunked(flat, coreset.random_projection(jax.random.key(1), flat.shape[1], 128))
        p.block_until_ready()
        proj_s.append(time.perf_counter() - t)
        del p
        for name, select in methods.items():
            l0 = load()
            t = time.perf_counter()
            idx = np.asarray(coreset.coreset_indices(key, flat, ratio, select=select))
            out[name].append((time.perf_counter() - t, l0, load()))
            sel[name] = idx
    first = next(iter(sel.values()))
    return [{"n": n, "ratio": ratio, "method": name, "s": statistics.median(t for t, _, _ in v),
             "s_all": [t for t, _, _ in v], "loadavg": [(a, b) for _, a, b in v],
             "projection_s": statistics.median(proj_s), "n_select": int(len(sel[name])),
             "identical": bool(np.array_equal(sel[name], first))} for name, v in out.items()]


# ----------------------------------------------------------------------------- main
def fmt_table(knn_rows, core_rows) -> str:
    lines = []
    if knn_rows:
        lines += md_table(
            ("bank M", "k", "method", "ms / image", "min", "GFLOP/s", "vs knn", "identical", "proven by the bound"),
            [(r["bank"], r["k"], r["method"], fmt(r["ms_per_image"], ".1f"), fmt(r["ms_min"], ".1f"),
              fmt(r["gflops"], ".0f"), fmt(r["vs_knn"], ".2f"),
              "-" if r["identical"] is None else (f"{r['identical']:.4f} agree" if isinstance(r["identical"], float)
                                                  else str(r["identical"])),
              fmt(r["dense_proven"], ".2%")) for r in knn_rows if r["method"] != "_setup"])
    if core_rows:
        lines += [""] + md_table(
            ("coreset N", "ratio", "method", "seconds (median)", "projection s", "selected", "identical"),
            [(r["n"], r["ratio"], r["method"], fmt(r["s"], ".2f"), fmt(r["projection_s"], ".2f"), r["n_select"],
              r["identical"]) for r in core_rows])
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--quick", action="store_true", help="small: 60 train / 4 test images, banks 500,2000, "
                   "coreset 50k points, 2 rounds")
    p.add_argument("--features", choices=("elpv", "synthetic"), default="elpv")
    p.add_argument("--cache", type=Path, default=Path(os.path.expanduser("~/.cache/pn_jax/bench_knn")))
    p.add_argument("--train-images", type=int, default=None, help="ELPV train+holdout images (default 700)")
    p.add_argument("--test-images", type=int, default=None, help="query images (default 8)")
    p.add_argument("--banks", default=None, help="bank sizes M (default 2000,7000)")
    p.add_argument("--ks", default="1,9")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    p.add_argument("--block", type=int, default=8192, help="bank rows per matmul")
    p.add_argument("--coreset-n", type=int, default=None,
                   help="points for the coreset timing (default 700416 = 684 images x 1024 patches)")
    p.add_argument("--coreset-ratio", type=float, default=0.01)
    p.add_argument("--coreset-rounds", type=int, default=None, help="default 2")
    p.add_argument("--skip-knn", action="store_true")
    p.add_argument("--skip-coreset", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    q = a.quick
    a.train_images = a.train_images or (60 if q else 700)
    a.test_images = a.test_images or (4 if q else 8)
    a.banks = [int(x) for x in (a.banks or ("500,2000" if q else "2000,7000")).split(",")]
    a.ks = [int(x) for x in a.ks.split(",")]
    a.rounds = a.rounds or (2 if q else 3)
    a.coreset_n = a.coreset_n or (50 * 1024 if q else 684 * 1024)
    a.coreset_rounds = a.coreset_rounds or (1 if q else 2)
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    import jax

    from pn_jax import hardware

    if a.features == "elpv":
        train, test = elpv_features(a.cache, a.train_images, a.test_images)
    else:
        train, test = synthetic_features(max(a.coreset_n, a.train_images * 1024), a.test_images)
    if a.coreset_n > len(train) and not a.skip_coreset:
        sys.exit(f"bench_knn: --coreset-n {a.coreset_n} > the {len(train)} train patches; "
                 f"raise --train-images (1024 patches each) or lower --coreset-n")
    test = test[:a.test_images]
    knn_rows = [] if a.skip_knn else knn_table(train, test, a.banks, a.ks, rounds=a.rounds, block=a.block,
                                               seed=a.seed)
    core_rows = [] if a.skip_coreset else coreset_table(train, a.coreset_n, a.coreset_ratio, a.coreset_rounds, a.seed)
    table = f"CPU: {hardware.describe_cpu()}\n" + fmt_table(knn_rows, core_rows)
    print(table)
    doc = {"features": a.features, "n_train_patches": int(len(train)), "n_query_images": int(len(test)),
           "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
           "machine": {"cpus": hardware.usable_cores(), "platform": platform.platform(), "cpu": hardware.describe_cpu(),
                       "knn_ranking_default": hardware.knn_ranking()}, "args": {
               k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
           "knn": knn_rows, "coreset": core_rows, "table": table}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2))
    return doc


if __name__ == "__main__":
    main()
