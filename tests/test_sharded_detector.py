"""The detector with a bank sharded over 8 simulated CPU devices scores exactly as on one,
for every score variant (each of them must keep the bank's zero pad rows out of its searches)."""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    assert len(jax.devices()) == 8, jax.devices()
    from pn_jax import detector, fitting
    from tests.test_detector import fake_backbone
    from pn_jax.config import tiny_config
    rng = np.random.default_rng(0)
    train = rng.normal(size=(6, 64, 64, 3)).astype(np.float32)
    hold = rng.normal(size=(2, 64, 64, 3)).astype(np.float32)
    test = rng.normal(size=(4, 64, 64, 3)).astype(np.float32)
    test[1, 8:30, 8:30] += 2.0
    out = {}
    for devices in (1, 8):
        cfg = tiny_config(devices=devices, noising={"score": "seed"},
                          model={"pretrain_embed_dimension": 32, "target_embed_dimension": 32})
        ext = detector.FeatureExtractor(cfg, backbone_fn=fake_backbone)
        state, _ = fitting.fit_state(cfg, np.asarray(ext(train)), np.asarray(ext(hold)), jax.random.key(0))
        scorer = detector.Scorer(cfg, ext.grid, variants=(None, "patchcore"))
        res = scorer(state, ext(test))
        out[devices] = (np.asarray(state.bank), np.asarray(res["image_scores"]),
                        np.asarray(res["signals"]["nearest"]))
        # The same Scorer with a bank one row larger that pads to the same sharded shape: the
        # new row (all zeros, the exact nearest entry of all-zero queries) is a real entry now,
        # not a pad, so the mask must follow the bank size.
        assert state.bank.shape[0] % 8 not in (0, 7), state.bank.shape  # M + 1 pads to the same shape
        bigger = state._replace(bank=np.concatenate([state.bank, np.zeros((1, 32), np.float32)]))
        zeros = np.zeros(ext(test).shape, np.float32)  # the same shapes: no retrace on its own
        out[devices] += (np.asarray(scorer(bigger, zeros)["signals"]["nearest"]),)
        # Leave-one-image-out calibration (its k-NN on the sharded bank with 8 devices)
        loo, rep = fitting.fit_state(cfg, np.asarray(ext(train)), None, jax.random.key(0),
                                     calibrate_on=np.array([0, 2, 5]))
        out[devices] += (np.asarray(loo.params["noise_scale"]), np.concatenate([np.asarray(x).ravel() for x in loo.stats]))
        # ... and leave-one-image-out scoring (the threshold's) of training images 0, 2, 5 and a
        # test image (owner -1: nothing excluded), on the sharded bank with 8 devices
        feats = np.concatenate([np.asarray(ext(train))[[0, 2, 5]], np.asarray(ext(test))[:1]])
        sc = detector.Scorer(cfg, ext.grid, variants=(None, "patchcore"))(loo, feats, (rep.bank_owner, np.array([0, 2, 5, -1])))
        out[devices] += (np.asarray(sc["image_scores"]), np.asarray(sc["signals"]["nearest"]))
        own = rep.bank_owner
        assert len(set(own.tolist())) == 6 and state.bank.shape[0] % 8  # every image owns rows; pads on 8 devices
    np.testing.assert_array_equal(out[1][4], out[8][4])  # leave-one-image-out: the same noise scale
    np.testing.assert_array_equal(out[1][5], out[8][5])  # ... and statistics, bit for bit
    np.testing.assert_array_equal(out[1][6], out[8][6])  # ... and image scores
    np.testing.assert_array_equal(out[1][7], out[8][7])
    # independent check of the exclusion: each training image's nearest distance is that of a
    # float64 brute force over the bank rows of the other images
    bank = np.asarray(loo.bank, np.float64)
    for c, o in enumerate([0, 2, 5]):
        f = feats[c].astype(np.float64)
        d = np.sqrt(((f[:, None] - bank[rep.bank_owner != o][None]) ** 2).sum(-1)).min(1)
        np.testing.assert_allclose(out[8][7][c], d, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[1][0], out[8][0])  # same coreset
    np.testing.assert_allclose(out[1][1], out[8][1], rtol=1e-6)
    np.testing.assert_allclose(out[1][2], out[8][2], rtol=1e-6)
    np.testing.assert_allclose(out[1][3], out[8][3], rtol=1e-6)
    assert out[8][3].max() == 0
    print("SHARDED_OK")
""")


VARIANTS_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    assert len(jax.devices()) == 8, jax.devices()
    from pn_jax import detector, fitting
    from tests.test_detector import fake_backbone
    from pn_jax.config import tiny_config
    rng = np.random.default_rng(0)
    train = rng.normal(size=(6, 64, 64, 3)).astype(np.float32)
    hold = rng.normal(size=(2, 64, 64, 3)).astype(np.float32)
    test = rng.normal(size=(3, 64, 64, 3)).astype(np.float32)
    test[1, 8:30, 8:30] += 2.0
    base = tiny_config(model={"pretrain_embed_dimension": 32, "target_embed_dimension": 32})
    ext = detector.FeatureExtractor(base, backbone_fn=fake_backbone)
    state, rep = fitting.fit_state(base, np.asarray(ext(train)), np.asarray(ext(hold)), jax.random.key(0))
    assert state.bank.shape[0] % 8, state.bank.shape  # 8 devices: the sharded bank has pad rows
    feats = np.array(ext(test))
    loo = (rep.bank_owner, np.array([0, 3, -1]))  # leave-one-image-out: each image scored without one image's rows
    # Patches at or near the origin: a zero pad row would be their nearest entry if any search
    # (Euclidean, whitened, or the literal fd re-search) looked at the pads.
    feats[2, :40] = 0.0
    feats[2, 40:80] *= 0.01
    variants = ("patchcore", "distance", "influence", "noise", "seed", "seed_z", "calibrated",
                "calibrated_mean", "calibrated_nll", "calibrated_rerank", "proposed")
    for influence in ("fd_fixed", "fd"):
        out = {}
        for devices in (1, 8):
            cfg = base.replace(devices=devices, noising={"influence": influence})
            scorer = detector.Scorer(cfg, ext.grid, variants=variants)
            sig, sig_loo = scorer.signals(state, feats), scorer.signals(state, feats, loo)
            out[devices] = {v: np.asarray(detector.patch_score(cfg, sig, state.stats, v)) for v in variants}
            out[devices].update({("loo", v): np.asarray(detector.patch_score(cfg, sig_loo, state.stats, v))
                                 for v in variants})
        for v in list(variants) + [("loo", v) for v in variants]:
            assert np.all(np.isfinite(out[1][v])), v
            np.testing.assert_allclose(out[8][v], out[1][v], rtol=1e-5, atol=1e-6,
                                       err_msg=f"influence={influence} score={v}")
    print("SHARDED_OK")
""")


STATS_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    assert len(jax.devices()) == 8, jax.devices()
    from pn_jax import calibration, detector, normalstats, sharding
    from pn_jax.config import tiny_config
    from pn_jax.research import explain
    rng = np.random.default_rng(1)
    M, D, N = 61, 16, 12  # 61 rows on 8 devices: 3 pad rows
    bank = rng.normal(size=(M, D)).astype(np.float32)
    owner = (np.arange(M) // 11).astype(np.int32)  # 6 training images
    feats = rng.normal(size=(3, N, D)).astype(np.float32)
    feats[2, :4] = 0.0  # at the origin: a zero pad row would be their nearest if a search saw the pads
    sb = sharding.shard_bank(bank, sharding.make_bank_mesh(jax.devices()))
    assert sb.rows.shape[0] == 64 and sharding.shard_bank(sb, None) is sb
    for influence in ("fd_fixed", "fd"):
        cfg = tiny_config().replace(noising={"influence": influence, "k": 3, "dim_selection": "importance"})
        for exclude in (None, (owner, np.array([0, 2, 5]))):
            out = {}
            for devices, b in ((1, bank), (8, sb)):  # the whole bank on one device; the ShardedBank
                c = cfg.replace(devices=devices)
                nb = (normalstats.holdout_neighbours(c, b, feats) if exclude is None
                      else normalstats.loo_neighbours(c, b, owner, feats, exclude[1]))
                rows, flat = getattr(b, "rows", b), jnp.asarray(feats.reshape(-1, D))
                s = calibration.fit_noise_scale(rows, flat, nearest=nb[1][..., 0].reshape(-1))
                dims = normalstats.select_dims(c, jax.random.key(0), D, flat, rows, nb)
                params = {**detector.init_params(D), "noise_scale": s}
                stats = normalstats.fit_stats(c, params, b, dims, feats, nb, exclude=exclude)
                ex = explain.Explainer(b, s, k=3, eps=c.noising.eps, batch=8).fine(feats.reshape(-1, D))
                out[devices] = [np.asarray(x) for x in (*nb, s, dims, *stats, *ex)]
            assert out[1][1].max() < M
            for i, (a, b_) in enumerate(zip(out[1], out[8])):
                np.testing.assert_array_equal(b_, a, err_msg=f"{influence} exclude={exclude is not None} #{i}")
    print("SHARDED_OK")
""")


def run_on_8_devices(script):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                       timeout=600)
    assert "SHARDED_OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


def test_sharded_bank_and_coreset_match_single_device():
    run_on_8_devices(SCRIPT)


def test_every_score_variant_sharded_matches_single_device():
    run_on_8_devices(VARIANTS_SCRIPT)


def test_fit_statistics_on_a_sharded_bank_equal_the_whole_banks():
    """What a distributed fit computes on its ShardedBank (never whole on a host): the held-out
    and leave-one-image-out K-NN, the noise scale, the importance dims, the influence
    statistics (fd's re-search kept off the pad rows) and the explanations' fine level, the
    same bits as on the whole bank on one device."""
    run_on_8_devices(STATS_SCRIPT)
