"""What the experiments share: number formatting, markdown tables, and the description of the
machine that every speed figure is printed beside (CPU model and flags, cores, load)."""
from __future__ import annotations

import math
import os
import platform


def fmt(x, spec: str = "%.3g") -> str:
    """A number for a table: "-" for None, NaN and inf; `spec` in %-style or format() style."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return spec % x if spec.startswith("%") else format(x, spec)


def md_table(header, rows) -> list[str]:
    """Markdown table lines: a header row, the separator, then one line per row of cells."""
    return ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(map(str, r)) + " |" for r in rows]


def load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def machine() -> dict:
    """This machine, for the JSON beside every timing."""
    import jax

    from pn_jax import hardware

    return {"cpu": hardware.describe_cpu(), "cpus": hardware.usable_cores(), "platform": platform.platform(),
            "host": platform.node(), "jax": jax.__version__, "backend": jax.default_backend(),
            "loadavg": load(), "knn_ranking": hardware.knn_ranking()}
