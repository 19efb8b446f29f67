"""Command-line options that several commands share."""
from __future__ import annotations


def add_engine_argument(p, **kw) -> None:
    from fromage.runtime.generate import ENGINES  # imported when a parser is built, not at CLI start
    p.add_argument("--engine", choices=ENGINES, help="decoder engine: native (C kernels, for fused Llama bundles on "
                   "the CPU), onnxruntime, or auto (default: native where it runs)", **(kw or {"default": "auto"}))


def int_list(text: str, flag: str, example: str, low: int, high: int | None = None) -> list[int]:
    """"1,8,16" -> [1, 8, 16] (sorted, unique), each within [low, high]; FromageError naming the flag otherwise."""
    from fromage.runtime.errors import FromageError
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise FromageError(f"{flag} {text!r}: give numbers like {example}") from None
    if not values or values[0] < low or (high is not None and values[-1] > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise FromageError(f"{flag} {text!r}: the numbers must be {bounds}")
    return values
