"""`python tests/distributed_worker.py DUMP.npz <experiments.run flags>`: runs
`experiments.run` and, in the process that writes results (process 0, or the only one),
dumps what tests/test_distributed.py compares: the memory bank (the coreset's rows, in
selection order), which training image each entry came from, every test image score and the
threshold's validation scores (normal images, synthetic anomalies; empty without a fit);
every process writes DUMP.held<process id>.json: what it held of the training features
(`distributed.held`), and DUMP.bank<process id>.json: what it read and kept of a checkpoint's
bank (`shardload.held`; read in chunks of 16 rows here, so that a chunk is not the whole bank),
and DUMP.test<process id>.json: the test batches it went through and extracted
(`distributed.held_test_batches`), and DUMP.thr<process id>.json: the threshold stage's
synthetic-anomaly batches it went through, extracted and made (`distributed.held_threshold_batches`)."""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pn_jax import cli, distributed, runner, sharding, shardload  # noqa: E402

DUMP = sys.argv[1]
_real = runner.run_category


def _spy(*args, **kwargs):
    entry = _real(*args, **kwargs)
    with open(f"{DUMP}.held{distributed.info().get('process_id', 0)}.json", "w") as f:  # every process
        json.dump(distributed.held(), f)
    with open(f"{DUMP}.bank{distributed.info().get('process_id', 0)}.json", "w") as f:
        json.dump(shardload.held(), f)
    with open(f"{DUMP}.test{distributed.info().get('process_id', 0)}.json", "w") as f:
        json.dump(distributed.held_test_batches(), f)
    with open(f"{DUMP}.thr{distributed.info().get('process_id', 0)}.json", "w") as f:
        json.dump(distributed.held_threshold_batches(), f)
    model = entry["_models"][next(iter(entry["_models"]))]
    bank = model.state.bank
    if isinstance(bank, sharding.ShardedBank):  # for the comparison only, after the run: every process's rows
        from jax.experimental import multihost_utils

        bank = multihost_utils.process_allgather(bank.rows, tiled=True)[:bank.n_valid]
    if distributed.is_primary():
        res = entry["_test"]
        np.savez(DUMP, bank=np.asarray(bank), dims=np.asarray(model.state.dims),
                 bank_owner=np.asarray(model.bank_owner) if getattr(model, "bank_owner", None) is not None
                 else np.zeros(0), scores=np.asarray(res["scores"][next(iter(res["scores"]))]),
                 labels=np.asarray(res["labels"]),
                 # the threshold's validation scores (configured variant): normal images, synthetic anomalies
                 val_normal=np.asarray(next(iter((model.validation or {None: ((), ())}).values()))[0]),
                 val_anomal=np.asarray(next(iter((model.validation or {None: ((), ())}).values()))[1]))
    return entry


runner.run_category = _spy
shardload.CHUNK_ROWS = 16
sys.exit(cli.run_main(sys.argv[2:]))
