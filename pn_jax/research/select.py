"""`--score auto`: the score variant chosen per category on that category's own validation
data, never on test data (issue 14.4).

The criterion, fixed before any measurement:

* For each candidate variant, the image AUROC of its validation scores: the leave-one-image-out
  scores of normal training images (label 0) against those of the seeded synthetic anomalies
  made from them (label 1), i.e. `Model.validation[variant]`. Ties in scores count one half
  (the Mann-Whitney AUROC, `metrics.auroc`).
* The choice is the FIRST candidate, in the fixed order of `candidates`, whose AUROC is within
  `tol` of the best candidate's. The order starts with the shipped default, so another
  variant replaces it only when it beats it by more than `tol`: with a few dozen validation
  images an AUROC difference of a point is noise, and near-ties must not flip the choice.
* A candidate whose scores are not all finite, or that has no validation scores, is refused
  by name (never silently skipped): its AUROC would be a wrong number.

`choose` reads only the validation dict, so the test split cannot change its choice; the
test in tests/test_select.py fits on the same training images with two different test splits
and checks that the validation scores and the choice are identical.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from pn_jax import metrics

# The shipped default first (it wins near-ties), then the note's mix raw and z-normalised,
# PatchCore's nearest distance and the mean of the K distances.
CANDIDATES = ("calibrated_rerank", "seed", "seed_z", "patchcore", "distance")
TOL = 0.01  # AUROC as a fraction: one point


class SelectError(ValueError):
    """The validation data cannot support a choice; the message says what to do."""


def validation_auroc(normal, anomalous) -> float:
    """Image AUROC (fraction) of validation normal vs synthetic-anomaly scores."""
    normal, anomalous = np.asarray(normal, np.float64).ravel(), np.asarray(anomalous, np.float64).ravel()
    scores = np.concatenate([normal, anomalous])
    labels = np.concatenate([np.zeros(normal.size, bool), np.ones(anomalous.size, bool)])
    return float(metrics.auroc(scores, labels))


def choose(validation: Mapping[str, tuple], candidates: Sequence[str] = CANDIDATES, *,
           tol: float = TOL) -> tuple[str, dict]:
    """validation {variant: (normal scores, anomaly scores)} -> (chosen variant, table).

    table: {"rule", "tol", "chosen", "best", "variants": {variant: {"auroc", "n_normal",
    "n_anomalous"}}} with AUROCs as fractions, candidates in their given order."""
    candidates = tuple(candidates)
    if not candidates:
        raise SelectError("auto score: no candidate variants given")
    if len(set(candidates)) != len(candidates):
        raise SelectError(f"auto score: candidate variants repeat: {list(candidates)}")
    if not 0 <= tol < 1:
        raise SelectError(f"auto score: tol is an AUROC difference in [0, 1), got {tol}")
    missing = [c for c in candidates if c not in validation]
    if missing:
        raise SelectError(f"auto score: no validation scores for {missing} (have {sorted(validation)}); "
                          f"fit with validation_variants={list(candidates)}")
    rows = {}
    for c in candidates:
        normal, anomalous = (np.asarray(x, np.float64).ravel() for x in validation[c])
        if normal.size == 0 or anomalous.size == 0:
            raise SelectError(f"auto score: variant {c!r} has {normal.size} normal and {anomalous.size} "
                              "synthetic-anomaly validation scores; both are needed (at least 2 training images)")
        if not (np.isfinite(normal).all() and np.isfinite(anomalous).all()):
            raise SelectError(f"auto score: variant {c!r} has non-finite validation scores; its AUROC "
                              "would be meaningless. Check the fit's calibration (noise scale, statistics)")
        rows[c] = {"auroc": validation_auroc(normal, anomalous), "n_normal": int(normal.size),
                   "n_anomalous": int(anomalous.size)}
    best = max(r["auroc"] for r in rows.values())
    chosen = next(c for c in candidates if rows[c]["auroc"] >= best - tol)
    table = {"rule": f"first of {list(candidates)} whose validation image AUROC is within {tol} of the best",
             "tol": tol, "chosen": chosen, "best": best, "variants": rows}
    return chosen, table


def config_for(cfg, variant: str):
    """The config whose configured score is `variant` (what a model fitted with `--score auto`
    stores once the choice is made), everything else unchanged, so a saved model scores with
    the chosen variant without knowing about `auto`."""
    if variant == "patchcore":  # the nearest distance: PatchCore's score on the same bank
        return cfg.replace(noising={"method": "patchcore"})
    if variant in ("seed", "seed_z"):
        return cfg.replace(noising={"method": "propose_noising", "score": "seed", "znorm_signals": variant == "seed_z"})
    if variant == "distance":  # the mean of the K distances: the note's mix with weight on distance only
        return cfg.replace(noising={"method": "propose_noising", "score": "seed", "znorm_signals": False,
                                    "score_weights": (0.0, 1.0, 0.0)})
    from pn_jax.config import SCORES

    if variant in SCORES:
        return cfg.replace(noising={"method": "propose_noising", "score": variant})
    raise SelectError(f"auto score: variant {variant!r} has no configuration; choose among "
                      f"{sorted(set(SCORES) | {'patchcore', 'seed_z', 'distance'})}")
