"""Uncertainty ranking: the formula against numpy, deterministic for a seed, files written."""
import csv
import types

import numpy as np
import pytest

from pn_jax.research import suggest
from pn_jax.config import tiny_config

LO, HI = 0.01, 0.5


def _reference(scores, noise_maps, thr, weight, width):
    z = np.asarray(scores, float) / thr
    u_s = np.exp(-0.5 * ((z - 1) / width) ** 2)
    q = np.array([np.quantile(m, 0.95) for m in noise_maps])
    u_n = np.clip((q - LO) / (HI - LO), 0, 1)
    return weight * u_s + (1 - weight) * u_n


def test_formula_and_order_against_numpy():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.5, 2.0, 30)
    maps = [rng.uniform(LO, HI, (8, 8)) ** (1 + i % 3) for i in range(30)]
    q = [suggest.noise_quantile(m) for m in maps]
    unc = suggest.uncertainty(scores, q, 1.2, (LO, HI), weight=0.3, width=0.2)
    want = _reference(scores, maps, 1.2, 0.3, 0.2)
    np.testing.assert_allclose(unc.total, want, rtol=1e-12)
    order = suggest.rank(unc.total, seed=0)
    assert list(order) == list(np.argsort(-want))  # values are distinct
    # closest to the threshold wins on the score term alone
    only_score = suggest.uncertainty(scores, q, 1.2, (LO, HI), weight=1.0, width=0.2)
    assert suggest.rank(only_score.total, 0)[0] == np.argmin(np.abs(scores - 1.2))


def test_default_width_is_the_robust_spread():
    z = np.array([0.9, 1.0, 1.1, 1.2, 5.0])
    mad = np.median(np.abs(z - np.median(z)))
    assert suggest.default_width(z) == pytest.approx(1.4826 * mad)
    assert suggest.default_width(np.ones(4)) == 0.02  # floor


def test_ties_are_broken_by_the_seed_only():
    total = np.array([0.5, 0.9, 0.5, 0.5, 0.1, 0.5, 0.9])
    a, b = suggest.rank(total, 3), suggest.rank(total, 3)
    assert list(a) == list(b)
    orders = {tuple(suggest.rank(total, s)) for s in range(20)}
    assert len(orders) > 1  # ties do move with the seed
    for o in orders:
        assert list(np.asarray(total)[list(o)]) == sorted(total, reverse=True)  # never across values
    # within a tie: the order of the seed's permutation
    perm = np.random.default_rng(3).permutation(len(total))
    tied = [i for i in a if total[i] == 0.5]
    assert tied == sorted(tied, key=lambda i: perm[i])


def test_bad_inputs():
    with pytest.raises(ValueError, match="threshold"):
        suggest.uncertainty([1.0], [0.1], None, (LO, HI))
    with pytest.raises(ValueError, match="weight"):
        suggest.uncertainty([1.0], [0.1], 1.0, (LO, HI), weight=2)
    with pytest.raises(ValueError, match="noise quantiles"):
        suggest.uncertainty([1.0, 2.0], [0.1], 1.0, (LO, HI))


class _FakeModel:
    """The duck-typed part of pn_jax.Model that `suggest` uses."""

    def __init__(self, n, seed=0):
        cfg = tiny_config()
        self.cfg, self.threshold = cfg, 1.0
        rng = np.random.default_rng(seed)
        self.recs = []
        for i in range(n):
            amap = rng.uniform(0.3, 1.3, (20, 24)).astype(np.float32)
            self.recs.append({"name": f"img{i:02d}.png", "error": None, "score": float(amap.max()),
                              "image": rng.integers(0, 255, (20, 24, 3), dtype=np.uint8), "anomaly_map": amap,
                              "noise_map": rng.uniform(LO, HI, (20, 24)).astype(np.float32)})
        self.recs.append({"name": "broken.png", "error": "cannot read broken.png", "score": float("nan")})

    def predict_iter(self, inputs):
        return iter(self.recs)


def test_suggest_writes_a_deterministic_csv_and_a_contact_sheet(tmp_path):
    model = _FakeModel(9)
    a = suggest.suggest(model, "ignored", str(tmp_path / "a"), top=4, seed=1, log=lambda *_: None)
    b = suggest.suggest(model, "ignored", str(tmp_path / "b"), top=4, seed=1, log=lambda *_: None)
    assert (tmp_path / "a" / "suggestions.csv").read_bytes() == (tmp_path / "b" / "suggestions.csv").read_bytes()
    assert (tmp_path / "a" / "suggestions.png").stat().st_size > 0
    with open(tmp_path / "a" / "suggestions.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 10 and table[-1]["name"] == "broken.png" and table[-1]["predicted"].startswith("error")
    # the CSV order is the formula's, recomputed here
    ok = model.recs[:-1]
    q = [np.quantile(r["noise_map"], 0.95) for r in ok]
    want = suggest.uncertainty([r["score"] for r in ok], q, 1.0, (LO, HI), width=a["width"]).total
    assert [row["name"] for row in table[:-1]] == [ok[i]["name"] for i in np.argsort(-want, kind="stable")]
    assert a["order"] == b["order"]


def test_pixel_uncertainty_matches_the_image_formula():
    amap = np.array([[1.0, 2.0]])
    noise = np.array([[LO, HI]])
    u = suggest.pixel_uncertainty(amap, noise, 1.0, (LO, HI), weight=0.5, width=0.1)
    np.testing.assert_allclose(u, [[0.5, 0.5 * np.exp(-0.5 * 100) + 0.5]])


def test_model_without_noise_maps_is_refused(tmp_path):
    model = _FakeModel(2)
    for r in model.recs[:-1]:
        del r["noise_map"]
    with pytest.raises(ValueError, match="noise maps"):
        suggest.suggest(model, "x", str(tmp_path), log=lambda *_: None)
    model.threshold = None
    with pytest.raises(ValueError, match="threshold"):
        suggest.suggest(types.SimpleNamespace(cfg=model.cfg, threshold=None), "x", str(tmp_path))


def test_suggest_is_a_subcommand_of_the_one_parser(tmp_path, capsys):
    from pn_jax import cli

    assert "suggest" in cli.build_parser().format_help()              # listed with fit, test, ...
    with pytest.raises(SystemExit) as e:
        cli.main(["suggest", "--help"])
    assert e.value.code == 0 and "--top" in capsys.readouterr().out
    assert cli.main(["suggest", "--checkpoint", str(tmp_path / "missing"), str(tmp_path), "--top", "0"]) == 2
    assert "--top must be >= 1" in capsys.readouterr().err
    assert cli.main(["suggest", "--checkpoint", str(tmp_path / "missing"), str(tmp_path)]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err       # names the checkpoint
