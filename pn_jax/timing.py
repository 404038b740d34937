"""Stage timings of a run: `timer("stage_s")` adds the seconds spent inside the `with` block."""
from __future__ import annotations

import time


class Timer(dict):
    def __call__(self, name):
        timer = self

        class _T:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer[name] = timer.get(name, 0.0) + time.perf_counter() - self.t0

        return _T()
