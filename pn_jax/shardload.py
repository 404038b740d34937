"""A checkpoint's memory bank read straight into the sharded layout of a distributed run.

`checkpoint.load(..., mesh=...)` (a `--distributed` test) gets the bank as
`sharding.shard_bank(<the whole bank>, mesh)` would shard it, a `sharding.ShardedBank`, with no
process ever holding the whole bank: each process reads the saved bank's rows by range from
the checkpoint's arrays (TensorStore, the store Orbax writes) and keeps only the rows bound for
its own devices (`sharding.place_bank`).

Integrity: meta.json records a sha256 per contiguous run of rows, one over the whole bank (a
one-process checkpoint) or one per device's rows (a distributed fit's, as `checkpoint.save` writes them).
A process checks every run that overlaps its rows, reading that run in order, CHUNK_ROWS rows at
a time, into one running sha256, and keeps only its own rows of each chunk. So with a
one-process checkpoint every process reads the whole bank once, chunk by chunk; with a
distributed one, only the runs it holds rows of. The processes then agree (an all-gather of
each one's verdict) before any of them goes on: a damaged run refuses the checkpoint in every
process, never leaving one waiting on a collective. `read()` records what this process read and
kept (tests/test_distributed.py).
"""
from __future__ import annotations

import hashlib

import numpy as np

CHUNK_ROWS = 8192
_STATE: dict = {}


def _open_bank(arrays_dir: str):
    """The saved bank `state.bank` as a TensorStore array (rows read by range); the zarr version
    Orbax wrote it with is the one whose metadata is there."""
    import orbax.checkpoint as ocp
    import tensorstore as ts
    from etils import epath

    err, ctx = None, ocp.type_handlers.get_ts_context()
    for zarr3 in (False, True):
        info = ocp.type_handlers.ParamInfo(name="state.bank", parent_dir=epath.Path(arrays_dir),
                                           is_ocdbt_checkpoint=True, use_zarr3=zarr3, ts_context=ctx)
        try:
            return ts.open(ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=True), open=True,
                           context=ctx).result()
        except Exception as e:  # noqa: BLE001 - the other zarr version, then refused by the caller
            err = e
    raise err


def runs(spec: dict, listed_shape) -> list[tuple[int, int, str]]:
    """The hashed runs of rows [(lo, hi, sha256)] of a checkpoint's bank entry in meta.json,
    covering rows [0, M) in order; ValueError when they do not."""
    if "shards" in spec:
        got = [(int(s["rows"][0]), int(s["rows"][1]), str(s["sha256"])) for s in spec["shards"]]
        m = int(spec["rows"])
    else:
        m = int(listed_shape[0])
        got = [(0, m, str(spec["sha256"]))]
    ends = [0] + [hi for _, hi, _ in got]
    if any(lo != ends[i] or hi <= lo for i, (lo, hi, _) in enumerate(got)) or ends[-1] != m:
        raise ValueError(f"the bank's hashed rows {[(lo, hi) for lo, hi, _ in got]} do not cover its {m} rows in order")
    return got


def read(arrays_dir: str, spec: dict, mesh):
    """The bank of the checkpoint arrays `arrays_dir` (meta.json's entry `spec`) as a
    `sharding.ShardedBank` over `mesh`, each process reading and keeping only its devices'
    rows (and the hashed runs that overlap them, chunk by chunk). Every process calls it alike.
    Returns (bank, None), or (None, what is wrong) in every process when any process found a run
    that reads back other than it was saved."""
    import jax

    from pn_jax import sharding

    shape, dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
    bad = None
    try:
        hashed = runs(spec, shape)
    except (KeyError, TypeError, ValueError) as e:
        hashed, bad = [], f"meta.json: {e}"
    m, dim = (hashed[-1][1] if hashed else 0), shape[1]
    layout = sharding.bank_layout(max(m, 1), mesh)
    mine = {int(layout.first[q]): (int(layout.first[q]), int(layout.first[q] + layout.counts[q]))
            for q, d in enumerate(mesh.devices.reshape(-1)) if d.process_index == jax.process_index()}
    kept = {lo: np.zeros((hi - lo, dim), dtype) for lo, hi in mine.values()}
    held = {"bank_rows": m, "bank_rows_held": int(sum(hi - lo for lo, hi in mine.values())),
            "rows_read": 0, "chunk_rows": 0, "runs_checked": 0}
    try:
        store = _open_bank(arrays_dir) if hashed else None
        if store is not None and (tuple(store.shape) != shape or np.dtype(store.dtype.numpy_dtype) != dtype):
            bad = f"the saved bank is {tuple(store.shape)} {store.dtype}, meta.json lists {shape} {dtype.name}"
        for lo, hi, sha in hashed if bad is None else []:
            if not any(a < hi and lo < b for a, b in mine.values()):
                continue  # another process's rows: it checks them
            digest = hashlib.sha256()
            for c in range(lo, hi, CHUNK_ROWS):
                chunk = np.ascontiguousarray(store[c:min(c + CHUNK_ROWS, hi)].read().result(), dtype)
                digest.update(chunk.view(np.uint8).reshape(-1))
                held["rows_read"] += len(chunk)
                held["chunk_rows"] = max(held["chunk_rows"], len(chunk))
                for a, b in mine.values():  # this process's rows of the chunk
                    x, y = max(a, c), min(b, c + len(chunk))
                    if x < y:
                        kept[a][x - a:y - a] = chunk[x - c:y - c]
            held["runs_checked"] += 1
            if digest.hexdigest() != sha:
                bad = f"array state/bank rows [{lo}, {hi}) read back other than they were saved (files under arrays/)"
                break
    except Exception as e:  # noqa: BLE001 - any read failure is a damaged payload
        bad = f"reading the bank from {arrays_dir} failed ({type(e).__name__}: {str(e)[:300]})"
    bad = _agree(bad)
    _STATE["bank"] = held
    if bad is not None:
        return None, bad
    return sharding.place_bank(m, dim, mesh, lambda lo, hi: kept[lo][:hi - lo], dtype), None


def _agree(bad: str | None) -> str | None:
    """The first process's complaint (by process order), in every process; None when none has one."""
    from pn_jax import distributed

    if not distributed.active():
        return bad
    from jax.experimental import multihost_utils

    msg = np.zeros(512, np.uint8)
    raw = (bad or "").encode()[:511]
    msg[:len(raw)] = np.frombuffer(raw, np.uint8)
    every = np.asarray(multihost_utils.process_allgather(msg)).reshape(-1, 512)
    for row in every:
        text = bytes(row.astype(np.uint8)).rstrip(b"\0").decode(errors="replace")
        if text:
            return text
    return None


def held() -> dict | None:
    """What this process read and kept of the last bank `read` loaded (None: none loaded)."""
    return _STATE.get("bank")
