"""The public pipeline: fit on good images, predict on new ones, save, load (SPEC 6).

    model = pn_jax.fit(cfg, "data/good_parts", key=jax.random.key(0))
    pred = model.predict("new_photos/")          # scores, normalised scores, labels, maps
    model.save("ckpt/parts"); model = pn_jax.load("ckpt/parts")

Everything that scores images goes through `Model`: the CLI, `experiments.run`, the
benchmarks and the studies. Preprocessing (decode, resize, the backbone's own
normalisation), batching and padding to the compiled batch size happen here and nowhere
else, so a benchmark times the code a user runs and no caller pads.

Every training image is in the bank. The decision threshold is chosen at fit time without
test labels, on training images scored leave-one-image-out (without the bank entries that
came from them) plus one seeded synthetic anomaly of each: F1-max, or the (1 - q) quantile of
those normal images' scores (`cfg.threshold_fpr = q`). The calibration (noise scale, dims,
statistics) uses a disjoint sample of training images, or held-out images when asked.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import threading
import warnings
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from pn_jax import batches, detector, tiles, transfer
from pn_jax.config import Config

FORMAT = "pn_jax.Model/1"
MAP_KEYS = ("anomaly_maps", "influence_maps", "noise_maps")
_SCORERS_LOCK = threading.Lock()


class ModelError(ValueError):
    """A model cannot be built, loaded or used as asked; the message says what to do."""


# ----------------------------------------------------------------------------- inputs
@dataclasses.dataclass
class Item:
    """One image to score: where it came from and how to read it (RGB uint8 HxWx3)."""
    name: str
    read: Callable[[], np.ndarray]


def as_items(inputs) -> list[Item]:
    """A path, a folder (recursive), an array ([H,W], [H,W,C] or [B,H,W,C]; uint8, uint16, bool
    or float in [0, 1]) or a list of paths, folders and arrays -> items, in a deterministic
    order (`imageread.input_items`, which the exported model's loader uses too)."""
    from pn_jax import imageread

    return [Item(name, read) for name, read in imageread.input_items(inputs)]


# ----------------------------------------------------------------------------- results
@dataclasses.dataclass
class Prediction:
    """Per image: score, normalised score (score / threshold: 1.0 is the decision boundary),
    label (score >= threshold) and maps at the input's own resolution. Images that could not
    be read have NaN scores, no maps and an entry in `errors`."""
    names: list[str]
    scores: np.ndarray
    normalized: np.ndarray
    labels: np.ndarray
    anomaly_maps: list
    influence_maps: list
    noise_maps: list
    errors: dict[str, str]
    threshold: float

    @property
    def paths(self) -> list[str]:
        return self.names

    def rows(self) -> list[dict]:
        """One CSV row per input (failures included, with their error)."""
        return [csv_row({"name": n, "score": s, "normalized": z, "label": lab, "error": self.errors.get(n)})
                for n, s, z, lab in zip(self.names, self.scores, self.normalized, self.labels)]


CSV_FIELDS = ("path", "score", "normalized_score", "label", "error")


def csv_row(rec: dict) -> dict:
    """A `predict_iter` record as a predictions.csv row (empty score and label on an error)."""
    num = lambda x: "" if x is None or not np.isfinite(x) else f"{float(x):.6g}"  # noqa: E731
    return {"path": rec["name"], "score": num(rec["score"]), "normalized_score": num(rec["normalized"]),
            "label": "" if rec["error"] else ("anomalous" if rec["label"] else "normal"),
            "error": rec["error"] or ""}


# ----------------------------------------------------------------------------- the model
class Model:
    """A fitted detector: config, feature grid, `DetectorState`, threshold and provenance."""

    def __init__(self, cfg: Config, grid: tuple[int, int], state: detector.DetectorState, *,
                 threshold: float | None = None, provenance: dict | None = None,
                 calibration: dict | None = None, extractor: detector.FeatureExtractor | None = None):
        self.cfg, self.grid, self.state = cfg, tuple(int(g) for g in grid), state
        self.threshold = None if threshold is None else float(threshold)
        self.provenance = dict(provenance or {})
        self.calibration = dict(calibration or {})
        self._extractor = extractor
        self._scorers: dict = {}
        self.bank_owner = None  # [M] source training image of each bank entry (known at fit time)
        # variant -> (normal, synthetic-anomaly) validation image scores; saved with the model,
        # so a loaded model can re-choose its threshold (`fitting.rethreshold`) without test data
        self.validation: dict = {}
        from pn_jax import backbones

        info = backbones.info(cfg.model.backbone)
        self.mean, self.std = info.mean, info.std

    # -- pieces the runner, benchmarks and studies use -------------------------------------
    @property
    def extractor(self) -> detector.FeatureExtractor:
        if self._extractor is None:
            saved = self.provenance.get("weights_sha256")
            if saved:  # a loaded model: its bank was built with these exact backbone weights
                now = weights_sha256(self.cfg)
                if now != saved:
                    raise ModelError(
                        f"the backbone weights file ({self.cfg.model.weights or self.cfg.model.backbone}) "
                        f"has sha256 {str(now)[:12]}..., but this model's memory bank was built with "
                        f"{saved[:12]}...: features would not match the bank. Restore those weights or re-fit.")
            self._extractor = detector.FeatureExtractor(self.cfg)
        return self._extractor

    def with_state(self, state: detector.DetectorState, **changes) -> "Model":
        """The same model (sharing its compiled extractor) with another state, e.g. tuned."""
        kw = dict(threshold=self.threshold, provenance=self.provenance, calibration=self.calibration,
                  extractor=self._extractor)
        kw.update(changes)
        out = Model(self.cfg, self.grid, state, **kw)
        out.bank_owner = self.bank_owner
        return out

    @property
    def input_size(self) -> int:
        return self.cfg.data.crop_size if self.cfg.data.resize_mode == "patchcore" else self.cfg.data.image_size

    def batches(self, source, *, num_workers: int | None = None) -> Iterator[dict]:
        """Preprocessed batches of a data source (list of records, `Source`, tfds source),
        decoded by `num_workers` threads (default: one per usable core) while the device works
        on the previous batch."""
        from pn_jax import hardware
        from pn_jax.data import pipeline

        num_workers = hardware.decode_workers() if num_workers is None else num_workers
        d = self.cfg.data
        return pipeline.make_batches(source, image_size=d.image_size, mean=self.mean, std=self.std,
                                     batch_size=self.cfg.batch_size, resize_mode=d.resize_mode,
                                     crop_size=d.crop_size, num_workers=num_workers)

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        """RGB uint8 HxWx3 -> the normalised float32 model input."""
        from pn_jax import imageread
        from pn_jax.data import preprocess

        d = self.cfg.data
        img = imageread.resize_image(rgb, d.image_size, d.resize_mode, d.crop_size)
        return preprocess.normalize(img, self.mean, self.std)

    def features(self, images: np.ndarray) -> jax.Array:
        """Normalised images [n, S, S, 3] -> patch features [n, N, D] (on the device).
        Padded to the compiled batch size inside, so nothing recompiles for a short batch."""
        images = np.asarray(images, np.float32)
        lay = tiles.of_config(self.cfg)
        if lay is not None:  # an image's tiles laid end to end: [n, T * N_t, D] (pn_jax/tiles.py)
            f = self._features(tiles.split(images, lay))
            return f.reshape(len(images), lay.n_tiles * f.shape[1], f.shape[2])
        return self._features(images)

    def _features(self, images: np.ndarray) -> jax.Array:
        n, bs = len(images), self.cfg.batch_size
        out = [self.extractor(detector.pad_batch(images[s:s + bs], bs)) for s in range(0, n, bs)]
        if len(out) == 1:  # one batch: no slice unless it was padded (each slice shape compiles once)
            return out[0] if n == bs else out[0][:n]
        return jnp.concatenate(out)[:n]

    def extract(self, images, *, desc: str = "features") -> np.ndarray:
        """Patch features [n, N, D] (host float32) of a source, a folder, paths or an array."""
        if not is_source(images):
            images = items_source(as_items(images))
        if not len(images):
            raise ModelError(f"no images to extract features from ({desc})")
        return batches.extract(self, images, desc=desc)

    def scorer(self, variants=(None,), *, single_device: bool = False) -> detector.Scorer:
        cfg = self.cfg.replace(devices=1) if single_device else self.cfg
        key = (cfg, tuple(variants))  # keyed by the config: a changed model.cfg gets its own Scorer
        with _SCORERS_LOCK:  # batches are scored from two threads on the CPU: one Scorer per key
            if key not in self._scorers:
                self._scorers[key] = detector.Scorer(cfg, self.grid, variants=key[1])
            return self._scorers[key]

    def score_features(self, feats, variants=(None,), *, exclude=None, outputs=None) -> dict:
        """Patch features [n, N, D] -> {"image_scores", "anomaly_maps", "influence_maps",
        "noise_maps", "patch_scores", "image_scores_patch_max", "variants": {variant: (image
        scores, maps)}} at the model's input resolution, as host arrays. Variant None is the
        configured score. `exclude`: (bank_owner [M], owners [n]) scores training image
        owners[i] leave-one-image-out. `outputs`: the keys to bring to the host (default all;
        a variant's maps only with "anomaly_maps", else None): what is not asked for is not
        copied, and maps not asked for are not computed."""
        return batches.to_host(self.dispatch_scores(feats, variants, exclude=exclude, outputs=outputs))

    def dispatch_scores(self, feats, variants=(None,), *, exclude=None, outputs=None) -> batches.Dispatched:
        """`score_features`, dispatched to the device and not waited for: `batches.to_host` of the
        result waits once and copies (issue 25: one host sync per batch, after the next batch's
        work is queued). Host features are sliced on the host and transferred per batch; device
        features already padded to the batch size are scored as they are."""
        n, bs = len(feats), self.cfg.batch_size
        scorer = self.scorer(variants)  # leave-one-image-out too: sharded where the bank is
        keys = tuple(outputs) if outputs is not None else None
        want_maps = keys is None or "anomaly_maps" in keys
        owner_rows = None if exclude is None else transfer.to_device(exclude[0], np.int32)
        parts = []
        for s in range(0, n, bs):
            m = min(bs, n - s)
            ex = None
            if exclude is not None:
                owners = np.full(bs, -1, np.int32)
                owners[:m] = np.asarray(exclude[1])[s:s + m]
                ex = (owner_rows, transfer.to_device(owners))
            chunk = feats if (s == 0 and m == n and isinstance(feats, jax.Array)) else feats[s:s + m]
            out = scorer(self.state, transfer.to_device(detector.pad_batch(chunk, bs)), ex,
                         extra_maps=keys is None or any(k in keys for k in ("influence_maps", "noise_maps")))
            dev = {k: v for k, v in out.items() if k != "signals" and (keys is None or k in keys)}
            var = {}
            for v in variants:
                if v is None:
                    var[None] = (out["image_scores"], out["anomaly_maps"] if want_maps else None)
                else:
                    patch = detector.patch_score(self.cfg, out["signals"], self.state.stats, v)
                    amap, img, _ = scorer.scored_maps(patch)
                    var[v] = (img, amap if want_maps else None)
            parts.append((m, dev, var))
        return batches.Dispatched(parts, tuple(variants))

    def score_images(self, images: np.ndarray, variants=(None,)) -> dict:
        """Normalised images [n, S, S, 3] -> `score_features` of their features."""
        return self.score_features(self.features(images), variants)

    # -- the user's call -------------------------------------------------------------------
    def predict_iter(self, inputs, *, progress: bool = True, maps: bool = True,
                     num_workers: int | None = None) -> Iterator[dict]:
        """Stream predictions, one dict per input, in input order: {"name", "score",
        "normalized", "label", "error", "image" (RGB uint8), "anomaly_map", ...}. Decoding and
        resizing run on `num_workers` threads (default: one per usable core) while the device
        scores the previous batch (on the CPU two batches at once, `batches.in_flight`); only a
        few batches are ever held in memory."""
        from pn_jax import hardware, imageread

        num_workers = hardware.decode_workers() if num_workers is None else num_workers
        items = inputs if isinstance(inputs, list) and inputs and isinstance(inputs[0], Item) else as_items(inputs)
        bs = self.cfg.batch_size
        thr = self.threshold

        def load(item):
            def read():
                rgb = item.read()
                return rgb, self.preprocess(rgb)

            done, err = imageread.attempt(read)  # a bad file or array: its reason, not an exception
            return (None, None, err) if err else (*done, None)

        bar = tqdm(total=len(items), desc="predict", unit="img", disable=not progress, leave=False)
        with batches.loaded(items, load, bs, num_workers) as loaded_batches:
            def score(batch):  # on the CPU two batches at once (`batches.in_flight`)
                ok = [i for i, (_, x, err) in enumerate(batch[1]) if err is None]
                return ok, (self.score_images(np.stack([batch[1][i][1] for i in ok])) if ok else None)

            for (chunk, loaded), (ok, out) in batches.in_flight(loaded_batches, score, batches.streams_for(self.cfg)):
                for j, (item, (rgb, _, err)) in enumerate(zip(chunk, loaded)):
                    rec = {"name": item.name, "error": err}
                    if err is None:
                        r = ok.index(j)
                        score_ = float(out["image_scores"][r])
                        rec.update(score=score_, normalized=score_ / thr if thr else float("nan"),
                                   label=bool(thr is not None and score_ >= thr), image=rgb)
                        if maps:
                            for k in MAP_KEYS:
                                if k in out:
                                    rec[k[:-1]] = self.to_input_resolution(out[k][r], rgb.shape[:2])
                    else:
                        rec.update(score=float("nan"), normalized=float("nan"), label=False)
                    yield rec
                bar.update(len(chunk))
        bar.close()

    def predict(self, inputs, *, progress: bool = True, maps: bool = True) -> Prediction:
        """Score a path, a list of paths, a folder (recursive) or an array of images."""
        if self.threshold is None:
            warnings.warn("this model has no decision threshold (no validation images at fit "
                          "time); labels are all False and normalised scores NaN", stacklevel=2)
        recs = list(self.predict_iter(inputs, progress=progress, maps=maps))
        get = lambda k: [r.get(k[:-1]) for r in recs]  # noqa: E731
        return Prediction(
            names=[r["name"] for r in recs],
            scores=np.array([r["score"] for r in recs], np.float64),
            normalized=np.array([r["normalized"] for r in recs], np.float64),
            labels=np.array([r["label"] for r in recs], bool),
            anomaly_maps=get("anomaly_maps"), influence_maps=get("influence_maps"),
            noise_maps=get("noise_maps"),
            errors={r["name"]: r["error"] for r in recs if r["error"]},
            threshold=float("nan") if self.threshold is None else self.threshold)

    def to_input_resolution(self, amap: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        """A map at the model's input resolution -> the original image's H x W (bilinear). In
        PatchCore's centre-crop mode the map covers the crop; outside it takes the map's minimum."""
        from PIL import Image

        from pn_jax import imageread

        h, w = hw
        d = self.cfg.data
        amap = np.asarray(amap, np.float32)
        if d.resize_mode != "patchcore":
            return np.asarray(Image.fromarray(amap).resize((w, h), Image.BILINEAR))
        (nw, nh), (l, t, r, b) = imageread.geometry(h, w, d.image_size, "patchcore", d.crop_size)
        x0, x1 = round(l * w / nw), round(r * w / nw)
        y0, y1 = round(t * h / nh), round(b * h / nh)
        out = np.full((h, w), amap.min(), np.float32)
        out[y0:y1, x0:x1] = np.asarray(Image.fromarray(amap).resize((x1 - x0, y1 - y0), Image.BILINEAR))
        return out

    # -- persistence -----------------------------------------------------------------------
    def meta(self) -> dict:
        return {"format": FORMAT, "grid": list(self.grid), "threshold": self.threshold,
                "category": self.provenance.get("category"),
                "weights_sha256": self.provenance.get("weights_sha256"),
                "provenance": self.provenance, "calibration": self.calibration,
                # float32 scores as JSON numbers: exact, so a re-chosen threshold is the fit's own
                "validation_scores": {v: {"normal": [float(x) for x in np.ravel(n)],
                                          "anomaly": [float(x) for x in np.ravel(a)]}
                                      for v, (n, a) in self.validation.items()}}

    def save(self, directory) -> str:
        """Atomic Orbax checkpoint of the state, with config, threshold and provenance."""
        from pn_jax import checkpoint

        params = dict(self.state.params)
        learned = params.pop("predictor", None)  # a learned influence predictor travels as extra arrays
        return checkpoint.save(os.path.abspath(os.fspath(directory)), self.state._replace(params=params), self.cfg,
                               self.meta(), extra_arrays={"predictor": learned} if learned is not None else None)

    def export(self, path, **kw) -> dict:
        """A self-contained `jax.export` artifact of image -> scores, labels, maps (SPEC 6)."""
        from pn_jax import export

        return export.export_model(self.cfg, self.state, self.grid, self.threshold, self.meta(), path, **kw)


def is_source(x) -> bool:
    return hasattr(x, "__getitem__") and hasattr(x, "__len__") and not isinstance(
        x, (str, bytes, os.PathLike, np.ndarray, list, tuple)) or (
        isinstance(x, list) and bool(x) and isinstance(x[0], dict))


def items_source(items: Sequence[Item]):
    """Items -> a records source (label 0, no mask) for the batch pipeline."""
    from pn_jax.data import records

    def read(i):
        return records.make_record(items[i].read(), None, 0, "good", items[i].name, "train")

    return records.Source(len(items), read, [it.name for it in items], dataset="user", category="user",
                          split="train")


# ----------------------------------------------------------------------------- provenance
def weights_sha256(cfg: Config) -> str | None:
    """sha256 of the backbone weights file the model was built with (None for random weights)."""
    from pn_jax import backbones, weights

    if cfg.model.weights == "random":
        return None
    try:
        path = backbones.weights_file(cfg.model.backbone, cfg.model.weights)
    except (AttributeError, FileNotFoundError, ValueError):
        return None
    return weights.sha256_file(path)


def provenance(cfg: Config, *, dataset: str | None = None, category: str | None = None, **extra) -> dict:
    import importlib.metadata

    import pn_jax
    from pn_jax import hardware

    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"pn_jax": pn_jax.__version__, "jax": jax.__version__, "flax": version("flax"),
            "orbax": version("orbax-checkpoint"), "backbone": cfg.model.backbone,
            "weights_sha256": weights_sha256(cfg), "dataset": dataset or cfg.data.dataset,
            "category": category, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"), "knn_ranking": hardware.knn_ranking(), **extra}


# ----------------------------------------------------------------------------- load
def resolve_checkpoint(directory, category: str | None = None) -> str:
    """A checkpoint directory, or the parent of `<category>/` checkpoints."""
    d = os.path.abspath(os.fspath(directory))
    if _is_checkpoint(d):
        return d
    if category and _is_checkpoint(os.path.join(d, category)):
        return os.path.join(d, category)
    if os.path.isdir(d):
        subs = sorted(s for s in os.listdir(d) if _is_checkpoint(os.path.join(d, s)))
        if len(subs) == 1 and not category:
            return os.path.join(d, subs[0])
        if subs:
            raise ModelError(f"{d} holds checkpoints of several categories ({', '.join(subs)}); "
                             f"name one with --category or pass {os.path.join(d, subs[0])}")
    return d  # checkpoint.load names what is wrong with it


def _is_checkpoint(d: str) -> bool:
    return os.path.isfile(os.path.join(d, "config.json")) and os.path.isfile(os.path.join(d, "meta.json"))


def load(directory, *, category: str | None = None, expected: Config | None = None) -> Model:
    """A model saved by `Model.save` (or by `experiments.run`'s train mode). `category`
    resolves a parent directory and must match the checkpoint's (unified checkpoints hold
    several); `expected`: a config whose feature-space fields must match."""
    from pn_jax import checkpoint, distributed, sharding

    d = resolve_checkpoint(directory, category)
    # Several processes: the bank straight into its shards over every device (a distributed run's mesh)
    state, cfg, meta = checkpoint.load(d, expected=expected, mesh=sharding.make_bank_mesh() if distributed.active() else None)
    saved_cat = meta.get("category") or (meta.get("provenance") or {}).get("category")
    if category and saved_cat and category != saved_cat and category not in str(saved_cat).split("+"):
        raise ModelError(f"checkpoint {d} was fitted on category {saved_cat!r}, not {category!r}; "
                         f"pass that category's checkpoint or re-fit")
    learned = (meta.get("extra_arrays") or {}).get("predictor")
    if learned is not None:
        state = state._replace(params={**state.params, "predictor": learned})
    elif cfg.noising.influence == "predictor":
        raise ModelError(f"checkpoint {d} uses --influence predictor but holds no predictor weights; re-fit it")
    grid = meta.get("grid")
    if not grid:
        raise ModelError(f"checkpoint {d} records no feature grid; re-fit it with this pn_jax")
    model = Model(cfg, tuple(grid), state, threshold=meta.get("threshold"),
                  provenance=meta.get("provenance") or {"category": saved_cat},
                  calibration=meta.get("calibration") or {})
    model.validation = {v: (np.asarray(x["normal"], np.float32), np.asarray(x["anomaly"], np.float32))
                        for v, x in (meta.get("validation_scores") or {}).items()}
    return model
