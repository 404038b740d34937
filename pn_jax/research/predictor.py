"""A learned influence predictor (the note's future work: "predict influence without perturbation").

The reference `grad` influence of a patch f with K-NN distances d_k and residuals r_k = f - m_k is

    I_d / eps = mean_k |r_kd| / d_k                      (d in S, exactly linear in eps)

It needs the K neighbours' coordinates on S: a [Q, K, S] gather, which is what `fd_fixed`
and `grad` spend their time on. The predictor sees only what the k-NN search hands over
anyway plus ONE row: the patch's coordinates x_S, its K distances, and its residual to the
nearest entry r_1S ([Q, S] gather, 1/K of the others'). It writes

    I / eps = (u + (K - 1) g) / K,   u = |r_1S| / d_1   (the k=1 term, exact)
                                     g = softplus(MLP(x_S, r_1S, |r_1S|, log d) + a * u_norm + b)

so the network learns only the other K - 1 neighbours' mean term g, which it cannot see.
It is trained (optax adam, one jitted `lax.scan` over the steps, fixed key) on a log-space
squared error against `grad` on

  * normal patches that are not in the bank (the held-out images), and
  * anomalous patches: the features of seeded synthetic-anomaly images (`anomalous=`, e.g.
    `pn_jax.data.make_validation_records` of the held-out images, extracted by the caller)
    or, when none are given, perturbed normals made in feature space (documented in
    `perturbed_normals`).

Params are a plain nested dict of arrays (`nnx.to_pure_dict`), input normalisation included,
so a checkpoint stores them as they are and `apply` rebuilds the module inside jit.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pn_jax import influence as influence_lib
from pn_jax import knn as knn_lib


class InputStat(nnx.Variable):
    """Fit-time normalisation of the inputs: stored with the params, never trained."""


class InfluencePredictor(nnx.Module):
    """(x_S [Q,S], dist [Q,K], r_1S [Q,S]) -> predicted influence / eps [Q,S].

    x_S is accepted for the interface but not used. An earlier version that also read x_S (and
    had a second gelu layer of 32) agreed slightly better with `grad` on ELPV (Spearman over
    entries 0.68 against 0.63, median relative error 0.22 against 0.24) but cost ~3x more per
    image, more than `fd_fixed` itself."""

    def __init__(self, n_dims: int, k: int, hidden: int = 16, *, rngs: nnx.Rngs):
        s = n_dims
        # float32 matmuls on every backend under either precision policy: the layers are tiny.
        hi = jax.lax.Precision.HIGHEST
        self.inp = nnx.Linear(2 * s + k, hidden, precision=hi, rngs=rngs)
        self.out = nnx.Linear(hidden, s, precision=hi, rngs=rngs)
        self.skip = nnx.Param(jnp.zeros((s,), jnp.float32))  # a: per-dim weight of the k=1 term
        # G: log-linear in a few per-patch statistics (starts at a constant, set by fit_predictor)
        self.level = nnx.Linear(k + 1, 1, kernel_init=nnx.initializers.zeros, precision=hi, rngs=rngs)
        self.r_rms = InputStat(jnp.ones((s,), jnp.float32))
        self.u_rms = InputStat(jnp.ones((s,), jnp.float32))
        self.logd_mean = InputStat(jnp.zeros((k,), jnp.float32))
        self.logd_std = InputStat(jnp.ones((k,), jnp.float32))

    def __call__(self, x_s, dist, r1_s):
        k = dist.shape[-1]
        u = jnp.abs(r1_s) / jnp.maximum(dist[..., :1], 1e-12)
        u_n = u / self.u_rms[...]
        logd = (jnp.log(jnp.maximum(dist, 1e-12)) - self.logd_mean[...]) / self.logd_std[...]
        h = jax.nn.relu(self.inp(jnp.concatenate([r1_s / self.r_rms[...], u_n, logd], axis=-1)))
        # g = G * profile: the network shapes the per-dim profile (mean 1 over S); the patch's
        # level G comes from a log-linear model of a few patch statistics. Letting the MLP set
        # the level too made its ~20% per-entry errors swamp the small differences between
        # patches' means (patch-level Spearman 0.25-0.35 against 0.66 for the k=1 term alone).
        o = jax.nn.softplus(self.out(h) + self.skip[...] * u_n)
        profile = o / jnp.maximum(jnp.mean(o, axis=-1, keepdims=True), 1e-12)
        g = jnp.exp(self.level(jnp.concatenate([logd, jnp.mean(u_n, -1, keepdims=True)], axis=-1))) * profile
        return (u + (k - 1) * g) / k


def _sizes(params) -> tuple[int, int, int]:
    """(|S|, K, hidden) read off the params' shapes."""
    try:
        return (int(params["skip"].shape[0]), int(params["logd_mean"].shape[0]),
                int(params["inp"]["kernel"].shape[1]))
    except (KeyError, TypeError, AttributeError, IndexError):
        raise ValueError("predictor params must be the dict made by fit_predictor/init_params "
                         f"(keys skip, logd_mean, inp/kernel, ...); got {_describe(params)}") from None


def _describe(params) -> str:
    return str(jax.tree.map(lambda a: getattr(a, "shape", a), params)) if isinstance(params, dict) \
        else type(params).__name__


def init_params(n_dims: int, k: int, hidden: int = 16, key=None) -> dict:
    """Fresh params (plain nested dict of float32 arrays)."""
    key = jax.random.key(0) if key is None else key
    model = InfluencePredictor(n_dims, k, hidden, rngs=nnx.Rngs(params=key))
    return nnx.to_pure_dict(nnx.state(model))


def _module(params) -> InfluencePredictor:
    s, k, hidden = _sizes(params)
    abstract = nnx.eval_shape(lambda: InfluencePredictor(s, k, hidden, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


@jax.jit
def apply(params, x_s, dist, r1_s):
    """Pure, jitted: predicted influence / eps [Q,S] (multiply by eps for the influence)."""
    s, k, _ = _sizes(params)
    if x_s.shape[-1] != s or r1_s.shape[-1] != s or dist.shape[-1] != k:
        raise ValueError(f"predictor was fitted for |S|={s}, K={k}; got x_S {x_s.shape}, "
                         f"r_1S {r1_s.shape}, dist {dist.shape}")
    return _module(params)(x_s.astype(jnp.float32), dist.astype(jnp.float32), r1_s.astype(jnp.float32))


def inputs(f, bank, dist, idx, dims, bank_s=None):
    """The predictor's inputs from a k-NN result: (x_S [Q,S], dist [Q,K], r_1S [Q,S]).
    Only the nearest entry's S columns are gathered."""
    bank_s = influence_lib.bank_columns(bank, dims) if bank_s is None else bank_s
    x_s = f[:, dims].astype(jnp.float32)
    r1 = x_s - jnp.take(bank_s, idx[:, 0], axis=0, mode="clip").astype(jnp.float32)
    return x_s, dist, r1


@jax.jit
def influence(params, f, bank, dist, idx, dims, eps, bank_s=None):
    """The estimator with the signature of `pn_jax.influence`'s, params first: [Q,D] -> [Q,|S|]."""
    return eps * apply(params, *inputs(f, bank, dist, idx, dims, bank_s))


# ----------------------------------------------------------------------------- training data
def perturbed_normals(feats: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n feature-space stand-ins for anomalous patches, made from normal patches feats [P,D]:
    half are a normal patch plus Gaussian noise of 0.5..3 x the per-dim spread of the normals
    (a patch off the normal manifold in every direction), half are a normal patch whose values
    on a random 10..50% of the dims are taken from another random patch (a local defect that
    changes some channels only). Used when no synthetic-anomaly image features are given."""
    p, d = feats.shape
    sd = feats.std(0, keepdims=True)
    base = feats[rng.integers(0, p, n)]
    half = n // 2
    noise = rng.normal(size=(half, d)).astype(np.float32) * sd * rng.uniform(0.5, 3.0, (half, 1))
    donor = feats[rng.integers(0, p, n - half)]
    frac = rng.uniform(0.1, 0.5, (n - half, 1))
    swap = rng.random((n - half, d)) < frac
    out = np.concatenate([base[:half] + noise, np.where(swap, donor, base[half:])])
    return out.astype(np.float32)


@functools.partial(jax.jit, static_argnames=("k", "block"))
def _targets(f, bank, dims, *, k, block):
    """grad influence / eps and the predictor inputs of patches f [P,D] (chunked by the caller)."""
    dist, idx = knn_lib.knn(f, bank, k=k, block=block)
    y = influence_lib.grad(f, bank, dist, idx, dims, 1.0)
    return (*inputs(f, bank, dist, idx, dims), y)


def training_set(feats, bank, dims, *, k, block=4096, chunk=4096):
    """Patches [P,D] -> host arrays (x_S, dist, r_1S, target influence / eps)."""
    bank, dims = jnp.asarray(bank), jnp.asarray(dims)
    parts = []
    for s in range(0, len(feats), chunk):
        parts.append([np.asarray(a) for a in _targets(jnp.asarray(feats[s:s + chunk]), bank, dims,
                                                       k=k, block=block)])
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))


def _normalisation(x_s, dist, r1) -> dict:
    u = np.abs(r1) / np.maximum(dist[:, :1], 1e-12)
    logd = np.log(np.maximum(dist, 1e-12))
    rms = lambda a: np.maximum(np.sqrt(np.mean(a * a, 0)), 1e-12).astype(np.float32)  # noqa: E731
    return {"r_rms": rms(r1), "u_rms": rms(u), "logd_mean": logd.mean(0).astype(np.float32),
            "logd_std": np.maximum(logd.std(0), 1e-6).astype(np.float32)}


def log_loss(pred, target, delta, patch_weight=1.0):
    """Squared error of log(. + delta) per entry (a relative error, softened below delta, ~1% of
    the mean), plus `patch_weight` x the same on each patch's mean over S: the scores use that
    mean, and per-entry errors of ~20% otherwise swamp its small differences between patches."""
    entries = jnp.mean((jnp.log(pred + delta) - jnp.log(target + delta)) ** 2)
    patches = jnp.mean((jnp.log(pred.mean(-1)) - jnp.log(target.mean(-1) + 1e-30)) ** 2)
    return entries + patch_weight * patches


TRAINED = ("inp", "out", "skip", "level")


@jax.jit
def _loss(trainable, fixed, batch_data, delta, patch_weight):
    x_s, dist, r1, y = batch_data
    return log_loss(apply({**trainable, **fixed}, x_s, dist, r1), y, delta, patch_weight)


@functools.partial(jax.jit, static_argnames=("steps", "batch", "lr"))
def _train(trainable, fixed, key, train, delta, patch_weight, *, steps, batch, lr):
    """All steps in one compiled scan; mini-batch i is drawn with fold_in(key, i)."""
    opt = optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1), alpha=0.05))
    n = train[0].shape[0]

    def step(carry, i):
        p, s = carry
        sel = jax.random.randint(jax.random.fold_in(key, i), (min(batch, n),), 0, n)
        loss, g = jax.value_and_grad(_loss)(p, fixed, tuple(a[sel] for a in train), delta, patch_weight)
        upd, s = opt.update(g, s, p)
        return (optax.apply_updates(p, upd), s), loss

    (p, _), losses = jax.lax.scan(step, (trainable, opt.init(trainable)), jnp.arange(steps))
    return p, losses


@dataclasses.dataclass
class PredictorFit:
    params: dict  # plain nested dict of arrays
    losses: np.ndarray  # [steps] training loss (mini-batch, log-space squared error)
    val_loss: float  # on the held-back 10% of the training patches, after training
    val_loss_init: float  # ... before training
    info: dict  # counts, seconds, settings


def fit_predictor(feats, bank, dims, *, k: int, key, steps: int = 1000, anomalous=None,
                  synthetic_fraction: float = 0.5, hidden: int = 16, batch: int = 512,
                  lr: float = 3e-3, patch_weight: float = 1.0, val_fraction: float = 0.1,
                  block: int = 4096, max_patches: int = 65536) -> PredictorFit:
    """Fit an InfluencePredictor against `grad` influence.

    feats: normal patch features not in the bank, [n,N,D] or [P,D] (held-out images).
    anomalous: features of synthetic-anomaly images ([a,N,D] or [P',D]), or None to use
    `perturbed_normals` (synthetic_fraction x the normal count). The key seeds everything
    (initialisation, sub-sampling, perturbations, mini-batches). grad influence is linear in
    eps, so the predictor learns influence / eps and serves every eps."""
    t0 = time.perf_counter()
    dims = np.asarray(dims)
    normal = np.asarray(feats, np.float32).reshape(-1, np.shape(feats)[-1])
    bank = np.asarray(bank)
    if normal.shape[-1] != bank.shape[-1]:
        raise ValueError(f"fit_predictor: features have D={normal.shape[-1]} but the bank D={bank.shape[-1]}")
    if len(normal) < 2 or bank.shape[0] < k:
        raise ValueError(f"fit_predictor needs >= 2 normal patches and a bank of >= k={k} entries "
                         f"(got {len(normal)} patches, bank {bank.shape[0]})")
    k_init, k_data, k_steps = jax.random.split(key, 3)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(k_data)).ravel().tolist())
    if len(normal) > max_patches:
        normal = normal[np.sort(rng.choice(len(normal), max_patches, replace=False))]
    if anomalous is not None:
        anom = np.asarray(anomalous, np.float32).reshape(-1, normal.shape[-1])
        if len(anom) > max_patches:
            anom = anom[np.sort(rng.choice(len(anom), max_patches, replace=False))]
        anom_kind = "synthetic-anomaly image features"
    else:
        anom = perturbed_normals(normal, max(1, int(round(synthetic_fraction * len(normal)))), rng)
        anom_kind = "perturbed normals (feature space)"
    data = training_set(np.concatenate([normal, anom]), bank, dims, k=k, block=block)
    is_anom = np.r_[np.zeros(len(normal), bool), np.ones(len(anom), bool)]
    order = rng.permutation(len(is_anom))
    n_val = max(1, int(round(val_fraction * len(order))))
    val, tr = order[:n_val], order[n_val:]
    params = init_params(len(dims), k, hidden, k_init)
    params.update({name: jnp.asarray(v) for name, v in _normalisation(*(a[tr] for a in data[:3])).items()})
    params["level"]["bias"] = jnp.full((1,), np.log(max(float(np.mean(data[3][tr])), 1e-12)), jnp.float32)
    delta = float(0.01 * np.mean(data[3][tr]))
    t_data = time.perf_counter() - t0

    train = tuple(jnp.asarray(a[tr]) for a in data)
    held = tuple(jnp.asarray(a[val]) for a in data)
    frozen = {n for n in params if n not in TRAINED}  # input normalisation
    trainable = {n: v for n, v in params.items() if n not in frozen}
    fixed = {n: v for n, v in params.items() if n in frozen}
    v0 = float(_loss(trainable, fixed, held, delta, patch_weight))
    t1 = time.perf_counter()
    trained, losses = _train(trainable, fixed, k_steps, train, delta, patch_weight, steps=steps, batch=batch, lr=lr)
    losses = np.asarray(losses)
    t_train = time.perf_counter() - t1
    v1 = float(_loss(trained, fixed, held, delta, patch_weight))
    out = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), {**trained, **fixed})
    info = {"n_normal": int(len(normal)), "n_anomalous": int(len(anom)), "anomalous_source": anom_kind,
            "n_val": int(n_val), "steps": int(steps), "batch": int(batch), "hidden": int(hidden), "lr": lr,
            "patch_weight": patch_weight,
            "data_s": t_data, "train_s": t_train, "total_s": time.perf_counter() - t0,
            "n_params": int(sum(np.size(a) for n, a in jax.tree.leaves_with_path(out)
                                if str(n[0].key) not in frozen)),
            "val_is_anomalous_fraction": float(is_anom[val].mean())}
    return PredictorFit(out, losses, v1, v0, info)


# ----------------------------------------------------------------------------- checkpoints
def flatten(params, prefix: str = "predictor") -> dict:
    """{"predictor/inp/kernel": array, ...}: flat names for a checkpoint's extra arrays."""
    out = {}
    for path, leaf in jax.tree.leaves_with_path(params):
        out["/".join([prefix] + [str(p.key) for p in path])] = leaf
    return out


def unflatten(flat: dict, prefix: str = "predictor") -> dict:
    """Inverse of `flatten` (other names are ignored)."""
    out: dict = {}
    for name, leaf in flat.items():
        parts = name.split("/")
        if parts[0] != prefix:
            continue
        node = out
        for p in parts[1:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = jnp.asarray(leaf)
    if not out:
        raise ValueError(f"no predictor arrays (names starting with {prefix!r}/) among {sorted(flat)[:5]}...")
    _sizes(out)
    return out
