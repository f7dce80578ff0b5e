"""What fresh memory costs on this machine: ResNet-50's calibration accumulators (fit and held apart,
float64, Σ d² over its 54 layers, ~2 GB) allocated and first written two ways, then written again.

On a VM that hands freed pages back to its host (free-page reporting), the first touch of memory is a
host fault; `np.zeros` (calloc) maps zero pages that a first ``+=`` reads and then copies on write.

    python benchmarks/fresh_memory.py
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import numpy as np
from calib_speed import _folded, _kernel_share

from lrdeploy.planning.calibrate import LayerInput


def _timed(label: str, arrays: list[np.ndarray] | None, make, touch) -> list[np.ndarray]:
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    arrays = arrays if arrays is not None else [make(d) for d in DIMS for _ in range(2)]
    for array in arrays:
        touch(array)
    cpu, kernel, faults = _kernel_share(before, resource.getrusage(resource.RUSAGE_SELF))
    print(
        f"{label}: wall {time.perf_counter() - start:.2f} s, CPU {cpu:.2f} s, "
        f"kernel {kernel:.2f} s, {faults * 1e3:.0f} k faults"
    )
    return arrays


model = _folded(Path("out/bench"))
weights = {t.name: t for t in model.graph.initializer}
DIMS = [LayerInput.of(n, weights).dim for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
print(f"{2 * sum(d * d * 8 for d in DIMS) / 1e9:.2f} GB of float64 accumulators")
_timed("np.zeros, then +=", None, lambda d: np.zeros((d, d)), lambda a: a.__iadd__(1.0))
_timed("np.empty, then fill", None, lambda d: np.empty((d, d)), lambda a: a.fill(0.0))
kept = _timed("np.zeros, then += (again)", None, lambda d: np.zeros((d, d)), lambda a: a.__iadd__(1.0))
_timed("the same arrays written again", kept, None, lambda a: a.__iadd__(1.0))
