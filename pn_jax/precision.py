"""The precision policy of matmuls and convolutions (`Config.model.precision`, SPEC 2.9), and an
audit of traced functions against it.

A float32 matmul or convolution with `precision=None` runs at the backend's default: float32
on a CPU, TF32 (10-bit mantissa) on NVIDIA GPUs since Ampere, one bfloat16 pass (8 bits) on a
TPU. The same data and seed then give other features, another coreset and other metrics on
each platform (issue 22, measured: I-AUROC 67.31 on an H200 against 66.67 on a CPU, and an
exported `cuda` artifact 4.7e-5 away from `predict` on the same GPU).

  "highest"  every matmul and convolution of the model path (backbone, aggregation, coreset,
             influence, scoring, export) is called with precision=HIGHEST: float32 products and
             sums on every backend. The default.
  "fast"     precision=None: the backend chooses (TF32 / bf16 passes where it offers them).
             On a CPU both policies compute the same float32 numbers.

The k-NN search (`pn_jax/knn.py`) pins its own matmuls to HIGHEST under both policies: its
exactness proof assumes float32 arithmetic. The coreset is HIGHEST under "highest" and
follows the policy under "fast" (its fast path's equality with the plain loop is then no
longer bit-exact on an accelerator).

`unpinned(jaxpr)` lists every dot_general and conv_general_dilated, in a jaxpr and all its
sub-jaxprs (jit, while, cond, scan, custom_jvp/vjp, ...), that does not carry (HIGHEST,
HIGHEST); `unpinned_stablehlo` does the same on an exported artifact's StableHLO.
`tests/test_precision.py` runs them on every traced path.
"""
from __future__ import annotations

from typing import Iterator

from jax import lax

from pn_jax.config import PRECISIONS

HIGHEST = lax.Precision.HIGHEST
MATMUL_PRIMITIVES = ("dot_general", "conv_general_dilated")


def lax_precision(policy: str) -> lax.Precision | None:
    """The `precision=` argument that a policy name gives every matmul and convolution."""
    if policy == "highest":
        return HIGHEST
    if policy == "fast":
        return None
    raise ValueError(f"model.precision must be one of {PRECISIONS}, got {policy!r}")


def of(cfg) -> lax.Precision | None:
    """`lax_precision(cfg.model.precision)`."""
    return lax_precision(cfg.model.precision)


# ----------------------------------------------------------------------------- audit
def _subjaxprs(value) -> Iterator:
    if hasattr(value, "eqns"):  # a Jaxpr
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value, "consts"):  # a ClosedJaxpr
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):  # cond's branches, ...
        for v in value:
            yield from _subjaxprs(v)


def matmul_eqns(jaxpr, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    """(path of enclosing primitives, eqn) for every dot_general / conv_general_dilated in
    `jaxpr` (a Jaxpr or ClosedJaxpr, e.g. from `jax.make_jaxpr`) and its sub-jaxprs."""
    jaxpr = jaxpr.jaxpr if hasattr(jaxpr, "consts") else jaxpr
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in MATMUL_PRIMITIVES:
            yield path + (name,), eqn
        for value in eqn.params.values():
            for sub in _subjaxprs(value):
                yield from matmul_eqns(sub, path + (name,))


def is_highest(eqn) -> bool:
    return eqn.params.get("precision") == (HIGHEST, HIGHEST)


def describe(path, eqn) -> str:
    shapes = " x ".join(f"{v.aval.dtype}{list(v.aval.shape)}" for v in eqn.invars)
    try:  # where in the user's code the eqn was traced (a private helper: optional)
        from jax._src import source_info_util

        where = source_info_util.summarize(eqn.source_info)
    except Exception:  # noqa: BLE001
        where = "?"
    return f"{'/'.join(path)} {shapes} precision={eqn.params.get('precision')} at {where}"


def unpinned(jaxpr) -> list[str]:
    """Descriptions of the matmuls and convolutions in `jaxpr` that are not pinned to HIGHEST
    (empty: every one is float32 on every backend)."""
    return [describe(p, e) for p, e in matmul_eqns(jaxpr) if not is_highest(e)]


def unpinned_stablehlo(mlir_text: str) -> list[str]:
    """The same audit on lowered StableHLO text (`jax.export.Exported.mlir_module()`): the
    dot_general and convolution ops without HIGHEST on both operands."""
    ops = ("stablehlo.dot_general", "stablehlo.convolution")
    return [line.strip()[:200] for line in mlir_text.splitlines()
            if any(op in line for op in ops) and line.count("HIGHEST") < 2]
