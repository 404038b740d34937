"""The coreset's random projection of host rows by numpy's BLAS, with the same bits for a row
whatever other rows share the call (`coreset.project_chunked` on CPUs, `streaming`, and the
blocks of rows the processes of a distributed fit hold: `sharding.coreset_indices_by_process`)."""
from __future__ import annotations

import numpy as np

# Below this many rows OpenBLAS's sgemm switches kernels (its small-matrix path: 1-7 rows at
# D = 1024, 1 row at D = 64..384, measured with numpy's scipy-openblas 0.3.31 on this AMD EPYC),
# which rounds a row differently. Padding a short call to this many rows keeps every row's
# projection the same bits whatever rows share its call: the last short chunk of a fit, a
# streamed chunk, or the block of rows one process of a distributed fit holds.
PROJECT_MIN_ROWS = 256


def project_host(rows: np.ndarray, proj: np.ndarray) -> np.ndarray:
    """numpy's float32 projection rows [R, D] @ proj [D, P], the same bits for a row in any call."""
    rows = np.asarray(rows, np.float32)
    if len(rows) >= PROJECT_MIN_ROWS or not len(rows):
        return np.matmul(rows, proj)
    padded = np.zeros((PROJECT_MIN_ROWS, rows.shape[1]), np.float32)
    padded[:len(rows)] = rows
    return np.matmul(padded, proj)[:len(rows)]
