"""pn_jax.download against a loopback HTTP server (PN_JAX_MIRROR): success, resume, restart,
checksum mismatch, unsafe archives, HTTP errors, refused connections, offline mode, and the
weights and MVTec paths through the real loaders."""
from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import io
import json
import os
import re
import socket
import struct
import sys
import tarfile
import threading
import urllib.parse
import urllib.request
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pn_jax import download as D
from pn_jax import weights as W
from pn_jax.data import mvtec
from pn_jax.data.preprocess import MissingDataError

FIX = Path(__file__).parent / "fixtures"


# ----------------------------------------------------------------------------- the server
class _Handler(BaseHTTPRequestHandler):
    """GET of <root>/<name> with `Range: bytes=N-`; `cut` sends only the first bytes of a
    file (then closes, as a dropped connection); `ranges=False` ignores Range."""

    def do_GET(self):
        srv = self.server
        name = urllib.parse.unquote(self.path.lstrip("/"))
        rng = self.headers.get("Range")
        srv.requests.append((name, rng))
        path = srv.root / name
        if not path.is_file():
            self.send_error(404, "Not Found")
            return
        data = path.read_bytes()
        start = 0
        if rng and srv.ranges:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = srv.cut.get(name)
        sent = body if cut is None else body[: max(cut - start, 0)]
        # Recorded before the write: the client may finish reading (and the test check `sent`)
        # before this thread runs again after the last byte goes out.
        srv.sent.append((name, len(sent)))
        self.wfile.write(sent)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.root, httpd.requests, httpd.sent, httpd.cut, httpd.ranges = root, [], [], {}, True
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def mirror(server, monkeypatch, tmp_path):
    monkeypatch.delenv(D.OFFLINE_ENV, raising=False)  # tests/conftest.py sets it for all tests
    monkeypatch.setenv(D.MIRROR_ENV, server.url)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return server


def _blob(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------- fetching
def test_fetch_verifies_and_renames(mirror, tmp_path):
    data = _blob(3_000_000)
    (mirror.root / "f.bin").write_bytes(data)
    dest = tmp_path / "out" / "f.bin"
    assert D.fetch(f"{mirror.url}/f.bin", dest, _sha(data)) == dest
    assert dest.read_bytes() == data
    assert not dest.with_name("f.bin.part").exists()
    assert mirror.requests == [("f.bin", None)]


def test_resume_of_a_partial_file(mirror, tmp_path):
    data = _blob(3_000_000, 1)
    (mirror.root / "f.bin").write_bytes(data)
    dest = tmp_path / "f.bin"
    dest.with_name("f.bin.part").write_bytes(data[:1_000_000])
    D.fetch(f"{mirror.url}/f.bin", dest, _sha(data)[:8])
    assert dest.read_bytes() == data
    assert mirror.requests == [("f.bin", "bytes=1000000-")]
    assert mirror.sent == [("f.bin", 2_000_000)]  # only the rest travelled


def test_interrupted_download_keeps_part_and_resumes(mirror, tmp_path):
    data = _blob(2_500_000, 2)
    (mirror.root / "f.bin").write_bytes(data)
    mirror.cut["f.bin"] = 1_200_000
    dest = tmp_path / "f.bin"
    with pytest.raises(D.DownloadError) as e:
        D.fetch(f"{mirror.url}/f.bin", dest, _sha(data))
    msg = _one_line(e)
    assert "interrupted" in msg and "resume" in msg and "f.bin" in msg
    assert not dest.exists()  # nothing under the final name
    assert dest.with_name("f.bin.part").stat().st_size == 1_200_000
    del mirror.cut["f.bin"]
    D.fetch(f"{mirror.url}/f.bin", dest, _sha(data))
    assert dest.read_bytes() == data
    assert mirror.requests[-1] == ("f.bin", "bytes=1200000-")


def test_server_without_range_support_restarts(mirror, tmp_path):
    data = _blob(1_500_000, 3)
    (mirror.root / "f.bin").write_bytes(data)
    mirror.ranges = False
    dest = tmp_path / "f.bin"
    dest.with_name("f.bin.part").write_bytes(b"x" * 700_000)  # not even a prefix of the file
    D.fetch(f"{mirror.url}/f.bin", dest, _sha(data))
    assert dest.read_bytes() == data


def test_stale_part_of_another_file_is_replaced(mirror, tmp_path):
    data = _blob(1_500_000, 4)
    (mirror.root / "f.bin").write_bytes(data)
    dest = tmp_path / "f.bin"
    dest.with_name("f.bin.part").write_bytes(_blob(600_000, 99))  # resumed, then fails the hash
    D.fetch(f"{mirror.url}/f.bin", dest, _sha(data))
    assert dest.read_bytes() == data
    assert [r for _, r in mirror.requests] == ["bytes=600000-", None]


def test_a_complete_part_is_only_verified(mirror, tmp_path):
    data = _blob(500_000, 5)
    (mirror.root / "f.bin").write_bytes(data)
    dest = tmp_path / "f.bin"
    dest.with_name("f.bin.part").write_bytes(data)  # killed between download and rename
    D.fetch(f"{mirror.url}/f.bin", dest, _sha(data))
    assert dest.read_bytes() == data
    assert mirror.sent == []  # the server answered 416 and sent nothing


def test_checksum_mismatch_leaves_nothing(mirror, tmp_path):
    data = _blob(800_000, 6)
    (mirror.root / "f.bin").write_bytes(data)
    dest = tmp_path / "f.bin"
    wrong = "0" * 64 if not _sha(data).startswith("0") else "1" * 64
    with pytest.raises(D.DownloadError) as e:
        D.fetch(f"{mirror.url}/f.bin", dest, wrong)
    msg = _one_line(e)
    assert "checksum mismatch" in msg and f"{mirror.url}/f.bin" in msg and _sha(data) in msg
    assert list(tmp_path.glob("f.bin*")) == []


def test_http_404(mirror, tmp_path):
    dest = tmp_path / "nothere.bin"
    with pytest.raises(D.DownloadError) as e:
        D.fetch(f"{mirror.url}/nothere.bin", dest, "ab" * 32)
    msg = _one_line(e)
    assert "HTTP 404" in msg and f"{mirror.url}/nothere.bin" in msg and str(dest) in msg
    assert list(tmp_path.glob("nothere*")) == []


def test_connection_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(D.OFFLINE_ENV, raising=False)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    url = f"http://127.0.0.1:{port}/f.bin"
    with pytest.raises(D.DownloadError) as e:
        D.fetch(url, tmp_path / "f.bin", "ab" * 32)
    msg = _one_line(e)
    assert "connection refused" in msg and url in msg and D.MIRROR_ENV in msg
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_disk_full(mirror, tmp_path):
    (mirror.root / "f.bin").write_bytes(_blob(2_000_000, 7))
    dest = tmp_path / "f.bin"
    dest.with_name("f.bin.part").symlink_to("/dev/full")  # every write fails with ENOSPC
    with pytest.raises(D.DownloadError) as e:
        D.fetch(f"{mirror.url}/f.bin", dest, "ab" * 32)
    msg = _one_line(e)
    assert msg.startswith("disk full") and "f.bin.part" in msg
    assert not dest.exists()


def test_file_mirror(tmp_path, monkeypatch):
    # A plain folder (a shared drive) works as a mirror too.
    monkeypatch.delenv(D.OFFLINE_ENV, raising=False)
    (tmp_path / "m").mkdir()
    data = _blob(100_000, 8)
    (tmp_path / "m" / "x-1.bin").write_bytes(data)
    monkeypatch.setenv(D.MIRROR_ENV, str(tmp_path / "m"))
    url = D.source_url("x-1.bin", "https://example.invalid/x-1.bin")
    assert url.startswith("file://")
    D.fetch(url, tmp_path / "out" / "x-1.bin", _sha(data))
    assert (tmp_path / "out" / "x-1.bin").read_bytes() == data


# ----------------------------------------------------------------------------- policy
def test_policy_and_flags(monkeypatch):
    monkeypatch.delenv(D.OFFLINE_ENV)
    assert D.allowed() and D.allowed(True) and not D.allowed(False)
    D.set_policy(False)
    assert not D.allowed() and D.allowed(True)
    D.set_policy(None)
    monkeypatch.setenv(D.OFFLINE_ENV, "1")
    assert not D.allowed(True) and not D.allowed()  # the environment always wins

    p = argparse.ArgumentParser()
    D.add_cli_flags(p)
    assert p.parse_args([]).download is None
    assert p.parse_args(["--download"]).download is True
    assert p.parse_args(["--no-download"]).download is False
    with pytest.raises(SystemExit):
        p.parse_args(["--download", "--no-download"])


def test_offline_makes_no_request(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv(D.OFFLINE_ENV, "1")

    def no_network(*a, **k):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    (mirror.root / "tiny-00000000.pth").write_bytes(b"x")
    with pytest.raises(D.DownloadError, match="PN_JAX_OFFLINE=1"):
        D.fetch(f"{mirror.url}/tiny-00000000.pth", tmp_path / "t.pth", "00000000")
    with pytest.raises(W.WeightsNotFoundError) as e:
        W.find_weights("tiny-00000000.pth", url="https://example.invalid/tiny-00000000.pth")
    assert "PN_JAX_OFFLINE=1" in _one_line(e)
    with pytest.raises(MissingDataError) as e:
        D.ensure_mvtec(tmp_path / "mvtec", ["bottle"], allow=True, log=lambda s: None)
    msg = _one_line(e)
    assert "does not exist" in msg and "PN_JAX_OFFLINE=1" in msg
    assert mirror.requests == []
    assert not (tmp_path / "mvtec").exists()


# ----------------------------------------------------------------------------- archives
def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:xz") -> Path:
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    return info


_EVIL = {
    "dot-dot": (_member("cat/../../evil.txt"), b"evil"),
    "absolute": (_member("/tmp/pn_jax_evil_abs.txt"), b"evil"),
    "symlink out": (_member("cat/link", tarfile.SYMTYPE, "../../outside"), None),
    "absolute symlink": (_member("cat/passwd", tarfile.SYMTYPE, "/etc/passwd"), None),
    "hardlink out": (_member("cat/hard", tarfile.LNKTYPE, "../outside.txt"), None),
    "device": (_member("cat/dev", tarfile.CHRTYPE), None),
}


@pytest.mark.parametrize("case", list(_EVIL))
def test_unsafe_members_are_refused(tmp_path, case):
    info, data = _EVIL[case]
    good = (_member("cat/ok.txt"), b"fine")
    archive = _tar(tmp_path / "a.tar.xz", [good, (info, data)])
    dest = tmp_path / "box" / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(D.DownloadError) as e:
        D.safe_extract(archive, dest)
    msg = _one_line(e)
    assert repr(info.name) in msg and str(archive) in msg  # the member is named
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "box" / "evil.txt").exists()
    assert not Path("/tmp/pn_jax_evil_abs.txt").exists()
    assert not (dest / "cat" / "link").exists() and not (dest / "cat" / "passwd").exists()


def test_links_inside_the_target_are_fine(tmp_path):
    archive = _tar(tmp_path / "a.tar.gz", [
        (_member("cat/sub/ok.txt"), b"fine"),
        (_member("cat/link", tarfile.SYMTYPE, "sub/ok.txt"), None),
        (_member("cat/hard", tarfile.LNKTYPE, "cat/sub/ok.txt"), None),
    ], mode="w:gz")
    D.safe_extract(archive, tmp_path / "dest")
    assert (tmp_path / "dest" / "cat" / "link").read_bytes() == b"fine"
    assert (tmp_path / "dest" / "cat" / "hard").read_bytes() == b"fine"


def test_corrupt_archive(tmp_path):
    data = _tar(tmp_path / "a.tar.xz", [(_member("cat/ok.txt"), _blob(50_000))]).read_bytes()
    (tmp_path / "bad.tar.xz").write_bytes(data[: len(data) // 2])
    with pytest.raises(D.DownloadError) as e:
        D.safe_extract(tmp_path / "bad.tar.xz", tmp_path / "dest")
    assert "corrupt" in _one_line(e) and "bad.tar.xz" in str(e.value)


# ----------------------------------------------------------------------------- MVTec AD
def _png(path: Path, rng, size=64, mask=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mask:
        a = np.zeros((size, size), np.uint8)
        a[size // 4: size // 2, size // 4: size // 2] = 255
    else:
        a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(a).save(path)


def _fake_category(where: Path, name: str, n_train=6, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    c = where / name
    for i in range(n_train):
        _png(c / "train" / "good" / f"{i:03d}.png", rng)
    for i in range(2):
        _png(c / "test" / "good" / f"{i:03d}.png", rng)
        _png(c / "test" / "broken" / f"{i:03d}.png", rng)
        _png(c / "ground_truth" / "broken" / f"{i:03d}_mask.png", rng, mask=True)
    return c


def _category_archive(served: Path, tmp: Path, name: str, extra=()) -> str:
    src = tmp / f"src-{name}"
    _fake_category(src, name)
    path = served / f"{name}.tar.xz"
    with tarfile.open(path, "w:xz") as tar:
        tar.add(src / name, arcname=name)
        for info, data in extra:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return _sha(path.read_bytes())


def _pin_category(monkeypatch, name: str, sha: str):
    monkeypatch.setitem(D.MVTEC_CATEGORY_ARCHIVES, name,
                        D.Archive(f"{name}.tar.xz", f"https://example.invalid/{name}.tar.xz", sha))


def test_ensure_mvtec_downloads_verifies_and_extracts_a_category(mirror, tmp_path, monkeypatch):
    _pin_category(monkeypatch, "bottle", _category_archive(mirror.root, tmp_path, "bottle"))
    root = tmp_path / "mvtec"
    logs = []
    D.ensure_mvtec(root, ["bottle"], allow=True, log=logs.append)
    idx = mvtec.index_category(str(root), "bottle")  # the reader accepts the layout
    assert len(idx["train"]) == 6 and len(idx["test"]) == 4
    assert sum(s.label for s in idx["test"]) == 2 and all(
        s.mask_path for s in idx["test"] if s.label)
    assert "CC BY-NC-SA 4.0" in logs[0] and "downloading" in logs[1]  # licence first
    assert sorted(p.name for p in root.iterdir()) == ["bottle"]  # no staging or temp folders
    assert mirror.requests == [("bottle.tar.xz", None)]
    D.ensure_mvtec(root, ["bottle"], allow=True, log=logs.append)  # present: nothing fetched
    assert len(mirror.requests) == 1


def test_ensure_mvtec_all_fetches_the_whole_archive_once(mirror, tmp_path, monkeypatch):
    monkeypatch.setattr(mvtec, "MVTEC_CATEGORIES", ("bottle", "cable", "carpet"))
    root = tmp_path / "mvtec"
    (root / "carpet").mkdir(parents=True)
    (root / "carpet" / "mine.txt").write_text("user data")  # present: never touched
    src = tmp_path / "full"
    for i, c in enumerate(("bottle", "cable", "carpet")):
        _fake_category(src, c, n_train=2, seed=i)
    (src / "license.txt").write_text("CC BY-NC-SA 4.0")
    archive = mirror.root / "mvtec_anomaly_detection.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        for p in sorted(src.iterdir()):
            tar.add(p, arcname=p.name)
    monkeypatch.setattr(D, "MVTEC_ARCHIVE", dataclasses.replace(D.MVTEC_ARCHIVE, sha256=_sha(archive.read_bytes())))
    D.ensure_mvtec(root, ["all"], allow=True, log=lambda s: None)
    assert mirror.requests == [("mvtec_anomaly_detection.tar.xz", None)]
    for c in ("bottle", "cable"):
        assert len(mvtec.index_category(str(root), c)["train"]) == 2
    assert sorted(os.listdir(root / "carpet")) == ["mine.txt"]
    assert (root / "license.txt").read_text() == "CC BY-NC-SA 4.0"
    assert sorted(p.name for p in root.iterdir()) == ["bottle", "cable", "carpet", "license.txt"]
    D.ensure_mvtec(root, ["all"], allow=True, log=lambda s: None)
    assert len(mirror.requests) == 1


def test_ensure_mvtec_without_a_pinned_category_checksum_uses_the_whole_archive():
    assert D.MVTEC_ARCHIVE.sha256 and len(D.MVTEC_ARCHIVE.sha256) == 64
    assert set(D.MVTEC_CATEGORY_ARCHIVES) == set(mvtec.MVTEC_CATEGORIES)
    plan = D._plan(["bottle", "cable"])
    assert plan == [(D.MVTEC_ARCHIVE, ["bottle", "cable"])]


def test_ensure_mvtec_verifies_an_archive_placed_by_hand(mirror, tmp_path, monkeypatch):
    sha = _category_archive(mirror.root, tmp_path, "bottle")
    _pin_category(monkeypatch, "bottle", sha)
    root = tmp_path / "mvtec"
    (root / ".downloads").mkdir(parents=True)
    (mirror.root / "bottle.tar.xz").rename(root / ".downloads" / "bottle.tar.xz")
    D.ensure_mvtec(root, ["bottle"], allow=True, log=lambda s: None)
    assert mirror.requests == []  # verified in place, extracted, no network
    assert (root / "bottle" / "train" / "good").is_dir()
    assert sorted(p.name for p in root.iterdir()) == ["bottle"]


def test_fetch_replaces_a_wrong_file_under_the_final_name(mirror, tmp_path):
    data = _blob(100_000, 9)
    (mirror.root / "f.bin").write_bytes(data)
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"something else")
    D.fetch(f"{mirror.url}/f.bin", dest, _sha(data))
    assert dest.read_bytes() == data and len(mirror.requests) == 1
    D.fetch(f"{mirror.url}/f.bin", dest, _sha(data))  # already right: no request
    assert len(mirror.requests) == 1


def test_ensure_mvtec_refuses_a_traversal_member(mirror, tmp_path, monkeypatch):
    sha = _category_archive(mirror.root, tmp_path, "bottle", extra=[(_member("bottle/../../evil.txt"), b"x")])
    _pin_category(monkeypatch, "bottle", sha)
    root = tmp_path / "mvtec"
    with pytest.raises(D.DownloadError) as e:
        D.ensure_mvtec(root, ["bottle"], allow=True, log=lambda s: None)
    assert "bottle/../../evil.txt" in _one_line(e)
    assert not (tmp_path / "evil.txt").exists()
    assert not (root / "bottle").exists()  # no half-extracted category
    assert not list(root.glob(".extract-*"))


def test_ensure_mvtec_checksum_mismatch(mirror, tmp_path, monkeypatch):
    sha = _category_archive(mirror.root, tmp_path, "bottle")
    _pin_category(monkeypatch, "bottle", ("0" if sha[0] != "0" else "1") + sha[1:])
    root = tmp_path / "mvtec"
    with pytest.raises(D.DownloadError, match="checksum mismatch"):
        D.ensure_mvtec(root, ["bottle"], allow=True, log=lambda s: None)
    assert not (root / "bottle").exists()
    assert not list(root.rglob("*.tar.xz*"))


def test_ensure_mvtec_not_allowed_explains(mirror, tmp_path, monkeypatch):
    _pin_category(monkeypatch, "bottle", _category_archive(mirror.root, tmp_path, "bottle"))
    root = tmp_path / "mvtec"
    with pytest.raises(MissingDataError) as e:  # no flag, not a terminal: no download
        D.ensure_mvtec(root, ["bottle"], allow=None, log=lambda s: None)
    msg = _one_line(e)
    assert str(root) in msg and "--download" in msg and "bottle" in msg
    root.mkdir()
    with pytest.raises(MissingDataError) as e:
        D.ensure_mvtec(root, ["bottle"], allow=False, log=lambda s: None)
    msg = _one_line(e)
    assert "category 'bottle' not found" in msg and "--no-download was given" in msg
    assert mirror.requests == []
    D.ensure_mvtec(root, ["my_own_category"], allow=None)  # not MVTec's: left to the reader


def test_ensure_mvtec_asks_on_a_terminal(mirror, tmp_path, monkeypatch):
    _pin_category(monkeypatch, "bottle", _category_archive(mirror.root, tmp_path, "bottle"))

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Tty())
    answers, logs = ["n", "y"], []
    monkeypatch.setattr("builtins.input", lambda q: (logs.append(q), answers.pop(0))[1])
    root = tmp_path / "mvtec"
    with pytest.raises(MissingDataError):
        D.ensure_mvtec(root, ["bottle"], allow=None, log=logs.append)
    assert mirror.requests == []
    D.ensure_mvtec(root, ["bottle"], allow=None, log=logs.append)
    assert (root / "bottle" / "train" / "good").is_dir()
    assert "CC BY-NC-SA 4.0" in logs[0] and "[y/N]" in logs[1]


# ----------------------------------------------------------------------------- weights
def _pickle_str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _pickle_ints(xs) -> bytes:
    return b"(" + b"".join(b"J" + struct.pack("<i", int(x)) for x in xs) + b"t"


def write_torch_zip(path: Path, sd: dict[str, np.ndarray]) -> Path:
    """torch.save's zip format for a float32 state dict, written by hand (no torch): an
    OrderedDict of `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad)` calls."""
    pkl = bytearray(b"\x80\x02" + b"ccollections\nOrderedDict\n)R")
    blobs = {}
    for i, (k, v) in enumerate(sd.items()):
        v = np.ascontiguousarray(v, dtype="<f4")
        strides = [st // 4 for st in v.strides] if v.ndim else []
        pkl += _pickle_str(k) + b"ctorch._utils\n_rebuild_tensor_v2\n("
        pkl += b"(" + _pickle_str("storage") + b"ctorch\nFloatStorage\n" + _pickle_str(str(i))
        pkl += _pickle_str("cpu") + b"J" + struct.pack("<i", v.size) + b"tQ"  # persistent id
        pkl += b"J" + struct.pack("<i", 0) + _pickle_ints(v.shape) + _pickle_ints(strides) + b"\x89tRs"
        blobs[f"archive/data/{i}"] = v.tobytes()
    pkl += b"."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", bytes(pkl))
        zf.writestr("archive/byteorder", "little")
        for name, blob in blobs.items():
            zf.writestr(name, blob)
        zf.writestr("archive/version", "3\n")
    return path


def test_weights_download_into_the_hub_cache_then_the_real_loader(mirror, tmp_path):
    data = (FIX / "resnet_tiny_zip.pth").read_bytes()
    name = f"tiny-{_sha(data)[:8]}.pth"
    (mirror.root / name).write_bytes(data)
    logs = []
    path = D.ensure_weights(name, f"https://example.invalid/{name}", W.torch_hub_dir(), log=logs.append)
    assert path == tmp_path / "torch_home" / "hub" / "checkpoints" / name
    assert mirror.url in logs[0] and name in logs[0]
    got, want = W.load_state_dict(path), W.load_state_dict(FIX / "resnet_tiny_zip.pth")
    assert list(got) == list(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    assert W.find_weights(name, url="https://example.invalid/x") == path  # cached: no request
    assert len(mirror.requests) == 1


def test_weights_name_without_hash_is_not_downloaded(mirror, tmp_path):
    (mirror.root / "plain.pth").write_bytes(b"x")
    with pytest.raises(D.DownloadError, match="no SHA-256 prefix"):
        D.ensure_weights("plain.pth", "https://example.invalid/plain.pth", tmp_path)
    assert mirror.requests == []


def test_weights_hash_mismatch_is_refused(mirror, tmp_path):
    data = (FIX / "resnet_tiny_zip.pth").read_bytes()
    wrong = "0" * 8 if not _sha(data).startswith("0" * 8) else "1" * 8
    (mirror.root / f"tiny-{wrong}.pth").write_bytes(data)
    with pytest.raises(D.DownloadError) as e:
        W.find_weights(f"tiny-{wrong}.pth", url="https://example.invalid/x")
    assert "checksum mismatch" in _one_line(e) and f"tiny-{wrong}.pth" in str(e.value)
    assert not list((tmp_path / "torch_home").rglob("tiny-*"))


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A random resnet18 state dict in torchvision's file format, named by its hash."""
    from pn_jax.backbones import resnet

    sd = resnet.random_state_dict("resnet18", 5)
    sd = collections.OrderedDict(sd, **{"fc.weight": np.zeros((1000, 512), np.float32),
                                        "fc.bias": np.zeros(1000, np.float32)})
    tmp = write_torch_zip(tmp_path_factory.mktemp("r18") / "r18.pth", sd)
    name = f"resnet18-{_sha(tmp.read_bytes())[:8]}.pth"
    return tmp.rename(tmp.with_name(name)), sd


def _use_weights_file(monkeypatch, path: Path):
    from pn_jax.backbones import resnet

    monkeypatch.setitem(resnet.INFOS, "resnet18",
                        dataclasses.replace(resnet.INFOS["resnet18"], weight_file=path.name))


def test_backbone_downloads_its_weights_and_loads_them(mirror, monkeypatch, resnet18_file):
    from pn_jax import backbones
    from pn_jax.backbones import resnet

    path, sd = resnet18_file
    (mirror.root / path.name).write_bytes(path.read_bytes())
    _use_weights_file(monkeypatch, path)
    net = backbones.create("resnet18", layers=("layer1",))
    assert mirror.requests == [(path.name, None)]
    assert (W.torch_hub_dir() / path.name).is_file()
    x = np.random.default_rng(0).standard_normal((1, 32, 32, 3)).astype(np.float32)
    ref = resnet.build("resnet18", state_dict=sd, layers=("layer1",))
    np.testing.assert_array_equal(np.asarray(net(x)["layer1"]), np.asarray(ref(x)["layer1"]))
    assert backbones.weights_file("resnet18") == W.torch_hub_dir() / path.name


def test_backbone_offline_keeps_the_not_found_message(monkeypatch, tmp_path):
    from pn_jax import backbones

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(W.WeightsNotFoundError) as e:
        backbones.create("wide_resnet50_2")
    msg = _one_line(e)
    assert "wide_resnet50_2-95faca4d.pth" in msg and "https://download.pytorch.org/models/" in msg
    assert "PN_JAX_OFFLINE=1" in msg


# ----------------------------------------------------------------------------- end to end
TINY_RUN = ["--category", "bottle", "--backbone", "resnet18", "--image-size", "64", "--embed-dim", "64",
            "--coreset-ratio", "0.5", "--k", "3", "--batch-size", "4", "--max-train", "4",
            "--max-test", "4", "--figures", "0"]


def test_experiments_run_downloads_what_it_needs(mirror, tmp_path, monkeypatch, resnet18_file, capsys):
    from experiments import run

    path, _ = resnet18_file
    (mirror.root / path.name).write_bytes(path.read_bytes())
    _use_weights_file(monkeypatch, path)
    _pin_category(monkeypatch, "bottle", _category_archive(mirror.root, tmp_path, "bottle"))
    root, out = tmp_path / "data" / "mvtec_ad", tmp_path / "out"
    args = TINY_RUN + ["--data-root", str(root), "--out", str(out)]

    assert run.main(args + ["--no-download"]) == 2  # today's behaviour: a clear message, no network
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--no-download" in err and str(root) in err
    assert mirror.requests == []

    assert run.main(args + ["--download"]) == 0
    assert sorted(n for n, _ in mirror.requests) == sorted(["bottle.tar.xz", path.name])
    assert (root / "bottle" / "train" / "good").is_dir()
    assert (W.torch_hub_dir() / path.name).is_file()
    res = json.loads((out / "results.json").read_text())
    assert "bottle" in json.dumps(res)
