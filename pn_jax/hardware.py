"""What this machine can do, and the k-NN ranking path chosen from it (SPEC 2.9).

The exact k-NN ranks the bank either in float32 or in bfloat16 (`knn.low_indices`, then a
float32 proof). The bf16 ranking is faster only where the CPU multiplies bf16 natively:
XLA:CPU's bf16 x bf16 -> f32 matmul ran at 2x the float32 rate on an AVX512-BF16 CPU, and at
0.5-0.6x on an AVX2-only AMD EPYC (issue 22), where it is emulated. So the default is chosen
by capability, never by backend name or by the machine it was tuned on:

* CPU with `avx512_bf16` or `amx_bf16` in its flags (Linux /proc/cpuinfo): bfloat16.
* Any other CPU (AVX2-only x86, ARM, unknown flags): float32.
* GPU, TPU: float32. The bf16 bound assumes IEEE float32 accumulation of exact bf16 products;
  tensor cores and MXUs do not accumulate that way, so `low=True` is refused there.

`PN_JAX_KNN_RANKING=float32|bfloat16` overrides the CPU choice (bfloat16 is still refused off
the CPU). The choice and its reason go into the checkpoint's provenance and results.json.
"""
from __future__ import annotations

import functools
import os
import platform

import jax

ENV = "PN_JAX_KNN_RANKING"
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else platform.processor()."""
    for line in _cpuinfo_lines():
        if line.lower().startswith(("model name", "hardware", "cpu model")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of the first core (x86 'flags', ARM 'Features'); empty if unknown."""
    for line in _cpuinfo_lines():
        key = line.split(":", 1)[0].strip().lower()
        if key in ("flags", "features"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _cpuinfo_lines() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:
        return []


def vector_flags() -> list[str]:
    """The SIMD flags that matter for the matmuls (for benchmark tables)."""
    keep = ("avx", "fma", "amx", "neon", "asimd", "sve", "bf16", "vnni")
    return sorted(f for f in cpu_flags() if any(f.startswith(k) or k in f for k in keep))


def describe_cpu() -> str:
    """'MODEL (N cores; flags ...)': what every speed figure is printed beside."""
    return f"{cpu_model()} ({os.cpu_count()} cores; {' '.join(vector_flags()) or 'flags unknown'})"


def knn_ranking(backend: str | None = None) -> dict:
    """{"bfloat16": bool, "reason": str, "backend": ..., "cpu": ...}: the default ranking of the
    exact k-NN on `backend` (default: JAX's default backend) and why."""
    backend = backend or jax.default_backend()
    out = {"backend": backend}
    if backend != "cpu":
        return out | {"bfloat16": False, "reason": f"{backend}: float32 ranking (the bfloat16 bound holds "
                                                      f"only for XLA:CPU's float32 accumulation)"}
    out["cpu"] = cpu_model()
    forced = os.environ.get(ENV, "").strip().lower()
    if forced:
        if forced not in ("float32", "bfloat16"):
            raise ValueError(f"{ENV}={forced!r}: expected 'float32' or 'bfloat16'")
        return out | {"bfloat16": forced == "bfloat16", "reason": f"{ENV}={forced}"}
    native = sorted(set(BF16_FLAGS) & cpu_flags())
    if native:
        return out | {"bfloat16": True, "reason": f"CPU has native bf16 dot products ({', '.join(native)})"}
    return out | {"bfloat16": False,
                  "reason": "CPU shows no native bf16 dot products (no avx512_bf16/amx_bf16 flag): float32 ranking"}


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (a container's, SLURM's or
    taskset's limit), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def decode_workers() -> int:
    """Image decode/resize threads of the input pipeline: one per usable core (PIL releases
    the GIL while it decodes and resizes, so the threads run in parallel with the device)."""
    return usable_cores()


def cpu_streams(backend: str | None = None) -> int:
    """Batches the CPU scores at once, each called from its own host thread (`batches.in_flight`):
    2 on XLA:CPU with 2 or more usable cores, else 1. PJRT's CPU client runs programs called
    from different threads side by side but the programs one thread dispatches one after
    another, and part of every k-NN search (the top-k selection, the gathers of the refined
    rows) runs on one core: with two batches in flight one batch's single-threaded parts run
    beside the other's matmul. Accelerators get 1: they run queued programs in order and
    `batches.overlap` keeps them fed from one thread."""
    return 2 if (backend or jax.default_backend()) == "cpu" and usable_cores() >= 2 else 1

