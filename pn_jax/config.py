"""Typed, frozen configuration for every option of pn_jax.

One `Config` describes a whole run. It is JSON-serialisable (`to_dict` / `from_dict`), stored
in checkpoints and results, and compared field by field when a checkpoint is reloaded.
Unknown keys are an error, never silently swallowed (see STYLE.md: patchcore-inspection's
`anomaly_scorer_num_nn` typo made its k=3 runs run with k=1).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

METHODS = ("propose_noising", "patchcore")
INFLUENCE_METHODS = ("fd", "fd_fixed", "grad", "jvp", "predictor")  # predictor: learned (pn_jax/predictor.py)
DIM_SELECTION = ("random", "importance")
# Patch scores of method propose_noising: the note's literal mix, or the calibrated noise model.
SCORES = ("seed", "calibrated", "calibrated_mean", "calibrated_nll", "calibrated_rerank", "proposed")
# `auto`: chosen per category at fit time on its own validation data (pn_jax/select.py); a
# fitted model's config always names the concrete score it chose.
FIT_SCORES = SCORES + ("auto",)
# Image score from the patch scores: the max of the upsampled, blurred map (PatchCore's and
# ADer's sp_max) or the raw max over patches (the note's literal "max over patches").
IMAGE_SCORES = ("blurred_max", "patch_max")
RESIZE_MODES = ("resize", "patchcore")  # resize: WxW no crop; patchcore: shorter side, centre crop
# Matmul/convolution precision (SPEC 2.9, pn_jax/precision.py): "highest" pins every matmul and
# convolution of the model path to float32 (lax.Precision.HIGHEST); "fast" leaves the backend
# default (TF32 on NVIDIA GPUs, one bf16 pass on TPUs; the same float32 as "highest" on a CPU).
PRECISIONS = ("highest", "fast")
TILE_BANKS = ("shared", "per_position")  # bank.tile_bank
DATA_BACKENDS = ("direct", "tfds")
TFDS_DATASETS = ("mvtec_ad", "elpv", "synthetic")  # = pn_jax.data.pipeline.TFDS_DATASETS


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "mvtec_ad"  # mvtec_ad | elpv | synthetic
    root: str = "data/mvtec_ad"
    image_size: int = 256
    resize_mode: str = "resize"
    crop_size: int = 224  # only for resize_mode="patchcore"
    # Fraction of train/good held out of the bank for the fit-time statistics and the threshold
    # (SPEC 2.7). 0 (default): every image is in the bank and calibration is leave-one-image-out.
    holdout_fraction: float = 0.0
    holdout_min: int = 2
    # How mvtec_ad / elpv / synthetic are read: "direct" (the files) or "tfds" (tensorflow-
    # datasets builders written once as array_record under tfds_dir, default <root>/_tfds, and
    # read without TensorFlow; the same records in the same order). Not part of what a
    # checkpoint means: a test run may read its data either way.
    backend: str = "direct"
    tfds_dir: str | None = None
    # Overlapping tiles (pn_jax/tiles.py): 0 = no tiling; else each image_size image is cut
    # into tile x tile pieces overlapping by tile_overlap px, featurised one by one, and the
    # maps stitched back at image_size. One bank serves every tile position.
    tile: int = 0
    tile_overlap: int = 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    backbone: str = "wide_resnet50_2"
    weights: str | None = None  # path to .pth/.safetensors; None = standard locations
    layers: tuple[str, ...] = ("layer2", "layer3")
    pretrain_embed_dimension: int = 1024
    target_embed_dimension: int = 1024
    patchsize: int = 3
    # One of PRECISIONS. A checkpoint written before this field existed loads as "highest": it was
    # fitted at the backend's default precision, which for float32 on a CPU is float32 anyway.
    precision: str = "highest"


@dataclasses.dataclass(frozen=True)
class BankConfig:
    coreset_ratio: float = 0.01
    coreset_proj_dim: int = 128
    coreset_starts: int = 10
    # > 0: the two-stage coreset (pn_jax/coreset.py, PRESELECT_CHUNK): each chunk of 32,768
    # train patches keeps its own greedy coreset of coreset_preselect x coreset_ratio, then the
    # global greedy runs on those. 0 (default): the exact single greedy over all patches.
    coreset_preselect: float = 0.0
    # With tiles (data.tile): "shared" = one bank for every tile position; "per_position" = one
    # coreset bank per tile position, each tile scored against its own (pn_jax/tilebank.py).
    tile_bank: str = "shared"
    knn_block: int = 8192  # bank rows per k-NN matmul (one block up to M = 8192: measured 5 ms/image faster at M = 7000)


@dataclasses.dataclass(frozen=True)
class NoisingConfig:
    method: str = "propose_noising"
    k: int = 9  # K nearest neighbours (PatchCore baseline always uses k=1)
    influence: str = "fd_fixed"
    influence_ratio: float = 0.1
    dim_selection: str = "random"
    eps: float = 1e-3
    noise_std_min: float = 0.01
    noise_std_max: float = 0.5
    score_weights: tuple[float, float, float] = (0.4, 0.4, 0.2)  # influence, distance, noise
    znorm_signals: bool = False
    score: str = "calibrated_rerank"  # chosen on validation data, see README "Default score"
    noise_shrinkage: float = 0.1  # calibrated noise model: shrink s_j^2 towards its mean
    noise_floor: float = 0.1  # ... and keep s_j >= floor * median(s)
    blur_sigma: float = 4.0
    predictor_steps: int = 1000  # influence=predictor: optax steps of its fit (SPEC 3, the note's future work)
    predictor_hidden: int = 16
    image_score: str = "blurred_max"  # one of IMAGE_SCORES


@dataclasses.dataclass(frozen=True)
class Config:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    bank: BankConfig = BankConfig()
    noising: NoisingConfig = NoisingConfig()
    seed: int = 0
    batch_size: int = 8
    devices: int = 1  # >1: memory bank and coreset sharded over that many devices (SPEC 2.9)
    # Decision threshold, chosen at fit time without test labels (SPEC 6): None = F1-max on the
    # validation split; q = the (1 - q) quantile of the validation normals' image scores.
    threshold_fpr: float | None = None
    # Bound on the run's peak resident memory, in GB (pn_jax/membudget.py): None = no bound.
    # When set, the fit streams its train features to disk and keeps only their coreset
    # projection in memory (pn_jax/streaming.py: the same bank, exactly), and a run estimated
    # to exceed the bound is refused before it reads an image. How a fit runs, not what it fits.
    max_memory_gb: float | None = None

    def __post_init__(self):
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        return _from_dict(cls, d, "config")

    def replace(self, **sections) -> "Config":
        """`cfg.replace(noising={"k": 1}, seed=3)`: nested partial updates, unknown keys refused."""
        d = self.to_dict()
        for key, val in sections.items():
            if key not in d:
                raise ValueError(f"unknown config field {key!r}; known: {sorted(d)}")
            if isinstance(d[key], dict):
                unknown = set(val) - set(d[key])
                if unknown:
                    raise ValueError(f"unknown config field(s) {sorted(unknown)} in {key!r}; known: {sorted(d[key])}")
                d[key].update(val)
            else:
                d[key] = val
        return Config.from_dict(d)


def _from_dict(cls, d, where):
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(fields)}")
    kw = {}
    for name, val in d.items():
        f = fields[name]
        default = getattr(cls(), name) if cls is not Config else getattr(Config, name, None)
        if dataclasses.is_dataclass(default):
            kw[name] = _from_dict(type(default), val, f"{where}.{name}")
        elif isinstance(default, tuple) or (isinstance(val, list)):
            kw[name] = tuple(val)
        else:
            kw[name] = val
    return cls(**kw)


def validate(cfg: Config) -> None:
    n, b, m, d = cfg.noising, cfg.bank, cfg.model, cfg.data
    checks = [
        (n.method in METHODS, f"noising.method must be one of {METHODS}, got {n.method!r}"),
        (d.backend in DATA_BACKENDS, f"data.backend must be one of {DATA_BACKENDS}, got {d.backend!r}"),
        (d.backend == "direct" or d.dataset in TFDS_DATASETS,
         f"data.backend 'tfds' reads {', '.join(TFDS_DATASETS)}, not {d.dataset!r}: use 'direct'"),
        (n.influence in INFLUENCE_METHODS, f"noising.influence must be one of {INFLUENCE_METHODS}, got {n.influence!r}"),
        (n.dim_selection in DIM_SELECTION, f"noising.dim_selection must be one of {DIM_SELECTION}"),
        (n.score in FIT_SCORES, f"noising.score must be one of {FIT_SCORES}, got {n.score!r}"),
        (n.image_score in IMAGE_SCORES, f"noising.image_score must be one of {IMAGE_SCORES}, got {n.image_score!r}"),
        (0 <= n.noise_shrinkage <= 1 and n.noise_floor >= 0, "noising.noise_shrinkage in [0,1], noise_floor >= 0"),
        (n.k >= 1, f"noising.k must be >= 1, got {n.k}"),
        (n.predictor_steps >= 1 and n.predictor_hidden >= 1, "noising.predictor_steps and predictor_hidden must be >= 1"),
        (0 < n.influence_ratio <= 1, f"noising.influence_ratio must be in (0, 1], got {n.influence_ratio}"),
        (n.eps > 0, f"noising.eps must be > 0, got {n.eps}"),
        (0 < n.noise_std_min < n.noise_std_max, "noising.noise_std_min < noise_std_max, both > 0"),
        (len(n.score_weights) == 3, "noising.score_weights needs 3 values (influence, distance, noise)"),
        (0 < b.coreset_ratio <= 1, f"bank.coreset_ratio must be in (0, 1], got {b.coreset_ratio}"),
        (b.coreset_starts >= 1 and b.coreset_proj_dim >= 1, "bank.coreset_starts and coreset_proj_dim must be >= 1"),
        (b.coreset_preselect == 0 or b.coreset_preselect >= 1,
         f"bank.coreset_preselect (--coreset-preselect) must be 0 (off) or >= 1, got {b.coreset_preselect}"),
        (b.coreset_preselect == 0 or cfg.devices == 1,
         "bank.coreset_preselect (--coreset-preselect) runs on one device; drop --devices"),
        (b.tile_bank in TILE_BANKS, f"bank.tile_bank (--tile-bank) must be one of {TILE_BANKS}, got {b.tile_bank!r}"),
        (b.tile_bank == "shared" or d.tile, "bank.tile_bank per_position (--tile-bank per-position) needs --tile"),
        (b.tile_bank == "shared" or b.coreset_preselect == 0,
         "--tile-bank per-position runs the exact greedy per position; drop --coreset-preselect"),
        (b.tile_bank == "shared" or cfg.devices == 1, "--tile-bank per-position scores on one device; drop --devices"),
        (b.tile_bank == "shared" or n.influence != "predictor",
         "--influence predictor learns from one bank; it does not take --tile-bank per-position"),
        (len(m.layers) >= 1, "model.layers must name at least one layer"),
        (m.precision in PRECISIONS, f"model.precision must be one of {PRECISIONS}, got {m.precision!r}"),
        (d.resize_mode in RESIZE_MODES, f"data.resize_mode must be one of {RESIZE_MODES}"),
        (d.image_size >= 32, f"data.image_size must be >= 32, got {d.image_size}"),
        (0 <= d.holdout_fraction < 1, "data.holdout_fraction must be in [0, 1)"),
        (d.tile >= 0 and d.tile_overlap >= 0, "data.tile and data.tile_overlap must be >= 0"),
        (d.tile or not d.tile_overlap, "data.tile_overlap needs data.tile (--tile-overlap without --tile)"),
        (cfg.batch_size >= 1, "batch_size must be >= 1"),
        (cfg.devices >= 1, "devices must be >= 1"),
        (cfg.threshold_fpr is None or 0 < cfg.threshold_fpr < 1, "threshold_fpr must be in (0, 1)"),
        (cfg.max_memory_gb is None or cfg.max_memory_gb > 0, "max_memory_gb must be > 0 (--max-memory)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    if d.tile:
        from pn_jax import tiles

        tiles.check(d.crop_size if d.resize_mode == "patchcore" else d.image_size, d.tile, d.tile_overlap)


def tiny_config(**overrides) -> Config:
    """A few-second variant for tests: small images, small dims, bigger coreset ratio."""
    cfg = Config(
        data=DataConfig(dataset="synthetic", image_size=64),
        model=ModelConfig(backbone="efficientnet_lite0", layers=("blocks4", "blocks10"),
                          pretrain_embed_dimension=64, target_embed_dimension=64),
        bank=BankConfig(coreset_ratio=0.1, knn_block=256),
        noising=NoisingConfig(k=3),
        batch_size=4,
    )
    return cfg.replace(**overrides) if overrides else cfg
