"""Overlapping tiles (issue 26): layout, stitching, blending, flags, and a tiled model end to end."""
import numpy as np
import pytest

import pn_jax
from pn_jax import cli, maps, tiles
from pn_jax.config import Config
from pn_jax.data import pipeline


@pytest.mark.parametrize("size,tile,overlap,want", [
    (100, 40, 10, (0, 30, 60)),        # stride 30 fits exactly
    (110, 40, 10, (0, 30, 60, 70)),    # 110 - 40 = 70 is not a multiple of 30: the last tile moves back to 70
    (64, 64, 0, (0,)),                 # one tile = the image
    (256, 128, 0, (0, 128)),
    (257, 128, 0, (0, 128, 129)),
])
def test_positions_cover_the_image_and_edge_tiles_end_at_the_border(size, tile, overlap, want):
    got = tiles.positions(size, tile, overlap)
    assert got == want  # worked out by hand
    covered = np.zeros(size, bool)
    for s in got:
        covered[s:s + tile] = True
    assert covered.all() and got[-1] + tile == size


def test_a_map_made_of_known_tiles_comes_back(rng=np.random.default_rng(0)):
    lay = tiles.layout(110, 40, 10)  # edge tiles included: starts 0, 30, 60, 70
    full = rng.normal(size=(2, 110, 110)).astype(np.float32)
    pieces = tiles.split(full[..., None], lay)[..., 0].reshape(2, lay.n_tiles, 40, 40)
    np.testing.assert_allclose(np.asarray(tiles.stitch(pieces, lay)), full, rtol=0, atol=1e-6)
    # and the tiles are the crops at the corners, row-major
    y, x = lay.corners[5]
    np.testing.assert_array_equal(pieces[1, 5], full[1, y:y + 40, x:x + 40])


def test_blending_a_constant_gives_the_constant():
    lay = tiles.layout(100, 48, 16)
    out = np.asarray(tiles.stitch(np.full((1, lay.n_tiles, 48, 48), 3.25, np.float32), lay))
    np.testing.assert_allclose(out, 3.25, rtol=1e-6)


def test_blending_is_the_ramp_weighted_mean_per_pixel(rng=np.random.default_rng(1)):
    """Against a per-pixel loop in float64 with the ramp written out here."""
    size, t, o = 70, 32, 12
    lay = tiles.layout(size, t, o)
    vals = rng.normal(size=(1, lay.n_tiles, t, t))
    got = np.asarray(tiles.stitch(vals.astype(np.float32), lay))[0]

    def w(u):  # distance-to-edge ramp over the overlap
        return min(1.0, (u + 0.5) / o, (t - u - 0.5) / o)

    want = np.zeros((size, size))
    for py in range(size):
        for px in range(size):
            num = den = 0.0
            for i, (y, x) in enumerate(lay.corners):
                if y <= py < y + t and x <= px < x + t:
                    wt = w(py - y) * w(px - x)
                    num += wt * vals[0, i, py - y, px - x]
                    den += wt
            want[py, px] = num / den
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the overlap really blends: a pixel in the middle of an overlap is not one tile's value
    assert not np.isclose(got[(o // 2) + lay.starts[1], 5], vals[0, 0, (o // 2) + lay.starts[1], 5])


def test_one_tile_is_the_untiled_map(rng=np.random.default_rng(2)):
    lay = tiles.layout(64, 64, 0)
    patch = rng.normal(size=(3, 8 * 8)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(tiles.to_pixel_maps(patch, (8, 8), lay, 4.0)),
                               np.asarray(maps.to_pixel_maps(patch, (8, 8), (64, 64), 4.0)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("data,match", [
    ({"image_size": 64, "tile": 96}, r"--tile 96 is larger than the image \(64 px"),
    ({"image_size": 128, "tile": 64, "tile_overlap": 64}, r"--tile-overlap 64: the overlap must be .* smaller"),
    ({"image_size": 128, "tile": 16}, r"--tile 16: a tile must be at least 32"),
    ({"image_size": 128, "tile_overlap": 8}, r"--tile-overlap without --tile"),
])
def test_bad_tilings_are_refused_by_name(data, match):
    with pytest.raises(ValueError, match=match):
        Config().replace(data=data)


def test_tile_flags_reach_the_config_and_are_checked_before_work():
    p = cli.build_run_parser()
    cfg = cli.build_config(p.parse_args(["--dataset", "synthetic", "--image-size", "128", "--tile", "64",
                                         "--tile-overlap", "16"]))
    assert (cfg.data.tile, cfg.data.tile_overlap) == (64, 16)
    assert Config.from_dict(cfg.to_dict()).data.tile == 64  # recorded in the config a checkpoint stores
    with pytest.raises(cli.UsageError, match="--tile 512 is larger than the image"):
        cli.build_config(p.parse_args(["--dataset", "synthetic", "--tile", "512"]))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiles_data")
    pipeline.ensure_synthetic(str(root / "synthetic"))
    return root / "synthetic" / "synthetic"


@pytest.fixture(scope="module")
def tiled(data_root):
    cfg = pn_jax.tiny_config(data={"image_size": 96, "tile": 64, "tile_overlap": 32})
    return pn_jax.fit(cfg, str(data_root / "train" / "good"), log=lambda *_: None)


def test_tiled_features_are_the_features_of_each_crop(tiled):
    rng = np.random.default_rng(3)
    img = rng.normal(size=(2, 96, 96, 3)).astype(np.float32)
    got = np.asarray(tiled.features(img))
    lay = tiles.layout(96, 64, 32)
    assert lay.starts == (0, 32) and got.shape == (2, 4 * 8 * 8, 64)
    for i, (y, x) in enumerate(lay.corners):
        crop = np.asarray(tiled.extractor(np.pad(img[:, y:y + 64, x:x + 64], ((0, 2), (0, 0), (0, 0), (0, 0)))))[:2]
        np.testing.assert_allclose(got[:, i * 64:(i + 1) * 64], crop, rtol=1e-5, atol=1e-5)


def test_tiled_model_predicts_full_size_maps_and_round_trips(tiled, data_root, tmp_path):
    assert tiled.grid == (8, 8) and tiled.state.bank.shape[1] == 64
    folder = str(data_root / "test" / "blob")
    pred = tiled.predict(folder, progress=False)
    assert np.all(np.isfinite(pred.scores)) and pred.anomaly_maps[0].shape[:2] == (128, 128)
    # the image score is the max of the stitched, blurred map at the model's size
    out = tiled.score_images(np.stack([tiled.preprocess(np.asarray(
        __import__("PIL.Image").Image.open(p).convert("RGB"))) for p in pred.names[:2]]))
    assert out["anomaly_maps"].shape == (2, 96, 96)
    np.testing.assert_allclose(out["image_scores"], out["anomaly_maps"].reshape(2, -1).max(-1), rtol=1e-6)
    np.testing.assert_allclose(out["image_scores"], pred.scores[:2], rtol=1e-5)
    tiled.save(tmp_path / "ck")
    loaded = pn_jax.load(str(tmp_path / "ck"))
    assert (loaded.cfg.data.tile, loaded.cfg.data.tile_overlap) == (64, 32)
    np.testing.assert_allclose(loaded.predict(folder, progress=False).scores, pred.scores, rtol=1e-5)


def test_test_mode_refuses_another_tiling(tiled, tmp_path):
    tiled.save(tmp_path / "ck")
    a = cli.build_parser().parse_args(["test", "--checkpoint", str(tmp_path / "ck"), "--tile", "48"])
    with pytest.raises(cli.UsageError, match="--tile 48 cannot apply .* tile=64"):
        cli.apply_test_flags(tiled, a)


def test_tiled_export_reproduces_predict(tiled, data_root, tmp_path):
    path = str(tmp_path / "tiled.jaxexport")
    md = tiled.export(path)
    assert md["tiles"]["tile"] == 64 and md["input"]["size"] == 96
    predict = pn_jax.load_exported(path, max_batch=4)
    paths = sorted(str(p) for p in (data_root / "test" / "blob").iterdir())[:3]
    want, got = tiled.predict(paths, progress=False), predict(paths)
    np.testing.assert_allclose(got["scores"], want.scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got["labels"], want.labels)
