"""Fit and test Propose Noising / PatchCore on one or more categories (an alias of `pn-jax fit`
with `--mode train|test`; every flag is documented in `pn_jax/cli.py` and `--help`).

    python -m experiments.run --category bottle                       # MVTec AD (data/mvtec_ad)
    python -m experiments.run --dataset elpv --category mono          # offline demo (ELPV)
    python -m experiments.run --dataset synthetic --category synthetic --image-size 128
    python -m experiments.run --mode test --checkpoint results/run/checkpoint/bottle

Prints `Name | mAUROC_sp_max | mAUROC_px | mAUPRO_px | ...`, writes <out>/results.json and
PNG figures under <out>/figures/<category>/.
"""
from __future__ import annotations

import sys

from pn_jax.cli import MVTEC_CATEGORIES, run_main as main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
