"""Command-line options that several commands share."""
from __future__ import annotations


def add_engine_argument(p, **kw) -> None:
    from fromage.runtime.generate import ENGINES  # imported when a parser is built, not at CLI start
    p.add_argument("--engine", choices=ENGINES, help="decoder engine: native (C kernels, for fused Llama bundles on "
                   "the CPU), onnxruntime, or auto (default: native where it runs)", **(kw or {"default": "auto"}))


def kv_cache_list(text: str) -> list[str]:
    """"f32,f16" -> ["f32", "f16"] (in that order, unique); FromageError naming --kv-cache otherwise."""
    from fromage.runtime.errors import FromageError
    from fromage.runtime.generate import KV_CACHES
    kinds = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    if not kinds or any(k not in KV_CACHES for k in kinds):
        raise FromageError(f"--kv-cache {text!r}: give {' or '.join(KV_CACHES)} (or both, comma-separated, where a "
                           "bench compares them)")
    return kinds


def add_kv_cache_argument(p, help: str | None = None, several: str = "") -> None:
    """--kv-cache: one type, or with `several` (where a bench compares them, said in the help) a comma-separated
    list that the command reads with kv_cache_list."""
    from fromage.runtime.generate import KV_CACHES  # imported when a parser is built, not at CLI start
    p.add_argument("--kv-cache", default="f32", **({"metavar": "TYPE"} if several else {"choices": KV_CACHES}),
                   help=(help or "KV cache elements: f32 (default), or f16 with the native engine: half the cache's "
                                 "memory and attention reads, at fp16's precision (llama.cpp's default cache type)")
                   + (f"; {several}" if several else ""))


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
