"""Backbone throughput: JAX ports vs their PyTorch references, on this machine.

    python -m experiments.bench_backbones --batch 8 --size 256 --iters 5 --out runs/bench
    # with the PyTorch reference as well (an env with torch, torchvision, jax):
    PYTHONPATH=. /work/venv-torch/bin/python -m experiments.bench_backbones

Each backbone runs only up to its default deepest layer (WRN-50-2 and ResNet-18: layer3,
EfficientNet-Lite0: blocks10). Compile time is excluded; every timed call ends with
block_until_ready (JAX) or a synchronise (torch on CUDA). ResNets use random weights when the
torchvision file is not found; speed does not depend on the values.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from pn_jax import backbones
from pn_jax import weights as wio
from pn_jax.backbones import resnet

DEFAULT = ("wide_resnet50_2", "resnet18", "efficientnet_lite0")


def _time(fns: dict, iters: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn. Calls are interleaved, so a busy (shared) machine
    slows every contender alike instead of whichever ran during the busy spell."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _state_dict(name: str) -> tuple[dict[str, np.ndarray], str]:
    """Real weights when found, else seeded random ones (same speed)."""
    info = backbones.info(name)
    if name in resnet.INFOS:
        try:
            path = wio.find_weights(info.weight_file)
            return wio.load_state_dict(path), f"real ({path.name})"
        except FileNotFoundError:
            return resnet.random_state_dict(name), f"random ({info.weight_file} not found)"
    from pn_jax.backbones import efficientnet_lite

    path = efficientnet_lite.find_weights_file()
    return wio.load_state_dict(path), f"real ({path.name})"


def _jax_fn(name: str, sd, layers):
    if name in resnet.INFOS:
        return resnet.build(name, state_dict=sd, layers=layers)
    from pn_jax.backbones import efficientnet_lite

    return efficientnet_lite.build(params=efficientnet_lite.convert_state_dict(sd), layers=layers)


def _torch_fn(name: str, sd, x_nhwc: np.ndarray, device: str):
    """A no-arg callable running the PyTorch reference up to the same layer, or None."""
    import torch

    tsd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
    x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))).to(device)
    if name in resnet.INFOS:
        import torchvision

        m = getattr(torchvision.models, name)(weights=None)
        m.load_state_dict(tsd, strict=False)  # fc absent from random weights
        m.eval().to(device)

        def run():
            h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            h2 = m.layer2(m.layer1(h))
            return h2, m.layer3(h2)
    else:
        from efficientnet_lite_pytorch import EfficientNet

        m = EfficientNet.from_name("efficientnet-lite0", image_size=None)
        m.load_state_dict(tsd, strict=True)
        m.eval().to(device)

        def run():
            h = m._swish(m._bn0(m._conv_stem(x)))
            outs = []
            for i, blk in enumerate(m._blocks[:11]):
                h = blk(h)
                if i in (4, 10):
                    outs.append(h)
            return outs

    def call():
        with torch.inference_mode():
            out = run()
        if device != "cpu":
            torch.cuda.synchronize()
        return out

    return call


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=list(DEFAULT))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--out", type=Path, default=None, help="write bench_backbones.json here")
    args = p.parse_args(argv)

    try:
        if args.no_torch:
            raise ImportError
        import torch

        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(threads)
        tdev = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
        torch_note = f"torch {torch.__version__} on {tdev}, {torch.get_num_threads()} threads"
    except ImportError:
        torch, tdev, torch_note = None, None, "torch not importable: PyTorch reference skipped"

    dev = jax.devices()[0]
    from pn_jax import hardware

    print(f"JAX {jax.__version__} on {dev.platform} ({dev.device_kind}); {torch_note}")
    print(f"CPU: {hardware.describe_cpu()}")
    print(f"batch {args.batch}, {args.size}x{args.size}, median of {args.iters} calls "
          f"(JAX and torch interleaved); load average {os.getloadavg()[0]:.1f}\n")

    x = np.random.default_rng(0).standard_normal((args.batch, args.size, args.size, 3)).astype(np.float32)
    xj = jax.device_put(x)
    rows = []
    for name in args.backbones:
        info = backbones.info(name)
        layers = tuple(info.default_layers)
        try:
            sd, wnote = _state_dict(name)
        except (FileNotFoundError, ImportError) as e:
            print(f"skipping {name}: {e}")
            continue
        fn = _jax_fn(name, sd, layers)
        fns = {"jax": lambda: jax.block_until_ready(fn(xj))}
        if torch is not None:
            try:
                fns["torch"] = _torch_fn(name, sd, x, tdev)
            except ImportError as e:
                print(f"{name}: PyTorch reference unavailable ({e})")
        t = _time(fns, args.iters)
        row = {"backbone": name, "layers": list(layers), "weights": wnote,
               "jax_img_s": args.batch / t["jax"], "torch_img_s": None, "jax_over_torch": None}
        if "torch" in t:
            row["torch_img_s"] = args.batch / t["torch"]
            row["jax_over_torch"] = t["torch"] / t["jax"]
        rows.append(row)
        print(f"  {name}: {row['jax_img_s']:.2f} img/s (JAX)", flush=True)

    print("\n| backbone | up to | weights | JAX img/s | torch img/s | JAX / torch |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        t = f"{r['torch_img_s']:.2f}" if r["torch_img_s"] else "-"
        ratio = f"{r['jax_over_torch']:.2f}x" if r["jax_over_torch"] else "-"
        print(f"| {r['backbone']} | {r['layers'][-1]} | {r['weights']} | {r['jax_img_s']:.2f} | {t} | {ratio} |")

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"jax": jax.__version__, "device": f"{dev.platform} {dev.device_kind}",
                "torch": torch_note, "batch": args.batch, "size": args.size, "iters": args.iters,
                "host": platform.node(), "cpus": os.cpu_count(), "cpu": hardware.describe_cpu()}
        (args.out / "bench_backbones.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"\nwrote {args.out / 'bench_backbones.json'}")
    return rows


if __name__ == "__main__":
    main()
