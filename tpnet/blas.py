"""Use the system's OpenBLAS for MLX's CPU matmuls when there is one.

The `mlx[cpu]` wheel links the reference BLAS, whose matmuls do not get
faster per row as rows are added: a step of 64 tokens costs 64 single-token
steps. OpenBLAS makes such a step about 30x faster here, which is what lets
prompt processing, batching and speculative verification pay on a CPU.

Loading it with RTLD_GLOBAL before MLX is imported puts its BLAS symbols
first in the process's global scope, where MLX's own lookups find them. This
must run before `import mlx`; tpnet/__init__.py calls it. TPNET_BLAS=bundled
keeps MLX's own BLAS.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

CANDIDATES = (
    "/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/*-linux-gnu/openblas-serial/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

loaded: str | None = None


def use_system_openblas() -> str | None:
    """Load the first OpenBLAS found (Linux only); return its path."""
    global loaded
    if loaded or sys.platform != "linux" or os.environ.get("TPNET_BLAS") == "bundled":
        return loaded
    if "mlx.core" in sys.modules:
        return None  # too late: MLX already bound its BLAS
    # One thread per rank: the ranks of a machine share its cores.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    for pattern in CANDIDATES:
        for path in sorted(glob.glob(pattern)):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            loaded = path
            return loaded
    return None
