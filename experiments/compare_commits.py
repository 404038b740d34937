"""Side by side: the same `python -m experiments.run` command on this checkout and on another
commit (checked out in a temporary git worktree, sharing this venv), interleaved, cold, each
in a fresh process. Reports wall time, CPU use and peak RSS per run, the speed-up as a ratio
of medians, and whether the metrics are identical.

    python -m experiments.compare_commits --base 164a564 --rounds 3 --out results/compare -- \\
        --dataset elpv --category all --method patchcore --holdout-fraction 0.1 --figures 0

Everything after `--` is passed to both runs (an `--out` per run is added). Pick flags that
both commits understand and that mean the same protocol on both, or the metrics differ for a
reason other than speed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def run_once(cwd: str, args: list[str], out: str) -> dict:
    env = {**os.environ, "PYTHONPATH": cwd, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "experiments.run", *args, "--out", out]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, _ = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"run failed in {cwd} (exit {proc.returncode}):\n{log[-3000:]}")
    with open(os.path.join(out, "results.json")) as fh:
        res = json.load(fh)
    return {"wall_s": wall, "results": res, "log_tail": log[-2000:]}


RENAMED = {"mF1_max_sp": "mF1_max_sp_max"}  # ADer's name, fixed after 164a564


def metrics_of(res: dict) -> dict:
    return {c: {RENAMED.get(k, k): round(v, 6) for k, v in e["metrics"].items() if v is not None}
            for c, e in res["categories"].items()}


STAGES = ("extract_train_s", "extract_holdout_s", "coreset_s", "stats_s", "threshold_s", "checkpoint_s",
          "extract_test_s", "score_s", "metrics_s")


def stage_medians(runs: dict) -> dict:
    """{run name: {stage: median over rounds of the stage's seconds summed over categories}}."""
    import numpy as np

    out = {}
    for name, rs in runs.items():
        per_round = [{st: sum((e.get("timings") or {}).get(st, 0.0) for e in x["results"]["categories"].values())
                      for st in STAGES} for x in rs]
        out[name] = {st: float(np.median([r[st] for r in per_round])) for st in STAGES}
    return out


def stage_table(stages: dict, med: dict, base: str) -> str:
    lines = [f"| stage (all categories, median of rounds) | {base[:8]} s | this checkout s |", "|---|---:|---:|"]
    for st in STAGES:
        b, h = stages["base"][st], stages["head"][st]
        if b or h:
            lines.append(f"| {st[:-2]} | {b:.1f} | {h:.1f} |")
    lines.append(f"| **wall (fresh process, median)** | **{med['base']:.1f}** | **{med['head']:.1f}** |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        i = argv.index("--")
        own, passed = argv[:i], argv[i + 1:]
    else:
        own, passed = argv, []
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the commit to compare against")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="results/compare")
    a = p.parse_args(own)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.makedirs(a.out, exist_ok=True)
    wt = tempfile.mkdtemp(prefix="pn_jax-base-")
    subprocess.run(["git", "-C", here, "worktree", "add", "--detach", wt, a.base], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = {"base": [], "head": []}
    try:
        for r in range(a.rounds):
            for name, cwd in (("base", wt), ("head", here)):
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                out = run_once(cwd, passed, os.path.abspath(os.path.join(a.out, f"{name}_{r}")))
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                out.update(cpu_s=cpu, cpu_pct=100.0 * cpu / out["wall_s"], load=os.getloadavg()[0])
                runs[name].append(out)
                print(f"round {r} {name}: {out['wall_s']:.1f}s wall, {out['cpu_pct']:.0f}% CPU, "
                      f"load {out['load']:.1f}", flush=True)
    finally:
        subprocess.run(["git", "-C", here, "worktree", "remove", "--force", wt], check=False)
    import numpy as np

    from pn_jax import hardware

    med = {k: float(np.median([x["wall_s"] for x in v])) for k, v in runs.items()}
    same = all(metrics_of(x["results"]) == metrics_of(runs["base"][0]["results"]) for x in runs["base"]) and \
        all(metrics_of(x["results"]) == metrics_of(runs["base"][0]["results"]) for x in runs["head"])
    stages = stage_medians(runs)
    doc = {"base": a.base, "args": passed, "median_wall_s": med, "speedup": med["base"] / med["head"],
           "metrics_identical": same, "metrics": {k: metrics_of(v[0]["results"]) for k, v in runs.items()},
           "runs": {k: [{kk: vv for kk, vv in x.items() if kk != "results"} for x in v] for k, v in runs.items()},
           "stages": {k: {c: e.get("timings") for c, e in v[0]["results"]["categories"].items()}
                      for k, v in runs.items()},
           "stage_medians": stages, "cpu": hardware.describe_cpu(), "knn_ranking": hardware.knn_ranking()}
    with open(os.path.join(a.out, "compare.json"), "w") as fh:
        json.dump(doc, fh, indent=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for i, (k, v) in enumerate(runs.items()):
        ax.scatter([i] * len(v), [x["wall_s"] for x in v], label=k)
    ax.set_xticks([0, 1], [f"{a.base[:8]} (base)", "this checkout"])
    ax.set_ylabel("wall time, cold run (s)")
    ax.set_title(f"speed-up {doc['speedup']:.2f}x; metrics identical: {same}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "compare.png"), dpi=100)
    print(f"CPU: {doc['cpu']}")
    print(stage_table(stages, med, a.base))
    print(f"median wall: base {med['base']:.1f}s, this checkout {med['head']:.1f}s -> {doc['speedup']:.2f}x; "
          f"metrics identical: {same}; {os.path.join(a.out, 'compare.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
