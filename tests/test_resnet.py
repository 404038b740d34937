"""ResNet ports vs torchvision (fixtures from tests/fixtures/make_resnet_fixtures.py), strict
loading, and the backbone registry."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from pn_jax import backbones
from pn_jax import weights as W
from pn_jax.backbones import resnet

FIX = Path(__file__).parent / "fixtures"
NAMES = ("resnet18", "wide_resnet50_2")


@functools.lru_cache(maxsize=None)
def _features(name: str):
    ref = dict(np.load(FIX / f"resnet_parity_{name}.npz"))
    sd = resnet.random_state_dict(name, int(ref["seed"]))
    net = resnet.build(name, state_dict=sd)  # all four stages
    out = {k: np.asarray(v, np.float64) for k, v in net(ref["input"]).items()}
    return ref, out


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("stage", resnet.STAGES)
def test_parity_with_torchvision(name, stage):
    ref, out = _features(name)
    got = out[stage]
    assert got.shape == tuple(ref[f"{stage}/shape"])
    scale = float(ref[f"{stage}/max_abs"])
    assert np.abs(got).max() == pytest.approx(scale, rel=1e-4)
    idx = ref[f"{stage}/channel_idx"]
    err = np.abs(got[..., idx] - ref[f"{stage}/channels"]).max() / scale
    assert err <= 1e-4, f"{name}.{stage}: channels rel err {err:.2e}"
    proj = got @ ref[f"{stage}/proj_matrix"].astype(np.float64)
    perr = np.abs(proj - ref[f"{stage}/proj"]).max() / np.abs(ref[f"{stage}/proj"]).max()
    assert perr <= 1e-4, f"{name}.{stage}: projection rel err {perr:.2e}"
    merr = np.abs(got.mean(axis=(0, 1, 2)) - ref[f"{stage}/channel_mean"]).max() / scale
    assert merr <= 1e-4, f"{name}.{stage}: channel-mean rel err {merr:.2e}"


def test_truncated_net_matches_and_returns_only_requested():
    ref, out = _features("resnet18")
    sd = resnet.random_state_dict("resnet18", int(ref["seed"]))
    net = resnet.build("resnet18", state_dict=sd, layers=("layer2", "layer1"))
    got = net(ref["input"])
    assert set(got) == {"layer1", "layer2"}
    for k in got:
        np.testing.assert_allclose(np.asarray(got[k]), out[k], rtol=0, atol=1e-5 * np.abs(out[k]).max())
    # Only the convs up to layer2 are kept on the device.
    assert not any(k.startswith(("layer3", "layer4")) for k in net.params)


def test_no_retrace_per_batch():
    sd = resnet.random_state_dict("resnet18", 1)
    net = resnet.build("resnet18", state_dict=sd, layers=("layer1",))
    x = np.random.default_rng(0).standard_normal((3, 32, 32, 3)).astype(np.float32)
    a = np.asarray(net(x)["layer1"])
    b = np.asarray(net(x[::-1].copy())["layer1"])
    assert net._fn._cache_size() == 1
    # Batch composition does not change a sample's features.
    np.testing.assert_allclose(a[0], b[2], atol=1e-5)
    np.testing.assert_allclose(np.asarray(net(x[1:2])["layer1"])[0], a[1], atol=1e-5)


def test_strict_loading_names_every_problem():
    sd = resnet.random_state_dict("resnet18", 0)
    sd["fc.weight"] = np.zeros((1000, 512), np.float32)  # ignored on purpose
    sd["layer1.0.bn1.num_batches_tracked"] = np.zeros((), np.int64)  # ignored on purpose
    resnet.convert_state_dict("resnet18", sd)  # fine

    del sd["layer2.0.downsample.1.running_var"]
    sd["layer1.0.conv3.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    sd["layer3.1.conv2.weight"] = np.zeros((256, 256, 1, 1), np.float32)
    with pytest.raises(W.WeightMappingError) as e:
        resnet.build("resnet18", state_dict=sd)
    msg = str(e.value)
    assert "missing (1): layer2.0.downsample.1.running_var" in msg
    assert "unexpected (1): layer1.0.conv3.weight" in msg
    assert "layer3.1.conv2.weight expected (256, 256, 3, 3) got (256, 256, 1, 1)" in msg


def test_wrn50_weights_do_not_fit_resnet18():
    with pytest.raises(W.WeightMappingError, match="layer1.0.conv3.weight"):
        resnet.convert_state_dict("resnet18", {k: np.zeros(s, np.float32) for k, s in
                                               resnet.torch_shapes("wide_resnet50_2").items()})


def test_infos():
    r18, wrn = resnet.INFOS["resnet18"], resnet.INFOS["wide_resnet50_2"]
    assert [(s.stride, s.channels) for s in r18.stages.values()] == [(4, 64), (8, 128), (16, 256), (32, 512)]
    assert [(s.stride, s.channels) for s in wrn.stages.values()] == [(4, 256), (8, 512), (16, 1024), (32, 2048)]
    assert wrn.weight_file == "wide_resnet50_2-95faca4d.pth"
    assert r18.weight_file == "resnet18-f37072fd.pth"
    assert wrn.default_layers == ("layer2", "layer3")
    assert wrn.mean == (0.485, 0.456, 0.406) and wrn.std == (0.229, 0.224, 0.225)
    # Parameter count of torchvision's wide_resnet50_2 without fc (68,883,240 - 2,049,000)
    # and of its BN params: checks the architecture table independently of the fixtures.
    n = sum(int(np.prod(s)) for k, s in resnet.torch_shapes("wide_resnet50_2").items()
            if not k.endswith(("running_mean", "running_var")))
    assert n == 68_883_240 - 2_049_000


def test_registry(tmp_path, monkeypatch):
    known = backbones.list_backbones()
    assert {"wide_resnet50_2", "resnet18"} <= set(known)
    assert backbones.info("resnet18") is resnet.RESNET18_INFO
    with pytest.raises(KeyError, match="known backbones: .*wide_resnet50_2"):
        backbones.create("resnet19")
    with pytest.raises(ValueError, match="layer1, layer2, layer3, layer4"):
        backbones.create("resnet18", layers=("layer5",))
    net = backbones.create("resnet18", weights="random", layers=("layer1",))
    assert set(net(np.zeros((1, 32, 32, 3), np.float32))) == {"layer1"}
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        backbones.create("wide_resnet50_2")
    msg = str(e.value)
    assert "wide_resnet50_2-95faca4d.pth" in msg and str(tmp_path) in msg
    assert "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth" in msg


def test_registry_builds_from_file(tmp_path, monkeypatch):
    from safetensors.numpy import save_file

    sd = resnet.random_state_dict("resnet18", 3)
    save_file(sd, str(tmp_path / "r18.safetensors"))
    net = backbones.create("resnet18", weights=str(tmp_path / "r18.safetensors"), layers=("layer3",))
    x = np.zeros((1, 64, 64, 3), np.float32)
    assert net(x)["layer3"].shape == (1, 4, 4, 256)
    # Found in the torch hub cache by its canonical name; the hash check refuses the impostor.
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    save_file(sd, str(hub / "resnet18-f37072fd.pth"))
    with pytest.raises(W.WeightsHashError, match="resnet18-f37072fd.pth"):
        backbones.create("resnet18")
