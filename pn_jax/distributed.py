"""Scale-out across processes with JAX's own multi-controller runtime (SPEC 2.9).

    pn-jax fit --distributed --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0 ...   # host 0
    pn-jax fit --distributed --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 1 ...   # host 1
    pn-jax fit --distributed ...      # SLURM, Open MPI, a TPU pod slice, or JAX_COORDINATOR_ADDRESS

`jax.distributed.initialize` joins the processes; `jax.devices()` then lists every process's
devices, and the sharded coreset and k-NN of `pn_jax.sharding` run over all of them: the
same `jax.shard_map` programs as on the devices of one process, with JAX's collectives
between hosts (gloo on CPUs, NCCL on GPUs, ICI/DCN on TPUs). There is no protocol of our own.

JAX's multi-controller model: every process runs the same program, and every computation on
a sharded array must be entered by every process. So each process runs the whole command;
only process 0 keeps what it writes (results.json, the checkpoint, the figures). The others
write into a private temporary folder that is removed when they finish (their computations
must match process 0's call for call, figures included, or a collective would wait forever),
and print one line.

The training features of a fit stay with the process that extracted them (`ProcessFeatures`):
the coreset runs over one global array of every device's own projected rows, and only what is
selected (the bank's rows, the calibration and validation images) crosses between processes.
The bank is built as a global row-sharded array (`ProcessFeatures.bank`, a
`sharding.ShardedBank`): each process keeps only the rows bound for its own devices, and what
follows (the searches, the statistics, the scoring, the checkpoint's multi-process save) works
on that array; no process holds the whole bank. A checkpoint loaded into a distributed
`test` comes the same way: each process reads and keeps only its devices' rows, checking
their sha256 chunk by chunk (`pn_jax.shardload`). The backbone's work on the test images
(`feature_batches`) and on a fit's synthetic anomalies for the threshold (`own_feature_batches`:
each process also makes only its own batches' anomalies) is split by batches over the processes.

Without `--coordinator/--num-processes/--process-id`, JAX's own cluster detection fills in
what is missing (SLURM, Open MPI, Cloud TPU, `JAX_COORDINATOR_ADDRESS` with
`JAX_NUM_PROCESSES`/`JAX_PROCESS_ID` where the cluster sets them).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile

import numpy as np

_STATE: dict = {}


def add_cli_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distributed (several processes or hosts, jax.distributed)")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run with jax.distributed: the bank and the coreset are sharded "
                        "over every process's devices; only process 0 writes results, checkpoint and figures")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="address of process 0's coordinator (default: JAX's cluster detection or "
                        "JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=_positive("--num-processes"), default=None,
                   help="number of processes in the run (default: from the cluster)")
    g.add_argument("--process-id", type=_nonneg("--process-id"), default=None,
                   help="this process's rank, 0..N-1 (default: from the cluster)")


def _positive(flag):
    def parse(s):
        if not s.isdigit() or int(s) < 1:
            raise argparse.ArgumentTypeError(f"{s!r}: {flag} takes a whole number >= 1")
        return int(s)
    return parse


def _nonneg(flag):
    def parse(s):
        if not s.isdigit():
            raise argparse.ArgumentTypeError(f"{s!r}: {flag} takes a whole number >= 0")
        return int(s)
    return parse


def check_flags(a) -> dict | None:
    """The jax.distributed arguments the flags ask for (None: not distributed), or a ValueError
    naming the flag. Checked before anything else runs."""
    coord, n, pid = (getattr(a, k, None) for k in ("coordinator", "num_processes", "process_id"))
    if not getattr(a, "distributed", False):
        given = [f for f, v in (("--coordinator", coord), ("--num-processes", n), ("--process-id", pid))
                 if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} read only with --distributed")
        return None
    if coord is not None:
        host, sep, port = coord.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--coordinator {coord!r}: give HOST:PORT, e.g. 10.0.0.1:1234 (port 1..65535)")
    if pid is not None and n is not None and pid >= n:
        raise ValueError(f"--process-id {pid} is out of range: --num-processes {n} takes ids 0..{n - 1}")
    return {"coordinator_address": coord, "num_processes": n, "process_id": pid}


def initialize(args: dict) -> dict:
    """Join the run (before any JAX computation). CPU processes talk through gloo."""
    import jax

    try:
        jax.distributed.initialize(**args)
    except (ValueError, TypeError) as e:
        missing = [f for f, k in (("--coordinator", "coordinator_address"), ("--num-processes", "num_processes"),
                                  ("--process-id", "process_id")) if args.get(k) is None]
        hint = (f"; no cluster was detected to supply {', '.join(missing)}: give them" if missing else "")
        raise ValueError(f"--distributed: jax.distributed.initialize failed: {str(e).rstrip('.')}{hint}") from None
    except RuntimeError as e:
        raise ValueError(f"--distributed: jax.distributed.initialize failed: {e}") from None
    # Before the first computation creates the CPU backend: its collectives go through gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    _STATE.update(process_id=jax.process_index(), num_processes=jax.process_count())
    return info()


def active() -> bool:
    return _STATE.get("num_processes", 1) > 1


def is_primary() -> bool:
    """Process 0 (or the only process): the one that keeps what it writes."""
    return _STATE.get("process_id", 0) == 0


def info() -> dict:
    """What results.json records about the processes of this run."""
    import jax

    if not _STATE:
        return {"processes": 1}
    return {"processes": jax.process_count(), "process_id": jax.process_index(),
            "devices": jax.device_count(), "local_devices": jax.local_device_count(),
            "platform": jax.devices()[0].platform}


def scratch_dir() -> str:
    """A private folder for what a non-primary process writes; removed by `cleanup`."""
    if "scratch" not in _STATE:
        _STATE["scratch"] = tempfile.mkdtemp(prefix=f"pn_jax-process{_STATE.get('process_id', 0)}-")
    return _STATE["scratch"]


def cleanup() -> None:
    path = _STATE.pop("scratch", None)
    if path:
        shutil.rmtree(path, ignore_errors=True)


def orbax_options():
    """Orbax's options for a checkpoint that this process reads or writes alone (a pn_jax
    checkpoint holds host arrays; without this Orbax waits at barriers for every process)."""
    import orbax.checkpoint as ocp

    if not active():
        return ocp.options.MultiprocessingOptions()
    pid = _STATE["process_id"]
    return ocp.options.MultiprocessingOptions(primary_host=pid, active_processes={pid},
                                              barrier_sync_key_prefix=f"pn_jax_p{pid}")


def from_primary(obj):
    """Process 0's JSON-able `obj`, in every process (a checkpoint's folder and temporary name,
    which every process must write to alike). One process: `obj` itself."""
    if not active():
        return obj
    import json

    from jax.experimental import multihost_utils

    raw = json.dumps(obj).encode()
    size = int(multihost_utils.broadcast_one_to_all(np.int64(len(raw))))
    buf = np.zeros(size, np.uint8)
    if is_primary():
        buf[:] = np.frombuffer(raw, np.uint8)
    return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8)).decode())


def bank_bytes_per_row(dim: int, dtype_bytes: int = 4) -> dict:
    """Device bytes one memory-bank row costs where it lives, from its dimension D and dtype:
    `stored`: the row itself (D values); `search`: what the exact sharded search adds while
    it runs (`knn.augment_rows`: [-2b, |b|^2] padded to D + knn.AUG float32 columns);
    `coreset`: one training patch in the sharded greedy loop (its `coreset_proj_dim`=128
    float32 projection; per training patch, not per bank row). A host with P of the run's
    devices holds P / n_devices of the bank's rows."""
    from pn_jax import knn

    return {"stored": dim * dtype_bytes, "search": (dim + knn.AUG) * 4, "coreset": 128 * 4}


def check_devices(flag: str | None, n_global: int) -> str:
    """The --devices value of a distributed run: every device of every process (a mesh that
    left out a process's devices would leave that process nothing to compute)."""
    if flag is None or flag == "all" or (flag.isdigit() and int(flag) == n_global):
        return "all"
    raise ValueError(f"--devices {flag}: a --distributed run shards the bank over every device of every process "
                     f"({n_global} here); drop --devices or give --devices all")


# Images per process in one all-gather: the gather holds processes x GATHER_IMAGES x N x D
# float32 on each device (2 processes x 8 x 1024 x 1024: 64 MB); rows of selected patches
# (the bank, the calibration and validation images) go GATHER_ROWS at a time.
GATHER_IMAGES = 8
GATHER_ROWS = 8192


def _blocks(n: int, n_proc: int) -> np.ndarray:
    """Image bounds of the processes' blocks: process p extracts images [b[p], b[p + 1])."""
    return np.cumsum([0] + [n // n_proc + (p < n % n_proc) for p in range(n_proc)])


def _extract_block(model, source, bounds, desc):
    from pn_jax.data import records

    lo, hi = int(bounds[_STATE["process_id"]]), int(bounds[_STATE["process_id"] + 1])
    names = getattr(source, "names", None)
    block = records.Source(hi - lo, lambda i: source[lo + i],
                           names[lo:hi] if names is not None else [str(i) for i in range(lo, hi)],
                           dataset=getattr(source, "dataset", "user"), category=getattr(source, "category", "user"),
                           split=getattr(source, "split", "train"))
    return model.extract(block, desc=desc)


def extract(model, source, *, desc: str = "features"):
    """Patch features [n, N, D] (host float32) of every image of `source`, the backbone's work
    split over the processes: process p extracts the p-th contiguous block of images (block
    sizes differ by at most one), and the blocks are all-gathered, a few images at a time,
    into every process's copy (held-out images: they calibrate). The training images of a
    fit stay where they were extracted instead (`extract_local`). One process, or fewer
    images than processes: `Model.extract`."""
    n, n_proc = len(source), _STATE.get("num_processes", 1)
    if n_proc == 1 or n < n_proc:
        return model.extract(source, desc=desc)
    from jax.experimental import multihost_utils

    bounds = _blocks(n, n_proc)
    local = _extract_block(model, source, bounds, desc)
    per = int(np.max(np.diff(bounds)))
    out = np.empty((n,) + local.shape[1:], np.float32)
    for c in range(0, per, GATHER_IMAGES):  # every process joins the same number of gathers
        part = np.zeros((GATHER_IMAGES,) + local.shape[1:], np.float32)
        rows = local[c:c + GATHER_IMAGES]
        part[:len(rows)] = rows
        got = multihost_utils.process_allgather(part)  # [n_proc, GATHER_IMAGES, N, D]
        for p in range(n_proc):
            take = max(0, min(GATHER_IMAGES, int(bounds[p + 1] - bounds[p]) - c))
            out[bounds[p] + c:bounds[p] + c + take] = got[p, :take]
    return out


def extract_local(model, source, *, desc: str = "features train"):
    """The training features of a distributed fit, kept where they were extracted: a
    `ProcessFeatures` holding this process's block of images (as `extract` splits them). One
    process, or fewer images than processes: `Model.extract`'s array."""
    n, n_proc = len(source), _STATE.get("num_processes", 1)
    if n_proc == 1 or n < n_proc:
        return model.extract(source, desc=desc)
    bounds = _blocks(n, n_proc)
    return ProcessFeatures(_extract_block(model, source, bounds, desc), bounds, _STATE["process_id"])


class ProcessFeatures:
    """Patch features [n, N, D] of which this process holds only its block of images
    ([bounds[p], bounds[p + 1])), what `fitting.fit_state` reads as it reads a
    `streaming.FeatureStore`: `coreset` (sharded over every process's devices, each device
    projecting its own rows), `rows` (the bank's rows) and `store[images]` (the calibration and
    validation images): only what is selected crosses between processes, never all features.
    `held` records what this process held and fetched (tests/test_distributed.py)."""

    def __init__(self, local: np.ndarray, bounds, process_id: int):
        self.local, self.bounds, self.pid = local, np.asarray(bounds, np.int64), process_id
        self.shape = (int(self.bounds[-1]),) + tuple(local.shape[1:])
        self.held = {"images": self.shape[0], "images_held": int(len(local)), "rows_fetched": 0}
        _STATE["train_features"] = self.held

    def __len__(self) -> int:
        return self.shape[0]

    def coreset(self, key, cfg, progress: bool = True) -> np.ndarray:
        """`coreset.coreset_indices(key, <all features>, ...)`'s indices (sharding.coreset_indices_by_process)."""
        from pn_jax import sharding

        _, n_patch, dim = self.shape
        flat, off = self.local.reshape(-1, dim), int(self.bounds[self.pid]) * n_patch
        return sharding.coreset_indices_by_process(
            key, lambda lo, hi: flat[lo - off:hi - off], np.diff(self.bounds) * n_patch, dim, cfg.bank.coreset_ratio,
            cfg.bank.coreset_proj_dim, cfg.bank.coreset_starts, sharding.process_mesh())

    def rows(self, flat_idx) -> np.ndarray:
        """Rows [len(idx), D] by flat patch index (image * N + patch), each from the process that
        holds it (every process calls this with the same indices)."""
        from jax.experimental import multihost_utils

        _, n_patch, dim = self.shape
        flat_idx = np.asarray(flat_idx, np.int64)
        owner = np.searchsorted(self.bounds, flat_idx // n_patch, side="right") - 1
        local = self.local.reshape(-1, dim)
        off = int(self.bounds[self.pid]) * n_patch
        out = np.empty((len(flat_idx), dim), np.float32)
        for c in range(0, len(flat_idx), GATHER_ROWS):
            idx, own = flat_idx[c:c + GATHER_ROWS], owner[c:c + GATHER_ROWS]
            part = np.zeros((GATHER_ROWS, dim), np.float32)
            mine = np.flatnonzero(own == self.pid)
            part[mine] = local[idx[mine] - off]
            got = multihost_utils.process_allgather(part)  # [n_proc, GATHER_ROWS, D]
            out[c:c + len(idx)] = got[own, np.arange(len(idx))]
        self.held["rows_fetched"] += int(len(flat_idx))
        return out

    def bank(self, flat_idx, mesh):
        """The bank rows `flat_idx` (in that order) as `sharding.shard_bank` would shard them over
        `mesh`, without any process holding the whole bank: the rows go GATHER_ROWS at a time
        (each from the process that holds it, as `rows`), and each process keeps only the rows
        bound for its own devices (`sharding.place_bank`). `held` records how many it kept."""
        import jax
        from jax.experimental import multihost_utils

        from pn_jax import sharding

        _, n_patch, dim = self.shape
        flat_idx = np.asarray(flat_idx, np.int64)
        m = len(flat_idx)
        layout = sharding.bank_layout(m, mesh)
        mine = [q for q, d in enumerate(mesh.devices.reshape(-1)) if d.process_index == jax.process_index()]
        spans = {q: (int(layout.first[q]), int(layout.first[q] + layout.counts[q])) for q in mine}
        kept = {q: np.zeros((hi - lo, dim), np.float32) for q, (lo, hi) in spans.items()}
        owner = np.searchsorted(self.bounds, flat_idx // n_patch, side="right") - 1
        local = self.local.reshape(-1, dim)
        off = int(self.bounds[self.pid]) * n_patch
        for c in range(0, m, GATHER_ROWS):
            idx, own = flat_idx[c:c + GATHER_ROWS], owner[c:c + GATHER_ROWS]
            part = np.zeros((GATHER_ROWS, dim), np.float32)
            sel = np.flatnonzero(own == self.pid)
            part[sel] = local[idx[sel] - off]
            got = multihost_utils.process_allgather(part)  # [n_proc, GATHER_ROWS, D]: a transient chunk
            for q, (lo, hi) in spans.items():  # bank rows [c, c + len(idx)) that land on device q
                a, b = max(lo, c), min(hi, c + len(idx))
                if a < b:
                    kept[q][a - lo:b - lo] = got[own[a - c:b - c], np.arange(a - c, b - c)]
        self.held["rows_fetched"] += int(m)
        self.held.update(bank_rows=int(m), bank_rows_held=int(sum(len(v) for v in kept.values())),
                         bank_chunk_rows=int(len(self.bounds) - 1) * GATHER_ROWS)
        by_first = {lo: kept[q] for q, (lo, _) in spans.items()}
        return sharding.place_bank(m, dim, mesh, lambda lo, hi: by_first[lo][:hi - lo])

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.atleast_1d(np.asarray(idx, np.int64))
        _, n_patch, dim = self.shape
        return self.rows((idx[:, None] * n_patch + np.arange(n_patch)).reshape(-1)).reshape(len(idx), n_patch, dim)


def held() -> dict | None:
    """What this process held of a distributed fit's training features (`ProcessFeatures.held`)."""
    return _STATE.get("train_features")


def feature_batches(model, source, *, desc: str = "scoring", timer=None, stage: str = "extract_test_s"):
    """`batches.feature_batches` of a test pass with the backbone's work split over the
    processes: every process decodes every batch (the labels, masks and images the metrics,
    gallery and figures read, which every process computes alike), and in each group of
    n_processes consecutive batches, process p runs the backbone on the p-th at the batch's own
    shape (the bits of one process's pass), padded to the batch size for one all-gather per
    group. (batch, features [n, N, D] host float32), in source order, in every process."""
    import contextlib
    import itertools

    from jax.experimental import multihost_utils
    from tqdm.auto import tqdm

    n_proc, pid = _STATE["num_processes"], _STATE["process_id"]
    rec = _STATE["test_features"] = {"batches": 0, "batches_extracted": 0}
    it = iter(tqdm(model.batches(source), desc=desc, unit="batch", leave=False))
    shape = None
    while True:
        with timer(stage) if timer is not None else contextlib.nullcontext():
            group = list(itertools.islice(it, n_proc))
            if not group:
                return
            # A process without a batch in a group (the last one) sends zeros, of the shape of its
            # earlier batches; only when there were fewer batches than processes does it extract
            # the first batch to learn that shape.
            todo = group[pid] if pid < len(group) else (group[0] if shape is None else None)
            f = np.asarray(model.features(todo["image"]), np.float32) if todo is not None else None
            rec["batches"] += len(group)
            rec["batches_extracted"] += todo is not None
            shape = (model.cfg.batch_size,) + f.shape[1:] if shape is None else shape
            part = np.zeros(shape, np.float32)
            if pid < len(group):
                part[:len(f)] = f
            got = multihost_utils.process_allgather(part)  # [n_proc, batch size, N, D]
        for p, batch in enumerate(group):
            yield batch, got[p, :len(batch["image"])]


def held_test_batches() -> dict | None:
    """The test batches this process's last distributed test pass went through and extracted."""
    return _STATE.get("test_features")


def own_feature_batches(model, source, *, desc: str = "threshold"):
    """Features [n, N, D] (host float32) of each batch of `source`, in source order, in every
    process, for a pass whose batches nothing reads but the backbone (a fit's synthetic
    anomalies for the threshold: only their scores are kept). The backbone's work is split as
    `feature_batches` splits a test pass (process p runs the p-th batch of each group of
    n_processes, at the batch's own shape: the bits of one process's pass), and each process
    reads and makes only the images of its own batches (a source of just those, batched alike
    since every batch but the last is full). The shape of the gathers comes from one small
    all-gather of each process's first feature shape (process 0 always has the first batch).
    `held_threshold_batches` records the batches and images this process handled."""
    from jax.experimental import multihost_utils
    from tqdm.auto import tqdm

    from pn_jax.data import records

    n_proc, pid, bs, n = _STATE["num_processes"], _STATE["process_id"], model.cfg.batch_size, len(source)
    n_batches = -(-n // bs)
    mine = [np.arange(s, min(s + bs, n)) for s in range(pid * bs, n, n_proc * bs)]
    idx = np.concatenate(mine) if mine else np.zeros(0, np.int64)
    made: list = []  # list.append is atomic: the decode workers are threads
    read = lambda j: made.append(j) or source[int(idx[j])]  # noqa: E731

    rec = _STATE["threshold_features"] = {"batches": n_batches, "batches_extracted": 0, "images_made": 0}
    if n == 0:
        return
    names = getattr(source, "names", None)
    own = iter(model.batches(records.Source(
        len(idx), read, [names[i] if names is not None else str(i) for i in idx],
        dataset=getattr(source, "dataset", "user"), category=getattr(source, "category", "user"),
        split=getattr(source, "split", "validation"), has_masks=getattr(source, "has_masks", False),
        log=records.ReadLog()))) if len(idx) else iter(())  # the reads are logged by `source` itself

    def extract(g):
        if g >= len(mine):
            return None
        f = np.asarray(model.features(next(own)["image"]), np.float32)
        if len(f) != len(mine[g]):
            raise RuntimeError(f"{desc}: batch of {len(f)} images where {len(mine[g])} were expected")
        rec["batches_extracted"] += 1
        return f

    f = extract(0)
    dims = multihost_utils.process_allgather(np.asarray(f.shape[1:] if f is not None else (0, 0), np.int64))
    shape = (bs,) + tuple(int(d) for d in np.asarray(dims).reshape(n_proc, -1)[0])
    for g in tqdm(range(-(-n_batches // n_proc)), desc=desc, unit="group", leave=False):
        f = f if g == 0 else extract(g)
        part = np.zeros(shape, np.float32)
        if f is not None:
            part[:len(f)] = f
        got = multihost_utils.process_allgather(part)  # [n_proc, batch size, N, D]
        rec["images_made"] = len(made)
        for p in range(n_proc):
            b = g * n_proc + p
            if b < n_batches:
                yield got[p, :min(bs, n - b * bs)]
    rec["images_made"] = len(made)


def held_threshold_batches() -> dict | None:
    """The synthetic-anomaly batches of this process's last distributed threshold stage, those
    it extracted, and the images it read and made (`own_feature_batches`)."""
    return _STATE.get("threshold_features")
