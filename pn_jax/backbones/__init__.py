"""Backbone registry: name -> (info, builder). A backbone maps [B, H, W, 3] normalised images
to a dict of named feature maps [B, h, w, C]; the extractor picks layers by name."""
from __future__ import annotations

import importlib
import os
from typing import Callable, Sequence

from jax import lax

from pn_jax.backbones.base import BackboneInfo, StageInfo

__all__ = ["BackboneInfo", "StageInfo", "UnknownBackboneError", "create", "info", "list_backbones", "weights_file"]


class UnknownBackboneError(KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""

# name -> module; modules load on first use so one broken or absent port never hides the rest.
_MODULES = {
    "wide_resnet50_2": "pn_jax.backbones.resnet",
    "resnet18": "pn_jax.backbones.resnet",
    "efficientnet_lite0": "pn_jax.backbones.efficientnet_lite",
}


def _module(name: str):
    if name not in _MODULES:
        raise UnknownBackboneError(f"unknown backbone {name!r}; known backbones: {', '.join(_MODULES)}")
    try:
        return importlib.import_module(_MODULES[name])
    except ModuleNotFoundError as e:
        if e.name != _MODULES[name]:
            raise
        raise UnknownBackboneError(f"backbone {name!r} is not available: module {e.name} is missing") from None


def info(name: str) -> BackboneInfo:
    mod = _module(name)
    return mod.INFOS[name] if hasattr(mod, "INFOS") else mod.INFO


def list_backbones() -> dict[str, BackboneInfo]:
    out = {}
    for name in _MODULES:
        try:
            out[name] = info(name)
        except UnknownBackboneError:  # port not present in this checkout
            continue
    return out


def create(
    name: str,
    weights: str | os.PathLike | None = None,
    layers: Sequence[str] | None = None,
    precision: lax.Precision | None = lax.Precision.HIGHEST,
) -> Callable:
    """Jitted feature extractor computing only up to the deepest of `layers`.

    `layers=None` returns every stage. `weights`: a file path (.pth or .safetensors), or None
    to look for the backbone's published weights file in the usual places (torchvision's are
    downloaded into the torch hub cache when absent, unless `pn_jax.download` says not to).
    ResNets also take "random": seeded random weights, for speed tests only. `precision`: of
    every convolution and matmul (`pn_jax.precision.of(cfg)`; None = the backend's default).
    """
    bi = info(name)
    if layers is not None:
        layers = tuple(layers)
        unknown = [l for l in layers if l not in bi.stages]
        if unknown or not layers:
            raise ValueError(
                f"backbone {name!r} has no layer(s) {unknown or '(none given)'}; "
                f"its stages are: {', '.join(bi.stages)}"
            )
    else:
        layers = tuple(bi.stages)
    mod = _module(name)
    if hasattr(mod, "INFOS"):
        return mod.build(name, weights=weights, layers=layers, precision=precision)
    return mod.build(weights, layers=layers, precision=precision)


def weights_file(name: str, weights: str | os.PathLike | None = None):
    """The weights file `create(name, weights)` loads (raises the same not-found error)."""
    from pn_jax import weights as wio

    mod = _module(name)
    if hasattr(mod, "INFOS"):  # a lookup only: building the backbone is what downloads
        return mod.find_weights_file(name, weights, download=False)
    if hasattr(mod, "find_weights_file"):
        return mod.find_weights_file(weights)
    bi = info(name)
    return wio.find_weights(bi.weight_file, explicit=weights, help=bi.weight_help)
