"""torchvision ResNet-18 and Wide-ResNet-50-2 as pure JAX functions (NHWC, inference only).

Weights come from torchvision state dicts. Every BatchNorm is folded into the conv before
it at load time (w' = w * gamma / sqrt(var + eps), b' = beta - mean * gamma / sqrt(var + eps)),
so the forward pass is convs, ReLUs, adds and one max-pool.
"""
from __future__ import annotations

import functools
import os
import zlib
from pathlib import Path
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pn_jax import weights as wio
from pn_jax.backbones.base import BackboneInfo, StageInfo

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BN_EPS = 1e-5
HIGHEST = jax.lax.Precision.HIGHEST  # float32 convolutions on every backend (pn_jax.precision)
STAGES = ("layer1", "layer2", "layer3", "layer4")

# name -> (block kind, blocks per stage, width of the 3x3 conv per unit of `planes`)
_ARCH = {
    "resnet18": ("basic", (2, 2, 2, 2), 1),
    # torchvision wide_resnet50_2: Bottleneck, width_per_group = 64 * 2 -> 3x3 width = 2 * planes
    "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3), 2),
}
_PLANES = (64, 128, 256, 512)
_FILES = {"resnet18": "resnet18-f37072fd.pth", "wide_resnet50_2": "wide_resnet50_2-95faca4d.pth"}


def _info(name: str) -> BackboneInfo:
    kind = _ARCH[name][0]
    expansion = 1 if kind == "basic" else 4
    stages = {
        s: StageInfo(stride=4 * 2**i, channels=p * expansion, doc=f"torchvision {name}.{s} output")
        for i, (s, p) in enumerate(zip(STAGES, _PLANES))
    }
    return BackboneInfo(
        name=name,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        stages=stages,
        default_layers=("layer2", "layer3"),
        weight_file=_FILES[name],
        weight_help=wio.torchvision_help(_FILES[name], name),
    )


INFOS: dict[str, BackboneInfo] = {n: _info(n) for n in _ARCH}
RESNET18_INFO = INFOS["resnet18"]
WIDE_RESNET50_2_INFO = INFOS["wide_resnet50_2"]


# --------------------------------------------------------------------------------------
# Architecture description: the conv+bn pairs, in torchvision names
# --------------------------------------------------------------------------------------

def _blocks(name: str):
    """Yield (stage, block prefix, [(conv, bn, stride, pad)], downsample (conv, bn, stride)|None,
    in_ch, [conv shapes OIHW])."""
    kind, counts, wmul = _ARCH[name]
    expansion = 1 if kind == "basic" else 4
    inplanes = 64
    for si, (stage, planes, n) in enumerate(zip(STAGES, _PLANES, counts)):
        for bi in range(n):
            stride = 2 if (bi == 0 and si > 0) else 1
            p = f"{stage}.{bi}"
            out = planes * expansion
            if kind == "basic":
                convs = [
                    (f"{p}.conv1", f"{p}.bn1", stride, 1, (planes, inplanes, 3, 3)),
                    (f"{p}.conv2", f"{p}.bn2", 1, 1, (planes, planes, 3, 3)),
                ]
            else:
                width = planes * wmul
                convs = [
                    (f"{p}.conv1", f"{p}.bn1", 1, 0, (width, inplanes, 1, 1)),
                    (f"{p}.conv2", f"{p}.bn2", stride, 1, (width, width, 3, 3)),
                    (f"{p}.conv3", f"{p}.bn3", 1, 0, (out, width, 1, 1)),
                ]
            down = None
            if stride != 1 or inplanes != out:
                down = (f"{p}.downsample.0", f"{p}.downsample.1", stride, 0, (out, inplanes, 1, 1))
            yield stage, p, convs, down
            inplanes = out


def _conv_table(name: str):
    """[(stage or 'stem', conv name, bn name, OIHW shape)] for every conv, in forward order."""
    rows = [("stem", "conv1", "bn1", (64, 3, 7, 7))]
    for stage, _, convs, down in _blocks(name):
        for c, b, _, _, shape in convs:
            rows.append((stage, c, b, shape))
        if down is not None:
            rows.append((stage, down[0], down[1], down[4]))
    return rows


def torch_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """The torchvision state-dict keys we need, with shapes (no `fc.*`, no batch counters)."""
    out: dict[str, tuple[int, ...]] = {}
    for _, conv, bn, shape in _conv_table(name):
        out[f"{conv}.weight"] = shape
        for k in ("weight", "bias", "running_mean", "running_var"):
            out[f"{bn}.{k}"] = (shape[0],)
    return out


def _ignored(key: str) -> bool:
    # The classifier is not part of a feature extractor; batch counters carry no weights.
    return key.startswith("fc.") or key.endswith(".num_batches_tracked")


# --------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------

def convert_state_dict(
    name: str, state_dict: Mapping[str, np.ndarray], source: str = "state dict"
) -> dict[str, dict[str, np.ndarray]]:
    """Strictly check a torchvision state dict and fold BN: {conv name: {"w": HWIO, "b": [O]}}."""
    if name not in _ARCH:
        raise KeyError(f"unknown ResNet {name!r}; known: {sorted(_ARCH)}")
    got = {k: v for k, v in state_dict.items() if not _ignored(k)}
    wio.check_mapping(torch_shapes(name), got, source=f"{source} (as {name})")
    params = {}
    for _, conv, bn, _ in _conv_table(name):
        w = np.asarray(got[f"{conv}.weight"], np.float64)
        gamma, beta, mean, var = (
            np.asarray(got[f"{bn}.{k}"], np.float64)
            for k in ("weight", "bias", "running_mean", "running_var")
        )
        scale = gamma / np.sqrt(var + BN_EPS)
        params[conv] = {
            "w": np.ascontiguousarray((w * scale[:, None, None, None]).transpose(2, 3, 1, 0), np.float32),
            "b": (beta - mean * scale).astype(np.float32),
        }
    return params


def random_state_dict(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Seed-reproducible torchvision-layout weights (numpy only), for tests and benchmarks.

    Each tensor draws from its own generator keyed by (seed, crc32(key)), so the values do not
    depend on iteration order. BN statistics are random too, or a parity test would not notice
    a mishandled running mean/var.
    """
    out: dict[str, np.ndarray] = {}
    for key, shape in torch_shapes(name).items():
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
        if key.endswith(".running_mean"):
            v = rng.normal(0.0, 0.2, shape)
        elif key.endswith(".running_var"):
            v = rng.uniform(0.5, 2.0, shape)
        elif key.endswith(".bias"):
            v = rng.normal(0.0, 0.2, shape)
        elif len(shape) == 1:  # bn gamma; a small last gamma per residual branch keeps depth tame
            branch_end = ".bn2.weight" if _ARCH[name][0] == "basic" else ".bn3.weight"
            lo, hi = (0.2, 0.6) if key.endswith(branch_end) else (0.7, 1.3)
            v = rng.uniform(lo, hi, shape)
        else:  # conv OIHW, He init on fan-in
            fan_in = shape[1] * shape[2] * shape[3]
            v = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        out[key] = v.astype(np.float32)
    return out


# --------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------

def _conv(x, p, stride: int, pad: int, precision):
    y = jax.lax.conv_general_dilated(
        x, p["w"], (stride, stride), ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision,
    )
    return y + p["b"]


def _max_pool_3x3_s2(x):
    # torch pads with -inf, so padded cells never win.
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    )


def forward(name: str, params, x, layers: Sequence[str], precision=HIGHEST) -> dict[str, jax.Array]:
    """x: [B, H, W, 3] normalised images -> {layer: [B, h, w, C]} for the requested layers.
    `precision`: of every convolution (`pn_jax.precision`; None = the backend's default)."""
    deepest = max(STAGES.index(l) for l in layers)
    conv = functools.partial(_conv, precision=precision)
    x = jax.nn.relu(conv(x, params["conv1"], 2, 3))
    x = _max_pool_3x3_s2(x)
    feats = {}
    for stage, _, convs, down in _blocks(name):
        if STAGES.index(stage) > deepest:
            break
        h = x
        for i, (c, _, stride, pad, _) in enumerate(convs):
            h = conv(h, params[c], stride, pad)
            if i < len(convs) - 1:
                h = jax.nn.relu(h)
        skip = x if down is None else conv(x, params[down[0]], down[2], down[3])
        x = jax.nn.relu(h + skip)
        feats[stage] = x  # overwritten until the stage's last block
    return {l: feats[l] for l in layers}


class ResNetBackbone:
    """Callable feature extractor: images [B, H, W, 3] -> {layer: [B, h, w, C]} (jitted)."""

    def __init__(self, name: str, params, layers: Sequence[str] | None = None, precision=HIGHEST):
        layers = tuple(layers) if layers else STAGES
        unknown = [l for l in layers if l not in STAGES]
        if unknown:
            raise ValueError(f"{name} has no layer(s) {unknown}; its stages are {list(STAGES)}")
        self.name = name
        self.info = INFOS[name]
        self.layers = layers
        deepest = max(STAGES.index(l) for l in layers)
        keep = {"stem", *STAGES[: deepest + 1]}
        needed = {c for st, c, _, _ in _conv_table(name) if st in keep}
        # Only the convs up to the deepest requested stage go to the device.
        self.params = jax.device_put({k: v for k, v in params.items() if k in needed})
        self._fn = jax.jit(functools.partial(forward, name, layers=layers, precision=precision))

    def __call__(self, images) -> dict[str, jax.Array]:
        return self._fn(self.params, images)


def find_weights_file(name: str, weights: str | os.PathLike | None = None, download: bool = True) -> Path:
    """An explicit path, or torchvision's file from the torch hub cache, downloaded there
    first when absent if `download` (and `pn_jax.download` allows it)."""
    info = INFOS[name]
    return wio.find_weights(info.weight_file, explicit=weights, help=info.weight_help,
                            url=wio.torchvision_url(info.weight_file) if download else None)


def build(
    name: str,
    weights: str | None = None,
    layers: Sequence[str] | None = None,
    state_dict: Mapping[str, np.ndarray] | None = None,
    precision=HIGHEST,
) -> Callable:
    """ResNet feature extractor from a torchvision weights file or an in-memory state dict.

    `weights`: a path, None (the torchvision file from the torch hub cache, downloaded
    there when absent and allowed), or "random" (seeded `random_state_dict`, for benchmarks
    and smoke tests only). `precision`: of every convolution (None = the backend's default).
    """
    if name not in _ARCH:
        raise KeyError(f"unknown ResNet {name!r}; known: {sorted(_ARCH)}")
    if state_dict is not None:
        source = "in-memory state dict"
    elif weights == "random":
        state_dict, source = random_state_dict(name), "random weights"
    else:
        path = find_weights_file(name, weights)
        state_dict, source = wio.load_state_dict(path), str(path)
    return ResNetBackbone(name, convert_state_dict(name, state_dict, source), layers, precision)
