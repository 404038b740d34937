"""Deploy a fitted detector as one self-contained `jax.export` artifact, and run it.

    export_model(cfg, state, grid, threshold, meta, "model.jaxexport")   # needs pn_jax + flax
    predict = load_exported("model.jaxexport")                           # needs jax, numpy, PIL
    out = predict(["a.png", "b.png"])   # scores, normalized, labels, anomaly_maps, names, errors

The artifact is one StableHLO function of a uint8 NHWC batch at the model's input size S:
normalisation, backbone, PatchCore aggregation, k-NN (+ influence and noise where the score
needs them), the configured patch score, bilinear upsampling + Gaussian blur, the configured
image score (`noising.image_score`: max of the blurred map, or of the patch scores), scores /
threshold and labels. The bank, the backbone weights and the learnable parameters
are constants inside it. Resizing from an arbitrary image size stays on the host: PIL's
antialiased bilinear resize has no exact StableHLO equivalent, and the training pipeline used
PIL's, so the loader applies the same resize (and centre crop in "patchcore" geometry).

Metadata lives beside the artifact in `<FILE>.json` (e.g. `model.jaxexport.json`): input
size, layout and normalisation, threshold, label rule, score variant, output names, versions,
the checkpoint's provenance and the artifact's sha256, which the loader checks before it
deserialises anything.

The loader half of this module imports only jax, numpy, PIL, the standard library and
`pn_jax.imageread` (the image reading that predict and the training pipeline use: decoding,
geometry and the per-file errors): the pn_jax model code (and flax/orbax through it) is
imported inside `export_model` only, so a deployment box can copy this file and imageread.py,
or `import pn_jax.export`, without them.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import tempfile
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

try:
    from pn_jax import imageread
except ImportError:  # export.py copied beside imageread.py, without the pn_jax package
    import imageread

FORMAT = "pn_jax.export"
FORMAT_VERSION = 1
OUTPUTS = ("scores", "normalized", "labels", "anomaly_maps")
LABEL_RULE = "scores >= threshold (normalized >= 1.0)"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
RESIZE = "PIL bilinear (antialiased) on the host"
DEFAULT_MAX_BATCH = 8


class ExportError(ValueError):
    """A bad export request or a missing, corrupted or mismatched artifact (names the file)."""


def metadata_path(path) -> str:
    """The metadata file of artifact `path`: `<path>.json`."""
    return os.fspath(path) + ".json"


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: str, data: bytes) -> None:
    """Write to a sibling temporary file, fsync, rename: `path` is whole or untouched."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- export
def predict_function(cfg, state, grid, threshold: float, *, variant: str | None = None,
                     backbone_fn: Callable | None = None) -> Callable:
    """The function that `export_model` serialises: uint8 images [B, S, S, 3] ->
    {"scores" [B], "normalized" [B], "labels" [B] bool, "anomaly_maps" [B, S, S],
    "threshold" []} (the threshold comes back so the loader can check the metadata's)."""
    from pn_jax import backbones, detector, features, maps, tiles
    from pn_jax import precision as precision_lib

    m = cfg.model
    info = backbones.info(m.backbone)
    # The model's precision policy is baked into the artifact: under "highest" every matmul and
    # convolution is lowered with precision=HIGHEST, float32 on every platform it runs on.
    prec = precision_lib.of(cfg)
    backbone = backbone_fn or backbones.create(m.backbone, weights=m.weights, layers=tuple(m.layers),
                                               precision=prec)
    variant = variant or detector.default_variant(cfg)
    need = detector.needs(cfg, (variant,))
    signals = detector.make_signal_fn(cfg, need_influence=need.influence, calibrated=need.calibrated,
                                      rerank=need.rerank, jit=False)
    grid, size, sigma = tuple(int(g) for g in grid), detector.map_size(cfg), cfg.noising.blur_sigma
    lay = tiles.of_config(cfg)  # a tiled model: tiles cut, featurised and stitched inside the artifact
    mean = np.asarray(info.mean, np.float32)
    std = np.asarray(info.std, np.float32)
    t = np.float32(threshold)
    # The smallest float32 >= the (float64) threshold: float32 scores compare against it
    # exactly as pn_jax.Model.predict compares them against the threshold itself.
    t_label = t if float(t) >= threshold else np.nextafter(t, np.float32(np.inf))

    def fn(images):
        # The same float32 arithmetic as pn_jax.data.preprocess.normalize.
        x = (images.astype(jnp.float32) / np.float32(255.0) - mean) / std
        if lay is not None:
            x = tiles.split(x, lay)
        # Traced inline, not as the backbone's own jit: with a symbolic batch an inner jit keeps
        # every argument, so the whole weight tree would become constants of the artifact
        # (efficientnet_lite0: 18.5 MB, of which the stages up to blocks10 take 2.8 MB).
        with jax.disable_jit():
            out = backbone(x)
        fmaps = [out[layer] for layer in m.layers]
        if tuple(fmaps[0].shape[1:3]) != grid:
            raise ExportError(f"the backbone's feature grid at {lay.tile if lay else size[0]} px is {tuple(fmaps[0].shape[1:3])}, "
                              f"but the fitted state was made on grid {grid}: the config and state disagree")
        feats = features.aggregate(fmaps, m.pretrain_embed_dimension, m.target_embed_dimension, m.patchsize,
                                   precision=prec)
        if lay is not None:  # an image's tiles end to end, as Model.features lays them
            feats = feats.reshape(images.shape[0], lay.n_tiles * feats.shape[1], feats.shape[2])
        sig = signals(state.params, state.bank, state.dims, state.stats, feats)
        patch = detector.patch_score(cfg, sig, state.stats, variant)
        amap = (tiles.to_pixel_maps(patch, grid, lay, sigma) if lay is not None
                else maps.to_pixel_maps(patch, grid, size, sigma))
        scores = detector.image_scores(cfg, patch, amap)
        normalized = scores / t
        return {"scores": scores, "normalized": normalized, "labels": scores >= t_label,
                "anomaly_maps": amap, "threshold": jnp.asarray(t)}

    return fn


def _json_provenance(meta: dict | None) -> dict:
    out = {}
    for key, val in (meta or {}).items():
        if key in ("structure", "extra_arrays"):  # checkpoint internals, not provenance
            continue
        try:
            json.dumps(val)
        except (TypeError, ValueError):
            raise ExportError(f"export metadata: provenance entry {key!r} is not JSON-serialisable "
                              f"({type(val).__name__}); pass plain values in `meta`") from None
        out[key] = val
    return out


def _versions() -> dict:
    import importlib.metadata

    import pn_jax

    out = {"pn_jax": getattr(pn_jax, "__version__", None), "jax": jax.__version__}
    try:
        out["jaxlib"] = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        out["jaxlib"] = None
    return out


def export_model(cfg, state, grid, threshold: float, meta: dict | None, path, *,
                 platforms: Sequence[str] = ("cpu",), batch_size: int | None = None,
                 variant: str | None = None, backbone_fn: Callable | None = None) -> dict:
    """Serialise the fitted detector to `path` and its metadata to `<path>.json`; -> metadata.

    `batch_size=None`: the batch dimension is symbolic (any batch size at run time); an int
    fixes it (the loader pads and chunks). `platforms`: any of cpu, cuda, rocm, tpu, lowered
    together into one artifact (no accelerator needed to export for it). `meta`: the
    checkpoint's provenance, copied into the metadata. `variant`: the score (default: the
    configured one). `backbone_fn` replaces the configured backbone (tests)."""
    from jax import export as jexport

    from pn_jax import detector

    path = os.fspath(path)
    platforms = tuple(platforms)
    if cfg.bank.tile_bank != "shared":
        raise ExportError(f"export {path}: this model holds a bank per tile position (--tile-bank per-position), "
                          f"which the exported artifact does not implement yet; score it with `pn-jax predict`, "
                          f"or fit with --tile-bank shared to export")
    bad = [p for p in platforms if p not in PLATFORMS]
    if bad or not platforms:
        raise ExportError(f"export {path}: unknown platform(s) {bad or '(none given)'}; "
                          f"choose from {', '.join(PLATFORMS)}")
    if threshold is None:
        raise ExportError(f"export {path}: the model has no decision threshold (it was fitted without "
                          f"held-out normal images); fit with holdout_fraction > 0 or pass a threshold")
    threshold = float(threshold)
    if not (math.isfinite(threshold) and threshold > 0):
        raise ExportError(f"export {path}: the threshold must be a finite number > 0 (normalised score = "
                          f"score / threshold, label = score >= threshold), got {threshold}")
    if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
        raise ExportError(f"export {path}: batch_size must be a positive integer or None (symbolic), "
                          f"got {batch_size!r}")
    if os.path.isdir(path):
        raise ExportError(f"export: {path} is a directory; give a file name such as "
                          f"{os.path.join(path, 'model.jaxexport')}")
    variant = variant or detector.default_variant(cfg)
    provenance = _json_provenance(meta)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    s = detector.map_size(cfg)[0]
    fn = predict_function(cfg, state, grid, threshold, variant=variant, backbone_fn=backbone_fn)
    batch = jexport.symbolic_shape("b")[0] if batch_size is None else int(batch_size)
    spec = jax.ShapeDtypeStruct((batch, s, s, 3), jnp.uint8)
    exported = jexport.export(jax.jit(fn), platforms=platforms)(spec)
    data = bytes(exported.serialize())

    from pn_jax import backbones

    info = backbones.info(cfg.model.backbone)
    b = "b" if batch_size is None else int(batch_size)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "artifact": os.path.basename(path),
        "sha256": _sha256_bytes(data),
        "size_bytes": len(data),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platforms": list(platforms),
        "calling_convention_version": int(exported.calling_convention_version),
        "input": {"size": s, "layout": "NHWC", "dtype": "uint8", "channels": "RGB", "resize": RESIZE,
                  # the host geometry that makes an S x S image, as in pn_jax.data.preprocess
                  "resize_mode": cfg.data.resize_mode, "image_size": cfg.data.image_size,
                  "crop_size": cfg.data.crop_size if cfg.data.resize_mode == "patchcore" else None,
                  "normalization": {"applied": "inside the artifact", "formula": "(x / 255 - mean) / std",
                                    "mean": [float(v) for v in info.mean], "std": [float(v) for v in info.std]}},
        "batch": {"symbolic": batch_size is None, "size": None if batch_size is None else int(batch_size)},
        "outputs": {"scores": {"shape": [b], "dtype": "float32"},
                    "normalized": {"shape": [b], "dtype": "float32", "formula": "scores / threshold"},
                    "labels": {"shape": [b], "dtype": "bool", "rule": LABEL_RULE},
                    "anomaly_maps": {"shape": [b, s, s], "dtype": "float32"},
                    "threshold": {"shape": [], "dtype": "float32"}},
        "threshold": threshold,
        "label_rule": LABEL_RULE,
        "score": {"variant": variant, "method": cfg.noising.method, "image_score": cfg.noising.image_score,
                  "image_score_rule": detector.IMAGE_SCORE_RULES[cfg.noising.image_score],
                  "blur_sigma": cfg.noising.blur_sigma},
        "backbone": {"name": cfg.model.backbone, "layers": list(cfg.model.layers)},
        # "highest": float32 matmuls and convolutions (lax.Precision.HIGHEST) on every platform;
        # "fast": the platform's default (pn_jax/precision.py). Applied inside the artifact.
        "precision": cfg.model.precision,
        "grid": [int(g) for g in grid],  # per tile for a tiled model
        "tiles": ({"tile": cfg.data.tile, "overlap": cfg.data.tile_overlap, "applied": "inside the artifact"}
                  if cfg.data.tile else None),
        "bank_size": int(state.bank.shape[0]),
        "versions": _versions(),
        "provenance": provenance,
        "config": cfg.to_dict(),
    }
    text = json.dumps(metadata, indent=2, sort_keys=True) + "\n"
    _write_atomic(path, data)  # artifact first: a metadata file never names a missing artifact
    _write_atomic(metadata_path(path), text.encode())
    return json.loads(text)  # exactly what the file holds (tuples as lists)


# ----------------------------------------------------------------------------- loading
def _read_metadata(path: str) -> dict:
    mpath = metadata_path(path)
    if not os.path.isfile(path):
        raise ExportError(f"exported model not found: {path}")
    if not os.path.isfile(mpath):
        raise ExportError(f"exported model {path} has no metadata file {mpath}; export it again "
                          f"(pn_jax.export.export_model writes both)")
    try:
        with open(mpath) as f:
            md = json.load(f)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read the metadata {mpath} of {path}: {e}; export the model again") from None
    if not isinstance(md, dict) or md.get("format") != FORMAT:
        found = md.get("format") if isinstance(md, dict) else None
        raise ExportError(f"{mpath} is not pn_jax export metadata (format {found!r})")
    if md.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{mpath}: export format version {md.get('format_version')!r}, but this loader reads "
                          f"version {FORMAT_VERSION}; use the pn_jax version that exported it "
                          f"({md.get('versions', {}).get('pn_jax')}) or export again")
    missing = [k for k in ("sha256", "input", "batch", "threshold", "platforms", "calling_convention_version")
               if k not in md]
    if missing:
        raise ExportError(f"{mpath}: metadata lacks {missing}; export the model again")
    return md


def _check_against_artifact(exported, md: dict, path: str) -> None:
    """The metadata must describe the function that was deserialised."""
    mpath = metadata_path(path)
    (aval,) = exported.in_avals
    shape = tuple(aval.shape)
    s = md["input"].get("size")
    problems = []
    if len(shape) != 4 or shape[1:] != (s, s, 3):
        problems.append(f"input shape: metadata says [batch, {s}, {s}, 3], the artifact takes {list(map(str, shape))}")
    if str(aval.dtype) != md["input"].get("dtype"):
        problems.append(f"input dtype: metadata {md['input'].get('dtype')}, artifact {aval.dtype}")
    symbolic = not isinstance(shape[0], int) if shape else None
    if symbolic != md["batch"].get("symbolic") or (not symbolic and shape and shape[0] != md["batch"].get("size")):
        problems.append(f"batch: metadata {md['batch']}, artifact batch dimension {shape[0] if shape else None}")
    if sorted(exported.platforms) != sorted(md["platforms"]):
        problems.append(f"platforms: metadata {md['platforms']}, artifact {list(exported.platforms)}")
    if exported.calling_convention_version != md["calling_convention_version"]:
        problems.append(f"calling convention: metadata {md['calling_convention_version']}, "
                        f"artifact {exported.calling_convention_version}")
    if problems:
        raise ExportError(f"{mpath} does not match the artifact {path}: " + "; ".join(problems)
                          + ". Export the model again; never edit the metadata by hand.")


def load_exported(path, *, max_batch: int = DEFAULT_MAX_BATCH) -> "ExportedPredictor":
    """Verify `path` against its metadata (`<path>.json`) and return a predictor.

    Checks, before deserialising: metadata present and readable, format version, the
    artifact's size and sha256, that this jax can run the artifact's calling convention;
    after: that input shape, batch, platforms agree with the metadata."""
    from jax import export as jexport

    path = os.fspath(path)
    md = _read_metadata(path)
    with open(path, "rb") as f:
        data = f.read()
    if len(data) != md.get("size_bytes", len(data)) or _sha256_bytes(data) != md["sha256"]:
        raise ExportError(f"exported model {path} is corrupted or was replaced: its sha256 is "
                          f"{_sha256_bytes(data)} ({len(data)} bytes), the metadata {metadata_path(path)} "
                          f"records {md['sha256']} ({md.get('size_bytes')} bytes). Copy or export it again.")
    ccv = md["calling_convention_version"]
    lo, hi = (jexport.minimum_supported_calling_convention_version,
              jexport.maximum_supported_calling_convention_version)
    if not lo <= ccv <= hi:
        raise ExportError(f"exported model {path} uses jax.export calling convention {ccv} (exported with "
                          f"jax {md.get('versions', {}).get('jax')}); this jax {jax.__version__} runs {lo}..{hi}. "
                          f"Install a jax close to the exporting one, or export again with this one.")
    try:
        exported = jexport.deserialize(bytearray(data))
    except Exception as e:  # noqa: BLE001 - any decoding failure means the same thing here
        raise ExportError(f"cannot deserialise exported model {path} with jax {jax.__version__} "
                          f"(exported with jax {md.get('versions', {}).get('jax')}): {e}") from None
    _check_against_artifact(exported, md, path)
    return ExportedPredictor(path, exported, md, max_batch=max_batch)


# ----------------------------------------------------------------------------- host preprocessing
def resize_for_model(image: np.ndarray, geometry: dict) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [S, S, 3] with the metadata's geometry ("input": resize_mode,
    image_size, crop_size): `imageread.resize_image`, as the training pipeline resized."""
    return imageread.resize_image(image, geometry["image_size"], geometry["resize_mode"],
                                  geometry.get("crop_size") or 224)


class ExportedPredictor:
    """`predictor(inputs) -> {"scores", "normalized", "labels", "anomaly_maps", "names", "errors"}`.

    inputs: an image path, a folder (recursive), a list of paths and/or image arrays, or an
    array (one image [H,W(,C)] or a batch [n,H,W(,C)]): `imageread.input_items`, as
    `pn_jax.Model.predict`. Images are decoded and resized on the host, then scored in chunks:
    with a symbolic batch, chunks of at most `max_batch` padded to a power of two (so at most
    log2(max_batch) + 1 compilations); with a fixed batch, chunks of exactly that size.
    Outputs are numpy, at the model's input size S; an input that cannot be read gets NaN
    score and map, label False, and its message in `errors` (keyed by name)."""

    def __init__(self, path: str, exported, metadata: dict, *, max_batch: int = DEFAULT_MAX_BATCH):
        if int(max_batch) < 1:
            raise ExportError(f"max_batch must be >= 1, got {max_batch}")
        self.path, self.exported, self.metadata = path, exported, metadata
        self.size = int(metadata["input"]["size"])
        self.threshold = float(metadata["threshold"])
        fixed = metadata["batch"]["size"]
        self.fixed_batch = int(fixed) if fixed is not None else None
        self.max_batch = self.fixed_batch or int(max_batch)
        self._fn = jax.jit(exported.call)
        self._threshold_checked = False

    def _bucket(self, n: int) -> int:
        if self.fixed_batch:
            return self.fixed_batch
        return min(self.max_batch, 1 << (n - 1).bit_length())

    def run_batch(self, images: np.ndarray) -> dict:
        """uint8 [n, S, S, 3] already at the input size -> the artifact's outputs (numpy)."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (self.size, self.size, 3):
            raise ExportError(f"{self.path} takes uint8 [n, {self.size}, {self.size}, 3] images, got "
                              f"{images.dtype} {list(images.shape)}; call the predictor itself to resize")
        n = len(images)
        b = self._bucket(n)
        if b > n:  # zero images fill the chunk; every image is scored independently of the others
            images = np.concatenate([images, np.zeros((b - n,) + images.shape[1:], np.uint8)])
        try:
            out = self._fn(images)
        except ValueError as e:
            if "exported for platform" not in str(e):
                raise
            raise ExportError(f"exported model {self.path} was exported for platforms {self.metadata['platforms']} "
                              f"and cannot run on this JAX backend ({jax.default_backend()}): {e}. Export it "
                              f"again with that platform, or set JAX_PLATFORMS=cpu.") from None
        out = jax.device_get(out)
        if not self._threshold_checked:
            if np.float32(out["threshold"]) != np.float32(self.threshold):
                raise ExportError(f"{metadata_path(self.path)} records threshold {self.threshold}, but the "
                                  f"artifact {self.path} was exported with {float(out['threshold'])}; export "
                                  f"the model again; never edit the metadata by hand.")
            self._threshold_checked = True
        return {k: np.asarray(out[k])[:n] for k in OUTPUTS}

    def __call__(self, inputs) -> dict:
        items = imageread.input_items(inputs)
        s = self.size
        n = len(items)
        out = {"scores": np.full(n, np.nan, np.float32), "normalized": np.full(n, np.nan, np.float32),
               "labels": np.zeros(n, bool), "anomaly_maps": np.full((n, s, s), np.nan, np.float32)}
        errors: dict[str, str] = {}
        geometry = self.metadata["input"]
        for start in range(0, n, self.max_batch):
            ok, batch = [], []
            for i in range(start, min(n, start + self.max_batch)):
                name, read = items[i]
                image, err = imageread.attempt(lambda read=read: resize_for_model(read(), geometry))
                if err:
                    errors[name] = err  # the same reason Model.predict gives
                else:
                    batch.append(image)
                    ok.append(i)
            if ok:
                res = self.run_batch(np.stack(batch))
                for k in OUTPUTS:
                    out[k][ok] = res[k]
        out["names"] = [name for name, _ in items]
        out["errors"] = errors
        return out

    def __repr__(self) -> str:
        batch = self.fixed_batch or "symbolic"
        return (f"ExportedPredictor({self.path!r}, size={self.size}, batch={batch}, "
                f"platforms={self.metadata['platforms']}, threshold={self.threshold:g})")
