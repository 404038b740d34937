"""The precision policy (issue 22.3, SPEC 2.9): under "highest" every dot_general and
conv_general_dilated of the traced model paths (backbones, aggregation, Scorer, coreset,
influence estimators, the exported function) carries Precision.HIGHEST; under "fast" the
policy really reaches them (the backbone's carry the backend default). The audit itself is
shown to catch an unpinned matmul wherever it hides. Everything is traced, nothing compiled,
except one small fit and one export."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pn_jax import checkpoint, coreset, detector, export, features, fitting, flags, influence, noising, normalstats
from pn_jax.research import predictor
from pn_jax import model as model_lib
from pn_jax import precision as P
from pn_jax.backbones import efficientnet_lite as effnet
from pn_jax.config import tiny_config

POLICIES = ("highest", "fast")
DIM = 64
GRID = (8, 8)  # resnet18 layer2 at 64 px


def r18_cfg(policy, **noising_kw):
    """resnet18 with seeded random weights: nothing to download, the real architecture."""
    return tiny_config(model={"backbone": "resnet18", "weights": "random", "layers": ("layer2", "layer3"),
                              "pretrain_embed_dimension": DIM, "target_embed_dimension": DIM,
                              "precision": policy}, noising=noising_kw)


def random_state(dim=DIM, m=96, s=6, seed=0):
    rng = np.random.default_rng(seed)
    bank = jnp.asarray(rng.normal(size=(m, dim)).astype(np.float32))
    dims = jnp.asarray(np.sort(rng.choice(dim, s, replace=False)).astype(np.int32))
    return detector.DetectorState(bank, dims, detector.init_params(dim), noising.identity_stats())


def check(jaxpr, policy, *, all_default=False):
    """Under "highest": no unpinned matmul or convolution. Under "fast": at least one follows
    the backend default (every one with `all_default`). Returns the number audited."""
    eqns = list(P.matmul_eqns(jaxpr))
    assert eqns, "nothing to audit: the traced function has no matmul or convolution"
    if policy == "highest":
        bad = P.unpinned(jaxpr)
        assert not bad, "not pinned to Precision.HIGHEST:\n  " + "\n  ".join(bad)
    else:
        default = [e for _, e in eqns if e.params.get("precision") is None]
        assert default, "--precision fast reached none of these matmuls"
        if all_default:
            assert len(default) == len(eqns), [P.describe(p, e) for p, e in eqns if p not in default]
    return len(eqns)


# ----------------------------------------------------------------------------- the audit
def test_the_audit_finds_an_unpinned_matmul_wherever_it_hides():
    hi = P.HIGHEST

    def bare(a):
        return a @ a

    def pinned(a):
        return jnp.matmul(a, a, precision=hi)

    @jax.custom_jvp
    def cj(a):
        return bare(a)

    cj.defjvp(lambda p, t: (cj(p[0]), t[0]))

    @jax.custom_vjp
    def cv(a):
        return bare(a)

    cv.defvjp(lambda a: (cv(a), None), lambda _, g: (g,))

    def conv(a, precision=None):
        return jax.lax.conv_general_dilated(a[None, None], a[None, None], (1, 1), "SAME", precision=precision)[0, 0]

    def f(a):
        x = pinned(a)
        x = jax.jit(bare)(x)
        x = jax.lax.cond(x[0, 0] > 0, bare, pinned, x)
        x = jax.lax.scan(lambda c, _: (bare(c), None), x, None, length=2)[0]
        x = jax.lax.while_loop(lambda c: c[0, 0] < 0, bare, x)
        x = cj(x) + cv(x)
        x = conv(x) + conv(x, hi)
        x = jax.vmap(bare)(x[None])[0]
        x = jax.checkpoint(bare)(x)
        return jnp.matmul(x, x, precision="high")  # explicit, but not float32: also caught

    j = jax.make_jaxpr(f)(jnp.ones((4, 4), jnp.float32))
    found = P.unpinned(j)
    assert len(list(P.matmul_eqns(j))) == 13
    assert len(found) == 10, found  # every bare one (and the "high" one), none of the pinned
    outer = {d.split()[0].split("/")[0] for d in found}
    for kind in ("cond", "scan", "while", "custom_jvp_call", "custom_vjp_call", "conv_general_dilated"):
        assert any(o.startswith(kind) for o in outer), (kind, outer)
    with pytest.raises(AssertionError, match="not pinned"):
        check(j, "highest")


def test_policy_names_are_validated():
    assert P.lax_precision("highest") == jax.lax.Precision.HIGHEST and P.lax_precision("fast") is None
    with pytest.raises(ValueError, match="model.precision must be one of"):
        tiny_config(model={"precision": "tf32"})
    assert tiny_config().model.precision == "highest"


def test_cli_flag_sets_the_policy():
    from pn_jax import cli

    a = cli.build_run_parser().parse_args(["--dataset", "synthetic", "--precision", "fast"])
    assert cli.build_config(a).model.precision == "fast"
    a = cli.build_parser().parse_args(["fit", "--dataset", "synthetic"])
    assert cli.build_config(a).model.precision == "highest"
    assert "precision" in flags.CONFIG_FLAGS  # compared against a checkpoint in test mode
    with pytest.raises(SystemExit):
        cli.build_run_parser().parse_args(["--precision", "tf32"])


# ----------------------------------------------------------------------------- backbones, aggregation
@pytest.mark.parametrize("policy", POLICIES)
def test_resnet_and_aggregation_from_the_config(policy):
    ext = detector.FeatureExtractor(r18_cfg(policy))  # backbones.create with the config's precision
    x = jnp.zeros((2, 64, 64, 3), jnp.float32)
    n = check(jax.make_jaxpr(ext.backbone)(x), policy, all_default=True)
    assert n == 1 + 2 * 2 * 3 + 2  # stem + 2 blocks x 2 convs x 3 stages + 2 downsamples
    maps = jax.eval_shape(ext.backbone, x)
    maps = [jnp.zeros(maps[l].shape, maps[l].dtype) for l in ext.layers]
    check(jax.make_jaxpr(ext._aggregate)(maps), policy, all_default=True)


@pytest.mark.parametrize("policy", POLICIES)
def test_efficientnet_lite0(policy):
    shapes = effnet.expected_state_dict_shapes()
    sd = {k: np.ones(s, np.float32) for k, s in shapes.items()}  # traced only: values do not matter
    params = effnet.convert_state_dict(sd, source="ones")
    net = effnet.build(layers=("blocks4", "blocks10", "logits"), params=params, precision=P.lax_precision(policy))
    j = jax.make_jaxpr(net)(jnp.zeros((1, 64, 64, 3), jnp.float32))
    # stem conv, expand + project per block (the first has no expand), head, fc
    assert check(j, policy, all_default=True) == 1 + 2 * 16 - 1 + 1 + 1


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("shape", [((1, 8, 8, 512), (1, 4, 4, 1024), 1024, 1024),  # WRN50-like: grouped taps
                                   ((1, 8, 8, 40), (1, 4, 4, 112), 300, 200),  # einsum pooling
                                   ((1, 8, 8, 5), (1, 4, 4, 7), 64, 64)])  # upsampling pool
def test_aggregation(policy, shape):
    a, b, pre, tgt = shape
    j = jax.make_jaxpr(lambda x, y: features.aggregate([x, y], pre, tgt, precision=P.lax_precision(policy)))(
        jnp.zeros(a), jnp.zeros(b))
    check(j, policy, all_default=True)


# ----------------------------------------------------------------------------- scoring
def _scoring_args(cfg, state):
    feats = jnp.zeros((2, GRID[0] * GRID[1], DIM), jnp.float32)
    return state.params, state.bank, state.dims, state.stats, feats


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("infl", ["fd", "fd_fixed", "grad", "jvp", "predictor"])
def test_signal_functions(policy, infl):
    cfg = r18_cfg(policy, influence=infl)
    state = random_state()
    if infl == "predictor":
        state = state._replace(params={**state.params, "predictor": predictor.init_params(6, cfg.noising.k)})
    args = _scoring_args(cfg, state)
    for bank in (state.bank, detector.knn_lib.prepare_bank(state.bank)):
        fn = detector.make_signal_fn(cfg, need_influence=True, calibrated=True, rerank=True, jit=False)
        j = jax.make_jaxpr(fn)(args[0], bank, *args[2:])
        if policy == "highest" or infl == "fd":  # fast: only fd's re-search follows the policy
            check(j, policy)
    owners = (jnp.zeros((state.bank.shape[0],), jnp.int32), jnp.array([0, 1], jnp.int32))
    fn = detector.make_signal_fn(cfg, need_influence=True, calibrated=True, rerank=True, jit=False, loo=True)
    j = jax.make_jaxpr(fn)(*args, owners)
    if policy == "highest" or infl == "fd":
        check(j, policy)


@pytest.mark.parametrize("policy", POLICIES)
def test_scorer_end_to_end_and_compiled_per_policy(policy):
    cfg = r18_cfg(policy, influence="fd").replace(noising={"blur_sigma": 3.3})  # its own compiled fns
    state = random_state()
    feats = _scoring_args(cfg, state)[-1]
    j = jax.make_jaxpr(lambda f: detector.Scorer(cfg, GRID)(state, f))(feats)
    check(j, policy)
    other = cfg.replace(model={"precision": "fast" if policy == "highest" else "highest"})
    assert detector.Scorer(cfg, GRID)._signals is not detector.Scorer(other, GRID)._signals


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("method", sorted(influence.METHODS))
def test_influence_estimators(policy, method):
    state = random_state()
    rng = np.random.default_rng(1)
    f = jnp.asarray(rng.normal(size=(16, DIM)).astype(np.float32))
    dist, idx = influence.neighbours(f, state.bank, 3, 64)
    j = jax.make_jaxpr(lambda *a: influence.influence(method, *a, 1e-3, precision=P.lax_precision(policy)))(
        f, state.bank, dist, idx, state.dims)
    if list(P.matmul_eqns(j)) and (policy == "highest" or method == "fd"):
        check(j, policy)
    if method == "fd":  # the re-search: one matmul that follows the policy
        assert list(P.matmul_eqns(j))
    # the fit-time path over held-out images
    j = jax.make_jaxpr(lambda f, b, d, i, dims: normalstats._holdout_influence(
        f, b, d, i, np.int32(0), dims, None, None, None, method=method, eps=1e-3, precision=P.lax_precision(policy)))(
        f[None], state.bank, dist[None], idx[None], state.dims)
    if list(P.matmul_eqns(j)) and (policy == "highest" or method == "fd"):
        check(j, policy)


# ----------------------------------------------------------------------------- coreset, fit
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("select", [coreset.greedy_select, coreset.greedy_select_stepwise])
def test_coreset(policy, select):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(300, 32)).astype(np.float32))
    j = jax.make_jaxpr(lambda f: coreset.coreset_indices(jax.random.key(0), f, 0.1, proj_dim=16, select=select,
                                                         precision=P.lax_precision(policy)))(x)
    check(j, policy)


def test_sharded_coreset_and_search_stay_float32():
    """The sharded loop and search (`devices > 1`) pin their matmuls whatever the policy."""
    from pn_jax import sharding

    mesh = sharding.make_bank_mesh(jax.devices()[:1])
    x = jnp.asarray(np.random.default_rng(0).normal(size=(300, 32)).astype(np.float32))
    check(jax.make_jaxpr(lambda f: sharding.coreset_indices_sharded(jax.random.key(0), f, 0.1, 16, 10, mesh))(x),
          "highest")
    check(jax.make_jaxpr(lambda q, b: sharding._knn_sharded(q, b, k=3, block=64, n_valid=300, mesh=mesh))(x[:10], x),
          "highest")


def test_fit_passes_the_policy_on(monkeypatch):
    seen = []

    def spy(fn, name):
        def wrapped(*a, **kw):
            seen.append((name, kw.get("precision", "missing")))
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(coreset, "coreset_indices", spy(coreset.coreset_indices, "coreset"))
    monkeypatch.setattr(influence, "influence", spy(influence.influence, "influence"))
    cfg = r18_cfg("fast", influence="fd")
    rng = np.random.default_rng(0)
    train = rng.normal(size=(4, 16, DIM)).astype(np.float32)
    fitting.fit_state(cfg, train, train[:2] + 0.1, jax.random.key(0))
    assert ("coreset", None) in seen and ("influence", None) in seen, seen
    assert all(p is None for _, p in seen), seen


# ----------------------------------------------------------------------------- export, checkpoint
@pytest.mark.parametrize("policy", POLICIES)
def test_exported_function(policy):
    fn = export.predict_function(r18_cfg(policy, influence="fd"), random_state(), GRID, 1.0)
    j = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.uint8))
    check(j, policy)
    if policy == "fast":  # the backbone's convolutions follow the policy inside the artifact
        convs = [e for p, e in P.matmul_eqns(j) if p[-1] == "conv_general_dilated"]
        assert convs and all(e.params["precision"] is None for e in convs)


def test_export_artifact_and_metadata_carry_the_policy(tmp_path):
    for policy in POLICIES:
        path = tmp_path / f"{policy}.jaxexport"
        md = export.export_model(r18_cfg(policy), random_state(), GRID, 1.0, {}, path, platforms=("cpu", "cuda"))
        assert md["precision"] == policy and md["config"]["model"]["precision"] == policy
        text = export.load_exported(path).exported.mlir_module()
        assert "stablehlo.convolution" in text
        bad = P.unpinned_stablehlo(text)
        assert (not bad) if policy == "highest" else bad, bad[:3]


def test_checkpoint_keeps_the_policy_and_refuses_another(tmp_path):
    cfg = r18_cfg("fast")
    d = checkpoint.save(tmp_path / "ck", random_state(), cfg, {"grid": list(GRID)})
    _, saved, _ = checkpoint.load(d)
    assert saved.model.precision == "fast"
    with pytest.raises(checkpoint.CheckpointError, match="model.precision: saved 'fast', requested 'highest'"):
        checkpoint.load(d, expected=cfg.replace(model={"precision": "highest"}))
    model = model_lib.load(d)  # scores with its stored policy: its backbone is built with it
    check(jax.make_jaxpr(model.extractor.backbone)(jnp.zeros((1, 64, 64, 3))), "fast", all_default=True)
    # a checkpoint written before the field existed loads as "highest"
    with open(os.path.join(d, "config.json")) as f:
        raw = json.load(f)
    del raw["model"]["precision"]
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(raw, f)
    assert checkpoint.load(d)[1].model.precision == "highest"
