"""Command-line options that several commands share."""
from __future__ import annotations


def add_engine_argument(p, **kw) -> None:
    from fromage.runtime.generate import ENGINES  # imported when a parser is built, not at CLI start
    p.add_argument("--engine", choices=ENGINES, help="decoder engine: native (C kernels, for fused Llama bundles on "
                   "the CPU), onnxruntime, or auto (default: native where it runs)", **(kw or {"default": "auto"}))
