"""The one loop over images: preprocessed batches -> backbone features on the device, used by
fit, test, tuning, the figures and the studies (`Model.extract` collects them on the host,
`score_source` scores each batch with every model; the feature loop over a feature array is
`Model.score_features`).

The loop is asynchronous (issue 25). Decoding runs on worker threads (`data.pipeline`); batch
i + 1's features are dispatched (`ahead`) before batch i is handed on. On accelerators
`score_source` dispatches batch i's scores before it copies batch i - 1's to the host, so the
host waits once per batch, on results whose successors are already queued, and the device is
never idle while the host converts, draws thumbnails or updates a progress bar. XLA:CPU runs
the programs one thread dispatches one after another, and part of each k-NN search on one
core; there two batches are scored at once, each called from its own thread (`in_flight`,
`hardware.cpu_streams`), so one batch's top-k and gathers run beside the other's matmul (the
threshold's leave-one-image-out batches and the statistics' image batches too). Stage timings are taken without extra waits:
a stage is charged the time its own code ran, its one wait included (`feature_batches`' stage:
the wait for decoded images and the dispatch; the device time of the features lands where
they are first waited for: `extract`'s copy to the host, `score_source`'s scores).
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
from typing import Iterable, Iterator, NamedTuple

import jax
import numpy as np
from tqdm.auto import tqdm

from pn_jax import distributed, hardware, hostmem
from pn_jax.timing import Timer

# Maps kept for the figures, with their titles.
MAP_TITLES = {"anomaly_maps": "anomaly map", "influence_maps": "influence map", "noise_maps": "noise map"}


def ahead(items: Iterable, start) -> Iterator[tuple]:
    """(item, start(item)) for every item, in order, with start(item i + 1) called before item
    i is yielded: work that `start` dispatches to the device runs while the consumer handles
    item i. An error in the source or in `start` surfaces at the item it belongs to, after
    the items before it were yielded."""
    it = iter(items)
    try:
        prev = next(it)
    except StopIteration:
        return
    prev = (prev, start(prev))
    while True:
        try:
            item = next(it)
            cur = (item, start(item))
        except StopIteration:
            break
        except Exception as e:  # noqa: BLE001 - re-raised once the earlier item is handed on
            yield prev
            raise e
        yield prev
        prev = cur
    yield prev


def in_flight(items: Iterable, fn, streams: int, waiting=contextlib.nullcontext) -> Iterator[tuple]:
    """(item, fn(item)) for every item, in order, with up to `streams` calls of `fn` running at
    once, each on its own thread (`hardware.cpu_streams`: XLA:CPU runs programs called from
    different threads side by side). Two first calls of a jitted function compile it once (JAX
    waits for the other thread's compile; tests/test_streams.py). Items are drawn from `items`
    on this thread as calls finish (at most `streams` results wait). An error in `fn` surfaces
    at its item, after the items before it were yielded; calls still running when the consumer
    stops are waited for (none spills into the next stage's time). streams <= 1: plain calls,
    one after another.
    `waiting()`: a context entered around each call made or waited for here (a stage timer),
    not around drawing the items."""
    it = iter(items)
    if streams <= 1:
        for item in it:
            with waiting():
                out = fn(item)
            yield item, out
        return
    pending: collections.deque = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(streams, thread_name_prefix="pn_jax-stream") as pool:
        try:
            for item in it:
                pending.append((item, pool.submit(fn, item)))
                while len(pending) >= streams:
                    done, fut = pending.popleft()
                    with waiting():
                        out = fut.result()
                    yield done, out
            while pending:
                done, fut = pending.popleft()
                with waiting():
                    out = fut.result()
                yield done, out
        finally:
            for _, fut in pending:
                fut.cancel()


@contextlib.contextmanager
def loaded(items: list, load, batch: int, workers: int):
    """(items, [load(item)]) a batch of `batch` items at a time, in order, `load` run ahead on
    `workers` threads (at most two batches read ahead): the user's `predict` input."""
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        pending = collections.deque(pool.submit(load, it) for it in items[:2 * batch])
        nxt = len(pending)

        def gen():
            nonlocal nxt
            for start in range(0, len(items), batch):
                chunk = items[start:start + batch]
                got = [pending.popleft().result() for _ in chunk]
                while nxt < len(items) and len(pending) < 2 * batch:
                    pending.append(pool.submit(load, items[nxt]))
                    nxt += 1
                yield chunk, got

        yield gen()


def streams_for(cfg) -> int:
    """Batches scored at once under config `cfg`: `hardware.cpu_streams`, but one where scoring
    runs collectives (a bank sharded over devices, or several processes), whose launches must
    come in the same order everywhere."""
    if distributed.active() or cfg.devices > 1:
        return 1
    return hardware.cpu_streams()


class Dispatched(NamedTuple):
    """Scores dispatched to the device (`Model.dispatch_scores`): per batch (its number of real
    images, the device outputs, {variant: (image scores, maps)})."""
    parts: list
    variants: tuple


def to_host(d: Dispatched) -> dict:
    """The host arrays of dispatched scores (`Model.score_features`' dict): one wait."""
    host = lambda x, m: None if x is None else np.asarray(x)[:m]  # noqa: E731
    parts = [({k: host(v, m) for k, v in dev.items()},
              {v: (host(sc, m), host(mp, m)) for v, (sc, mp) in var.items()}) for m, dev, var in d.parts]
    cat = lambda xs: None if xs[0] is None else (xs[0] if len(xs) == 1 else np.concatenate(xs))  # noqa: E731
    merged = {k: cat([p[0][k] for p in parts]) for k in parts[0][0]}
    merged["variants"] = {v: tuple(cat([p[1][v][i] for p in parts]) for i in (0, 1)) for v in d.variants}
    return merged


def overlap() -> bool:
    """Whether `score_source` queues a batch's scoring behind its features and the next
    batch's features behind that. Not on XLA:CPU: queued from one thread, its programs run one
    after another and the queue bought nothing measurable (README, issue 25); it scores
    `hardware.cpu_streams` batches at once from threads instead (`in_flight`). GPUs and TPUs
    run queued programs in order and the host's work hides behind them."""
    return jax.default_backend() != "cpu"


def feature_batches(model, source, *, desc: str = "features", timer: Timer | None = None,
                    stage: str = "extract_s", lookahead: bool = True) -> Iterator[tuple[dict, jax.Array]]:
    """(batch, patch features [n, N, D] on the device) for every batch of `source`: with
    `lookahead`, dispatched and the next batch's features dispatched first (`ahead`); without,
    waited for. With a `timer`, the time spent here (waiting for decoded images, dispatching,
    waiting without lookahead) is added to `timer[stage]`."""
    batches = tqdm(model.batches(source), desc=desc, unit="batch", leave=False)
    start = lambda b: model.features(b["image"])  # noqa: E731
    gen = ahead(batches, start) if lookahead else ((b, jax.block_until_ready(start(b))) for b in batches)
    while True:
        if timer is None:
            got = next(gen, None)
        else:
            with timer(stage):
                got = next(gen, None)
        if got is None:
            return
        yield got


def extract(model, source, *, desc: str = "features", keep: tuple[str, ...] = ()):
    """Patch features [n, N, D] (host float32) of a source; with `keep` (batch fields, e.g.
    ("mask", "label")): (features, {field: array over all images}).

    One array filled in place, its pages faulted in ahead of the writes (`hostmem`): a
    concatenate of the batches would first-touch a second copy of every feature."""
    out, n, kept = None, 0, {k: [] for k in keep}
    try:
        for batch, f in feature_batches(model, source, desc=desc):
            if out is None:
                out = hostmem.PrefaultedArray((len(source),) + tuple(f.shape[1:]), np.float32)
            out.claim(n + len(f))[n:n + len(f)] = np.asarray(f)
            n += len(f)
            for k in keep:
                kept[k].append(np.asarray(batch[k][:len(f)]))
    finally:
        arr = out.close() if out is not None else None
    if arr is None:
        raise ValueError(f"no images to extract features from ({desc})")
    return (arr[:n], {k: np.concatenate(v) for k, v in kept.items()}) if keep else arr[:n]


def owned(feature_batches, owners):
    """(owners of the batch's images, features) from `batches.feature_batches`' (batch, features)."""
    n = 0
    for _, f in feature_batches:
        yield owners[n:n + len(f)], f
        n += len(f)


def score_loo(model, owned_batches, variants, bank_owner=None) -> dict:
    """{"image_scores", "variants": {variant: (image scores, None)}} of training images scored
    leave-one-image-out, batch by batch: `Model.score_features` scores `cfg.batch_size` images
    per call whatever it is given, so the scores are those of the whole array, bit for bit,
    and only the image scores are kept (the threshold needs nothing else)."""
    bank_owner = model.bank_owner if bank_owner is None else bank_owner
    score = lambda of: model.score_features(of[1], variants, exclude=(bank_owner, of[0]),  # noqa: E731
                                            outputs=("image_scores",))
    parts = [p for _, p in in_flight(owned_batches, score, streams_for(model.cfg))]
    if not parts:
        raise ValueError("no validation images to score")
    return {"image_scores": np.concatenate([p["image_scores"] for p in parts]),
            "variants": {v: (np.concatenate([p["variants"][v][0] for p in parts]), None) for v in variants}}


class Figure(NamedTuple):
    """A test image kept for the figures, with what its test pass computed (nothing is
    extracted or scored a second time for them)."""
    image: np.ndarray  # normalised model input [S, S, 3]
    maps: dict  # MAP_TITLES key -> map at the input resolution
    mask: np.ndarray  # bool ground truth
    name: str
    label: int
    feats: np.ndarray  # patch features [N, D]
    patch_scores: np.ndarray  # [N], the configured score of the first model


def score_source(models: dict, source, timer: Timer, *, variants=(None,), keep_maps=True,
                 n_figures=0, desc="scoring", gallery=None):
    """Score every image of `source` with each model (same config and extractor); features
    are extracted once per batch. Returns labels, masks, names, defect types, {(model name,
    variant): image scores / maps} and up to `n_figures` `Figure`s. Variant None is the
    configured score. `gallery`: an object whose `offer(batch, scores, maps)` sees the first
    model's configured scores and anomaly maps of every batch (the report's gallery keeps a
    few images from them, whether or not the maps are kept here). Batch i's scores are
    dispatched before batch i - 1's are copied to the host (one wait per batch); only the
    outputs used here are copied."""
    labels, masks, names, defects, fig_items = [], [], [], [], []
    keys = [(s, v) for s in models for v in variants]
    scores = {k: [] for k in keys}
    maps = {k: [] for k in keys}
    first = next(iter(models))
    need_maps = keep_maps or gallery is not None

    def outputs(sname):
        out = ["image_scores"] + (["anomaly_maps"] if need_maps or (sname == first and n_figures) else [])
        if sname == first and n_figures:
            out += list(MAP_TITLES) + ["patch_scores"]
        return out

    def finish(batch, feats, hosted):
        n = len(batch["image"])
        for sname, model in models.items():
            out = hosted[sname]
            for v in variants:
                sc, amap = out["variants"][v]
                scores[(sname, v)].append(sc)
                if keep_maps:
                    maps[(sname, v)].append(amap.astype(np.float32))
                if gallery is not None and sname == first and v is None:
                    gallery.offer(batch, sc[:n], amap[:n])
            if sname == first and len(fig_items) < n_figures:
                # up to half the figures per label, so both normal and anomalous images are shown
                extra = {k: out[k] for k in MAP_TITLES if k in out}
                for i in range(n):
                    label = int(batch["label"][i])
                    if sum(f.label == label for f in fig_items) < -(-n_figures // 2) and len(fig_items) < n_figures:
                        fig_items.append(Figure(np.asarray(batch["image"][i]), {k: v[i] for k, v in extra.items()},
                                                np.asarray(batch["mask"][i]) > 0.5, str(batch["name"][i]), label,
                                                np.asarray(feats[i]), out["patch_scores"][i]))
        labels.append(np.asarray(batch["label"][:n]))
        if keep_maps:
            masks.append(np.asarray(batch["mask"][:n]) > 0.5)
        names.extend(list(batch["name"][:n]))
        defects.extend(str(d) for d in batch.get("defect", ["good" if y == 0 else "anomalous"
                                                              for y in batch["label"]])[:n])

    dispatch = lambda feats: {sname: model.dispatch_scores(feats, variants, outputs=outputs(sname))  # noqa: E731
                              for sname, model in models.items()}
    hosted = lambda dispatched: {sname: to_host(d) for sname, d in dispatched.items()}  # noqa: E731
    streams = streams_for(models[first].cfg)
    queue = overlap() and streams == 1
    if distributed.active():  # the backbone's work split over the processes, features all-gathered
        queue = False
        loop = distributed.feature_batches(models[first], source, desc=desc, timer=timer, stage="extract_test_s")
    else:
        loop = feature_batches(models[first], source, desc=desc, timer=timer, stage="extract_test_s", lookahead=queue)
    if not queue:  # each batch scored and copied by one call; on the CPU `streams` batches at once
        for (batch, feats), out in in_flight(loop, lambda bf: hosted(dispatch(bf[1])), streams,
                                             waiting=lambda: timer("score_s")):
            with timer("score_s"):
                finish(batch, feats, out)
    else:  # batch i's scores dispatched before batch i - 1's are copied
        pending = None
        for batch, feats in loop:
            with timer("score_s"):
                dispatched = dispatch(feats)
                if pending is not None:
                    finish(*pending[:2], hosted(pending[2]))
                pending = (batch, feats, dispatched)
        if pending is not None:
            with timer("score_s"):
                finish(*pending[:2], hosted(pending[2]))
    if not labels:
        raise ValueError(f"no images to score ({desc})")
    return {
        "labels": np.concatenate(labels),
        "masks": np.concatenate(masks) if keep_maps else None,
        "names": names,
        "defects": np.array(defects, dtype=str),
        "scores": {k: np.concatenate(v) for k, v in scores.items()},
        "maps": {k: np.concatenate(v) for k, v in maps.items()} if keep_maps else None,
        "figures": fig_items,
    }
