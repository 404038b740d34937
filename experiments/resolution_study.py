"""What resolution buys (issue 26): image sizes 256-1024 px and tiles of 256 px, PatchCore
against the default score, on ELPV and on a seeded small-defect set made at 1024 px.

    python -m experiments.resolution_study --out docs/resolution --datasets elpv        # 20 + 20 images
    python -m experiments.resolution_study --out docs/resolution --datasets texture,pattern --n-train 10 --n-test 12
    python -m experiments.resolution_study --out docs/resolution   # renders every row done (kept, not rerun)

(the README's rows: about 45 min on the 2-core CPU at load 4-15). A run done is kept in
<out>/<dataset>_<setting>.row.json and not repeated; delete it to measure it again.

Each (dataset, setting) runs in a fresh process (`--one`): the library fits one model (the
default score; under `--max-memory`, so the train features stream to disk) and scores the
test images once with both scores (PatchCore = the same bank's nearest-neighbour distance,
`--method patchcore`'s score, taken from the same search). The parent reads the child's
peak RSS and CPU time from wait4 (`bench.timed_run`'s way). Writes results.json, table.md
and resolution.png; every timing is printed beside the CPU model and its flags.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from experiments import bench

SETTINGS = ("256", "384", "512", "768", "1024", "512/t256", "1024/t256")
PER_POSITION = ("512/t256/pp", "1024/t256/pp")  # --tile-bank per-position (run with --settings)
DATASETS = ("elpv", "texture", "pattern")  # ELPV mono; the small-defect categories
OVERLAP = 32


def setting_flags(s: str) -> list[str]:
    """"SIZE", "SIZE/tTILE", or "SIZE/tTILE/pp" (a bank per tile position, --tile-bank per-position)."""
    s, per_position = (s[:-3], True) if s.endswith("/pp") else (s, False)
    size, _, tile = s.partition("/t")
    out = ["--image-size", size]
    return (out + (["--tile", tile, "--tile-overlap", str(OVERLAP)] if tile else [])
            + (["--tile-bank", "per-position"] if per_position else []))


def run_argv(ds: str, setting: str, a) -> list[str]:
    data = (["--dataset", "elpv", "--category", "mono"] if ds == "elpv" else
            ["--dataset", "mvtec_ad", "--data-root", str(a.small_root), "--category", ds])
    return data + setting_flags(setting) + ["--max-train", str(a.n_train), "--max-test", str(a.n_test),
                                            "--max-memory", str(a.max_memory), "--batch-size", "4",
                                            "--backbone", "efficientnet_lite0"]


# ----------------------------------------------------------------------------- one run (child)
def one(argv: list[str], out: str) -> None:
    import numpy as np

    from pn_jax import batches, cli, fitting, metrics, runner, timing

    a = cli.build_run_parser().parse_args(argv)
    cfg = cli.build_config(a)
    cat = a.category[0]
    src = runner.load_sources(cfg, cat, max_train=a.max_train, max_test=a.max_test)
    runner.check_memory(cfg, len(src["train"]), src)
    timer = timing.Timer()
    t0 = time.perf_counter()
    model = fitting.fit(cfg, src["train"], category=cat, timer=timer, log=lambda *_: None)
    t_fit = time.perf_counter() - t0
    masks = runner.has_masks(cfg, src["test"])
    t0 = time.perf_counter()
    res = batches.score_source({"m": model}, src["test"], timer, variants=(None, "patchcore"), keep_maps=masks)
    t_test = time.perf_counter() - t0
    allm = metrics.evaluate_all(res, masks)
    keep = ("mAUROC_sp_max", "mAUROC_px", "mAUPRO_px")
    doc = {"argv": argv, "n_train": len(src["train"]), "n_test": len(src["test"]),
           "n_anomalous": int(np.sum(res["labels"])), "bank": int(model.state.bank.shape[0]),
           "patches_per_image": model.provenance.get("train_patches", 0) // max(1, len(src["train"])),
           "fit_s": t_fit, "test_s": t_test, "timings": {k: float(v) for k, v in timer.items()},
           "metrics": {name: {k: allm[("m", v)].get(k) for k in keep}
                       for name, v in (("default", None), ("patchcore", "patchcore"))}}
    Path(out).write_text(json.dumps(doc, indent=1, default=float))


# ----------------------------------------------------------------------------- the study
def run_all(a) -> dict:
    from pn_jax import hardware
    from pn_jax.data import small_defects

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for ds in a.datasets:
        if ds != "elpv":  # 20 train; 10 good + 5 of each defect type to test (capped by --n-train/--n-test)
            small_defects.generate(str(a.small_root), ds, n_train=20, n_test_good=10, n_test_defect=5)
    rows = []
    order = list(dict.fromkeys(a.settings + a.elpv_settings))
    for s, ds in [(s, ds) for s in order for ds in a.datasets]:  # every dataset at a size before the next size
        if s not in (a.elpv_settings if ds == "elpv" else a.settings):
            continue
        tag = f"{ds}_{s.replace('/', '_')}"
        if (out / f"{tag}.row.json").exists():  # done by an earlier (interrupted) study: kept
            rows.append(json.loads((out / f"{tag}.row.json").read_text()))
            continue
        bench.log(f"{tag}: start")
        child = [sys.executable, "-m", "experiments.resolution_study", "--one", str(out / f"{tag}.json"), "--"]
        with open(out / f"{tag}.log", "w") as fh:
            t0 = time.perf_counter()
            p = subprocess.Popen(child + run_argv(ds, s, a), stdout=fh, stderr=subprocess.STDOUT,
                                 cwd=bench.REPO)
            _, status, ru = os.wait4(p.pid, 0)
            wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            rows.append({"dataset": ds, "setting": s, "error": (out / f"{tag}.log").read_text()[-400:]})
            bench.log(f"{tag}: FAILED (see {tag}.log)")
            continue
        r = json.loads((out / f"{tag}.json").read_text())
        r.update(dataset=ds, setting=s, wall_s=wall, cpu_s=ru.ru_utime + ru.ru_stime,
                 peak_rss_gb=ru.ru_maxrss * 1024 / 1e9, load=bench.load())
        rows.append(r)
        (out / f"{tag}.row.json").write_text(json.dumps(r, default=float))
        bench.log(f"{tag}: {wall:.0f} s, peak {r['peak_rss_gb']:.2f} GB, "
                  f"I-AUROC {r['metrics']['default']['mAUROC_sp_max']}")
    doc = {"cpu": hardware.describe_cpu(), "counts": {"n_train": a.n_train, "n_test": a.n_test},
           "max_memory_gb": a.max_memory, "tile_overlap": OVERLAP, "rows": rows}
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=float))
    (out / "table.md").write_text(table(doc))
    figure(doc, out / "resolution.png")
    return doc


def _p(x):
    return "-" if x is None or x != x else f"{x:.1f}"  # metrics come in percent


def table(doc: dict) -> str:
    L = [f"CPU: {doc['cpu']}. `--max-memory {doc['max_memory_gb']:g}`, tiles overlap {doc['tile_overlap']} px. "
         "I / P / PRO: image AUROC, pixel AUROC, AUPRO (%); s/img: wall time of the fresh process "
         "(compilation included) / (train + test images), at the machine's load average (shared: other "
         "jobs ran beside it).", "",
         "| dataset | setting | train / test | patches/img | PatchCore I / P / PRO | default I / P / PRO | s/img | "
         "load | peak RSS GB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        if "error" in r:
            L.append(f"| {r['dataset']} | {r['setting']} | failed: {r['error'].splitlines()[-1][:80]} |||||")
            continue
        m = r["metrics"]
        cell = lambda k: " / ".join(_p(m[k][x]) for x in ("mAUROC_sp_max", "mAUROC_px", "mAUPRO_px"))  # noqa: E731
        L.append(f"| {r['dataset']} | {r['setting']} | {r['n_train']} / {r['n_test']} | {r['patches_per_image']} | "
                 f"{cell('patchcore')} | "
                 f"{cell('default')} | {r['wall_s'] / (r['n_train'] + r['n_test']):.2f} | {r['load']:.0f} | "
                 f"{r['peak_rss_gb']:.2f} |")
    return "\n".join(L) + "\n"


def figure(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if "error" not in r]
    dss = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    order = [s for s in SETTINGS + PER_POSITION if any(r["setting"] == s for r in rows)]  # one x per setting
    for ds in dss:
        rs = sorted((r for r in rows if r["dataset"] == ds), key=lambda r: order.index(r["setting"]))
        x = [order.index(r["setting"]) for r in rs]
        for name, style in (("default", "-o"), ("patchcore", "--s")):
            axes[0].plot(x, [r["metrics"][name]["mAUROC_sp_max"] or 0 for r in rs], style,
                         label=f"{ds} {name}")
        axes[1].plot(x, [r["wall_s"] / (r["n_train"] + r["n_test"]) for r in rs], "-o", label=ds)
    for ax in axes:
        ax.set_xticks(range(len(order)), order, rotation=30)
    axes[0].set_ylabel("image AUROC (%)")
    axes[1].set_ylabel("s / image (2-core CPU)")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.suptitle("Resolution and tiles: " + doc["cpu"][:60], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def coreset_cost(n_train: int, size: int, factor: float) -> dict:
    """The two-stage coreset (--coreset-preselect) against the exact greedy on ELPV mono train
    features: time, points in common, and the covering radius (the largest distance of a train
    patch to its nearest bank row, in the projection the greedy works in: what k-center minimises)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pn_jax import cli, coreset, knn, model as model_lib, runner

    cfg = cli.build_config(cli.build_run_parser().parse_args(
        ["--dataset", "elpv", "--image-size", str(size), "--max-train", str(n_train)]))
    src = runner.load_sources(cfg, "mono", max_train=n_train, max_test=1)
    flat = model_lib.Model(cfg, (0, 0), None).extract(src["train"]).reshape(-1, cfg.model.target_embed_dimension)
    key = jax.random.split(jax.random.key(cfg.seed))[0]  # fitting.fit_state's coreset key
    proj = np.asarray(coreset.project_chunked(flat, coreset.random_projection(coreset.projection_key(key),
                                                                              flat.shape[1], 128)))
    out = {"rows": len(flat), "n_train": n_train, "image_size": size, "factor": factor}
    sel = {}
    for name, pre in (("exact", 0.0), ("preselect", factor)):
        t0 = time.perf_counter()
        sel[name] = np.asarray(coreset.coreset_indices(key, flat, cfg.bank.coreset_ratio, preselect=pre))
        t = time.perf_counter() - t0
        d, _ = knn.knn(jnp.asarray(proj), jnp.asarray(proj[sel[name]]), k=1)
        out[name] = {"s": t, "bank": len(sel[name]),
                     "covering_radius": float(jnp.max(d)), "mean_nn_distance": float(jnp.mean(d))}
    out["common_points"] = len(np.intersect1d(sel["exact"], sel["preselect"]))
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--one"]:
        return one(argv[3:], argv[1])  # --one OUT.json -- <experiments.run flags>
    if argv[:1] == ["--coreset-cost"]:  # --coreset-cost N_TRAIN SIZE FACTOR
        return print(json.dumps(coreset_cost(int(argv[1]), int(argv[2]), float(argv[3])), indent=1))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/resolution")
    p.add_argument("--settings", default=",".join(SETTINGS), type=lambda s: s.split(","))
    p.add_argument("--elpv-settings", default="256,384,512,512/t256", type=lambda s: s.split(","),
                   help="ELPV's cells are 300 px: larger sizes only upsample them")
    p.add_argument("--datasets", default=",".join(DATASETS), type=lambda s: s.split(","))
    p.add_argument("--n-train", type=int, default=20)
    p.add_argument("--n-test", type=int, default=20)
    p.add_argument("--max-memory", type=float, default=8.0)
    p.add_argument("--small-root", type=Path, default=Path("data/small_defects"))
    a = p.parse_args(argv)
    bad = ([s for s in a.settings + a.elpv_settings if s not in SETTINGS + PER_POSITION]
           + [d for d in a.datasets if d not in DATASETS])
    if bad:
        p.error(f"unknown setting(s)/dataset(s) {bad}; settings: {SETTINGS + PER_POSITION}, datasets: {DATASETS}")
    print(table(run_all(a)))


if __name__ == "__main__":
    main()
