"""Checkpoints: exact round trip of the fixed schema, refusal of mismatching / incomplete /
corrupted ones, provenance checks, and atomic saves (a kill mid-save never loses the old one)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

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
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


@pytest.fixture
def cfg():
    return tiny_config()


@pytest.fixture
def saved(tmp_path, cfg):
    state = make_state()
    path = ckpt.save(tmp_path / "ck", state, cfg, meta={"grid": (8, 8), "category": "gadget",
                                                        "weights_sha256": "a" * 64})
    return Path(path), state


def siblings(path: Path):
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def largest_array_file(path: Path) -> Path:
    return max((p for p in (path / "arrays").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


# ----------------------------------------------------------------------------- round trip
def test_round_trip_exact(tmp_path, cfg):
    state = make_state()
    extra = {"bank_image": np.arange(40, dtype=np.int32),
             "predictor": {"inp": {"kernel": np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4),
                                   "bias": jnp.zeros((4,), jnp.bfloat16)}},
             "predictor/flat/name": np.array([True, False]), "half": np.ones(3, np.float16)}
    meta = {"grid": (8, 8), "category": "bottle", "threshold": 1.5, "provenance": {"dataset": "x"}}
    path = ckpt.save(tmp_path / "ck", state, cfg, meta=meta, extra_arrays=extra)
    assert os.path.isabs(path)
    state2, cfg2, meta2 = ckpt.load(path, expected=cfg)
    assert cfg2 == cfg
    assert type(state2) is detector.DetectorState and type(state2.stats) is noising.Stats
    assert_exact(state, state2)
    assert_exact(jax.tree.map(np.asarray, extra), meta2["extra_arrays"])
    assert meta2["grid"] == [8, 8] and meta2["category"] == "bottle" and meta2["threshold"] == 1.5
    assert meta2["provenance"] == {"dataset": "x"}
    assert meta2["format_version"] == ckpt.FORMAT_VERSION and meta2["created"]
    assert set(meta2["versions"]) == {"pn_jax", "jax", "jaxlib", "flax", "orbax-checkpoint", "numpy"}
    assert json.loads((Path(path) / "config.json").read_text()) == json.loads(json.dumps(cfg.to_dict()))
    assert siblings(Path(path)) == []  # no temporary directories left


@pytest.mark.parametrize("bad,match", [
    ({"meta": {"arrays": 1}}, "reserved"),
    ({"meta": {"x": object()}}, "JSON"),
    ({"extra_arrays": {"x": None}}, "not a numeric array"),
    ({"extra_arrays": {"x": np.array(["a"])}}, "not a numeric array"),
    ({"extra_arrays": {"": np.zeros(2)}}, "non-empty strings"),
])
def test_bad_meta_or_extras_refused(tmp_path, cfg, bad, match):
    with pytest.raises((CheckpointError, TypeError), match=match):
        ckpt.save(tmp_path / "ck", make_state(), cfg, **bad)
    assert not (tmp_path / "ck").exists() and siblings(tmp_path / "ck") == []


def test_only_a_detector_state_of_the_fixed_schema_is_saved(tmp_path, cfg):
    with pytest.raises(TypeError, match="DetectorState"):
        ckpt.save(tmp_path / "ck", {"bank": np.zeros((3, 2))}, cfg)
    state = make_state()
    for params in ({**state.params, "other": jnp.ones(3)},  # a param this pn_jax does not know
                   {**state.params, "noise_scale": jnp.ones((D + 1,), jnp.float32)},  # wrong shape
                   {**state.params, "distance_weight": jnp.ones((1,), jnp.float16)}):  # wrong dtype
        with pytest.raises(TypeError, match="state.params must be"):
            ckpt.save(tmp_path / "ck", state._replace(params=params), cfg)
    assert not (tmp_path / "ck").exists()


def test_schema_of_another_version_refused(saved):
    """meta.json describes the arrays, but never which classes or fields to build: an array
    list with an unknown (or missing) state field is refused, nothing is imported from it."""
    path, _ = saved
    meta = json.loads((path / "meta.json").read_text())
    meta["arrays"] = [a for a in meta["arrays"] if a["path"] != ["state", "stats", "dist_std"]]
    meta["arrays"].append({"path": ["state", "os:system"], "dtype": "float32", "shape": [], "sha256": ""})
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"missing \['stats/dist_std'\], unknown \['os:system'\].*another"):
        ckpt.load(path)


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


def test_weights_file_compared_when_both_name_one(cfg):
    a, b = cfg.replace(model={"weights": "/a.pth"}), cfg.replace(model={"weights": "/b.pth"})
    assert ckpt.check_compatible(a, b)[0] == "model.weights: saved '/a.pth', requested '/b.pth'"
    assert ckpt.check_compatible(a, a) == []
    assert ckpt.check_compatible(a, cfg) == [] and ckpt.check_compatible(cfg, a) == []  # None: default


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


# ----------------------------------------------------------------------------- provenance
def test_category_and_weights_provenance_checked(saved, tmp_path, cfg):
    path, state = saved
    assert_exact(state, ckpt.load(path, expected_meta={"category": "gadget", "weights_sha256": "a" * 64})[0])
    with pytest.raises(CheckpointError, match="category: saved 'gadget', requested 'widget'"):
        ckpt.load(path, expected=cfg, expected_meta={"category": "widget"})
    with pytest.raises(CheckpointError, match="weights_sha256: saved 'a+', requested 'b+'"):
        ckpt.load(path, expected_meta={"weights_sha256": "b" * 64})
    ckpt.load(path, expected_meta={"weights_sha256": None})  # nothing to check against
    # a checkpoint that recorded no weights hash cannot be checked: refused, not waved through
    bare = ckpt.save(tmp_path / "bare", make_state(), cfg)
    with pytest.raises(CheckpointError, match="recorded none"):
        ckpt.load(bare, expected_meta={"weights_sha256": "a" * 64})
    # a unified bank over several categories serves each of them
    uni = ckpt.save(tmp_path / "uni", make_state(), cfg, meta={"category": "gadget+widget"})
    ckpt.load(uni, expected_meta={"category": "widget"})
    with pytest.raises(CheckpointError, match="category"):
        ckpt.load(uni, expected_meta={"category": "widge"})


# ----------------------------------------------------------------------------- refusals
def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load(tmp_path / "nope")


@pytest.mark.parametrize("name,match", [("meta.json", "incomplete"), ("config.json", "cannot read config.json")])
def test_deleted_json_file(saved, name, match):
    path, _ = saved
    (path / name).unlink()
    with pytest.raises(CheckpointError, match=match) as e:
        ckpt.load(path)
    assert str(path) in str(e.value) and "--mode train" in str(e.value)


@pytest.mark.parametrize("text,match", [("{garbage", "cannot read meta.json"), ("[1, 2]", "not a JSON object"),
                                        ('{"format_version": 1}', "format version 1"),
                                        ('{"format_version": 2, "arrays": [{"path": 3}]}', "array list is not valid")])
def test_garbage_meta_refused(saved, text, match):
    path, _ = saved
    (path / "meta.json").write_text(text)
    with pytest.raises(CheckpointError, match=match):
        ckpt.load(path)


def test_edited_config_refused(saved):
    path, _ = saved
    d = json.loads((path / "config.json").read_text())
    d["data"]["image_size"] = "big"
    (path / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="config.json"):
        ckpt.load(path)


def _flip(f: Path):
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [
    _flip,  # Orbax reads this back without error, as a wrong number: the sha256 catches it
    lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),  # truncated
    lambda f: f.unlink(),  # deleted
])
def test_damaged_array_file_refused(saved, damage):
    path, _ = saved
    damage(largest_array_file(path))
    with pytest.raises(CheckpointError, match="corrupted") as e:
        ckpt.load(path)
    assert str(path) in str(e.value) and "--mode train" in str(e.value)


def test_every_array_file_deleted_or_the_arrays_dir(saved):
    path, _ = saved
    for f in sorted(p for p in (path / "arrays").rglob("*") if p.is_file() and "manifest" in p.name):
        f.unlink()
    with pytest.raises(CheckpointError, match="corrupted"):
        ckpt.load(path)


def test_refuses_to_overwrite_a_foreign_directory(tmp_path, cfg):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="not a pn_jax checkpoint"):
        ckpt.save(tmp_path / "mine", make_state(), cfg)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


# ----------------------------------------------------------------------------- atomicity
def test_overwrite(saved, cfg):
    path, _ = saved
    new_state, new_cfg = make_state(seed=1, m=30), cfg.replace(seed=5)
    assert ckpt.save(path, new_state, new_cfg) == str(path)
    state2, cfg2, meta = ckpt.load(path)
    assert cfg2 == new_cfg and "category" not in meta
    assert_exact(new_state, state2)
    assert siblings(path) == []


def fail(*a, **k):
    raise RuntimeError("simulated failure")


@pytest.mark.parametrize("stage", ["orbax", "json", "swap"])
def test_failure_mid_save_keeps_previous(saved, cfg, monkeypatch, stage):
    path, state = saved
    if stage == "orbax":
        import orbax.checkpoint as ocp
        monkeypatch.setattr(ocp.Checkpointer, "save", fail)
    elif stage == "json":
        monkeypatch.setattr(ckpt, "_write_json", fail)
    else:  # the second rename of the swap (new in) fails: the old one is moved back
        real = os.rename
        monkeypatch.setattr(ckpt.os, "rename", lambda a, b: fail() if ".tmp-" in os.fspath(a) else real(a, b))
    with pytest.raises(RuntimeError, match="simulated"):
        ckpt.save(path, make_state(seed=2), cfg.replace(seed=9))
    monkeypatch.undo()
    assert siblings(path) == []  # the temporary directory was cleaned up
    state2, cfg2, _ = ckpt.load(path)
    assert cfg2 == cfg
    assert_exact(state, state2)


def test_leftovers_of_a_killed_save_refused_then_removed(saved, cfg, monkeypatch):
    """A crash with no cleanup (kill -9) leaves <dir>.tmp-*: it never loads, the checkpoint
    itself still does, and the next save removes it (issue 13.7)."""
    path, state = saved
    monkeypatch.setattr(ckpt, "_write_json", fail)
    monkeypatch.setattr(ckpt.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(RuntimeError):
        ckpt.save(path, make_state(seed=3), cfg)
    monkeypatch.undo()
    (leftover,) = [path.parent / n for n in siblings(path)]
    assert leftover.name.startswith("ck.tmp-") and (leftover / "arrays").is_dir()
    with pytest.raises(CheckpointError, match="interrupted"):
        ckpt.load(leftover)
    assert_exact(state, ckpt.load(path)[0])
    ckpt.save(path, make_state(seed=4), cfg)
    assert siblings(path) == []


def test_crash_between_the_two_renames_keeps_the_old_checkpoint(saved, cfg):
    """The old checkpoint is aside (<dir>.old-*), the new one not yet in: load reads the old
    one from there (changing nothing on disk); the next save replaces it and cleans up."""
    path, state = saved
    os.rename(path, path.with_name("ck.old-0123456789ab"))
    ckpt.save(path.with_name("ck.tmp-ba9876543210"), make_state(seed=5), cfg)  # a complete new copy
    state2, _, meta = ckpt.load(path)
    assert_exact(state, state2) and meta["category"] == "gadget"
    assert siblings(path) == ["ck.old-0123456789ab", "ck.tmp-ba9876543210"]
    new = make_state(seed=6)
    ckpt.save(path, new, cfg)
    assert siblings(path) == []
    assert_exact(new, ckpt.load(path)[0])


KILL_SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    from pn_jax import checkpoint as ckpt
    from pn_jax.config import tiny_config
    from tests.test_checkpoint import make_state
    print("ready", flush=True)
    for i in range(1000):
        ckpt.save(sys.argv[1], make_state(seed=i % 2, m=2000), tiny_config(seed=i % 2), meta={"i": i})
""")


def test_kill_minus_9_mid_save_leaves_a_loadable_checkpoint(tmp_path, cfg):
    """Saves in a loop over one checkpoint, killed at different moments: what is left always
    loads, and is exactly one of the two states that were being written."""
    target = tmp_path / "ck"
    states = {s: make_state(seed=s, m=2000) for s in (0, 1)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for delay in (0.4, 0.9, 1.7):
        p = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(target)], cwd=root, stdout=subprocess.PIPE,
                             env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert p.stdout.readline().strip() == b"ready"
        while not target.exists():
            time.sleep(0.01)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        state, cfg2, meta = ckpt.load(target)
        assert cfg2.seed == meta["i"] % 2
        assert_exact(states[cfg2.seed], state)
    ckpt.save(target, make_state(), cfg)
    assert siblings(target) == []


def test_a_sharded_banks_rows_are_checked_shard_by_shard():
    """A distributed fit's bank is saved as its padded rows with one sha256 per device's real
    rows (no host holds it whole to hash it whole); loading keeps the real rows, and a changed
    row, a missing shard or shards that do not cover the rows are refused."""
    import hashlib

    a = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)  # M = 7 real rows, one pad, 2 shards of 4
    a[7] = 0.0
    sha = lambda x: hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()  # noqa: E731
    spec = {"rows": 7, "shards": [{"rows": [0, 4], "sha256": sha(a[:4])}, {"rows": [4, 7], "sha256": sha(a[4:7])}]}
    np.testing.assert_array_equal(ckpt._check_bank_shards(a, spec), a[:7])
    b = a.copy()
    b[5, 1] += 1.0
    assert ckpt._check_bank_shards(b, spec) is None
    assert ckpt._check_bank_shards(a, {**spec, "shards": spec["shards"][:1]}) is None
    assert ckpt._check_bank_shards(a, {**spec, "rows": 8}) is None


def test_a_sharded_bank_saved_by_one_process_is_its_real_rows(tmp_path, cfg):
    from pn_jax import sharding

    state = make_state(m=5)
    sb = sharding.ShardedBank(jnp.concatenate([state.bank, jnp.zeros((3, D), state.bank.dtype)]), 5)
    ckpt.save(tmp_path / "ck", state._replace(bank=sb), cfg)
    np.testing.assert_array_equal(np.asarray(ckpt.load(tmp_path / "ck")[0].bank), np.asarray(state.bank))


@pytest.mark.parametrize("runs", [None, [(0, 9), (9, 23), (23, 40)]])
def test_a_bank_loaded_onto_a_mesh_is_read_chunk_by_chunk_and_checked(saved, monkeypatch, runs):
    """checkpoint.load(mesh=...) (a distributed test): the bank comes as shard_bank's
    ShardedBank, read in chunks of CHUNK_ROWS rows against one sha256 over the whole bank (a
    one-process checkpoint) or one per run of rows (a distributed fit's, rewritten here from the
    saved rows); the other arrays as without a mesh. A changed byte is refused by name."""
    import hashlib

    from pn_jax import sharding, shardload

    path, state = saved
    if runs is not None:  # the meta.json entry a distributed fit writes (checkpoint._shard_spec)
        meta = json.loads((path / "meta.json").read_text())
        entry = next(s for s in meta["arrays"] if s["path"] == ["state", "bank"])
        bank = np.asarray(state.bank)
        entry.update(rows=40, shards=[{"rows": [lo, hi], "sha256": hashlib.sha256(bank[lo:hi].tobytes()).hexdigest()}
                                      for lo, hi in runs])
        del entry["sha256"]
        (path / "meta.json").write_text(json.dumps(meta))
    monkeypatch.setattr(shardload, "CHUNK_ROWS", 7)
    mesh = sharding.make_bank_mesh()
    got, _, _ = ckpt.load(path, mesh=mesh)
    want = sharding.shard_bank(state.bank, mesh)
    assert isinstance(got.bank, sharding.ShardedBank) and got.bank.n_valid == 40
    assert got.bank.rows.sharding == want.rows.sharding
    np.testing.assert_array_equal(np.asarray(got.bank.rows), np.asarray(want.rows))
    assert_exact(got._replace(bank=None), state._replace(bank=None))
    assert shardload.held() == {"bank_rows": 40, "bank_rows_held": 40, "rows_read": 40, "chunk_rows": 7,
                                "runs_checked": 1 if runs is None else 3}
    store = shardload._open_bank(str(path / "arrays"))
    bad = np.asarray(store[25:26].read().result()).copy()
    bad[0, 3] += 1.0
    store[25:26].write(bad).result()  # one value of row 25, written as Orbax would read it back
    with pytest.raises(CheckpointError, match=r"corrupted: .*rows \[" + ("0, 40" if runs is None else "23, 40")):
        ckpt.load(path, mesh=mesh)
