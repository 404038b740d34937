"""Train features streamed to disk, projected on the fly: a fit whose memory does not grow
with D x patches (issue 26; used under `--max-memory`).

What the coreset needs in memory is small. The greedy k-center loop reads only the random
projection of every train patch ([n * N, 128] float32: 512 bytes a patch against 4 KB for
D = 1024), and the bank is 1% of the rows. So the full features of each batch go to a file
on disk as they come out of the backbone (written with `os.write`, never memory-mapped: the
page cache holds them, not this process), and each batch is projected at once. The greedy
then runs on the projected rows, and the bank's rows, the calibration and the validation
images are read back by offset.

Exactness. The projection is applied to the same chunks of 32,768 rows, by the same call,
as `coreset.project_chunked` applies it to the whole array (rows are buffered until a chunk
is full), so the projected values are bit for bit the in-memory fit's, and
`coreset.select_projected` with the same key selects the same points (tested). Nothing is
approximate: the full-resolution features of the selected rows are the bank.
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile

import jax
import numpy as np
from tqdm.auto import tqdm

from pn_jax import coreset as coreset_lib
from pn_jax import precision as precision_lib
from pn_jax import projection

CHUNK = 32768  # = coreset.project_chunked's default chunk


class FeatureStore:
    """Patch features [n, N, D] of the train images in a file, with their coreset projection
    in memory. Indexing by image (`store[idx]`) reads those images' features back."""

    def __init__(self, n_images: int, directory: str | None = None):
        self.n_images = n_images
        self.dir = tempfile.mkdtemp(prefix="pn_jax_features_", dir=directory)
        self.path = os.path.join(self.dir, "features.f32")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.shape = None
        self.projected = None
        self._buf, self._done = [], 0  # rows waiting for a full projection chunk; rows projected

    # -- writing ---------------------------------------------------------------------------
    def start(self, n_patch: int, dim: int, proj: np.ndarray | None, precision, *, ratio: float = 0.01,
              preselect: float = 0.0, n_starts: int = 10) -> None:
        """`preselect` > 0: each projected chunk keeps only its own pre-selected coreset
        (`coreset.preselect_chunk`), so the projection too stops growing with the patches."""
        self.shape = (self.n_images, n_patch, dim)
        self._proj, self._precision = proj, precision
        self._ratio, self._pre, self._n_starts = ratio, preselect, n_starts
        out = dim if proj is None else proj.shape[1]
        rows = self.n_images * n_patch
        if preselect:
            rows = -(-rows // CHUNK) * coreset_lib.n_preselect(min(rows, CHUNK), ratio, preselect)
        self.projected = np.empty((rows, out), np.float32)
        self.survivors, self._kept = [], 0

    def append(self, feats: np.ndarray) -> None:
        flat = np.ascontiguousarray(feats, np.float32).reshape(-1, self.shape[2])
        mv = memoryview(flat).cast("B")
        while mv:
            mv = mv[os.write(self._fd, mv):]
        self._buf.append(flat)
        if sum(len(b) for b in self._buf) >= CHUNK:
            self._project(final=False)

    def finish(self, n_written: int) -> None:
        self._project(final=True)
        if n_written != self.n_images:
            raise ValueError(f"feature store: {n_written} images written, {self.n_images} expected")

    def _project(self, final: bool) -> None:
        rows = np.concatenate(self._buf) if len(self._buf) > 1 else (self._buf[0] if self._buf else None)
        self._buf = []
        if rows is None:
            return
        use = len(rows) if final else (len(rows) // CHUNK) * CHUNK
        for i in range(0, use, CHUNK):
            part = rows[i:i + CHUNK]
            if self._proj is None:
                proj = part
            elif jax.default_backend() == "cpu":  # the call project_chunked makes on a CPU
                proj = projection.project_host(part, self._proj)
            else:
                proj = np.asarray(coreset_lib.project(jax.numpy.asarray(part), self._proj, self._precision))
            if self._pre:  # keep the chunk's own coreset only (coreset.preselect_chunk)
                keep = coreset_lib.preselect_chunk(self._key, self._done // CHUNK, proj, self._ratio, self._pre,
                                                   self._n_starts, self._precision)
                self.survivors.append(self._done + keep)
                proj = proj[keep]
            self.projected[self._kept:self._kept + len(proj)] = proj
            self._kept += len(proj)
            self._done += len(part)
        if use < len(rows):
            self._buf = [rows[use:].copy()]

    # -- reading ---------------------------------------------------------------------------
    def _read(self, offset: int, nbytes: int, out: np.ndarray) -> None:
        mv = memoryview(out.reshape(-1)).cast("B")
        got = 0
        while got < nbytes:
            k = os.preadv(self._fd, [mv[got:]], offset + got)
            if k <= 0:
                raise OSError(f"feature store {self.path}: short read")
            got += k

    def rows(self, flat_idx) -> np.ndarray:
        """Rows [len(idx), D] by flat patch index (image * N + patch)."""
        d = self.shape[2]
        out = np.empty((len(flat_idx), d), np.float32)
        for j, i in enumerate(np.asarray(flat_idx, np.int64)):
            self._read(int(i) * d * 4, d * 4, out[j])
        return out

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.atleast_1d(np.asarray(idx, np.int64))
        _, n, d = self.shape
        out = np.empty((len(idx), n, d), np.float32)
        for j, i in enumerate(idx):
            self._read(int(i) * n * d * 4, n * d * 4, out[j])
        return out

    def __len__(self) -> int:
        return self.n_images

    def coreset(self, key, cfg, progress: bool = True) -> np.ndarray:
        """`coreset.coreset_indices(key, <all features>, ...)`, from the projected rows."""
        if not np.array_equal(jax.random.key_data(self._key), jax.random.key_data(key)):
            raise ValueError("feature store: the coreset key differs from the one its projection was drawn with")
        surv = np.concatenate(self.survivors) if self._pre else None
        idx = np.asarray(coreset_lib.select_projected(key, self.projected[:self._kept], cfg.bank.coreset_ratio,
                                                      cfg.bank.coreset_starts, progress=progress,
                                                      precision=precision_lib.of(cfg), n_total=self._done,
                                                      survivors=surv))
        self.projected = None  # the selection was all it was for
        return idx

    def projection(self, key) -> np.ndarray:
        """Every row's projection (`tilebank.coreset` selects per tile position from it), then
        dropped from the store."""
        if not np.array_equal(jax.random.key_data(self._key), jax.random.key_data(key)):
            raise ValueError("feature store: the coreset key differs from the one its projection was drawn with")
        if self._pre:
            raise ValueError("feature store: a pre-selected projection holds the survivors only")
        out, self.projected = self.projected[:self._kept], None
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.projected = None
        shutil.rmtree(self.dir, ignore_errors=True)


def extract(model, source, coreset_key, *, directory: str | None = None, desc: str = "features train") -> FeatureStore:
    """Stream `source`'s features (`model.batches` -> `model.features`) into a FeatureStore
    whose projection is `coreset_key`'s (the key `detector.fit` gives the coreset)."""
    cfg = model.cfg
    store = FeatureStore(len(source), directory)
    store._key = coreset_key
    n = 0
    try:
        for b in tqdm(model.batches(source), desc=desc, unit="batch", leave=False):
            f = np.asarray(model.features(b["image"]))
            if store.shape is None:
                d, p = f.shape[2], cfg.bank.coreset_proj_dim
                proj = (np.asarray(coreset_lib.random_projection(coreset_lib.projection_key(coreset_key), d, p))
                        if p < d else None)
                store.start(f.shape[1], d, proj, precision_lib.of(cfg), ratio=cfg.bank.coreset_ratio,
                            preselect=cfg.bank.coreset_preselect, n_starts=cfg.bank.coreset_starts)
            store.append(f)
            n += len(f)
        if store.shape is None:
            raise ValueError(f"no images to extract features from ({desc})")
        store.finish(n)
    except BaseException:
        store.close()
        raise
    return store


@functools.partial(jax.jit, donate_argnums=0)
def _put_rows(buf, rows, start):
    return jax.lax.dynamic_update_slice(buf, rows, (start, 0))


def image_batches(n: int, batch: int) -> list[slice]:
    """Slices of `batch` images (at least 2) covering n images, a lone last image joined to the
    batch before it (`Subset.chunks`)."""
    batch = max(2, int(batch))
    starts = list(range(0, n, batch))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return [slice(lo, hi) for lo, hi in zip(starts, starts[1:] + [n])]


class Subset:
    """Some of a FeatureStore's images (the calibration or validation sample), read back
    `batch` images at a time, so that the sample is never held whole twice (issue 26: at
    1024 px, 32 images are 2.1 GB). The maths that consume it run image by image
    (`lax.map` over images; `Model.score_features` over batches), so reading in batches gives
    the whole array's results bit for bit (tests/test_streaming.py)."""

    def __init__(self, store: FeatureStore, idx, batch: int, cols: slice = slice(None)):
        self.store, self.idx, self.batch = store, np.asarray(idx, np.int64), max(2, int(batch))
        self.cols = cols  # the patches of each image kept (one tile position's, pn_jax/tilebank.py)

    def view(self, cols: slice) -> "Subset":
        """The same images, patches `cols` only (of the whole image's patches)."""
        return Subset(self.store, self.idx, self.batch, cols)

    def __len__(self) -> int:
        return len(self.idx)

    @property
    def shape(self) -> tuple[int, int, int]:
        _, n, d = self.store.shape
        return len(self.idx), len(range(n)[self.cols]), d

    def chunks(self):
        """(slice into the sample, features [b, N, D] host float32) per batch of images. No
        batch holds a single image unless the sample does: XLA compiles a `lax.map` of one
        step without its loop, and the influence then differs in the last bits (measured:
        2e-11 of 0.09) from the same image mapped among others; so a lone last image joins
        the batch before it."""
        for sl in image_batches(len(self.idx), self.batch):
            f = self.store[self.idx[sl]]
            yield sl, (f if self.cols == slice(None) else np.ascontiguousarray(f[:, self.cols]))

    def device_rows(self) -> jax.Array:
        """The sample's features as one [c * N, D] device array, filled batch by batch in place
        (a donated buffer): one copy of the sample, where `jnp.asarray` of a host array would
        hold two. The same values as `jnp.asarray(feats.reshape(-1, D))` of the whole array."""
        _, n, d = self.shape
        buf = jax.numpy.zeros((len(self.idx) * n, d), jax.numpy.float32)
        for sl, f in self.chunks():
            buf = _put_rows(buf, f.reshape(-1, d), sl.start * n)
        return buf
