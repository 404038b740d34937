"""What every backbone declares about itself."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class StageInfo:
    stride: int
    channels: int
    doc: str = ""


@dataclasses.dataclass(frozen=True)
class BackboneInfo:
    name: str
    # Per-channel input normalisation on a 0..1 pixel scale; the data pipeline applies it,
    # the backbone never normalises again.
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    stages: dict[str, StageInfo]  # in forward order
    default_layers: tuple[str, ...]
    weight_file: str  # canonical file name, e.g. torchvision's "resnet18-f37072fd.pth"
    weight_help: str  # how a user obtains the file
