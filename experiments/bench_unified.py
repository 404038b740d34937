"""How a unified (multi-class) bank's fit time and memory grow with the number of categories.

    python -m experiments.bench_unified --out results/bench_unified [--categories 1,2,4,8] [--image-size 128]

Each point is a fresh `python -m experiments.run --unified` process over n generated synthetic
categories (seeded by their names, so no two are the same images), efficientnet_lite0, 1%
coreset; its wall time, CPU time and peak RSS come from the operating system (wait4), its fit
stages from its results.json. Writes bench_unified.json / .md / .png and prints the table.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from experiments.bench import timed_run
from pn_jax import viz


def distinct_categories(root: str, cats: list[str]) -> int:
    """How many of the categories' first train images differ (byte hash): all of them when the
    generator seeds each category by its name."""
    digests = set()
    for c in cats:
        folder = os.path.join(root, c, "train", "good")
        first = sorted(os.listdir(folder))[0]
        with open(os.path.join(folder, first), "rb") as fh:
            digests.add(hashlib.sha256(fh.read()).hexdigest())
    return len(digests)


def run_point(n: int, a) -> dict:
    cats = [f"synthetic_{i}" for i in range(n)]
    out = os.path.join(a.out, f"n{n}")
    data_root = os.path.join(a.out, "data")
    argv = ["--dataset", "synthetic", "--data-root", data_root, "--category", *cats, "--unified",
            "--image-size", str(a.image_size), "--figures", "0", "--out", out,
            "--coreset-ratio", str(a.coreset_ratio), "--no-download"]
    run = timed_run(argv, Path(out + ".log"), label=f"unified run with {n} categories")
    res = json.load(open(os.path.join(out, "results.json")))
    first = next(iter(res["categories"].values()))
    t = first["timings"]
    fit_s = sum(v for k, v in t.items() if k.startswith("shared_") and k != "shared_total_s")
    return {"categories": n, "distinct_categories": distinct_categories(data_root, cats),
            "train_images": first["counts"]["train"], "bank": first["counts"]["bank"],
            "train_patches": first["counts"]["train_patches"], "fit_s": fit_s,
            "coreset_s": t.get("shared_coreset_s"), "wall_s": run["wall_s"], "cpu_percent": run["cpu_percent"],
            "peak_rss_gb": run["peak_rss_gb"], "loadavg": run["loadavg"],
            "mean_image_auroc": res["mean"]["mAUROC_sp_max"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/bench_unified")
    p.add_argument("--categories", default="1,2,4,8")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--coreset-ratio", type=float, default=0.01)
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for n in a.categories.split(","):
        rows.append(run_point(int(n), a))
        r = rows[-1]
        print(f"{r['categories']} categories: fit {r['fit_s']:.1f} s, wall {r['wall_s']:.1f} s, "
              f"load {r['loadavg'][0]:.1f}", flush=True)
    lines = ["| categories | distinct | train images | train patches | bank | fit s | coreset s | peak RSS GB "
             "| wall s | CPU % | load | mean image AUROC |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['categories']} | {r['distinct_categories']} | {r['train_images']} | {r['train_patches']} | "
              f"{r['bank']} | {r['fit_s']:.1f} | {r['coreset_s']:.1f} | {r['peak_rss_gb']:.2f} | {r['wall_s']:.1f} | "
              f"{r['cpu_percent']:.0f} | {r['loadavg'][0]:.1f} | {r['mean_image_auroc']:.1f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(a.out, "bench_unified.json"), "w") as f:
        json.dump({"rows": rows, "image_size": a.image_size, "coreset_ratio": a.coreset_ratio,
                   "cpus": os.cpu_count()}, f, indent=2)
    with open(os.path.join(a.out, "bench_unified.md"), "w") as f:
        f.write("# Unified bank: fit time and memory vs number of categories\n\n"
                f"Fresh `python -m experiments.run --unified` per row, {a.image_size} px, coreset "
                f"{a.coreset_ratio}; `distinct`: categories whose first train image differs (byte hash).\n\n"
                + table + "\n")
    n = [r["categories"] for r in rows]
    viz.plot_curves(os.path.join(a.out, "bench_unified.png"),
                    {"fit s": (n, [r["fit_s"] for r in rows]),
                     "peak RSS GB x10": (n, [10 * r["peak_rss_gb"] for r in rows])},
                    "categories in the bank", "seconds / GB x10", "unified bank scaling")
    return 0


if __name__ == "__main__":
    sys.exit(main())
