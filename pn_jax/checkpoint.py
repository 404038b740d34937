"""Atomic, verified checkpoints of a fitted detector (SPEC 2.10).

Layout of a checkpoint directory:

    arrays/       Orbax (StandardCheckpointer) payload: every array of the DetectorState
    config.json   cfg.to_dict(), exactly
    meta.json     format version, package versions, backbone, weights sha256, grid, time,
                  and `structure`: how the arrays rebuild the state (NamedTuple classes,
                  dicts, dtype, shape and sha256 of every array)
    COMMIT        written last: size and sha256 of every other file, sha256 of every array

Atomicity: everything is written into a sibling `<dir>.tmp-<hex>`, fsynced, COMMIT is
written (via rename, so it is whole or absent) and only then is the directory moved into
place; an existing checkpoint is swapped out only after the new one is complete. `load`
refuses a directory without COMMIT and any `.tmp-`/`.old-` leftover, so an interrupted save
never leaves something that loads.

The state is encoded generically (any NamedTuple / dict / array / None tree), so new
DetectorState fields are saved without touching this module. A checkpoint missing a field
that the current class requires is refused; a field with a default takes the default.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import hashlib
import importlib
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

FORMAT_VERSION = 1
COMMIT_NAME = "COMMIT"
ARRAYS_DIR = "arrays"
CONFIG_NAME = "config.json"
META_NAME = "meta.json"
_LEFTOVER = re.compile(r"\.(tmp|old)-[0-9a-f]{12}$")
_RETRAIN = "re-create it with --mode train"

# Config fields that make a checkpoint unusable for a run when they differ: they change the
# feature space (backbone, layers, dims, patch size, image geometry), the data, or which
# bank/dims were fitted. Seed, coreset_proj_dim/starts, holdout and knn_block only change
# sampling details or compute and are allowed. Some fields are conditional, see
# `check_compatible`.
COMPAT_FIELDS = (
    "data.dataset",
    "data.image_size",
    "data.resize_mode",
    "data.crop_size",  # only when either side uses resize_mode="patchcore"
    "model.backbone",
    "model.layers",
    "model.pretrain_embed_dimension",
    "model.target_embed_dimension",
    "model.patchsize",
    "bank.coreset_ratio",
    "noising.influence_ratio",  # sizes the fitted dims S (ignored for a patchcore run)
    "noising.dim_selection",  # how S was chosen (ignored for a patchcore run)
)
_DIMS_FIELDS = ("noising.influence_ratio", "noising.dim_selection")
# Fields the fit-time statistics / noise scale were computed with: a different value still
# runs, but what was fitted no longer matches the requested settings exactly (warning only).
STATS_FIELDS = ("noising.k", "noising.influence", "noising.eps", "noising.noise_shrinkage",
                "noising.noise_floor")
_MISSING = object()


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupted or does not match the requested run."""


# ----------------------------------------------------------------------------- compatibility
def _get(cfg: Config, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part, _MISSING)  # a field another pn_jax version lacks: not compared
    return obj


def _differs(saved: Config, requested: Config, field: str) -> bool:
    a, b = _get(saved, field), _get(requested, field)
    return a is not _MISSING and b is not _MISSING and a != b


def check_compatible(saved: Config, requested: Config) -> list[str]:
    """Conflicts, one line each, as "<field>: saved <a>, requested <b>" (empty: compatible)."""
    out = []
    patchcore_geom = "patchcore" in (saved.data.resize_mode, requested.data.resize_mode)
    needs_dims = requested.noising.method != "patchcore"
    for field in COMPAT_FIELDS:
        if field == "data.crop_size" and not patchcore_geom:
            continue
        if field in _DIMS_FIELDS and not needs_dims:
            continue
        if _differs(saved, requested, field):
            out.append(f"{field}: saved {_get(saved, field)!r}, requested {_get(requested, field)!r}")
    return out


def stale_stats_fields(saved: Config, requested: Config) -> list[str]:
    """Allowed differences that leave the fitted normalisation statistics slightly stale."""
    if requested.noising.method == "patchcore":
        return []
    return [f"{f}: saved {_get(saved, f)!r}, requested {_get(requested, f)!r}"
            for f in STATS_FIELDS if _differs(saved, requested, f)]


# ----------------------------------------------------------------------------- tree encoding
def _class_path(cls) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _import_class(path: str):
    module, _, qual = path.partition(":")
    obj = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def _is_namedtuple(x) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _sha256_array(a: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(f"{a.dtype.name}|{a.shape}|".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _encode(x, where: str):
    """x -> structure node; array nodes carry a transient host copy under "_host"."""
    if x is None:
        return {"kind": "none"}
    if _is_namedtuple(x):
        return {"kind": "namedtuple", "class": _class_path(type(x)),
                "fields": {name: _encode(getattr(x, name), f"{where}.{name}") for name in type(x)._fields}}
    if isinstance(x, dict):
        for key in x:
            if not isinstance(key, str) or not key:
                raise TypeError(f"checkpoint: dict keys must be non-empty strings, got {key!r} at {where}")
        return {"kind": "dict", "items": {key: _encode(x[key], f"{where}.{key}") for key in sorted(x)}}
    if isinstance(x, (jax.Array, np.ndarray)):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            raise TypeError(f"checkpoint: {where} is a PRNG key array; save jax.random.key_data(key)")
        host = np.asarray(jax.device_get(x))
        return {"kind": "array", "type": "jax" if isinstance(x, jax.Array) else "numpy",
                "dtype": host.dtype.name, "shape": list(host.shape), "sha256": _sha256_array(host),
                "_host": host}
    raise TypeError(f"checkpoint: cannot save {where} of type {type(x).__name__} "
                    "(only arrays, dicts, NamedTuples and None)")


def _children(node) -> dict:
    return node["fields"] if node["kind"] == "namedtuple" else node["items"]


def _arrays_tree(node, leaf):
    """The Orbax pytree of a structure node (nested dicts of `leaf(array node)`; no None or
    empty dicts, which Orbax does not store)."""
    if node["kind"] == "array":
        return leaf(node)
    if node["kind"] == "none":
        return None
    tree = {}
    for name, child in _children(node).items():
        sub = _arrays_tree(child, leaf)
        if sub is not None and not (isinstance(sub, dict) and not sub):
            tree[name] = sub
    return tree


def _decode(node, tree, where: str, directory: str):
    kind = node["kind"]
    if kind == "none":
        return None
    if kind == "array":
        a = np.asarray(tree)
        want = (node["dtype"], tuple(node["shape"]))
        if (a.dtype.name, a.shape) != want or _sha256_array(a) != node["sha256"]:
            raise CheckpointError(
                f"checkpoint {directory} is corrupted: array {where} read back as "
                f"{a.dtype.name}{list(a.shape)} with a different sha256 than when it was saved "
                f"(files under {ARRAYS_DIR}/); {_RETRAIN}")
        return jnp.asarray(a) if node["type"] == "jax" else a
    tree = tree if isinstance(tree, dict) else {}
    values = {name: _decode(child, tree.get(name), f"{where}.{name}" if where else name, directory)
              for name, child in _children(node).items()}
    if kind == "dict":
        return values
    try:
        cls = _import_class(node["class"])
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {directory}: {where} was saved as {node['class']}, "
                              f"which this pn_jax cannot import ({e}); {_RETRAIN}") from None
    unknown = set(values) - set(cls._fields)
    missing = [f for f in cls._fields if f not in values and f not in cls._field_defaults]
    if unknown or missing:
        raise CheckpointError(
            f"checkpoint {directory}: {where} ({node['class']}) does not match this pn_jax: "
            + "; ".join(p for p in (
                f"fields saved but unknown here: {sorted(unknown)}" if unknown else "",
                f"required fields absent from the checkpoint: {missing}" if missing else "") if p)
            + f"; {_RETRAIN}")
    return cls(**values)


# ----------------------------------------------------------------------------- file helpers
def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _payload_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and p.relative_to(root).as_posix() != COMMIT_NAME)


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _write_commit(tmp: Path, arrays_sha: dict[str, str]) -> None:
    files = {p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": _sha256_file(p)}
             for p in _payload_files(tmp)}
    part = tmp / (COMMIT_NAME + ".partial")
    _write_json(part, {"format_version": FORMAT_VERSION, "files": files, "arrays": arrays_sha})
    os.replace(part, tmp / COMMIT_NAME)  # COMMIT is whole or absent
    _fsync_path(tmp)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False when unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _install(tmp: Path, target: Path) -> None:
    """Move the complete checkpoint `tmp` to `target`, replacing an old one only now."""
    if not target.exists():
        os.rename(tmp, target)
    else:
        # Swap in one step where the OS can; otherwise old aside, new in, old out. A crash in
        # between leaves `target` absent (never half-written) and both complete copies beside it.
        if _exchange(tmp, target):
            old = tmp  # tmp now holds the previous checkpoint
        else:
            old = target.with_name(f"{target.name}.old-{secrets.token_hex(6)}")
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
        _fsync_path(target.parent)
        _remove_tree(old)
    _fsync_path(target.parent)


def _looks_like_checkpoint(path: Path) -> bool:
    return (path / COMMIT_NAME).exists() or (path / META_NAME).exists() or not any(path.iterdir())


# ----------------------------------------------------------------------------- versions/meta
def _versions() -> dict[str, str | None]:
    import pn_jax

    out = {"pn_jax": getattr(pn_jax, "__version__", None)}
    for name, dist in (("jax", "jax"), ("jaxlib", "jaxlib"), ("flax", "flax"),
                       ("orbax", "orbax-checkpoint"), ("numpy", "numpy")):
        try:
            out[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _build_meta(cfg: Config, meta: dict | None) -> dict:
    user = dict(meta or {})
    reserved = {"structure", "extra_arrays", "format_version", "created", "versions"} & set(user)
    if reserved:
        raise CheckpointError(f"checkpoint meta: keys {sorted(reserved)} are reserved")
    weights_path = user.pop("weights_path", None)
    if weights_path is not None and "weights_sha256" not in user:
        wp = Path(weights_path)
        if not wp.is_file():
            raise CheckpointError(f"checkpoint meta: weights_path {wp} is not a file")
        user["weights_sha256"] = _sha256_file(wp)
    if weights_path is not None:
        user["weights_path"] = str(weights_path)
    grid = user.pop("grid", None)
    out = {
        **user,
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "backbone": user.get("backbone", cfg.model.backbone),
        "weights_sha256": user.get("weights_sha256"),
        "grid": list(grid) if grid is not None else None,
    }
    try:
        json.dumps(out)
    except TypeError as e:
        raise CheckpointError(f"checkpoint meta must be JSON-serialisable: {e}") from None
    return out


# ----------------------------------------------------------------------------- save / load
def save(directory, state, cfg: Config, meta: dict | None = None,
         extra_arrays: dict | None = None) -> str:
    """Write `state` (any NamedTuple/dict tree of arrays), `cfg` and `meta` atomically.

    meta: optional JSON-serialisable extras; recognised keys: `grid` (feature grid h, w),
    `weights_path` (hashed with sha256) or `weights_sha256`, `backbone`. `extra_arrays`:
    more named arrays, returned by `load` in meta["extra_arrays"]. Returns the absolute path.
    """
    target = Path(os.path.abspath(os.fspath(directory)))
    if target.exists() and (not target.is_dir() or not _looks_like_checkpoint(target)):
        raise CheckpointError(f"cannot save checkpoint to {target}: it exists and is not a "
                              "pn_jax checkpoint (no COMMIT/meta.json); refusing to overwrite it")
    if not isinstance(cfg, Config):
        raise TypeError(f"save: cfg must be a pn_jax Config, got {type(cfg).__name__}")
    full_meta = _build_meta(cfg, meta)
    root = {"state": state, "extra": dict(extra_arrays or {})}
    structure = {"kind": "dict", "items": {name: _encode(val, name) for name, val in root.items()}}
    tree = _arrays_tree(structure, lambda node: node.pop("_host"))
    arrays_sha = {}
    _collect_sha(structure, "", arrays_sha)
    full_meta["structure"] = structure

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{secrets.token_hex(6)}")
    tmp.mkdir()
    try:
        import orbax.checkpoint as ocp

        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.fspath(tmp / ARRAYS_DIR), tree)
        ckptr.wait_until_finished()  # save is asynchronous
        ckptr.close()
        _write_json(tmp / CONFIG_NAME, cfg.to_dict())
        _write_json(tmp / META_NAME, full_meta)
        _fsync_tree(tmp)
        _write_commit(tmp, arrays_sha)
        _install(tmp, target)
    except BaseException:
        _remove_tree(tmp)
        raise
    return os.fspath(target)


def _collect_sha(node, prefix, out):
    if node["kind"] == "array":
        out[prefix] = node["sha256"]
    elif node["kind"] in ("namedtuple", "dict"):
        for name, child in _children(node).items():
            _collect_sha(child, f"{prefix}.{name}" if prefix else name, out)


def _read_json(directory: Path, name: str):
    path = directory / name
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {directory}: cannot read {name} ({e}); {_RETRAIN}") from None


def verify(directory) -> dict:
    """Check COMMIT and every payload file's size and sha256; returns the COMMIT record."""
    d = Path(os.path.abspath(os.fspath(directory)))
    if not d.exists():
        leftovers = sorted(p.name for p in d.parent.iterdir()
                           if p.name.startswith(d.name + ".") and _LEFTOVER.search(p.name)) \
            if d.parent.is_dir() else []
        hint = f" (leftovers of an interrupted save beside it: {leftovers})" if leftovers else ""
        raise CheckpointError(f"checkpoint directory {d} does not exist{hint}; "
                              f"check --checkpoint or {_RETRAIN}")
    if not d.is_dir():
        raise CheckpointError(f"checkpoint {d} is not a directory")
    if _LEFTOVER.search(d.name):
        raise CheckpointError(f"{d} is the temporary directory of an interrupted or replaced "
                              f"checkpoint save, not a checkpoint; delete it and {_RETRAIN}")
    if not (d / COMMIT_NAME).is_file():
        raise CheckpointError(f"checkpoint {d} is incomplete (no {COMMIT_NAME} marker: the save was "
                              f"interrupted or this is not a pn_jax checkpoint); {_RETRAIN}")
    commit = _read_json(d, COMMIT_NAME)
    if not isinstance(commit, dict) or not isinstance(commit.get("files"), dict):
        raise CheckpointError(f"checkpoint {d}: {COMMIT_NAME} is malformed; {_RETRAIN}")
    version = commit.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {d} has format version {version!r}; this pn_jax reads "
                              f"up to {FORMAT_VERSION}: upgrade pn_jax or {_RETRAIN}")
    for rel, rec in sorted(commit["files"].items()):
        p = d / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint {d} is corrupted: file {rel} is missing; {_RETRAIN}")
        size = p.stat().st_size
        if size != rec["size"]:
            raise CheckpointError(f"checkpoint {d} is corrupted: file {rel} has {size} bytes, "
                                  f"{rec['size']} were written (truncated?); {_RETRAIN}")
        if _sha256_file(p) != rec["sha256"]:
            raise CheckpointError(f"checkpoint {d} is corrupted: file {rel} does not match the "
                                  f"sha256 recorded at save time; {_RETRAIN}")
    return commit


def _check_detector_state(state, d: Path) -> None:
    """A DetectorState's learnable params must be those this pn_jax creates (names, shapes,
    dtypes): a checkpoint from a version with other params would fail or mis-score later."""
    from pn_jax import detector

    if not isinstance(state, detector.DetectorState) or not isinstance(state.params, dict):
        return
    dim = int(state.bank.shape[-1])
    want = jax.eval_shape(lambda: detector.init_params(dim))
    got = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in state.params.items()}
    if set(got) != set(want):
        raise CheckpointError(
            f"checkpoint {d}: its learnable params {sorted(got)} differ from this pn_jax's "
            f"{sorted(want)} (saved by another version); {_RETRAIN}")
    bad = [f"{k}: saved {got[k].dtype}{list(got[k].shape)}, expected {want[k].dtype}{list(want[k].shape)}"
           for k in sorted(want) if (got[k].shape, got[k].dtype) != (want[k].shape, want[k].dtype)]
    if bad:
        raise CheckpointError(f"checkpoint {d}: params of the wrong shape ({'; '.join(bad)}); {_RETRAIN}")


def load(directory, expected: Config | None = None, expected_meta: dict | None = None):
    """-> (state, cfg, meta). Refuses (CheckpointError) missing, incomplete, corrupted and
    mismatching checkpoints. `expected`: the requested run's config (see `check_compatible`).
    `expected_meta`: values that must match where the checkpoint recorded them too, e.g.
    {"weights_sha256": ..., "category": ...}."""
    d = Path(os.path.abspath(os.fspath(directory)))
    commit = verify(d)
    try:
        cfg = Config.from_dict(_read_json(d, CONFIG_NAME))
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {d}: its {CONFIG_NAME} is not valid for this pn_jax "
                              f"({e}); {_RETRAIN}") from None
    meta = _read_json(d, META_NAME)
    structure = meta.pop("structure", None)
    if not isinstance(structure, dict) or "state" not in structure.get("items", {}):
        raise CheckpointError(f"checkpoint {d}: {META_NAME} has no array structure; {_RETRAIN}")

    conflicts = check_compatible(cfg, expected) if expected is not None else []
    for key, want in (expected_meta or {}).items():
        have = meta.get(key)
        if want is not None and have is not None and have != want:
            conflicts.append(f"meta {key}: saved {have!r}, requested {want!r}")
    bank_node = structure["items"]["state"].get("fields", {}).get("bank")
    if expected is not None and bank_node and bank_node.get("kind") == "array" \
            and bank_node["shape"][0] < expected.noising.k:
        conflicts.append(f"noising.k: the saved memory bank has {bank_node['shape'][0]} entries, fewer "
                         f"than the requested k={expected.noising.k} (lower --k, or re-train with a "
                         "larger --coreset-ratio)")
    if conflicts:
        raise CheckpointError(
            f"checkpoint {d} does not match the requested run:\n  " + "\n  ".join(conflicts)
            + "\nEither pass flags that match the checkpoint, or re-train with --mode train.")
    if expected is not None:
        stale = stale_stats_fields(cfg, expected)
        if stale:
            warnings.warn(f"checkpoint {d}: the fit-time statistics were computed with other "
                          f"scoring settings ({'; '.join(stale)}); scores use them as they are. "
                          "Re-train for statistics that match exactly.", stacklevel=2)

    target = _arrays_tree(structure, lambda node: np.zeros(node["shape"], jnp.dtype(node["dtype"])))
    if target:
        try:
            import orbax.checkpoint as ocp

            with ocp.StandardCheckpointer() as ckptr:
                restored = ckptr.restore(os.fspath(d / ARRAYS_DIR), target)
        except Exception as e:  # noqa: BLE001 - any read failure is a corrupted payload
            raise CheckpointError(f"checkpoint {d}: reading the arrays in {d / ARRAYS_DIR} failed "
                                  f"({type(e).__name__}: {str(e)[:300]}); the checkpoint is "
                                  f"corrupted, {_RETRAIN}") from e
    else:
        restored = {}
    sha = {}
    _collect_sha(structure, "", sha)
    if sha != commit.get("arrays", sha):
        raise CheckpointError(f"checkpoint {d} is corrupted: {META_NAME} and {COMMIT_NAME} disagree "
                              f"on the array hashes; {_RETRAIN}")
    top = _decode(structure, restored, "", os.fspath(d))
    state = top["state"]
    meta["extra_arrays"] = top.get("extra") or {}

    _check_detector_state(state, d)
    return state, cfg, meta
