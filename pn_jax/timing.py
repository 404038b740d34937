"""Stage timings of a run: `timer("stage_s")` adds the seconds spent inside the `with` block;
`timer.stages()` adds each stage's compile seconds and CPU use (`pn_jax.stages`)."""
from __future__ import annotations

import time

from pn_jax import stages


class Timer(dict):
    """Stage name -> wall seconds (what results.json's `timings` holds). It also keeps each
    stage's wall intervals, from which `stages()` reads the compile seconds and the CPU use
    of every stage (`pn_jax.stages`). A stage is timed here (`with timer("name"):`) or by the
    code that ran it (`timer["name"] = seconds` as it ends; `update` with several stages that
    ran one after the other, in that order, ending now)."""

    SUMS = ("backbone_s", "aggregate_s")  # sums over batches inside other stages: no interval of their own

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.intervals: dict[str, list] = {}
        stages.clock()  # compile events are seen from now on

    def __call__(self, name):
        timer = self

        class _T:
            def __enter__(self):
                self.t0, self.w0 = time.perf_counter(), time.time()

            def __exit__(self, *exc):
                dict.__setitem__(timer, name, timer.get(name, 0.0) + time.perf_counter() - self.t0)
                timer.intervals.setdefault(name, []).append((self.w0, time.time()))

        return _T()

    def _ended(self, name, seconds, end):
        delta = seconds - self.get(name, 0.0)
        if name not in self.SUMS and delta > 0:
            self.intervals.setdefault(name, []).append((end - delta, end))
        return delta

    def __setitem__(self, name, seconds):
        self._ended(name, seconds, time.time())
        dict.__setitem__(self, name, seconds)

    def update(self, other=(), **kwargs):
        items = list(dict(other, **kwargs).items())
        end = time.time()
        for name, seconds in reversed(items):
            end -= max(0.0, self._ended(name, seconds, end))
        dict.update(self, items)

    def stages(self) -> dict:
        """{stage: wall_s, compile_s, run_s, cpu_s, cpu_percent} for every timed stage."""
        return stages.summary(self.intervals)
