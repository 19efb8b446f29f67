"""What every engine offers: a compiled graph run with named inputs and outputs, and the thread default.

An *engine* is a backend that runs graphs: the native C decoder (native.py) or ONNX Runtime
(onnxruntime.py). `Fromage.engine` names the one that runs the decoder."""
from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from .errors import ParameterError


class Graph(Protocol):
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        """Run the graph; returns the requested outputs (all, by default) in order."""
        ...


def default_threads() -> int:
    """The cores this process may run on (affinity and cpusets included), for engines' thread pools."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


MAX_THREADS_PER_CORE = 2  # more threads than this per core only slow decoding down (and hung ONNX Runtime)


def resolve_threads(threads: int | None) -> int:
    """The thread count an engine uses: `threads`, checked, or all the cores this process may use."""
    if threads is None:
        return default_threads()
    cores = default_threads()
    limit = MAX_THREADS_PER_CORE * cores
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= limit:
        raise ParameterError("threads", f"must be a whole number from 1 to {limit} ({cores} cores for this "
                                        f"process), got {threads!r}")
    return threads
