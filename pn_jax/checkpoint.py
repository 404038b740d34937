"""Checkpoints of a fitted detector: one fixed schema, written atomically (SPEC 2.10).

    <dir>/arrays/       Orbax: the DetectorState's arrays (bank, dims, params, stats) and extras
    <dir>/config.json   cfg.to_dict()
    <dir>/meta.json     the caller's meta (grid, category, weights_sha256, ...), format version,
                        package versions, and `arrays`: path, dtype, shape, sha256 of each array

Nothing read from a checkpoint decides which code runs. Orbax's own commit (a temporary
directory renamed once complete) makes the arrays whole; the JSON files join them in a sibling
`<dir>.tmp-<hex>`, which then takes the place of `<dir>` (old aside as `<dir>.old-<hex>`, new
in, old removed; after a crash between the two renames `load` reads the old one from there).
The sha256 catches what Orbax's reader does not: a flipped byte in the array data reads back
without an error, as a wrong number.
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import importlib.metadata
import json
import os
import re
import secrets
import shutil
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pn_jax.config import Config

FORMAT_VERSION = 2
_LEFTOVER = re.compile(r"\.(tmp|old)-[0-9a-f]{12}$")
_RETRAIN = "re-create it with --mode train"
_PARAMS = ("influence_weight", "distance_weight", "noise_scale")
_RESERVED = ("arrays", "extra_arrays", "format_version", "created", "versions")

# Config fields that make a checkpoint unusable for a run when they differ: they change the
# feature space (backbone, weights, layers, dims, patch size, image geometry), the data, or
# which bank/dims were fitted. Seed, coreset_proj_dim/starts, holdout and knn_block only change
# sampling details or compute. Some are conditional, see `check_compatible`.
COMPAT_FIELDS = (
    "data.dataset", "data.image_size", "data.resize_mode",
    "data.crop_size",  # only when either side uses resize_mode="patchcore"
    "data.tile", "data.tile_overlap",  # the bank holds features of tiles of that size
    "model.backbone",
    "model.weights",  # only when both name a file (None: the standard location); see weights_sha256
    "model.layers", "model.pretrain_embed_dimension", "model.target_embed_dimension", "model.patchsize",
    # The bank holds features computed under this precision policy; scoring under another would
    # compare features of two arithmetics (on an accelerator). A checkpoint from before the field
    # loads as "highest" (config.ModelConfig.precision says why that is right).
    "model.precision",
    "bank.coreset_ratio", "bank.coreset_preselect", "bank.tile_bank",
    "noising.influence_ratio", "noising.dim_selection",  # the fitted dims S (not for patchcore)
)
_DIMS_FIELDS = ("noising.influence_ratio", "noising.dim_selection")
# The fit-time statistics / noise scale were computed with these: another value still runs,
# but what was fitted no longer matches exactly (a warning).
STATS_FIELDS = ("noising.k", "noising.influence", "noising.eps", "noising.noise_shrinkage",
                "noising.noise_floor")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupted or does not match the requested run."""


def _bad(d: Path, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {d}: {what}{' ' if what.endswith((' or', ' and')) else '; '}{_RETRAIN}")


# ----------------------------------------------------------------------------- compatibility
def _get(cfg: Config, dotted: str):
    return functools.reduce(getattr, dotted.split("."), cfg)


def _diff(saved: Config, requested: Config, fields) -> list[str]:
    return [f"{f}: saved {_get(saved, f)!r}, requested {_get(requested, f)!r}"
            for f in fields if _get(saved, f) != _get(requested, f)]


def check_compatible(saved: Config, requested: Config) -> list[str]:
    """Conflicts, one line each, as "<field>: saved <a>, requested <b>" (empty: compatible)."""
    skip = set(_DIMS_FIELDS) if requested.noising.method == "patchcore" else set()
    if "patchcore" not in (saved.data.resize_mode, requested.data.resize_mode):
        skip.add("data.crop_size")
    if None in (saved.model.weights, requested.model.weights):
        skip.add("model.weights")
    return _diff(saved, requested, [f for f in COMPAT_FIELDS if f not in skip])


def stale_stats_fields(saved: Config, requested: Config) -> list[str]:
    """Allowed differences that leave the fitted normalisation statistics slightly stale."""
    return [] if requested.noising.method == "patchcore" else _diff(saved, requested, STATS_FIELDS)


# ----------------------------------------------------------------------------- schema
def _flatten(tree: dict, prefix: tuple, out: dict) -> dict:  # nested dict -> {path tuple: host array}
    for key, val in tree.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"checkpoint: array names must be non-empty strings, got {key!r} under {prefix}")
        a = np.asarray(jax.device_get(val)) if isinstance(val, (jax.Array, np.ndarray, np.generic)) else None
        if isinstance(val, dict):
            _flatten(val, prefix + (key,), out)
        elif a is None or (a.dtype.kind in "OSUMmV" and a.dtype != jnp.bfloat16):
            raise TypeError(f"checkpoint: {'/'.join(prefix + (key,))} is a {type(val).__name__}, not a numeric array")
        else:
            out[prefix + (key,)] = a
    return out


def _nest(flat: dict) -> dict:
    tree = {}
    for path, a in flat.items():
        functools.reduce(lambda node, key: node.setdefault(key, {}), path[:-1], tree)[path[-1]] = a
    return tree


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8).reshape(-1)).hexdigest()  # no copy


def _state_tree(state) -> dict:
    """The fixed layout of a DetectorState; its params must be those `init_params` creates
    (names, shapes, dtypes), so that `load` can trust a checkpoint whose arrays match their sha256."""
    from pn_jax import detector, noising, sharding

    rows = getattr(state, "bank", None)
    rows = rows.rows if isinstance(rows, sharding.ShardedBank) else rows
    if not (isinstance(state, detector.DetectorState) and isinstance(state.stats, noising.Stats)
            and isinstance(state.params, dict) and np.ndim(rows) == 2):
        raise TypeError(f"checkpoint: state must be a detector.DetectorState with a [M, D] bank, got {state!r:.200}")
    want = jax.eval_shape(lambda: detector.init_params(np.shape(rows)[-1]))
    got = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in state.params.items()}
    if got != want:
        raise TypeError(f"checkpoint: state.params must be {want}, got {got}")
    return {"bank": state.bank, "dims": state.dims, "params": state.params, "stats": state.stats._asdict()}


def _build_state(tree: dict, bank):
    from pn_jax import detector, noising, sharding

    tree = jax.tree.map(jnp.asarray, tree)
    bank = bank if isinstance(bank, sharding.ShardedBank) else jnp.asarray(bank)
    return detector.DetectorState(**{**tree, "bank": bank, "stats": noising.Stats(**tree["stats"])})


# ----------------------------------------------------------------------------- files
def _mp_options():
    from pn_jax import distributed

    return distributed.orbax_options()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _read_json(d: Path, name: str) -> dict:
    try:
        with open(d / name) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise _bad(d, f"cannot read {name} ({e})") from None
    if not isinstance(obj, dict):
        raise _bad(d, f"{name} is not a JSON object")
    return obj


def _leftovers(target: Path, kind: str = "tmp|old") -> list[Path]:
    pat = re.compile(re.escape(target.name) + rf"\.({kind})-[0-9a-f]{{12}}$")
    return sorted(p for p in target.parent.iterdir() if pat.match(p.name)) if target.parent.is_dir() else []


def _shard_spec(bank) -> dict:
    """meta.json's entry of a sharded bank: its padded rows' shape, the real rows M, and a
    sha256 of the real rows of each device's shard (each process hashes its own; no host
    holds the whole bank to hash it whole)."""
    from jax.experimental import multihost_utils

    rows, m = bank.rows, bank.n_valid
    per = rows.shape[0] // len(rows.sharding.device_set)
    mine = np.zeros((jax.local_device_count(), 34), np.int64)  # lo, hi, 32 digest bytes; empty: lo = hi
    for i, sh in enumerate(sorted(rows.addressable_shards, key=lambda sh: sh.index[0].start or 0)):
        lo = sh.index[0].start or 0
        hi = min(lo + per, m)
        if lo < hi:
            mine[i, :2] = lo, hi
            mine[i, 2:] = np.frombuffer(bytes.fromhex(_sha256(np.asarray(sh.data)[:hi - lo])), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 34)
    shards = sorted({(int(r[0]), int(r[1]), bytes(r[2:].astype(np.uint8)).hex()) for r in every if r[1] > r[0]})
    return {"path": ["state", "bank"], "dtype": np.dtype(rows.dtype).name, "shape": list(rows.shape), "rows": m,
            "shards": [{"rows": [lo, hi], "sha256": h} for lo, hi, h in shards]}


def _check_bank_shards(a: np.ndarray, spec: dict) -> np.ndarray | None:
    """A sharded bank's padded rows, read back whole: its real rows [M, D], or None when a
    shard's rows read back other than they were saved."""
    m = int(spec["rows"])
    covered = 0
    for sh in spec["shards"]:
        lo, hi = sh["rows"]
        if lo != covered or _sha256(a[lo:hi]) != sh["sha256"]:
            return None
        covered = hi
    return a[:m] if covered == m else None


# ----------------------------------------------------------------------------- save / load
def save(directory, state, cfg: Config, meta: dict | None = None, extra_arrays: dict | None = None) -> str:
    """Write `state` (a DetectorState), `cfg` and the JSON dict `meta` atomically; returns the
    absolute path. `extra_arrays`: a nested dict of named arrays, returned by `load` in
    meta["extra_arrays"]. Leftovers of an interrupted earlier save are removed."""
    from pn_jax import distributed, sharding

    if not isinstance(cfg, Config):
        raise TypeError(f"save: cfg must be a pn_jax Config, got {type(cfg).__name__}")
    if set(_RESERVED) & set(meta or {}):
        raise CheckpointError(f"checkpoint meta: keys {sorted(set(_RESERVED) & set(meta))} are reserved")
    tree = _state_tree(state)
    bank = tree.pop("bank")
    # A distributed fit's bank (sharding.ShardedBank): every process writes its own rows into
    # process 0's folder (Orbax's multi-process save); the rest is process 0's, as always.
    sharded = isinstance(bank, sharding.ShardedBank) and distributed.active()
    if isinstance(bank, sharding.ShardedBank) and not sharded:  # one process holds every shard: its real rows
        bank = bank.rows[:bank.n_valid]
    flat = _flatten({"state": tree if sharded else {**tree, "bank": bank}, "extra": dict(extra_arrays or {})}, (), {})
    full = {**(meta or {}), "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {n: _version(n) for n in ("pn_jax", "jax", "jaxlib", "flax", "orbax-checkpoint", "numpy")},
            "arrays": [{"path": list(p), "dtype": a.dtype.name, "shape": list(a.shape), "sha256": _sha256(a)}
                       for p, a in flat.items()] + ([_shard_spec(bank)] if sharded else [])}
    try:
        full = json.loads(json.dumps(full))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint meta must be JSON-serialisable: {e}") from None
    target = Path(os.path.abspath(os.fspath(directory)))
    refused = None
    if target.exists() and not (target.is_dir() and ((target / "meta.json").is_file() or not any(target.iterdir()))):
        refused = (f"cannot save checkpoint to {target}: it exists and is not a pn_jax checkpoint "
                   "(no meta.json); refusing to overwrite it")
    tmp = target.with_name(f"{target.name}.tmp-{secrets.token_hex(6)}")
    if sharded:  # one folder for every process: process 0's (a file system they all reach)
        target, tmp, refused = (lambda t: (Path(t[0]), Path(t[1]), t[2]))(
            distributed.from_primary([os.fspath(target), os.fspath(tmp), refused]))
    if refused:
        raise CheckpointError(refused)
    primary = not sharded or distributed.is_primary()
    if primary:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    try:
        import orbax.checkpoint as ocp

        if sharded:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("pn_jax checkpoint folder")  # process 0 made it
            # Every process: Orbax waits for all of them, then process 0 commits the folder.
            with ocp.Checkpointer(ocp.StandardCheckpointHandler(),
                                  multiprocessing_options=ocp.options.MultiprocessingOptions()) as ckptr:
                ckptr.save(tmp / "arrays", args=ocp.args.StandardSave(
                    _nest({**flat, ("state", "bank"): bank.rows})))
            if not primary:
                return os.fspath(target)
        else:
            # multiprocessing_options: this process alone writes it (host arrays; pn_jax.distributed)
            with ocp.Checkpointer(ocp.StandardCheckpointHandler(), multiprocessing_options=_mp_options()) as ckptr:
                ckptr.save(tmp / "arrays", args=ocp.args.StandardSave(_nest(flat)))
        _write_json(tmp / "config.json", cfg.to_dict())
        _write_json(tmp / "meta.json", full)
        if target.exists():  # old aside, new in; a crash in between leaves the old one complete
            old = target.with_name(f"{target.name}.old-{secrets.token_hex(6)}")
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for p in _leftovers(target):  # this save's old copy, and an interrupted save's (issue 13.7)
        shutil.rmtree(p, ignore_errors=True)
    return os.fspath(target)


def load(directory, expected: Config | None = None, expected_meta: dict | None = None, mesh=None):
    """-> (state, cfg, meta). Refuses (CheckpointError) missing, incomplete, corrupted and
    mismatching checkpoints. `expected`: the requested run's config (see `check_compatible`).
    `expected_meta`: recorded values that must match, e.g. {"category": ..., "weights_sha256": ...}
    (None: not checked; a checkpoint that recorded no value for a checked key is refused).
    `mesh` (a distributed run's, every process calling alike): the bank comes as the
    `sharding.ShardedBank` `shard_bank` would make over it, each process reading only its rows
    and checking their sha256 chunk by chunk (`pn_jax.shardload`); never read whole."""
    d = Path(os.path.abspath(os.fspath(directory)))
    if _LEFTOVER.search(d.name):
        raise _bad(d, "the temporary directory of an interrupted or replaced save, not a checkpoint; delete it and")
    old = [p for p in _leftovers(d, "old") if (p / "meta.json").is_file()]
    src = d if d.exists() or not old else max(old, key=lambda p: p.stat().st_mtime)  # a swap cut short
    if not src.is_dir():
        raise _bad(d, f"the directory does not exist{' or is not a directory' * d.exists()}; check --checkpoint or")
    if not (src / "meta.json").is_file():
        raise _bad(d, "incomplete or not a pn_jax checkpoint (no meta.json)")
    meta, raw_cfg = _read_json(src, "meta.json"), _read_json(src, "config.json")
    if meta.get("format_version") != FORMAT_VERSION:
        raise _bad(d, f"format version {meta.get('format_version')!r}, this pn_jax reads {FORMAT_VERSION}: use "
                      "the pn_jax that wrote it, or")
    try:
        cfg = Config.from_dict(raw_cfg)
        listed = meta.pop("arrays")
        specs = {tuple(s["path"]): (jnp.dtype(s["dtype"]), tuple(s["shape"]), s.get("sha256")) for s in listed}
        # a distributed fit's bank: padded rows, hashed shard by shard (`_shard_spec`)
        shard_spec = next((s for s in listed if "shards" in s), None)
    except (TypeError, KeyError, ValueError) as e:
        raise _bad(d, f"config.json or meta.json's array list is not valid for this pn_jax ({e})") from None
    from pn_jax import noising

    got = {p[1:] for p in specs if p[0] == "state"}
    want = {("bank",), ("dims",)} | {("params", p) for p in _PARAMS} | {("stats", f) for f in noising.Stats._fields}
    if got != want:
        raise _bad(d, f"its state arrays differ from this pn_jax's (missing {sorted('/'.join(p) for p in want - got)}, "
                      f"unknown {sorted('/'.join(p) for p in got - want)}): saved by another version")

    conflicts = check_compatible(cfg, expected) if expected is not None else []
    for key, value in (expected_meta or {}).items():
        have = meta.get(key)
        if value is not None and have != value and not (key == "category" and value in str(have).split("+")):
            conflicts.append(f"{key}: saved {have!r}, requested {value!r}"
                             + " (the checkpoint recorded none, so it cannot be checked)" * (have is None))
    m = specs[("state", "bank")][1][0] if shard_spec is None else int(shard_spec["rows"])
    if expected is not None and m < expected.noising.k:
        conflicts.append(f"noising.k: the saved memory bank has {m} entries, fewer than the requested "
                         f"k={expected.noising.k} (lower --k, or re-train with a larger --coreset-ratio)")
    if conflicts:
        raise CheckpointError(f"checkpoint {d} does not match the requested run:\n  " + "\n  ".join(conflicts)
                              + "\nEither pass flags that match the checkpoint, or re-train with --mode train.")
    stale = stale_stats_fields(cfg, expected) if expected is not None else []
    if stale:
        warnings.warn(f"checkpoint {d}: the fit-time statistics were computed with other scoring settings "
                      f"({'; '.join(stale)}); scores use them as they are. Re-train for statistics that "
                      "match exactly.", stacklevel=2)

    sharded_bank = None
    if mesh is not None:  # the bank straight into its shards; the rest as below
        from pn_jax import shardload

        sharded_bank, bad = shardload.read(os.fspath(src / "arrays"), shard_spec or next(
            s for s in listed if tuple(s["path"]) == ("state", "bank")), mesh)
        if bad is not None:
            raise _bad(d, f"corrupted: {bad}")
        specs.pop(("state", "bank"))
    try:
        import orbax.checkpoint as ocp

        target = _nest({p: np.zeros(shape, dtype) for p, (dtype, shape, _) in specs.items()})
        if sharded_bank is None:
            with ocp.Checkpointer(ocp.StandardCheckpointHandler(), multiprocessing_options=_mp_options()) as ckptr:
                restored = ckptr.restore(src / "arrays", args=ocp.args.StandardRestore(target))
        else:  # every array but the bank
            with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(), multiprocessing_options=_mp_options()) as ckptr:
                restored = ckptr.restore(src / "arrays", args=ocp.args.PyTreeRestore(
                    target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
        arrays = {p: np.asarray(functools.reduce(lambda t, k: t[k], p, restored)) for p in specs}
    except Exception as e:  # noqa: BLE001 - any read failure is a damaged payload
        raise _bad(d, f"corrupted: reading {src / 'arrays'} failed ({type(e).__name__}: {str(e)[:300]})") from None
    if sharded_bank is not None:
        arrays[("state", "bank")] = sharded_bank
    for p, (dtype, shape, sha) in specs.items():
        ok = arrays[p].dtype == dtype and arrays[p].shape == shape
        if ok and shard_spec is not None and p == ("state", "bank"):
            arrays[p] = _check_bank_shards(arrays[p], shard_spec)
            ok = arrays[p] is not None
        elif ok:
            ok = _sha256(arrays[p]) == sha
        if not ok:
            raise _bad(d, f"corrupted: array {'/'.join(p)} reads back other than it was saved (files under arrays/)")
    state = _build_state(_nest({p[1:]: a for p, a in arrays.items() if p[0] == "state" and p != ("state", "bank")}),
                         arrays[("state", "bank")])
    meta["extra_arrays"] = _nest({p[1:]: a for p, a in arrays.items() if p[0] == "extra"})
    return state, cfg, meta
