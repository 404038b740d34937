"""How a unified (multi-class) bank's fit time and memory grow with the number of categories.

    python -m experiments.bench_unified --out results/bench_unified [--categories 1,2,4] [--image-size 128]

Each point is a fresh `python -m experiments.run --unified` process over n generated
synthetic categories (so its peak RSS is its own), efficientnet_lite0, 1% coreset. Writes
bench_unified.json / .md / .png and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from pn_jax import viz

CHILD = """
import resource, runpy, sys
sys.argv = ["experiments.run"] + sys.argv[1:]
try:
    runpy.run_module("experiments.run", run_name="__main__")
except SystemExit as e:
    code = e.code or 0
else:
    code = 0
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def run_point(n: int, a) -> dict:
    cats = [f"synthetic_{i}" for i in range(n)]
    out = os.path.join(a.out, f"n{n}")
    cmd = [sys.executable, "-c", CHILD, "--dataset", "synthetic", "--data-root", os.path.join(a.out, "data"),
           "--category", *cats, "--unified", "--image-size", str(a.image_size), "--figures", "0",
           "--out", out, "--coreset-ratio", str(a.coreset_ratio)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"unified run with {n} categories failed:\n{r.stderr[-3000:]}")
    rss_kb = int(next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("PEAK_RSS_KB")))
    res = json.load(open(os.path.join(out, "results.json")))
    first = next(iter(res["categories"].values()))
    t = first["timings"]
    fit_s = sum(v for k, v in t.items() if k.startswith("shared_") and k != "shared_total_s")
    return {"categories": n, "train_images": first["counts"]["train"], "bank": first["counts"]["bank"],
            "train_patches": first["counts"]["train_patches"], "fit_s": fit_s,
            "coreset_s": t.get("shared_coreset_s"), "wall_s": wall, "peak_rss_gb": rss_kb / 1e6,
            "mean_image_auroc": res["mean"]["mAUROC_sp_max"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/bench_unified")
    p.add_argument("--categories", default="1,2,4")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--coreset-ratio", type=float, default=0.01)
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    rows = [run_point(int(n), a) for n in a.categories.split(",")]
    lines = ["| categories | train images | train patches | bank | fit s | coreset s | peak RSS GB | wall s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['categories']} | {r['train_images']} | {r['train_patches']} | {r['bank']} | {r['fit_s']:.1f} | "
              f"{r['coreset_s']:.1f} | {r['peak_rss_gb']:.2f} | {r['wall_s']:.1f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(a.out, "bench_unified.json"), "w") as f:
        json.dump({"rows": rows, "image_size": a.image_size, "coreset_ratio": a.coreset_ratio}, f, indent=2)
    with open(os.path.join(a.out, "bench_unified.md"), "w") as f:
        f.write("# Unified bank: fit time and memory vs number of categories\n\n" + table + "\n")
    n = [r["categories"] for r in rows]
    viz.plot_curves(os.path.join(a.out, "bench_unified.png"),
                    {"fit s": (n, [r["fit_s"] for r in rows]), "peak RSS GB x10": (n, [10 * r["peak_rss_gb"] for r in rows])},
                    "categories in the bank", "seconds / GB x10", "unified bank scaling")
    return 0


if __name__ == "__main__":
    sys.exit(main())
