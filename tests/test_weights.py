"""pn_jax.weights: torch-free .pth reading, refusal of unsafe pickles, hashes, finding files."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pn_jax import weights as W

FIX = Path(__file__).parent / "fixtures"


def _expected():
    z = np.load(FIX / "resnet_tiny_expected.npz")
    dtypes = dict(s.split(":") for s in z["__dtypes__"])
    return {k: z[k] for k in z.files if k != "__dtypes__"}, dtypes


@pytest.mark.parametrize("fname", ["resnet_tiny_zip.pth", "resnet_tiny_legacy.pth"])
def test_reads_torch_files_exactly(fname):
    sd = W.load_state_dict(FIX / fname)
    expected, dtypes = _expected()
    assert list(sd) == list(expected)  # order kept
    for k, want in expected.items():
        got = sd[k]
        assert got.shape == want.shape, k
        assert str(got.dtype) == dtypes[k], k
        np.testing.assert_array_equal(got.astype(want.dtype), want, err_msg=k)
        assert got.flags.writeable and got.flags.c_contiguous


def test_dtype_names_match_torch():
    sd = W.load_state_dict(FIX / "resnet_tiny_zip.pth")
    assert sd["half"].dtype == np.float16
    assert sd["bf16"].dtype.name == "bfloat16"
    assert sd["long"].dtype == np.int64 and sd["flag"].dtype == np.bool_
    assert sd["scalar"].shape == () and sd["scalar"].dtype == np.float64
    np.testing.assert_array_equal(sd["view_offset_t"], np.arange(24.0).reshape(4, 6)[1:, ::2].T)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_zip(path: Path, payload: bytes, prefix: str = "archive") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{prefix}/data.pkl", payload)
        zf.writestr(f"{prefix}/version", "3\n")
    return path


def test_refuses_code_in_zip_pth(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"weight": _Evil(marker)}, protocol=2)
    path = _evil_zip(tmp_path / "evil.pth", payload, prefix="some_model")
    with pytest.raises(W.UnsafeWeightsError) as e:
        W.load_state_dict(path)
    msg = str(e.value)
    assert str(path) in msg and "system" in msg and "not a plain" in msg
    assert not marker.exists()


def test_refuses_code_in_legacy_pth(tmp_path):
    marker = tmp_path / "pwned"
    # A valid legacy header, then a malicious object where the state dict should be.
    buf = io.BytesIO()
    for obj in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
        pickle.dump(obj, buf, protocol=2)
    pickle.dump(_Evil(marker), buf, protocol=2)
    path = tmp_path / "evil_legacy.pth"
    path.write_bytes(buf.getvalue())
    with pytest.raises(W.UnsafeWeightsError, match="system"):
        W.load_state_dict(path)
    # ... and as the very first pickle of the file.
    path.write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(W.UnsafeWeightsError):
        W.load_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("glob", [("builtins", "eval"), ("torch", "load"), ("numpy", "frombuffer"),
                                  ("torch._utils", "_rebuild_device_tensor_from_numpy")])
def test_refuses_other_globals(tmp_path, glob):
    payload = b"\x80\x02c" + f"{glob[0]}\n{glob[1]}\n".encode() + b"."
    with pytest.raises(W.UnsafeWeightsError, match=glob[1]):
        W.load_state_dict(_evil_zip(tmp_path / "g.pth", payload))


def test_out_of_bounds_view_is_refused(tmp_path):
    # Rewrite the tiny zip's first storage to be short: the view must not read past it.
    src = FIX / "resnet_tiny_zip.pth"
    dst = tmp_path / "short.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("/data/0"):
                data = data[:8]
            zout.writestr(item, data)
    with pytest.raises(W.WeightsFormatError):
        W.load_state_dict(dst)


def test_unwraps_checkpoint_dict():
    inner = W.load_state_dict(FIX / "resnet_tiny_zip.pth")
    wrapped = W.load_state_dict(FIX / "resnet_tiny_wrapped.pth")  # {"state_dict": ..., "epoch": 3}
    assert list(wrapped) == list(inner)
    assert list(W._unwrap({"model": inner}, "x")) == list(inner)
    with pytest.raises(W.WeightsFormatError, match="not a tensor"):
        W._unwrap({"a": inner["half"], "epoch": 3}, "x")


def test_safetensors_round_trip(tmp_path):
    from safetensors.numpy import save_file

    sd = {"a.weight": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32),
          "b": np.arange(5, dtype=np.int64)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    got = W.load_state_dict(tmp_path / "m.safetensors")
    assert set(got) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(got[k], sd[k])
        assert got[k].dtype == sd[k].dtype


def test_hash_prefix(tmp_path):
    data = (FIX / "resnet_tiny_zip.pth").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    good = tmp_path / f"tiny-{digest[:8]}.pth"
    good.write_bytes(data)
    assert "conv.weight" in W.load_state_dict(good)
    wrong = "0" * 8 if not digest.startswith("0" * 8) else "1" * 8
    bad = tmp_path / f"tiny-{wrong}.pth"
    bad.write_bytes(data)
    with pytest.raises(W.WeightsHashError) as e:
        W.load_state_dict(bad)
    msg = str(e.value)
    assert str(bad) in msg and wrong in msg and digest in msg and "corrupt" in msg
    assert "conv.weight" in W.load_state_dict(bad, check_hash=False)


def test_find_weights_searches_and_explains(tmp_path, monkeypatch):
    th = tmp_path / "torch_home"
    extra = tmp_path / "extra"
    monkeypatch.setenv("TORCH_HOME", str(th))
    with pytest.raises(W.WeightsNotFoundError) as e:
        W.find_weights("resnet18-f37072fd.pth", extra_dirs=[extra],
                       help=W.torchvision_help("resnet18-f37072fd.pth", "resnet18"))
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert "resnet18-f37072fd.pth" in msg
    assert str(th / "hub" / "checkpoints") in msg and str(extra) in msg
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    assert "torchvision.models.resnet18(weights='IMAGENET1K_V1')" in msg

    # Without TORCH_HOME: ~/.cache/torch/hub/checkpoints.
    monkeypatch.delenv("TORCH_HOME")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    hub = tmp_path / "home" / ".cache" / "torch" / "hub" / "checkpoints"
    with pytest.raises(W.WeightsNotFoundError, match=str(hub)):
        W.find_weights("x.pth")
    hub.mkdir(parents=True)
    shutil.copy(FIX / "resnet_tiny_zip.pth", hub / "x.pth")
    assert W.find_weights("x.pth") == hub / "x.pth"
    extra.mkdir()
    (extra / "y.pth").write_bytes(b"")
    assert W.find_weights("y.pth", extra_dirs=[extra]) == extra / "y.pth"

    with pytest.raises(W.WeightsNotFoundError, match="nope.pth"):
        W.find_weights("x.pth", explicit=tmp_path / "nope.pth")
    assert W.find_weights("whatever", explicit=hub / "x.pth") == hub / "x.pth"


def test_check_mapping_reports_everything():
    expected = {"a": (2, 3), "b": (4,), "c": (1,)}
    got = {"a": np.zeros((3, 2)), "b": np.zeros(4), "d": np.zeros(1), "e": np.zeros(1)}
    with pytest.raises(W.WeightMappingError) as e:
        W.check_mapping(expected, got, source="f.pth")
    msg = str(e.value)
    assert "f.pth" in msg
    assert "missing (1): c" in msg
    assert "unexpected (2): d, e" in msg
    assert "a expected (2, 3) got (3, 2)" in msg
    W.check_mapping(expected, {"a": np.zeros((2, 3)), "b": np.zeros(4), "c": np.zeros(1)})


# ----------------------------------------------------------------------------- one error type
def test_every_weights_error_is_one_catchable_type():
    for cls in (W.UnsafeWeightsError, W.WeightsFormatError, W.WeightsHashError,
                W.WeightsNotFoundError, W.WeightMappingError):
        assert issubclass(cls, W.WeightsError) and issubclass(cls, ValueError), cls
    # the old bases still catch them
    assert issubclass(W.UnsafeWeightsError, pickle.UnpicklingError)
    assert issubclass(W.WeightsNotFoundError, FileNotFoundError)
    assert issubclass(W.WeightMappingError, KeyError)


def _corrupt_files(tmp_path):
    data = (FIX / "resnet_tiny_zip.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pth").write_bytes(b"\x00\x01not a pickle" * 10)
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    # a zip whose data.pkl is cut short
    with zipfile.ZipFile(FIX / "resnet_tiny_zip.pth") as zin, \
            zipfile.ZipFile(tmp_path / "short_pickle.pth", "w") as zout:
        for item in zin.infolist():
            blob = zin.read(item.filename)
            zout.writestr(item, blob[:20] if item.filename.endswith("data.pkl") else blob)
    return ["truncated.pth", "garbage.pth", "bad.safetensors", "empty.safetensors", "short_pickle.pth"]


def test_corrupt_files_give_one_weights_error_naming_the_file(tmp_path):
    for name in _corrupt_files(tmp_path):
        path = tmp_path / name
        with pytest.raises(W.WeightsError) as e:
            W.load_state_dict(path)
        msg = str(e.value)
        assert str(path) in msg, (name, msg)
        assert "\n" not in msg, (name, msg)
        assert e.type is not W.WeightsError  # a specific subclass, not the bare base


def test_mapping_error_counts_and_few_names():
    expected = {f"layer.{i}.weight": (4,) for i in range(300)}
    got = {f"other.{i}.weight": np.zeros(4) for i in range(280)}
    got["layer.0.weight"] = np.zeros(3)
    with pytest.raises(W.WeightMappingError) as e:
        W.check_mapping(expected, got, source="big.pth")
    msg = str(e.value)
    assert "big.pth" in msg and "\n" not in msg
    assert "missing (299)" in msg and "unexpected (280)" in msg and "mis-shaped (1)" in msg
    assert "layer.0.weight expected (4,) got (3,)" in msg
    # at most 5 names per kind, plus a count of the rest
    assert msg.count("layer.") <= 6 and msg.count("other.") <= 5
    assert "(294 more)" in msg and "(275 more)" in msg
    assert len(msg) < 800


def test_not_found_is_one_line_and_says_why_nothing_was_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setenv("PN_JAX_OFFLINE", "1")
    with pytest.raises(W.WeightsNotFoundError) as e:
        W.find_weights("resnet18-f37072fd.pth", help=W.torchvision_help("resnet18-f37072fd.pth", "resnet18"),
                       url=W.torchvision_url("resnet18-f37072fd.pth"))
    msg = str(e.value)
    assert "\n" not in msg and "resnet18-f37072fd.pth" in msg
    assert "PN_JAX_OFFLINE=1" in msg and "Not downloaded" in msg
    assert not (tmp_path / "th").exists()  # nothing created, nothing fetched
