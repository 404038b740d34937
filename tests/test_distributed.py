"""Two CPU processes on localhost (jax.distributed, gloo collectives) against one process:
the same coreset, the same test scores, the same metrics (SPEC 2.9, issue 25). The bank
and the coreset are sharded over both processes' devices; each process is a fresh Python
started and stopped here, bounded in time."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from experiments import run
from pn_jax import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "distributed_worker.py")
TINY = ["--dataset", "synthetic", "--category", "synthetic", "--image-size", "64", "--embed-dim", "64",
        "--coreset-ratio", "0.098", "--k", "3", "--influence", "fd", "--batch-size", "4", "--figures", "2", "--max-train", "12",
        "--max-test", "16"]
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(tmp, name: str, args: list[str]):
    """Run the worker as processes 0 and 1 of one jax.distributed run; (stdout, stderr) of each."""
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    procs = []
    for pid in (0, 1):
        cmd = [sys.executable, WORKER, str(tmp / f"{name}.npz"), *args, "--distributed",
               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                      cwd=ROOT))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT_S))
    finally:
        for p in procs:  # never leave a process behind (a peer waiting on a collective)
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, f"process exited {p.returncode}:\n{o[-3000:]}\n{e[-3000:]}"
    return outs


def _one_process(tmp, name: str, args: list[str]):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, WORKER, str(tmp / f"{name}.npz"), *args], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=TIMEOUT_S)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    data = ["--data-root", str(tmp / "data")]
    from pn_jax.data import pipeline

    pipeline.ensure_synthetic(str(tmp / "data"))  # written once, before two processes read it
    _one_process(tmp, "one_fit", TINY + data + ["--out", str(tmp / "one")])
    outs = _two_processes(tmp, "two_fit", TINY + data + ["--out", str(tmp / "two")])
    return tmp, data, outs


def _load(tmp, name):
    return dict(np.load(tmp / f"{name}.npz"))


def test_two_processes_give_the_one_process_coreset_scores_and_metrics(runs):
    tmp, _, _ = runs
    one, two = _load(tmp, "one_fit"), _load(tmp, "two_fit")
    assert one["bank"].shape[0] >= 3
    assert len(one["val_normal"]) == len(one["val_anomal"]) == 6
    for key in ("bank", "bank_owner", "dims", "scores", "labels", "val_normal", "val_anomal"):
        np.testing.assert_array_equal(two[key], one[key], err_msg=key)
    r1 = json.load(open(tmp / "one" / "results.json"))
    r2 = json.load(open(tmp / "two" / "results.json"))
    e1, e2 = r1["categories"]["synthetic"], r2["categories"]["synthetic"]
    assert e2["metrics"] == e1["metrics"]
    assert e2["threshold"] == e1["threshold"]
    assert e2["at_threshold"] == e1["at_threshold"]
    # The run really spanned two processes: the bank was sharded over both processes' devices.
    assert r2["runtime"]["processes"]["processes"] == 2 and r2["runtime"]["processes"]["devices"] == 2
    assert e2["config"]["devices"] == 2 and e1["config"]["devices"] == 1
    assert r1["runtime"]["processes"] == {"processes": 1}
    # The backbone's work was split: process 0 extracted 6 of the 12 training images (2 batches
    # of 4 instead of 3), 2 of the 4 test batches (each process every other batch) and 1 of the
    # 2 batches of synthetic anomalies of the 6 validation images (the validation images' own
    # features come from the training features), and made only that batch's 4 anomalies
    # (process 1: the other 2).
    assert e1["counts"]["backbone_batches"] - e2["counts"]["backbone_batches"] == (
        -(-12 // 4) - (-(-6 // 4))) + (4 - 2) + (2 - 1)
    assert [json.load(open(tmp / f"two_fit.npz.test{p}.json")) for p in (0, 1)] == [
        {"batches": 4, "batches_extracted": 2}] * 2
    assert [json.load(open(tmp / f"two_fit.npz.thr{p}.json")) for p in (0, 1)] == [
        {"batches": 2, "batches_extracted": 1, "images_made": 4},
        {"batches": 2, "batches_extracted": 1, "images_made": 2}]
    assert json.load(open(tmp / "one_fit.npz.thr0.json")) is None  # one process: batches.feature_batches


def test_each_process_keeps_only_its_own_training_features(runs):
    """No all-gather of the training features: each process held its 6 of the 12 training
    images, and what crossed between them is the bank's rows and the calibration and
    validation images (ceil(12 / 2) = 6 calibrate, the other 6 validate), nothing else."""
    tmp, _, _ = runs
    one = _load(tmp, "one_fit")
    held = [json.load(open(tmp / f"two_fit.npz.held{p}.json")) for p in (0, 1)]
    n_patch = json.load(open(tmp / "one" / "results.json"))["categories"]["synthetic"]["counts"]["train_patches"] // 12
    assert n_patch == 64  # an 8 x 8 grid at 64 px
    m = one["bank"].shape[0]
    for h in held:
        assert h["images"] == 12 and h["images_held"] == 6
        assert h["rows_fetched"] == m + (6 + 6) * n_patch
    # The bank was never whole on a host: each process kept the rows of its one device,
    # shard_bank's split of the M rows (ceil(M / 2) on process 0, the rest on process 1), and
    # beyond them only one all-gathered chunk at a time (2 processes x GATHER_ROWS rows).
    assert [h["bank_rows"] for h in held] == [m, m]
    assert [h["bank_rows_held"] for h in held] == [-(-m // 2), m - -(-m // 2)]
    assert all(h["bank_chunk_rows"] == 2 * distributed.GATHER_ROWS for h in held)
    assert json.load(open(tmp / "one_fit.npz.held0.json")) is None  # one process: a plain array


def test_only_process_zero_writes_and_the_other_prints_one_line(runs):
    tmp, _, outs = runs
    assert (tmp / "two" / "results.json").is_file()
    assert (tmp / "two" / "checkpoint" / "synthetic" / "meta.json").is_file()
    assert any((tmp / "two" / "figures" / "synthetic").iterdir())
    ours = [line for line in outs[1][0].splitlines() if not line.startswith("[Gloo]")]  # gloo's own C++ line
    assert len(ours) == 1 and ours[0].startswith("distributed: process 1 of 2 done"), outs[1][0]
    assert "mAUROC_sp_max" in outs[0][0]  # process 0 prints the table


def test_checkpoints_move_between_one_and_two_processes(runs):
    tmp, data, _ = runs
    one = _load(tmp, "one_fit")
    # A distributed fit's checkpoint scored by one process ...
    _one_process(tmp, "one_test", TINY[:-4] + ["--max-test", "16"] + data + [
        "--out", str(tmp / "one_test"), "--mode", "test", "--checkpoint", str(tmp / "two" / "checkpoint" / "synthetic")])
    # ... and a one-process checkpoint scored by two processes over a bank sharded across them.
    _two_processes(tmp, "two_test", TINY[:-4] + ["--max-test", "16"] + data + [
        "--out", str(tmp / "two_test"), "--mode", "test", "--checkpoint", str(tmp / "one" / "checkpoint" / "synthetic")])
    # ... and the distributed fit's checkpoint scored by two processes.
    _two_processes(tmp, "two_test2", TINY[:-4] + ["--max-test", "16"] + data + [
        "--out", str(tmp / "two_test2"), "--mode", "test", "--checkpoint", str(tmp / "two" / "checkpoint" / "synthetic")])
    for name in ("one_test", "two_test", "two_test2"):
        got = _load(tmp, name)
        np.testing.assert_array_equal(got["bank"], one["bank"], err_msg=name)
        np.testing.assert_array_equal(got["scores"], one["scores"], err_msg=name)
    for name in ("two_test", "two_test2"):
        r = json.load(open(tmp / name / "results.json"))
        assert r["runtime"]["processes"]["processes"] == 2
        # each process ran the backbone on 2 of the 4 test batches (one process: all 4)
        assert r["categories"]["synthetic"]["counts"]["backbone_batches"] == 2
        assert [json.load(open(tmp / f"{name}.npz.test{p}.json")) for p in (0, 1)] == [
            {"batches": 4, "batches_extracted": 2}] * 2, name
        assert r["categories"]["synthetic"]["metrics"] == json.load(open(tmp / "one" / "results.json"))[
            "categories"]["synthetic"]["metrics"]
    # Neither distributed test read the bank whole into a process: each kept shard_bank's split
    # of the M rows (ceil(M / 2) on process 0, the rest on process 1). The one-process
    # checkpoint's single sha256 was checked by reading every row in order, 16 rows at a time
    # (the worker's chunk), never more at once; the distributed one's runs were each read by the
    # process whose rows they are, and only those.
    m = one["bank"].shape[0]
    assert m > 2 * 16
    split = [-(-m // 2), m - -(-m // 2)]
    for name, rows_read, n_runs in (("two_test", [m, m], [1, 1]), ("two_test2", split, [1, 1])):
        held = [json.load(open(tmp / f"{name}.npz.bank{p}.json")) for p in (0, 1)]
        assert [h["bank_rows"] for h in held] == [m, m], name
        assert [h["bank_rows_held"] for h in held] == split, name
        assert [h["rows_read"] for h in held] == rows_read, name
        assert [h["runs_checked"] for h in held] == n_runs, name
        assert all(h["chunk_rows"] <= 16 and h["bank_rows_held"] + h["chunk_rows"] < m for h in held), name
    assert json.load(open(tmp / "one_test.npz.bank0.json")) is None  # one process: read whole, as before
    assert json.load(open(tmp / "one_test" / "results.json"))["categories"]["synthetic"]["counts"][
        "backbone_batches"] == 4


@pytest.mark.parametrize("argv, flag", [
    (["--coordinator", "127.0.0.1:1234"], "--coordinator"),
    (["--process-id", "0"], "--process-id"),
    (["--distributed", "--coordinator", "nohost"], "--coordinator"),
    (["--distributed", "--coordinator", "h:99999"], "--coordinator"),
    (["--distributed", "--coordinator", "h:1234", "--num-processes", "2", "--process-id", "2"], "--process-id"),
])
def test_bad_distributed_flags_are_refused_by_name(argv, flag, tmp_path, capsys):
    assert run.main(TINY + ["--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err
    assert not distributed.active()


def test_a_distributed_run_spans_every_device_of_every_process():
    assert distributed.check_devices(None, 4) == "all" and distributed.check_devices("4", 4) == "all"
    assert distributed.check_devices("all", 4) == "all"
    with pytest.raises(ValueError, match="--devices 2"):
        distributed.check_devices("2", 4)  # would leave a process without a device


@pytest.mark.parametrize("argv", [["--num-processes", "0"], ["--process-id", "-1"]])
def test_bad_distributed_numbers_are_refused_by_argparse(argv, capsys):
    with pytest.raises(SystemExit):
        run.main(TINY + ["--distributed", *argv])
    assert argv[0] in capsys.readouterr().err


def test_distributed_without_a_cluster_names_the_missing_flags(tmp_path, capsys, monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "JAX_NUM_PROCESSES"):
        monkeypatch.delenv(var, raising=False)
    called = {}

    def fake_initialize(**kw):  # what jax.distributed.initialize raises where no cluster is detected
        called.update(kw)
        raise ValueError("coordinator_address should be defined.")

    import jax

    monkeypatch.setattr(jax.distributed, "initialize", fake_initialize)
    assert run.main(TINY + ["--out", str(tmp_path), "--distributed"]) == 2
    err = capsys.readouterr().err
    assert "--coordinator" in err and "--num-processes" in err and "--process-id" in err
    assert called == {"coordinator_address": None, "num_processes": None, "process_id": None}


def test_split_extraction_reassembles_every_image_in_order(monkeypatch):
    """distributed.extract with 3 processes, 7 images (blocks of 3, 2, 2) and gathers of 2
    images per process, simulated in one process: each process's block is what it would have
    extracted; the result is every image's features in source order."""
    from jax.experimental import multihost_utils

    n_img, n_proc = 7, 3
    feats_of = lambda i: np.full((4, 5), float(i), np.float32) + np.arange(20, dtype=np.float32).reshape(4, 5)  # noqa: E731
    blocks = [(0, 3), (3, 5), (5, 7)]

    class FakeModel:
        def extract(self, source, desc=""):
            return np.stack([feats_of(int(source[i])) for i in range(len(source))])

    source = [str(i) for i in range(n_img)]  # a record is its own index
    calls = []
    for pid in range(n_proc):
        state = {"num_processes": n_proc, "process_id": pid}
        monkeypatch.setattr(distributed, "_STATE", state)
        monkeypatch.setattr(distributed, "GATHER_IMAGES", 2)

        def allgather(part, pid=pid):
            c = 2 * sum(1 for p_, _ in calls if p_ == pid)  # the c-th gather of this process
            calls.append((pid, c))
            out = np.zeros((n_proc,) + part.shape, np.float32)
            for p, (lo, hi) in enumerate(blocks):
                rows = [feats_of(i) for i in range(lo + c, min(hi, lo + c + 2))]
                if rows:
                    out[p, :len(rows)] = np.stack(rows)
            np.testing.assert_array_equal(out[pid], part)  # what this process contributed
            return out

        monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
        got = distributed.extract(FakeModel(), source)
        np.testing.assert_array_equal(got, np.stack([feats_of(i) for i in range(n_img)]))
    assert len(calls) == n_proc * 2  # ceil(3 / 2) gathers in every process, the short blocks too


@pytest.mark.parametrize("cfg_changes, kw, flag", [
    ({"noising": {"influence": "predictor"}}, {}, "--influence predictor"),
    ({}, {"tune": True}, "--tune"),
])
def test_what_reads_the_bank_whole_is_refused_with_several_processes(cfg_changes, kw, flag, monkeypatch):
    """A distributed fit's bank is sharded over the processes; what reads it whole on one
    device is refused by name before any image goes through the backbone."""
    import jax

    from pn_jax import fitting, model as model_lib
    from pn_jax.config import tiny_config

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(distributed, "extract_local", lambda *a, **k: pytest.fail("extracted before refusing"))
    images = np.zeros((4, 32, 32, 3), np.uint8)
    with pytest.raises(model_lib.ModelError, match=flag):
        fitting.fit(tiny_config().replace(**cfg_changes), images, **kw)


def _feats_of(i):
    """Features [2, 3] of simulated image i (distinct per image)."""
    return np.full((2, 3), float(i), np.float32) + np.arange(6, dtype=np.float32).reshape(2, 3)


def _group_gather(batches, n_proc: int, pid: int, gathers: list):
    """A simulated `process_allgather` of split feature batches: gather g carries batch
    g * n_proc + p of every process p (zeros past the last batch), and checks that this
    process (pid) contributed its own batch; each call is appended to `gathers`."""
    def allgather(part):
        g = len(gathers)
        gathers.append(part)
        out = np.zeros((n_proc,) + part.shape, np.float32)
        for p in range(n_proc):
            if g * n_proc + p < len(batches):
                b = batches[g * n_proc + p]
                out[p, :len(b)] = np.stack([_feats_of(int(i)) for i in b])
        np.testing.assert_array_equal(out[pid], part)  # what this process contributed
        return out
    return allgather


@pytest.mark.parametrize("n_img", [10, 2])  # 3 batches of 4, 4, 2 over 2 + 1 groups; 1 batch, fewer than processes
def test_split_test_batches_come_back_in_order_at_their_own_shape(monkeypatch, n_img):
    """distributed.feature_batches with 3 processes and batches of 4 images, simulated in one
    process: process p extracts the p-th batch of each group of 3 (the whole batch at once, a
    short last batch at its own length), the gathers carry each process's batch, and every
    process gets every batch's features in source order; a process without a batch of its own
    in the first group extracts the first one only to learn the shape."""
    from types import SimpleNamespace

    from jax.experimental import multihost_utils

    n_proc, bs = 3, 4
    feats_of = _feats_of
    batches = [np.arange(s, min(s + bs, n_img)) for s in range(0, n_img, bs)]

    class FakeModel:
        cfg = SimpleNamespace(batch_size=bs)

        def batches(self, source):
            return ({"image": b} for b in batches)

        def features(self, images):
            calls.append(tuple(images))
            return np.stack([feats_of(int(i)) for i in images])

    for pid in range(n_proc):
        calls = []
        monkeypatch.setattr(distributed, "_STATE", {"num_processes": n_proc, "process_id": pid})
        gathers = []

        allgather = _group_gather(batches, n_proc, pid, gathers)

        monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
        got = list(distributed.feature_batches(FakeModel(), None))
        assert [tuple(b["image"]) for b, _ in got] == [tuple(b) for b in batches]
        np.testing.assert_array_equal(np.concatenate([f for _, f in got]), np.stack([feats_of(i) for i in range(n_img)]))
        own = [tuple(b) for b in batches[pid::n_proc]]
        assert calls == (own if own else [tuple(batches[0])])
        assert len(gathers) == -(-len(batches) // n_proc)
        assert distributed.held_test_batches() == {"batches": len(batches), "batches_extracted": len(calls)}


@pytest.mark.parametrize("n_img", [10, 2, 0])  # batches of 4, 4, 2 over 2 groups; 1 batch, fewer than processes; none
def test_threshold_batches_are_made_and_extracted_only_by_their_process(monkeypatch, n_img):
    """distributed.own_feature_batches with 3 processes and batches of 4 images, simulated in one
    process: process p reads and makes only the images of the p-th batch of each group of 3 (a
    source of just those), runs the backbone on each at the one-process batch's own shape, and
    every process gets every batch's features in source order; a process without a batch
    extracts nothing (the gathers' shape comes from the first process's)."""
    from types import SimpleNamespace

    from jax.experimental import multihost_utils

    n_proc, bs = 3, 4
    feats_of = _feats_of
    batches = [list(range(s, min(s + bs, n_img))) for s in range(0, n_img, bs)]

    class FakeModel:
        cfg = SimpleNamespace(batch_size=bs)

        def batches(self, source):  # consecutive batches of the records, as pipeline.make_batches
            recs = [source[j] for j in range(len(source))]
            return ({"image": np.array(recs[s:s + bs])} for s in range(0, len(recs), bs))

        def features(self, images):
            calls.append(tuple(int(i) for i in images))
            return np.stack([feats_of(int(i)) for i in images])

    class Src:
        names = [f"img{i}" for i in range(n_img)]

        def __len__(self):
            return n_img

        def __getitem__(self, i):
            read.append(int(i))
            return int(i)

    for pid in range(n_proc):
        calls, read, gathers = [], [], []
        monkeypatch.setattr(distributed, "_STATE", {"num_processes": n_proc, "process_id": pid})

        group_gather = _group_gather(batches, n_proc, pid, gathers)

        def allgather(part):
            if part.dtype == np.int64:  # the shape of the first process's features
                return np.stack([np.asarray((2, 3)) if p == 0 else part for p in range(n_proc)])
            return group_gather(part)

        monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
        got = list(distributed.own_feature_batches(FakeModel(), Src()))
        assert [len(f) for f in got] == [len(b) for b in batches]
        if n_img:
            np.testing.assert_array_equal(np.concatenate(got), np.stack([feats_of(i) for i in range(n_img)]))
        own = [tuple(b) for b in batches[pid::n_proc]]
        assert calls == own
        assert sorted(read) == sorted(i for b in own for i in b)
        assert len(gathers) == -(-len(batches) // n_proc)
        assert distributed.held_threshold_batches() == {"batches": len(batches), "batches_extracted": len(own),
                                                         "images_made": len(read)}
