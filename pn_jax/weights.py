"""Reading PyTorch weight files without torch, finding them on disk, and strict name mapping.

(Over 450 lines on purpose: the restricted unpickler, the zip/legacy formats it reads and the
name mapping that checks every tensor are one safety boundary, kept in one file to audit.)

A `.pth` file is a pickle, and unpickling runs whatever the file asks for. So we never
`pickle.load` one: `_RestrictedUnpickler.find_class` hands out only our own numpy shims for
the handful of globals a plain state dict uses, and refuses everything else.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

# The file-name hash convention and the file hash live with the downloads (no import cycle:
# download never imports weights).
from pn_jax.download import expected_hash_prefix, sha256_file

__all__ = [
    "WeightsError",
    "UnsafeWeightsError",
    "WeightsFormatError",
    "WeightsHashError",
    "WeightsNotFoundError",
    "WeightMappingError",
    "load_state_dict",
    "find_weights",
    "torch_hub_dir",
    "verify_hash",
    "expected_hash_prefix",
    "sha256_file",
    "check_mapping",
    "torchvision_help",
    "torchvision_url",
]


class WeightsError(ValueError):
    """Any problem with a weights file; the message names the file and what to do. One type
    for the CLI to catch (exit 2)."""


class UnsafeWeightsError(WeightsError, pickle.UnpicklingError):
    """The pickle asks for a global that a plain state dict never needs."""


class WeightsFormatError(WeightsError):
    """The file is not a readable state dict (truncated, unknown layout, bad tensor view)."""


class WeightsHashError(WeightsError):
    """The file's SHA-256 does not match the prefix in its published name."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """No weights file where we looked; the message says where and how to get it."""


class WeightMappingError(WeightsError, KeyError):
    """Converted weights do not match the model: missing, unexpected or mis-shaped keys."""

    def __str__(self) -> str:  # KeyError would repr() the message, losing the line breaks
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------

def _bfloat16():
    try:
        import ml_dtypes  # ships with jax

        return np.dtype(ml_dtypes.bfloat16)
    except ImportError:  # pragma: no cover - jax always brings ml_dtypes
        return None


# torch's typed storage classes -> numpy dtype (little-endian on disk).
_STORAGE_DTYPES: dict[str, Any] = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


def _np_dtype(storage_name: str) -> np.dtype:
    dt = _STORAGE_DTYPES[storage_name]
    if dt == "bfloat16":
        dt = _bfloat16()
        if dt is None:  # pragma: no cover
            raise WeightsFormatError("bfloat16 tensors need the ml_dtypes package")
    return np.dtype(dt).newbyteorder("<")


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stand-in for `torch.FloatStorage` & co: only carries the dtype."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        return _np_dtype(self.name)


@dataclasses.dataclass
class _Storage:
    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None  # 1-D, filled once the bytes are read


@dataclasses.dataclass
class _LazyTensor:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def materialize(self, where: str) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise WeightsFormatError(f"{where}: storage {self.storage.key!r} has no data")
        size, stride, off = self.size, self.stride, self.offset
        if len(size) != len(stride) or any(s < 0 for s in size) or off < 0:
            raise WeightsFormatError(f"{where}: bad tensor view size={size} stride={stride}")
        if any(s == 0 for s in size):
            return np.zeros(size, dtype=data.dtype)
        if any(st < 0 for st in stride):
            raise WeightsFormatError(f"{where}: negative strides are not supported")
        # Bounds check before as_strided, which would otherwise read arbitrary memory.
        last = off + sum((n - 1) * st for n, st in zip(size, stride))
        if last >= data.shape[0]:
            raise WeightsFormatError(
                f"{where}: tensor view (offset {off}, size {size}, stride {stride}) runs past "
                f"its storage of {data.shape[0]} elements; the file is corrupt"
            )
        item = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[off:], shape=size, strides=tuple(st * item for st in stride), writeable=False
        )
        return np.array(view, dtype=data.dtype.newbyteorder("="), order="C")


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    if not isinstance(storage, _Storage):
        raise WeightsFormatError("tensor rebuilt from something that is not a storage")
    return _LazyTensor(storage, int(storage_offset), tuple(int(s) for s in size),
                       tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    return data


class _Device:
    """`torch.device(...)` only ever appears as metadata; keep the string."""

    def __init__(self, *args):
        self.args = args


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "device"): _Device,
}
_SAFE_GLOBALS.update({("torch", n): _StorageType(n) for n in _STORAGE_DTYPES})


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str, storages: dict[str, _Storage], read_storage=None):
        super().__init__(file)
        self._source = source
        self._storages = storages
        self._read_storage = read_storage

    def find_class(self, module: str, name: str):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeWeightsError(
                f"{self._source}: refused to load global '{module}.{name}'. This file is not a "
                "plain PyTorch state dict (only tensors, storages and OrderedDict are allowed); "
                "loading it would run code from the file. Re-save it as "
                "torch.save(model.state_dict(), path) or as .safetensors."
            ) from None

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel[, view_metadata])
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise WeightsFormatError(f"{self._source}: unknown persistent id {pid!r:.80}")
        stype, key, _location, numel = pid[1:5]
        if len(pid) > 5 and pid[5] is not None:
            raise WeightsFormatError(f"{self._source}: storage views (pre-1.0 format) unsupported")
        if not isinstance(stype, _StorageType):
            raise WeightsFormatError(f"{self._source}: storage of unknown type {stype!r:.80}")
        key = str(key)
        st = self._storages.get(key)
        if st is None:
            st = _Storage(key, stype.dtype, int(numel))
            if self._read_storage is not None:
                st.data = self._read_storage(key, st.dtype, st.numel)
            self._storages[key] = st
        return st


def _materialize(obj, where: str):
    if isinstance(obj, _LazyTensor):
        return obj.materialize(where)
    if isinstance(obj, Mapping):
        out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _materialize(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v, where) for v in obj)
    return obj


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _load_zip(path: Path) -> Any:
    src = str(path)
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise WeightsFormatError(f"{src}: zip file without exactly one '<dir>/data.pkl'")
        prefix = pkls[0][: -len("data.pkl")]
        big = False
        if prefix + "byteorder" in names:
            big = zf.read(prefix + "byteorder").strip() == b"big"

        def read_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
            member = f"{prefix}data/{key}"
            if member not in names:
                raise WeightsFormatError(f"{src}: storage '{member}' missing from the archive")
            raw = zf.read(member)
            dt = dtype.newbyteorder(">" if big else "<")
            if len(raw) < numel * dt.itemsize:
                raise WeightsFormatError(f"{src}: storage '{member}' is truncated")
            return np.frombuffer(raw, dtype=dt, count=numel)

        storages: dict[str, _Storage] = {}
        up = _RestrictedUnpickler(io.BytesIO(zf.read(pkls[0])), src, storages, read_storage)
        return _materialize(up.load(), src)


def _load_legacy(path: Path) -> Any:
    src = str(path)
    with open(path, "rb") as f:

        def load_plain():
            # The header pickles hold only ints/dicts; still go through the restricted loader.
            return _RestrictedUnpickler(f, src, {}).load()

        try:
            magic = load_plain()
        except UnsafeWeightsError:
            raise
        except Exception as e:
            raise WeightsFormatError(
                f"{src}: not a PyTorch weights file (unreadable header: {type(e).__name__}); it is "
                "corrupt, or not a weights file at all") from None
        if magic != _LEGACY_MAGIC:
            raise WeightsFormatError(f"{src}: not a PyTorch weights file (bad magic number)")
        if load_plain() != _LEGACY_PROTOCOL:
            raise WeightsFormatError(f"{src}: unsupported legacy protocol version")
        sys_info = load_plain()
        little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
        storages: dict[str, _Storage] = {}
        obj = _RestrictedUnpickler(f, src, storages).load()
        keys = load_plain()
        for key in keys:
            st = storages.get(str(key))
            if st is None:
                raise WeightsFormatError(f"{src}: storage {key!r} listed but never used")
            (n,) = struct.unpack("<q" if little else ">q", f.read(8))
            dt = st.dtype.newbyteorder("<" if little else ">")
            raw = f.read(n * dt.itemsize)
            if len(raw) != n * dt.itemsize or n < st.numel:
                raise WeightsFormatError(f"{src}: storage {key!r} is truncated")
            st.data = np.frombuffer(raw, dtype=dt, count=n)
        return _materialize(obj, src)


def _unwrap(obj: Any, src: str) -> dict[str, np.ndarray]:
    # Training checkpoints often nest the weights one level down.
    for _ in range(2):
        if isinstance(obj, Mapping) and not any(isinstance(v, np.ndarray) for v in obj.values()):
            for k in ("state_dict", "model", "model_state_dict", "params"):
                if isinstance(obj.get(k), Mapping):
                    obj = obj[k]
                    break
    if not isinstance(obj, Mapping):
        raise WeightsFormatError(f"{src}: holds a {type(obj).__name__}, not a state dict")
    out: dict[str, np.ndarray] = {}
    for k, v in obj.items():
        if isinstance(v, np.ndarray):
            out[str(k)] = v
        else:
            raise WeightsFormatError(
                f"{src}: entry {k!r} is a {type(v).__name__}, not a tensor; not a plain state dict"
            )
    return out


def load_state_dict(path: str | os.PathLike, check_hash: bool = True) -> dict[str, np.ndarray]:
    """Read a PyTorch `.pth`/`.pt` (zip or legacy) or `.safetensors` file into numpy arrays.

    Names are kept exactly as in the file. With `check_hash`, a torchvision-style name
    `name-<hex>.pth` must match the file's SHA-256 prefix. Every failure is a `WeightsError`
    naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file not found: {path}")
    try:
        if check_hash:
            verify_hash(path)
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            return dict(load_file(str(path)))
        if zipfile.is_zipfile(path):
            obj = _load_zip(path)
        else:
            with open(path, "rb") as f:
                if f.read(4) == b"PK\x03\x04":  # a zip (torch.save's format) whose end is missing
                    raise WeightsFormatError(
                        f"{path}: truncated or corrupt zip-format .pth (its central directory is "
                        "missing, e.g. an interrupted download or copy); fetch it again")
            obj = _load_legacy(path)
        return _unwrap(obj, str(path))
    except WeightsError:
        raise
    except OSError as e:
        raise WeightsFormatError(f"cannot read weights file {path}: {e.strerror or e}") from None
    except Exception as e:  # zipfile, pickle, struct, safetensors... each has its own error type
        kind = "safetensors" if path.suffix == ".safetensors" else "PyTorch weights"
        raise WeightsFormatError(
            f"{path}: not a readable {kind} file ({type(e).__name__}: {str(e)[:200]}); it is "
            "corrupt or truncated (e.g. an interrupted copy): fetch it again") from None


# --------------------------------------------------------------------------------------
# Hash check
# --------------------------------------------------------------------------------------

# torch.hub's convention: "<name>-<first hex digits of sha256>.<ext>".


def verify_hash(path: str | os.PathLike, expected_prefix: str | None = None) -> None:
    """Raise `WeightsHashError` unless the file's SHA-256 starts with the expected prefix.

    The prefix defaults to the one in a torchvision-style file name; no prefix, no check.
    """
    expected = expected_prefix or expected_hash_prefix(path)
    if not expected:
        return
    got = sha256_file(path)
    if not got.startswith(expected.lower()):
        raise WeightsHashError(
            f"{path}: SHA-256 mismatch: expected a hash starting with {expected}, got {got}. "
            "The file is corrupt (e.g. an interrupted download) or not the right one; "
            "fetch it again."
        )


# --------------------------------------------------------------------------------------
# Finding files
# --------------------------------------------------------------------------------------

def torch_hub_dir() -> Path:
    """Where torch.hub keeps downloaded checkpoints: $TORCH_HOME/hub/checkpoints."""
    if os.environ.get("TORCH_HOME"):
        base = Path(os.environ["TORCH_HOME"]).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = Path(xdg) / "torch"
    return base / "hub" / "checkpoints"


def torchvision_url(file_name: str) -> str:
    return f"https://download.pytorch.org/models/{file_name}"


def torchvision_help(file_name: str, constructor: str) -> str:
    return (
        f"Download {torchvision_url(file_name)} on a machine with internet "
        f"(or run python -c \"import torchvision; torchvision.models.{constructor}"
        f"(weights='IMAGENET1K_V1')\" there, which puts it in ~/.cache/torch/hub/checkpoints/), "
        "then copy it into $TORCH_HOME/hub/checkpoints/ (default ~/.cache/torch/hub/checkpoints/) "
        "or pass its path explicitly (--weights)."
    )


def find_weights(
    file_name: str,
    explicit: str | os.PathLike | None = None,
    extra_dirs: Iterable[str | os.PathLike] = (),
    help: str = "",
    url: str | None = None,
) -> Path:
    """Locate a weights file.

    An explicit path wins (and must exist). Otherwise look for `file_name` in the torch hub
    cache and then in `extra_dirs`. Not found there and given a `url`: download it into the
    torch hub cache, unless downloading is off (`pn_jax.download.allowed()`).
    """
    if explicit is not None:
        p = Path(explicit).expanduser()
        if p.is_file():
            return p
        raise WeightsNotFoundError(f"weights file {p} (given explicitly) does not exist.")
    searched = [torch_hub_dir(), *(Path(d).expanduser() for d in extra_dirs)]
    for d in searched:
        if (d / file_name).is_file():
            return d / file_name
    note = "Nothing is downloaded automatically."
    if url is not None:
        from pn_jax import download

        if download.allowed():
            return download.ensure_weights(file_name, url, torch_hub_dir())
        note = f"Not downloaded: {download.disabled_reason()}."
    raise WeightsNotFoundError(
        f"weights file {file_name} not found (looked in {', '.join(map(str, searched))}). "
        + (help or "Pass its path explicitly (--weights).") + " " + note
    )


# --------------------------------------------------------------------------------------
# Strict mapping
# --------------------------------------------------------------------------------------

_SHOWN = 5  # names listed per kind of mismatch; the counts say how many there are


def check_mapping(
    expected: Mapping[str, tuple[int, ...]],
    got: Mapping[str, Any],
    source: str = "weights",
) -> None:
    """Raise `WeightMappingError` with the counts of missing, unexpected and mis-shaped keys
    and the first few names of each (a wrong file can mismatch hundreds)."""
    missing = sorted(k for k in expected if k not in got)
    unexpected = sorted(k for k in got if k not in expected)
    misshaped = sorted(
        f"{k} expected {tuple(expected[k])} got {tuple(np.shape(got[k]))}"
        for k in expected
        if k in got and tuple(np.shape(got[k])) != tuple(expected[k])
    )
    if not (missing or unexpected or misshaped):
        return

    def part(kind: str, items: list[str]) -> str:
        more = f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
        return f"{kind} ({len(items)}): " + ", ".join(items[:_SHOWN]) + more

    parts = [part(k, v) for k, v in (("missing", missing), ("unexpected", unexpected),
                                     ("mis-shaped", misshaped)) if v]
    raise WeightMappingError(
        f"{source} do not match the model ({len(expected)} tensors expected): " + "; ".join(parts)
        + ". Is it the weights file of this backbone?")
