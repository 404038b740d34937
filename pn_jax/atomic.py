"""A file written whole or not at all: the content goes to a sibling temporary file, which is
renamed onto the final name only once it is complete (a half-written result never passes for a
good one). `export` keeps its own fsync'ing copy: it must import nothing but jax and numpy."""
from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def replacing(path: str, suffix: str = ".tmp"):
    """Yield `path + suffix` to write; on success rename it onto `path`, on error remove it.
    `suffix` keeps an extension where the writer reads the format from it (".tmp.png")."""
    tmp = path + suffix
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
