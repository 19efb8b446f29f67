"""The engine interface: run one compiled graph with named inputs and outputs."""
from __future__ import annotations

from typing import Protocol

import numpy as np


class Engine(Protocol):
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        """Run the graph; returns the requested outputs (all, by default) in order."""
        ...
