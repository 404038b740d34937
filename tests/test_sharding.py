"""Sharded bank k-NN and sharded greedy coreset equal the single-device results (SPEC 2.9).

The 8-device checks run once, in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag must be set before JAX starts);
the 1-device checks run in this process.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pn_jax import coreset, knn, sharding
from tests import reference

ROOT = Path(__file__).resolve().parents[1]

# (name, M, D, k, block, query offset): M never divisible by 8. "near_pads" puts the queries
# at the origin, where the zero pad rows would be the nearest if they were not masked.
# "near_ties": a shell of rows at radii 1 + 1e-4 j around queries far from the origin, spread
# over every shard (the expanded form cannot order them: the exact search must); "ties": rows
# duplicated across shards (exact ties: the lower global index first, as on one device).
KNN_CASES = [
    ("m1003_k9_b64", 1003, 24, 9, 64, 30.0),
    ("m9_k9_b4", 9, 8, 9, 4, 30.0),          # 7 pad rows spread over 4 shards, k == M
    ("m37_k5_b4096", 37, 16, 5, 4096, 30.0),  # block larger than a shard
    ("m101_k9_b5_near_pads", 101, 24, 9, 5, 0.0),
    ("m203_k9_b64_near_ties", 203, 16, 9, 64, "near_ties"),
    ("m157_k9_b64_ties", 157, 16, 9, 64, "ties"),
]
# (name, N, P, n_select, duplicated, candidates per batch): "dup" repeats 50 points, so the
# argmax has exact ties between copies that live on different shards. Few candidates force
# many candidate batches (each a global top-k merge).
GREEDY_CASES = [
    ("n1001_p128", 1001, 128, 60, False, 64),
    ("n1001_p16_dup", 1001, 16, 45, True, 64),
    ("n13_p4", 13, 4, 12, False, 64),            # fewer rows than 2 per device
    ("n2003_p32_c5", 2003, 32, 150, False, 5),   # ~100 candidate batches
]
N_UNIQUE = 50
# Leave-one-image-out search on a sharded bank: (name, M, D, k, block, query offset) as
# KNN_CASES; each bank row belongs to one of N_OWNERS training images, spread over the shards.
LOO_CASES = [
    ("m1003_k9_b64", 1003, 24, 9, 64, 30.0),
    ("m157_k9_b64_ties", 157, 16, 9, 64, "ties"),   # duplicated rows: exact ties across shards
    ("m203_k9_b64_near_ties", 203, 16, 9, 64, "near_ties"),
]
N_OWNERS = 7


def _knn_data(m, d, offset, seed=0):
    rng = np.random.default_rng(seed)
    if offset == "near_ties":
        q = np.full((4, d), 1000.0, np.float32) + np.arange(4, dtype=np.float32)[:, None] * 1e-3
        dirs = rng.normal(size=(m, d))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        bank = (q[0] + dirs * (1.0 + 1e-4 * rng.permutation(m))[:, None]).astype(np.float32)
        return q, bank
    bank = (rng.normal(size=(m, d)) * 5 + 30).astype(np.float32)
    if offset == "ties":
        bank[m // 2:] = bank[: m - m // 2]       # each row of the first half again, in another shard
        return bank[::7] + np.float32(0.5), bank
    q = (rng.normal(size=(48, d)) * 5 + offset).astype(np.float32)
    return q, bank


def _greedy_data(n, p, dup, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p)).astype(np.float32)
    if dup:
        x = x[np.arange(n) % N_UNIQUE]
    starts = rng.choice(n, size=min(3, n), replace=False)
    return x, starts


def _run_checks(mesh):
    """All comparisons on `mesh`; returns a JSON-able dict of results."""
    out = {"n_devices": mesh.size, "knn": {}, "greedy": {}}
    for name, m, d, k, block, off in KNN_CASES:
        q, bank = _knn_data(m, d, off)
        d0, i0 = knn.knn(jnp.asarray(q), jnp.asarray(bank), k=k, block=block)
        d1, i1 = sharding.knn_sharded(q, sharding.shard_bank(bank, mesh), k, mesh, block)
        i0, i1 = np.asarray(i0), np.asarray(i1)
        out["knn"][name] = {
            "idx_equal": bool(np.array_equal(i0, i1)),
            "dist_equal": bool(np.array_equal(np.asarray(d0), np.asarray(d1))),   # bit for bit
            "idx_equal_float64": bool(np.array_equal(i1, reference.knn_bruteforce(q, bank, k)[1])),
            "max_idx": int(i1.max()), "m": m,
            "ascending": bool(np.all(np.diff(np.asarray(d1), axis=-1) >= 0)),
        }
    for name, n, p, n_sel, dup, n_cand in GREEDY_CASES:
        x, starts = _greedy_data(n, p, dup)
        a = np.asarray(coreset.greedy_select(jnp.asarray(x), jnp.asarray(starts), n_sel, n_cand=n_cand))
        b = np.asarray(sharding.greedy_select_sharded(x, starts, n_sel, mesh, n_cand=n_cand))
        out["greedy"][name] = {"a": a.tolist(), "b": b.tolist(), "dup": dup}
    f = np.random.default_rng(2).normal(size=(1203, 200)).astype(np.float32)
    key = jax.random.key(7)
    a = np.asarray(coreset.coreset_indices(key, f, 0.05, proj_dim=64, n_starts=10))
    b = np.asarray(sharding.coreset_indices_sharded(key, f, 0.05, proj_dim=64, n_starts=10, mesh=mesh))
    out["coreset_indices_equal"] = bool(np.array_equal(a, b)) and len(a) == 60
    out["loo"] = {}
    for name, m, d, k, block, off in LOO_CASES:
        q, bank = _knn_data(m, d, off)
        rng = np.random.default_rng(5)
        owner = rng.integers(0, N_OWNERS, m).astype(np.int32)
        img_owner = np.asarray([0, 3, 6, -1, 3], np.int32)  # -1: no image of the bank
        n_img = len(img_owner)
        feats = np.resize(q, (n_img, 6, d))  # 6 patches an image (the queries, repeated where fewer)
        ds, i_s = sharding.knn_sharded_excluding(feats, img_owner, sharding.shard_bank(bank, mesh),
                                                 sharding.shard_owners(owner, mesh), k, mesh, block)
        ds, i_s = np.asarray(ds), np.asarray(i_s)
        same, same_d, ref_ok, own_out = True, True, True, True
        for c, o in enumerate(img_owner):
            d1, i1 = knn.knn_excluding(jnp.asarray(feats[c]), jnp.asarray(bank), jnp.asarray(owner == o), k=k, block=block)
            same &= bool(np.array_equal(np.asarray(i1), i_s[c]))
            same_d &= bool(np.array_equal(np.asarray(d1), ds[c]))
            keep = np.flatnonzero(owner != o)  # float64 brute force on the bank without image o's rows
            ref_ok &= bool(np.array_equal(keep[reference.knn_bruteforce(feats[c], bank[keep], k)[1]], i_s[c]))
            own_out &= bool(not np.any(owner[i_s[c]] == o))
        out["loo"][name] = {"idx_equal": same, "dist_equal": same_d, "idx_equal_float64": ref_ok,
                            "own_rows_excluded": own_out}
    # Features no process holds whole (a distributed fit): simulated processes each holding a
    # block of rows over some of the devices, projected block by block, the same indices.
    out["by_process"] = {}
    for name, process_of, rows in _PROCESS_CASES[mesh.size]:
        layout = sharding.process_layout(mesh, rows, 128, process_of)
        pos = layout.to_global(np.arange(len(f)))
        c = np.asarray(sharding.coreset_indices_by_process(key, lambda lo, hi: f[lo:hi], rows, 200, 0.05, proj_dim=64,
                                                           n_starts=10, mesh=mesh, process_of=process_of))
        out["by_process"][name] = {
            "equal": bool(np.array_equal(a, c)),
            "layout_roundtrip": bool(np.array_equal(layout.to_flat(pos), np.arange(len(f)))),
            "positions_increase": bool(np.all(np.diff(pos) > 0)),
            "counts": [int(x) for x in layout.counts]}
    return out


# (name, the process of each mesh device, rows per process) of 1203 rows, per device count
_PROCESS_CASES = {
    8: [("uneven", [0, 0, 0, 1, 1, 2, 2, 2], [500, 3, 700]),  # process 1: 2 rows and 1 row on its devices
        ("empty_process", [0, 0, 0, 1, 1, 2, 2, 2], [600, 0, 603]),
        ("two_hosts", [0, 0, 0, 0, 1, 1, 1, 1], [601, 602])],
    1: [("one", [0], [1203])],
}


_SUBPROCESS = """
import json, jax
from pn_jax import sharding
from tests import test_sharding as t
assert len(jax.devices()) == 8, jax.devices()
print("RESULT" + json.dumps(t._run_checks(sharding.make_bank_mesh())))
"""


@pytest.fixture(scope="module")
def eight_devices():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", _SUBPROCESS], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


@pytest.fixture(scope="module")
def one_device():
    return _run_checks(sharding.make_bank_mesh(jax.devices()[:1]))


@pytest.fixture(params=["eight_devices", "one_device"])
def results(request):
    return request.getfixturevalue(request.param)


def test_device_count(eight_devices, one_device):
    assert eight_devices["n_devices"] == 8
    assert one_device["n_devices"] == 1


@pytest.mark.parametrize("case", [c[0] for c in KNN_CASES])
def test_knn_sharded_equals_knn(results, case):
    r = results["knn"][case]
    assert r["idx_equal"]
    assert r["dist_equal"]
    assert r["idx_equal_float64"]
    assert r["ascending"]
    assert r["max_idx"] < r["m"]  # global indices into the unpadded bank, never a pad


@pytest.mark.parametrize("case", [c[0] for c in GREEDY_CASES])
def test_greedy_select_sharded_equals_greedy_select(results, case):
    r = results["greedy"][case]
    if r["dup"]:
        # Exact ties between identical points are broken by last-ulp rounding, which XLA does
        # not keep identical across array shapes (row reductions are shape-dependent), not
        # even between copies within the single-device run. The points chosen must still be
        # the same, i.e. the same copy class at every step.
        assert [i % N_UNIQUE for i in r["a"]] == [i % N_UNIQUE for i in r["b"]]
    else:
        assert r["a"] == r["b"]


def test_coreset_indices_sharded_equals_coreset_indices(results):
    assert results["coreset_indices_equal"]


@pytest.mark.parametrize("case", [c[0] for c in LOO_CASES])
def test_leave_one_image_out_knn_on_a_sharded_bank(results, case):
    r = results["loo"][case]
    assert r["idx_equal"] and r["dist_equal"]  # detector.knn_excluding's, bit for bit
    assert r["idx_equal_float64"]
    assert r["own_rows_excluded"]


def test_coreset_of_rows_held_by_processes_equals_coreset_indices(results):
    assert results["by_process"]
    for name, r in results["by_process"].items():
        assert r["equal"], name
        assert r["layout_roundtrip"] and r["positions_increase"], name
        assert sum(r["counts"]) == 1203, name
    if "uneven" in results["by_process"]:
        assert results["by_process"]["uneven"]["counts"] == [167, 167, 166, 2, 1, 234, 233, 233]


def test_projection_of_a_row_does_not_depend_on_the_rows_beside_it():
    """The coreset's host projection of a block of rows (a distributed fit's process, a streamed
    chunk) equals the same rows' projection in one call over all rows, bit for bit, for blocks
    of 1 row up (OpenBLAS's small-matrix kernel rounds differently without the padding)."""
    from pn_jax import projection

    rng = np.random.default_rng(3)
    for d in (64, 1024):
        x = rng.normal(size=(700, d)).astype(np.float32)
        p = (rng.normal(size=(d, 128)) / np.sqrt(128)).astype(np.float32)
        whole = projection.project_host(x, p)
        np.testing.assert_allclose(whole, x.astype(np.float64) @ p.astype(np.float64), rtol=1e-4, atol=1e-4)
        for lo, hi in ((0, 1), (5, 8), (13, 20), (100, 355), (355, 700)):
            np.testing.assert_array_equal(projection.project_host(x[lo:hi], p), whole[lo:hi], err_msg=f"{d} {lo}:{hi}")


def test_process_layout_refuses_a_mesh_out_of_process_order():
    from types import SimpleNamespace

    two = SimpleNamespace(devices=np.asarray([None, None], dtype=object))  # process_layout reads the device list only
    with pytest.raises(ValueError, match="process order"):
        sharding.process_layout(two, [3, 4], process_of=[1, 0])
    with pytest.raises(ValueError, match="holds 4 rows but none"):
        sharding.process_layout(two, [3, 4], process_of=[0, 0])


def test_shard_bank_pads_and_places():
    mesh = sharding.make_bank_mesh(jax.devices()[:1])
    sb = sharding.shard_bank(np.ones((5, 3), np.float32), mesh)
    assert sb.n_valid == 5 and sb.rows.shape == (5, 3)
    with pytest.raises(ValueError, match="memory bank has only 5"):
        sharding.knn_sharded(np.zeros((2, 3), np.float32), sb, k=9, mesh=mesh)


def test_place_bank_is_shard_bank_of_the_whole_bank():
    """A bank placed piece by piece (a distributed fit: no process holds it whole) is the array
    `shard_bank` makes of the whole bank, and `shard_bank` passes it through unpadded again."""
    mesh = sharding.make_bank_mesh(jax.devices()[:1])
    bank = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    asked = []

    def rows_of(lo, hi):
        asked.append((lo, hi))
        return bank[lo:hi]

    sb = sharding.place_bank(7, 3, mesh, rows_of)
    ref = sharding.shard_bank(bank, mesh)
    assert sb.n_valid == ref.n_valid == 7 and asked == [(0, 7)]
    np.testing.assert_array_equal(np.asarray(sb.rows), np.asarray(ref.rows))
    assert sharding.shard_bank(sb, mesh) is sb and sharding.n_rows(sb) == 7 == sharding.n_rows(bank)
    np.testing.assert_array_equal(sharding.padded_owners([4, 2], 4), [4, 2, -1, -1])
