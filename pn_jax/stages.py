"""Per-stage accounting: wall time, the part of it spent compiling, and CPU use (issue 25).

Compile seconds come from JAX's own monitoring events (`jax.monitoring`): every jit trace,
lowering to StableHLO and backend compilation (or persistent-cache retrieval) reports its
time span; nested spans (a jit traced inside another's trace) are merged, so a second is
counted once. A stage's compile seconds are the merged spans that fall inside its wall
interval; its run seconds are the rest.

CPU use is the process's CPU time (every thread: decode workers, XLA's thread pool) over the
stage's wall time, in percent: 200% is both cores of a 2-core machine busy. A background
thread samples `time.process_time()` every 50 ms, so any interval can be read afterwards,
including stages whose wall time was measured by the code that ran them (interpolated
between samples: 50 ms of resolution at each end).

    clock = stages.clock()          # started once per process
    t0 = time.time(); ...; t1 = time.time()
    clock.compile_seconds(t0, t1), clock.cpu_seconds(t0, t1)
"""
from __future__ import annotations

import bisect
import threading
import time

_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
           "/jax/core/compile/backend_compile_duration")
SAMPLE_S = 0.05


class Clock:
    def __init__(self):
        import jax.monitoring

        self._lock = threading.Lock()
        self._spans: list[tuple[float, float]] = []  # (start, end) time.time() of compile work
        self._samples_t: list[float] = [time.time()]
        self._samples_cpu: list[float] = [time.process_time()]
        jax.monitoring.register_event_time_span_listener(self._on_span)
        threading.Thread(target=self._sample, name="pn_jax-cpu-sampler", daemon=True).start()

    def _on_span(self, event, start, end, **_):
        if event in _EVENTS:
            with self._lock:
                self._spans.append((start, end))

    def _sample(self):
        while True:
            time.sleep(SAMPLE_S)
            t, c = time.time(), time.process_time()
            with self._lock:
                self._samples_t.append(t)
                self._samples_cpu.append(c)

    def compile_seconds(self, a: float, b: float) -> float:
        """Seconds within [a, b] in which JAX traced, lowered or compiled (merged spans)."""
        with self._lock:
            spans = sorted(self._spans)
        total, cur_s, cur_e = 0.0, None, None
        for s, e in spans:
            s, e = max(s, a), min(e, b)
            if e <= s:
                continue
            if cur_e is None or s > cur_e:
                if cur_e is not None:
                    total += cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        if cur_e is not None:
            total += cur_e - cur_s
        return total

    def _cpu_at(self, t: float) -> float:
        now_t, now_c = time.time(), time.process_time()
        with self._lock:
            ts, cs = self._samples_t + [now_t], self._samples_cpu + [now_c]
        i = bisect.bisect_left(ts, t)
        if i <= 0:
            return cs[0]
        if i >= len(ts):
            return cs[-1]
        t0, t1, c0, c1 = ts[i - 1], ts[i], cs[i - 1], cs[i]
        return c0 + (c1 - c0) * ((t - t0) / (t1 - t0) if t1 > t0 else 1.0)

    def cpu_seconds(self, a: float, b: float) -> float:
        """CPU seconds of this process (all threads) within [a, b]."""
        return max(0.0, self._cpu_at(b) - self._cpu_at(a))


_CLOCK: list = []


def clock() -> Clock:
    if not _CLOCK:
        _CLOCK.append(Clock())
    return _CLOCK[0]


def summary(intervals: dict) -> dict:
    """{stage: [(start, end), ...]} -> {stage: wall_s, compile_s, run_s, cpu_s, cpu_percent}."""
    c = clock()
    out = {}
    for name, spans in intervals.items():
        wall = sum(b - a for a, b in spans)
        comp = sum(c.compile_seconds(a, b) for a, b in spans)
        cpu = sum(c.cpu_seconds(a, b) for a, b in spans)
        out[name] = {"wall_s": wall, "compile_s": comp, "run_s": max(0.0, wall - comp), "cpu_s": cpu,
                     "cpu_percent": 100.0 * cpu / wall if wall > 0 else None}
    return out
