"""A bank per tile position (`--tile-bank per-position`, pn_jax/tilebank.py): each tile is
searched against its own position's rows (float64 brute force), an aligned pattern that is
normal at one position and a defect at another is caught per position and missed by the
shared bank, a streamed fit is the in-memory one, save/load keeps it, and what it cannot do
is refused by name."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import pn_jax
from pn_jax import cli, tilebank
from pn_jax.config import tiny_config
from pn_jax.export import ExportError

QUIET = dict(log=lambda *_: None)


def _cfg(bank="per_position", **kw):
    # 64 px images cut into 4 tiles of 32 px (no overlap): tile t is quadrant t, row-major
    return tiny_config(data={"image_size": 64, "tile": 32, "tile_overlap": 0},
                       bank={"tile_bank": bank, "coreset_ratio": 0.25}, **kw)


def _stripes(horizontal: bool, rng) -> np.ndarray:
    y, x = np.mgrid[0:32, 0:32]
    s = np.where(((y if horizontal else x) // 3) % 2 == 0, 200.0, 40.0)
    return s + rng.normal(0, 6, (32, 32))


def aligned_images(n: int, seed: int, anomalous: bool = False) -> np.ndarray:
    """Quadrant 0 has horizontal stripes, the other three vertical ones; an anomaly has
    horizontal stripes in quadrant 3 too: a pattern that is normal at position 0."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 64, 64, 3), np.uint8)
    for i in range(n):
        img = np.empty((64, 64))
        for q, (y, x) in enumerate([(0, 0), (0, 32), (32, 0), (32, 32)]):
            img[y:y + 32, x:x + 32] = _stripes(q == 0 or (anomalous and q == 3), rng)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)[..., None]
    return out


@pytest.fixture(scope="module")
def fitted():
    train = aligned_images(10, 0)
    return {b: pn_jax.fit(_cfg(b), train, **QUIET) for b in ("per_position", "shared")}


def test_each_tile_is_searched_against_its_own_position_rows(fitted):
    model = fitted["per_position"]
    n_pos = tilebank.n_positions(model.cfg)
    bank = np.asarray(model.state.bank, np.float64)
    assert n_pos == 4 and len(bank) % 4 == 0
    feats = model.extract(np.concatenate([aligned_images(2, 5), aligned_images(2, 6, anomalous=True)]))
    sig = model.scorer().signals(model.state, feats)
    f = np.asarray(feats, np.float64)
    k = model.cfg.noising.k
    stricter = 0
    for bs, fs in tilebank.slices(len(bank), f.shape[1], n_pos):
        d = np.sqrt(((f[:, fs, None, :] - bank[None, None, bs, :]) ** 2).sum(-1))  # [B, N_t, M_t]
        d.sort(axis=-1)
        np.testing.assert_allclose(np.asarray(sig["nearest"])[:, fs], d[..., 0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(sig["distance"])[:, fs], d[..., :k].mean(-1), rtol=1e-5, atol=1e-5)
        whole = np.sqrt(((f[:, fs, None, :] - bank[None, None]) ** 2).sum(-1)).min(-1)
        stricter += int((whole < d[..., 0] - 1e-3).sum())
    assert stricter > 0  # the whole bank would have given some patches a nearer row: the test can fail


def test_aligned_pattern_is_caught_per_position_and_missed_by_the_shared_bank(fitted):
    test = np.concatenate([aligned_images(6, 11), aligned_images(6, 12, anomalous=True)])
    labels = np.r_[np.zeros(6), np.ones(6)]
    auroc = {b: roc_auc_score(labels, m.predict(test, progress=False).scores) for b, m in fitted.items()}
    assert auroc["per_position"] == 1.0, auroc
    assert auroc["shared"] <= 0.75, auroc
    # the threshold was chosen on scores made the same way: the anomalies are labelled
    pred = fitted["per_position"].predict(test, progress=False)
    assert pred.labels[6:].all()


def test_save_load_round_trip(fitted, tmp_path):
    model = fitted["per_position"]
    model.save(tmp_path / "ckpt")
    back = pn_jax.load(tmp_path / "ckpt")
    assert back.cfg.bank.tile_bank == "per_position"
    np.testing.assert_array_equal(np.asarray(back.state.bank), np.asarray(model.state.bank))
    test = aligned_images(3, 21, anomalous=True)
    np.testing.assert_array_equal(back.predict(test, progress=False).scores, model.predict(test, progress=False).scores)
    assert back.threshold == model.threshold


def test_streamed_per_position_fit_is_the_in_memory_fit():
    train = aligned_images(10, 0)
    cfg = _cfg(batch_size=3)
    a = pn_jax.fit(cfg, train, **QUIET)
    b = pn_jax.fit(cfg.replace(max_memory_gb=64.0), train, **QUIET)
    np.testing.assert_array_equal(np.asarray(a.state.bank), np.asarray(b.state.bank))
    np.testing.assert_array_equal(np.asarray(a.state.params["noise_scale"]), np.asarray(b.state.params["noise_scale"]))
    for x, y in zip(a.state.stats, b.state.stats):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a.threshold == b.threshold


def test_refusals(fitted, tmp_path):
    with pytest.raises(ValueError, match="needs --tile"):
        tiny_config(bank={"tile_bank": "per_position"})
    with pytest.raises(ValueError, match="drop --coreset-preselect"):
        _cfg(bank="per_position").replace(bank={"coreset_preselect": 4.0})
    with pytest.raises(ValueError, match="must be one of"):
        _cfg(bank="per-tile")
    with pytest.raises(ExportError, match="per tile position"):
        fitted["per_position"].export(str(tmp_path / "m.jax"))


def test_cli_refuses_tile_bank_without_tile(capsys, tmp_path):
    rc = cli.run_main(["--dataset", "synthetic", "--tile-bank", "per-position", "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--tile-bank per-position) needs --tile" in err and "Traceback" not in err


def test_position_rows_are_the_tiles_patches():
    # 3 images, 4 positions of 2 patches: position 1 is patches 2-3 of each image
    np.testing.assert_array_equal(tilebank.position_rows(3, 8, 4, 1), [2, 3, 10, 11, 18, 19])
    assert tilebank.slices(12, 8, 4)[2] == (slice(6, 9), slice(4, 6))
    with pytest.raises(ValueError, match="equal tile positions"):
        tilebank.slices(10, 8, 4)

