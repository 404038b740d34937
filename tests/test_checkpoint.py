"""Checkpoints: exact round trip, refusal of mismatching / incomplete / corrupted ones, and
atomic saves (an interrupted save never leaves something that loads)."""
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pn_jax import checkpoint as ckpt
from pn_jax import detector, noising
from pn_jax.checkpoint import CheckpointError
from pn_jax.config import tiny_config

D = 16


def make_state(seed=0, m=40):
    """A random DetectorState shaped like a fitted one (numpy RNG: no compilation, fast)."""
    rng = np.random.default_rng(seed)

    def rand(like):
        return jnp.asarray(rng.standard_normal(like.shape).astype(like.dtype))

    params = {name: rand(v) for name, v in detector.init_params(D).items()}
    stats = noising.Stats(*(rand(s) for s in noising.identity_stats()))
    bank = jnp.asarray(rng.standard_normal((m, D), np.float32))
    dims = jnp.asarray(np.sort(rng.choice(D, 3, replace=False)).astype(np.int32))
    return detector.DetectorState(bank=bank, dims=dims, params=params, stats=stats)


def assert_exact(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array))
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


@pytest.fixture
def cfg():
    return tiny_config()


@pytest.fixture
def saved(tmp_path, cfg):
    state = make_state()
    path = ckpt.save(tmp_path / "ck", state, cfg, meta={"grid": (8, 8)})
    return Path(path), state


def siblings(path: Path):
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


# ----------------------------------------------------------------------------- round trip
def test_round_trip_exact(tmp_path, cfg):
    state = make_state()
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"not really weights")
    extra = {"noise_scale": np.linspace(0, 1, D).astype(np.float16),
             "mask": jnp.arange(5) % 2 == 0, "none": None}
    path = ckpt.save(tmp_path / "ck", state, cfg, meta={"grid": (8, 8), "weights_path": weights,
                                                        "category": "bottle"},
                     extra_arrays=extra)
    assert os.path.isabs(path)
    state2, cfg2, meta = ckpt.load(path, expected=cfg)
    assert cfg2 == cfg and cfg2.to_dict() == cfg.to_dict()
    assert type(state2) is detector.DetectorState and type(state2.stats) is noising.Stats
    assert_exact(state, state2)
    assert_exact(extra, meta["extra_arrays"])
    assert isinstance(meta["extra_arrays"]["noise_scale"], np.ndarray)  # numpy stays numpy
    assert meta["grid"] == [8, 8] and meta["category"] == "bottle"
    assert meta["backbone"] == cfg.model.backbone
    assert meta["weights_sha256"] == hashlib.sha256(b"not really weights").hexdigest()
    assert meta["format_version"] == ckpt.FORMAT_VERSION and meta["created"]
    assert set(meta["versions"]) == {"pn_jax", "jax", "jaxlib", "flax", "orbax", "numpy"}
    assert json.loads((Path(path) / "config.json").read_text()) == json.loads(json.dumps(cfg.to_dict()))
    assert siblings(Path(path)) == ["w.pth"]  # no temporary directories left


class Old(NamedTuple):
    a: jax.Array


def test_new_namedtuple_fields_generic(tmp_path, cfg, monkeypatch):
    path = ckpt.save(tmp_path / "ck", Old(jnp.arange(3.0)), cfg)

    class New(NamedTuple):  # the class grew a field since the checkpoint was written
        a: jax.Array
        b: jax.Array

    class NewDefault(NamedTuple):
        a: jax.Array
        b: jax.Array | None = None

    monkeypatch.setattr(sys.modules[__name__], "Old", New, raising=True)
    with pytest.raises(CheckpointError, match=r"required fields absent.*\['b'\]"):
        ckpt.load(path)
    monkeypatch.setattr(sys.modules[__name__], "Old", NewDefault)
    state, _, _ = ckpt.load(path)
    assert type(state) is NewDefault and state.b is None
    np.testing.assert_array_equal(state.a, np.arange(3.0))


def test_params_of_another_version_refused(tmp_path, cfg):
    state = make_state()
    params = dict(state.params)
    dropped = sorted(params)[0]
    del params[dropped]
    path = ckpt.save(tmp_path / "ck", state._replace(params=params), cfg)
    with pytest.raises(CheckpointError, match="learnable params") as e:
        ckpt.load(path)
    assert dropped in str(e.value)


# ----------------------------------------------------------------------------- compatibility
@pytest.mark.parametrize("field,override", [
    ("model.backbone", {"model": {"backbone": "wide_resnet50_2"}}),
    ("model.layers", {"model": {"layers": ("blocks4",)}}),
    ("data.image_size", {"data": {"image_size": 128}}),
    ("model.target_embed_dimension", {"model": {"target_embed_dimension": 32}}),
    ("model.pretrain_embed_dimension", {"model": {"pretrain_embed_dimension": 32}}),
    ("model.patchsize", {"model": {"patchsize": 5}}),
    ("data.resize_mode", {"data": {"resize_mode": "patchcore"}}),
    ("data.dataset", {"data": {"dataset": "mvtec_ad"}}),
    ("bank.coreset_ratio", {"bank": {"coreset_ratio": 0.5}}),
    ("noising.influence_ratio", {"noising": {"influence_ratio": 0.5}}),
])
def test_conflicting_field_refused(saved, cfg, field, override):
    path, _ = saved
    requested = cfg.replace(**override)
    with pytest.raises(CheckpointError) as e:
        ckpt.load(path, expected=requested)
    msg = str(e.value)
    assert field in msg and str(path) in msg and "--mode train" in msg
    section, name = field.split(".")
    assert repr(getattr(getattr(cfg, section), name)) in msg  # saved value
    assert repr(getattr(getattr(requested, section), name)) in msg  # requested value
    assert ckpt.check_compatible(cfg, requested)[0].startswith(field)


def test_several_conflicts_all_named(saved, cfg):
    path, _ = saved
    req = cfg.replace(model={"backbone": "wide_resnet50_2", "layers": ("layer2",)}, data={"image_size": 96})
    with pytest.raises(CheckpointError) as e:
        ckpt.load(path, expected=req)
    for f in ("model.backbone", "model.layers", "data.image_size"):
        assert f in str(e.value)


def test_crop_size_only_matters_for_patchcore_resize(cfg):
    assert ckpt.check_compatible(cfg, cfg.replace(data={"crop_size": 100})) == []
    pc = cfg.replace(data={"resize_mode": "patchcore"})
    assert ckpt.check_compatible(pc, pc.replace(data={"crop_size": 100}))[0].startswith("data.crop_size")


@pytest.mark.parametrize("override", [{"seed": 7}, {"batch_size": 2}, {"bank": {"knn_block": 64}},
                                      {"data": {"root": "/elsewhere"}}, {"model": {"weights": "/x.pth"}},
                                      {"noising": {"method": "patchcore", "influence_ratio": 0.5}}])
def test_allowed_differences_load(saved, cfg, override):
    path, state = saved
    state2, cfg2, _ = ckpt.load(path, expected=cfg.replace(**override))
    assert cfg2 == cfg  # the saved config comes back, not the requested one
    assert_exact(state, state2)


def test_other_k_loads_with_warning(saved, cfg):
    path, state = saved
    with pytest.warns(UserWarning, match="noising.k"):
        state2, _, _ = ckpt.load(path, expected=cfg.replace(noising={"k": 1}))
    assert_exact(state, state2)
    with pytest.raises(CheckpointError, match="40 entries.*k=50"):  # bank has 40 rows
        ckpt.load(path, expected=cfg.replace(noising={"k": 50}))


def test_weights_hash_compared_via_expected_meta(tmp_path, cfg):
    path = ckpt.save(tmp_path / "ck", make_state(), cfg, meta={"weights_sha256": "a" * 64})
    ckpt.load(path, expected=cfg, expected_meta={"weights_sha256": "a" * 64})
    with pytest.raises(CheckpointError, match="weights_sha256"):
        ckpt.load(path, expected=cfg, expected_meta={"weights_sha256": "b" * 64})
    # unknown on one side: not compared
    ckpt.load(ckpt.save(tmp_path / "ck2", make_state(), cfg), expected_meta={"weights_sha256": "b" * 64})


# ----------------------------------------------------------------------------- refusals
def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load(tmp_path / "nope")


def test_no_commit_is_incomplete(saved):
    path, _ = saved
    (path / "COMMIT").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete.*--mode train"):
        ckpt.load(path)


def largest_array_file(path: Path) -> Path:
    return max((p for p in (path / "arrays").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_flipped_byte_refused(saved):
    path, _ = saved
    f = largest_array_file(path)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted") as e:
        ckpt.load(path)
    assert str(path) in str(e.value) and f.relative_to(path).as_posix() in str(e.value)


def test_truncated_file_refused(saved):
    path, _ = saved
    f = largest_array_file(path)
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="truncated") as e:
        ckpt.load(path)
    assert f.relative_to(path).as_posix() in str(e.value)


def test_corruption_behind_a_matching_commit_refused(saved):
    """Even if COMMIT is rewritten to match the damaged files, reading the arrays (Orbax or the
    per-array sha256) refuses them."""
    path, _ = saved
    for f in sorted((p for p in (path / "arrays").rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size)[:3]:
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    commit = json.loads((path / "COMMIT").read_text())
    for rel, rec in commit["files"].items():
        rec["size"] = (path / rel).stat().st_size
        rec["sha256"] = hashlib.sha256((path / rel).read_bytes()).hexdigest()
    (path / "COMMIT").write_text(json.dumps(commit))
    with pytest.raises(CheckpointError, match="corrupted") as e:
        ckpt.load(path)
    assert str(path) in str(e.value)


def test_edited_config_refused(saved):
    path, _ = saved
    d = json.loads((path / "config.json").read_text())
    d["data"]["image_size"] = 512
    (path / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="config.json"):
        ckpt.load(path)


def test_refuses_to_overwrite_a_foreign_directory(tmp_path, cfg):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="not a pn_jax checkpoint"):
        ckpt.save(tmp_path / "mine", make_state(), cfg)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


# ----------------------------------------------------------------------------- atomicity
@pytest.mark.parametrize("exchange", [True, False])
def test_overwrite(saved, cfg, monkeypatch, exchange):
    path, _ = saved
    if not exchange:
        monkeypatch.setattr(ckpt, "_exchange", lambda a, b: False)
    new_state, new_cfg = make_state(seed=1, m=30), cfg.replace(seed=5)
    assert ckpt.save(path, new_state, new_cfg) == str(path)
    state2, cfg2, _ = ckpt.load(path)
    assert cfg2 == new_cfg
    assert_exact(new_state, state2)
    assert siblings(path) == []


def fail(*a, **k):
    raise RuntimeError("simulated failure")


@pytest.mark.parametrize("stage", ["_write_commit", "_install"])
def test_failure_mid_save_keeps_previous(saved, cfg, monkeypatch, stage):
    path, state = saved
    monkeypatch.setattr(ckpt, stage, fail)
    with pytest.raises(RuntimeError, match="simulated"):
        ckpt.save(path, make_state(seed=2), cfg.replace(seed=9))
    assert siblings(path) == []  # the temporary directory was cleaned up
    state2, cfg2, _ = ckpt.load(path)
    assert cfg2 == cfg
    assert_exact(state, state2)


def test_failure_moving_new_in_restores_old(saved, cfg, monkeypatch):
    path, state = saved
    monkeypatch.setattr(ckpt, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in os.fspath(src):
            raise OSError("simulated failure")
        return real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save(path, make_state(seed=2), cfg.replace(seed=9))
    monkeypatch.undo()
    assert siblings(path) == []
    assert_exact(state, ckpt.load(path)[0])


@pytest.mark.parametrize("stage", ["_write_commit", "_install"])
@pytest.mark.parametrize("previous", [True, False])
def test_crash_leftovers_never_load(tmp_path, cfg, monkeypatch, stage, previous):
    """A hard crash (no cleanup runs) after the arrays are written: the target holds the previous
    checkpoint or does not exist, and the leftover temporary directory is refused."""
    target = tmp_path / "ck"
    state = make_state()
    if previous:
        ckpt.save(target, state, cfg)
    monkeypatch.setattr(ckpt, stage, fail)
    monkeypatch.setattr(ckpt, "_remove_tree", lambda p: None)
    with pytest.raises(RuntimeError):
        ckpt.save(target, make_state(seed=3), cfg.replace(seed=9))
    monkeypatch.undo()
    (leftover,) = [p for p in tmp_path.iterdir() if p.name.startswith("ck.tmp-")]
    assert (leftover / "arrays").is_dir()  # the arrays were written before the failure
    assert (leftover / "COMMIT").exists() == (stage == "_install")
    with pytest.raises(CheckpointError, match="interrupted"):
        ckpt.load(leftover)
    if previous:
        assert_exact(state, ckpt.load(target)[0])
    else:
        assert not target.exists()
        with pytest.raises(CheckpointError, match=r"does not exist.*ck\.tmp-"):
            ckpt.load(target)
